"""Triton kernels and their launchers, installed as `dbrx_fast.kernels` (never as a top-level `kernels` module).

Imports torch and triton only. Each module: a docstring, autotune configs, `@triton.jit` kernels, launchers that
check, allocate and launch, and `compile_specs()` for the compile-for-GPU check.
"""
