"""Triton kernels and their launchers, installed as `dbrx_fast.kernels` (never as a top-level `kernels` module).

Imports torch and triton only. Each module: a docstring, autotune configs, `@triton.jit` kernels, launchers that
check, allocate and launch, and `compile_specs()` for the compile-for-GPU check.

Importing this package with a Triton older than `MIN_TRITON` raises ImportError: the kernels use 3.6's language and
compiler interfaces, and their tiles are checked to compile without spills only with 3.6 and newer (see
benchmarks/results/compile-check/), so an older Triton would fail inside a kernel or run configs nobody checked.
"""

import os
import re

import triton

MIN_TRITON = (3, 6)


def triton_version_problem(version: str) -> str | None:
    """Why Triton `version` (a `triton.__version__` string) cannot run the kernels, or None when it can."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return f"dbrx_fast.kernels cannot read the Triton version {version!r}; it needs Triton >= 3.6"
    if tuple(int(part) for part in match.groups()) < MIN_TRITON:
        return (
            f"dbrx_fast.kernels needs Triton >= 3.6, found {version}: upgrade it (pip install 'triton>=3.6'), "
            "or patch the model with backend='torch'"
        )
    return None


if (_problem := triton_version_problem(triton.__version__)) is not None:
    raise ImportError(_problem)

if os.environ.get("TRITON_INTERPRET") == "1":
    # Every interpreted kernel then multiplies as a GPU's tensor cores do (see interpreter.py).
    from .interpreter import install_gpu_dot

    install_gpu_dot()
