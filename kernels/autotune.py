"""Autotune configs, pinned to one under the Triton interpreter or with DBRX_FAST_AUTOTUNE=0.

The interpreter cannot run a multi-config autotuner, and a pinned config makes CPU tests deterministic. Every
autotuner made by `autotune` keeps its full config list as `all_configs`, so that tests can run each config in turn
(`forced_config`), not only the pinned one.

An autotuner that meets a new key during CUDA-graph capture raises a RuntimeError that says what to run first,
instead of benchmarking its configs there (which synchronises the device and breaks the capture deep inside a
launch). dbrx_fast's modules check their calls' keys before they launch (`backend.check_capturable`); this guard, on
the tuner's own key, catches what those approximate keys miss.
"""

import os
from contextlib import contextmanager

import torch
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
        tuner._bench = _refused_in_capture(tuner._bench, fn.__name__)
        return tuner

    return wrap


def _refused_in_capture(bench, name: str):
    """Triton's `Autotuner._bench` (what it times each config with when a key is new; 3.6 to 3.9 alike), refused
    while the current CUDA stream is being captured."""

    def guarded(*args, **kwargs):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"dbrx_fast: {name} meets a new autotune key inside CUDA-graph capture, where Triton cannot benchmark "
                "its configs. Run the step once before capturing (on the capture's side stream, as torch advises; "
                "dbrx_fast.warmup(model, max_tokens=N) covers the decode batch sizes of the MoE kernels)."
            )
        return bench(*args, **kwargs)

    return guarded


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
