"""Which implementation serves a call: the Triton kernels, the eager reference ("torch"), or the stock module.

The choice is made per call from the tensors at hand, so a patched model can move between devices and dtypes.
A call the fast path cannot serve falls back to the stock module with a one-time warning that says why.
"""

import os
import warnings

import torch

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"dbrx_fast: {message}", stacklevel=3)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(backend: str, device: torch.device) -> str:
    """'auto' is Triton on CUDA and torch elsewhere; 'triton' off CUDA needs the interpreter."""
    if backend == "torch":
        return "torch"
    if device.type == "cuda":
        return "triton"
    if backend == "auto":
        return "torch"
    if interpreter_enabled():
        return "triton"
    raise RuntimeError(
        f"dbrx_fast: backend='triton' needs CUDA tensors (got {device}); to run the kernels on the CPU, set "
        "TRITON_INTERPRET=1 in the environment before triton is first imported (transformers imports it), or patch "
        "with backend='auto' or 'torch'."
    )


def choose_path(backend: str, op: str, x: torch.Tensor, *params: torch.Tensor) -> str:
    """'triton', 'torch' or 'stock' for one call of `op` on input `x` with parameters `params`."""
    devices = {x.device, *(p.device for p in params)}
    if len(devices) > 1:
        warn_once(f"{op}: tensors on several devices ({sorted(map(str, devices))}); using the stock path.")
        return "stock"
    if torch.is_autocast_enabled(x.device.type):
        warn_once(f"{op}: autocast is enabled; using the stock path, whose dtype rules autocast defines.")
        return "stock"
    path = resolve(backend, x.device)
    if path == "triton" and x.dtype not in TRITON_DTYPES:
        warn_once(f"{op}: the Triton kernels take fp32, fp16 or bf16, not {x.dtype}; using the stock path.")
        return "stock"
    return path
