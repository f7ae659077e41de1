"""Autotune configs, pinned to one under the Triton interpreter or with DBRX_FAST_AUTOTUNE=0.

The interpreter cannot run a multi-config autotuner, and a pinned config makes CPU tests deterministic.
"""

import os


def autotune_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("DBRX_FAST_AUTOTUNE", "1") != "0"


def pick(configs: list, pinned: int = 0) -> list:
    """All configs when autotuning, else only configs[pinned]."""
    return configs if autotune_enabled() else [configs[pinned]]
