"""TF32 mode for the expert-kernel tests: torch's matmul precision, and a baseline that multiplies as TF32 dots do.

With TF32 allowed, an fp32 Triton `tl.dot` reads each operand with its low 13 mantissa bits cut off (Triton passes
the fp32 registers to the tensor cores unrounded; see kernels/interpreter.py). The stock baseline in that mode is the
same fp32 computation with every matmul's operands truncated likewise, written here independently of the kernels.
"""

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


@contextmanager
def matmul_precision(precision: str):
    """torch.set_float32_matmul_precision(precision) within the block, restored after."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 values as a TF32 dot reads them: the 13 low mantissa bits cleared (toward zero); NaN stays NaN."""
    cut = (t.view(torch.int32) & ~0x1FFF).view(torch.float32)
    return torch.where(t.isnan(), t, cut)


class TF32Matmuls(TorchDispatchMode):
    """Within the block, every fp32 mm, bmm and addmm, autograd's backward ones included, multiplies TF32-truncated
    operands exactly (in float64) and rounds the result once to fp32: a TF32 dot with an ideal fp32 accumulator."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.mm.default, aten.bmm.default) and args[0].dtype == torch.float32 and not kwargs:
            return (tf32(args[0]).double() @ tf32(args[1]).double()).float()
        if func is aten.addmm.default and args[1].dtype == torch.float32 and not kwargs:
            bias, a, b = args
            return (bias.double() + tf32(a).double() @ tf32(b).double()).float()
        return func(*args, **kwargs)
