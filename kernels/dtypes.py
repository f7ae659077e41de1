"""The torch dtypes the kernels take, their names in a Triton signature, and the check that names any other."""

import torch

TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def check_dtype(name: str, t: torch.Tensor) -> None:
    """TypeError unless t is bf16, fp16 or fp32; `name` says whose tensor it is ("layernorm: x"). float64 has a
    message of its own: the callers fall back to the eager (torch) path for it."""
    if t.dtype == torch.float64:
        raise TypeError(
            f"{name} is float64; the Triton kernels take float16, bfloat16 or float32: use the eager (torch) path"
        )
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
