"""The Triton interpreter made to compute as a GPU does: tl.dot's operand precision, and the NaN rule of float max/min.

On a GPU, `tl.max` / `tl.min` and `tl.maximum` / `tl.minimum` (default `propagate_nan=NONE`) lower to llvm.maxnum /
minnum, PTX `max.f32` / `min.f32`, which ignore a NaN operand (all-NaN gives NaN). The interpreter follows that rule
for the reductions (np.nanmax, Triton 3.6 to 3.9) and for the elementwise ops in 3.9 (np.fmax), but Triton 3.6's
elementwise maxnumf / minnumf are np.maximum / np.minimum, which propagate NaN. `propagate_nan=ALL` (PTX
`max.NaN.f32`) propagates in every version, and is left alone here.

`nan_rule("gpu")` makes any supported Triton's interpreter follow the GPU; `nan_rule("propagate")` makes it
propagate NaN instead, so that a test can show that a kernel's outputs do not depend on the rule.

`install_gpu_dot()` makes the interpreter's tl.dot multiply as a GPU's tensor cores do (bf16 and fp16 exact, TF32
truncated, fp32 accumulation; see `gpu_create_dot`); kernels/__init__.py installs it under TRITON_INTERPRET=1.
"""

from contextlib import contextmanager

import numpy as np
import triton.language as tl
from triton._C.libtriton import ir as _ir
from triton.runtime import interpreter

# rule -> (elementwise max, elementwise min, max reduction, min reduction)
RULES = {
    "gpu": (np.fmax, np.fmin, np.nanmax, np.nanmin),
    "propagate": (np.maximum, np.minimum, np.max, np.min),
}
_REDUCTION = {np.nanmax: 2, np.max: 2, np.nanmin: 3, np.min: 3}


@contextmanager
def nan_rule(rule: str):
    """Within the block, the interpreter's NaN-ignoring float max and min (maxnumf / minnumf and the tl.max / tl.min
    reductions) follow `rule`: "gpu" (ignore NaN, as PTX max.f32 does) or "propagate"."""
    ops = RULES[rule]
    builder, reduce_ops = interpreter.InterpreterBuilder, interpreter.ReduceOps
    saved = builder.create_maxnumf, builder.create_minnumf, reduce_ops.min_max
    real_min_max = reduce_ops.min_max

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        # Only plain max / min: argmax / argmin pass an index op as well, and keep their own rule.
        if idx_reduce_op is None and val_reduce_op in _REDUCTION:
            val_reduce_op = ops[_REDUCTION[val_reduce_op]]
        return real_min_max(self, input, val_reduce_op, idx_reduce_op)

    builder.create_maxnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, ops[0])
    builder.create_minnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, ops[1])
    reduce_ops.min_max = min_max
    try:
        yield
    finally:
        builder.create_maxnumf, builder.create_minnumf, reduce_ops.min_max = saved


# The GPU's tl.dot on the interpreter.
#
# The interpreter's `InterpreterBuilder.create_dot` hands the operands' storage arrays to np.matmul. bf16 is stored as
# uint16, so a bf16 dot multiplies bit patterns; and an fp32 dot is full fp32 whatever its input_precision. On a GPU,
# 16-bit operands enter the tensor cores exactly and products accumulate in fp32; an fp32 dot with input_precision
# "tf32" (tl.dot's default) sees each operand with its low 13 mantissa bits cut off. Triton does not round: the PTX
# that Triton 3.6 and 3.9 emit for sm_80 and sm_90 feeds the fp32 values to mma.sync / wgmma `.tf32` unconverted
# (only "tf32x3" rounds, with cvt.rna.tf32.f32), and the SASS has no conversion either (sm_90's HGMMA reads the tiles
# straight from shared memory); the tensor cores then ignore those bits, so TF32 in Triton truncates, where cuBLAS
# rounds (Triton's maintainers in triton-lang/triton#4574: adding cvt.rna made it match torch). `gpu_create_dot` does
# the same in numpy; other operand types (int8, fp8, fp64) and the other precisions keep the interpreter's rule.
_TF32_MASK = np.uint32(0xFFFFE000)  # sign, exponent and the 10 mantissa bits TF32 keeps
# The interpreter's own, also when this module is imported again after `install_gpu_dot`.
interpreter_create_dot = getattr(
    interpreter.InterpreterBuilder.create_dot, "interpreter_create_dot", interpreter.InterpreterBuilder.create_dot
)


def tf32_truncate(x: np.ndarray) -> np.ndarray:
    """fp32 values as a GPU's tensor cores read them in a TF32 dot: the low 13 mantissa bits dropped (toward zero).
    NaN stays NaN (a payload only in those bits would otherwise become inf)."""
    cut = (x.view(np.uint32) & _TF32_MASK).view(np.float32)
    return np.where(np.isnan(x), x, cut)


def _dot_operand(t, input_precision) -> np.ndarray:
    """An operand's values in fp32, exactly as the GPU's dot multiplies them."""
    if t.dtype == tl.bfloat16:
        return (t.data.astype(np.uint32) << 16).view(np.float32)
    if t.dtype == tl.float16:
        return t.data.astype(np.float32)
    if input_precision == _ir.INPUT_PRECISION.TF32:
        return tf32_truncate(t.data)
    return t.data


def gpu_create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """`InterpreterBuilder.create_dot` with the GPU's numerics for bf16, fp16 and fp32 operands (see above)."""
    if a.dtype not in (tl.bfloat16, tl.float16, tl.float32) or d.dtype != tl.float32:
        return interpreter_create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
    product = np.matmul(_dot_operand(a, input_precision), _dot_operand(b, input_precision), dtype=np.float32)
    return interpreter.TensorHandle(product + d.data, tl.float32)


gpu_create_dot.interpreter_create_dot = interpreter_create_dot


def install_gpu_dot() -> None:
    """Make the interpreter's tl.dot the GPU's (idempotent). Kernel modules call this at import under
    TRITON_INTERPRET=1, so every interpreted kernel multiplies as on the hardware."""
    interpreter.InterpreterBuilder.create_dot = gpu_create_dot
