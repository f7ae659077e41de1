"""Autotune configs, pinned to one under the Triton interpreter or with DBRX_FAST_AUTOTUNE=0.

The interpreter cannot run a multi-config autotuner, and a pinned config makes CPU tests deterministic. Every
autotuner made by `autotune` keeps its full config list as `all_configs`, so that tests can run each config in turn
(`forced_config`), not only the pinned one.
"""

import os
from contextlib import contextmanager

import triton


def autotune_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("DBRX_FAST_AUTOTUNE", "1") != "0"


def pick(configs: list, pinned: int = 0) -> list:
    """All configs when autotuning, else only configs[pinned]."""
    return configs if autotune_enabled() else [configs[pinned]]


def autotune(configs: list, key: list[str], **kwargs):
    """`triton.autotune` over `pick(configs)`; the autotuner keeps the full list as `all_configs`."""

    def wrap(fn):
        tuner = triton.autotune(configs=pick(configs), key=key, **kwargs)(fn)
        tuner.all_configs = list(configs)
        return tuner

    return wrap


@contextmanager
def forced_config(tuner, config: triton.Config):
    """Within the block, `tuner` (an autotuner made by `autotune`) launches with `config` alone, as if pinned."""
    saved_configs, saved_cache = tuner.configs, dict(tuner.cache)
    tuner.configs = [config]
    tuner.cache.clear()
    try:
        yield
    finally:
        tuner.configs = saved_configs
        tuner.cache.clear()
        tuner.cache.update(saved_cache)
