"""Which implementation serves a call: the Triton kernels, the eager reference ("torch"), or the stock module.

The choice is made per call from the tensors at hand, so a patched model can move between devices and dtypes.
A call the fast path cannot serve falls back to the stock module with a one-time warning that says why. Autocast is
not a reason to fall back: the modules apply autocast's dtype rules themselves (see modules.py).
"""

import os
import warnings

import torch

BACKENDS = ("auto", "triton", "torch")
# kernels/dtypes.py's, repeated: this module must import without the kernels package (a Triton too old for it).
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
    path = resolve(backend, x.device)
    if path == "triton" and x.dtype not in TRITON_DTYPES:
        warn_once(f"{op}: the Triton kernels take fp32, fp16 or bf16, not {x.dtype}; using the stock path.")
        return "stock"
    return path


# Autotune keys (and the device, dtype and grad mode they ran in) of the Triton calls made outside CUDA-graph capture.
_ran_keys: set[tuple] = set()


def row_bucket(num_rows: int) -> int:
    """The MoE kernels' autotune row bucket: triton.next_power_of_2(num_rows), without importing triton on the torch
    path."""
    return 1 << max(num_rows - 1, 0).bit_length()


def capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream of `device` is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_capturable(op: str, x: torch.Tensor, *key) -> None:
    """Record a Triton call of `op` on input `x` with autotune key `key`; during CUDA-graph capture, refuse a key that
    never ran: Triton would autotune it (benchmarking configs synchronises the device) or compile it inside the capture,
    which fails deep inside a kernel launch. `dbrx_fast.warmup` runs every key a decode step can use."""
    if torch.compiler.is_compiling():
        return  # torch.compile traces the call; the launch happens (and is checked) in eager code or not at all
    entry = (op, str(x.device), x.dtype, torch.is_grad_enabled(), *key)
    if not capturing(x.device):
        _ran_keys.add(entry)
    elif entry not in _ran_keys:
        raise RuntimeError(
            f"dbrx_fast: {op} is being captured into a CUDA graph with an autotune key it has not run with before "
            f"({', '.join(map(str, entry[1:]))}): Triton would autotune or compile inside the capture. Call "
            "dbrx_fast.warmup(model, max_tokens=N), N at least the tokens of the captured step, before capturing."
        )
