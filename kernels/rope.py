"""Rotary position embedding of q and k in one launch, forward and backward.

q [B, Hq, S, D] and k [B, Hkv, S, D] may have any strides but a unit stride on the head dimension (in DBRX they are
views of one fused qkv projection); cos and sin are [Bc, S, D] with Bc = 1 (shared by the batch) or Bc = B, in any
float dtype, and follow Hugging Face's rotate-half convention: their two halves repeat, so only the first D/2
columns are read. The results are new contiguous [B, H, S, D] tensors in q's dtype:

    out[..., :D/2] = x1 * cos - x2 * sin        out[..., D/2:] = x2 * cos + x1 * sin

with x1, x2 the two halves of x and every product in float32: bf16 angles or tables are a known instability at
theta 500000 and long positions, and the float32 maths rounds once, on the store. The rotation is orthogonal, so
its backward is the inverse rotation: the same kernel with sin negated (BACKWARD=True), no -sin tensor allocated.

Each program owns BLOCK_S positions of one batch entry and HEADS_PER_PROGRAM heads of the concatenated list
[q heads..., k heads...]: it loads its cos/sin tile once and rotates every head it owns with it.
Limits: D even, a power of two, at most 256; fp16, bf16 or fp32 q/k (float64 is refused with a TypeError so that a
caller can fall back to the eager path).
"""

import torch
import triton
import triton.language as tl

from .autotune import autotune
from .compile_spec import CompileSpec, config_spec
from .dtypes import TRITON_DTYPES, check_dtype
from .launch import launch

MAX_HEAD_DIM = 256


def _configs() -> list[triton.Config]:
    # BLOCK_S * D/2 / (32 * num_warps) stays <= 16 elements per thread at D = 256, so that the cos/sin tile held
    # across the head loop, the two halves and the two results never spill; at D = 128 a thread moves 8 bf16
    # (16 bytes) per half.
    return [
        triton.Config({"BLOCK_S": bs, "HEADS_PER_PROGRAM": hp}, num_warps=nw)
        for bs, hp, nw in ((16, 4, 4), (16, 8, 4), (8, 8, 2), (32, 4, 8), (32, 8, 8), (64, 2, 16))
    ]


@triton.jit
def rotate_halves(x1, x2, cos, sin):
    """The rotate-half rotation of x = [x1, x2] (float32 tiles): [x1 * cos - x2 * sin, x2 * cos + x1 * sin]."""
    return (x1 * cos - x2 * sin), (x2 * cos + x1 * sin)


@triton.jit
def _rotate_tile(
    x_ptr,
    out_ptr,
    offs_x,
    offs_out,
    mask,
    cos,
    sin,
    HALF: tl.constexpr,
):
    """Rotate one [BLOCK_S, D] tile: the halves x1 = x[:, :HALF] and x2 = x[:, HALF:] mix through cos and sin."""
    x1 = tl.load(x_ptr + offs_x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs_x + HALF, mask=mask, other=0.0).to(tl.float32)
    y1, y2 = rotate_halves(x1, x2, cos, sin)
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs_out, y1.to(out_ty), mask=mask)
    tl.store(out_ptr + offs_out + HALF, y2.to(out_ty), mask=mask)


# seq_len is left out of the key on purpose: generation changes it at every step, and tuning again for every prompt
# length would cost far more than a better config saves on this memory-bound kernel. For the same reason it is not
# specialised on (a decode step's seq_len = 1 would otherwise compile a kernel of its own): it only bounds a mask.
# The strides keep their specialisation, which vectorises the loads: those that change with seq_len are multiples
# of HEAD_DIM, so from HEAD_DIM = 16 on their divisibility by 16, and with it the compiled kernel, stays the same.
@autotune(_configs(), key=["n_heads_q", "n_heads_k", "HEAD_DIM", "BACKWARD"])
@triton.jit(do_not_specialize=["seq_len"])
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    n_heads_q,
    n_heads_k,
    seq_len,
    stride_q_b,
    stride_q_h,
    stride_q_s,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_cos_b,
    stride_cos_s,
    stride_sin_b,
    stride_sin_s,
    HEAD_DIM: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    # int64 from here on: batch, head and position offsets into a fused qkv activation can pass 2**31.
    offs_s = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    head_start = tl.program_id(1).to(tl.int64) * HEADS_PER_PROGRAM
    b = tl.program_id(2).to(tl.int64)

    offs_d = tl.arange(0, HALF)
    mask = (offs_s < seq_len)[:, None]

    cos = tl.load(cos_ptr + b * stride_cos_b + offs_s[:, None] * stride_cos_s + offs_d[None, :], mask=mask, other=0.0)
    sin = tl.load(sin_ptr + b * stride_sin_b + offs_s[:, None] * stride_sin_s + offs_d[None, :], mask=mask, other=0.0)
    cos = cos.to(tl.float32)
    sin = sin.to(tl.float32)
    if BACKWARD:
        sin = -sin

    # Outputs are contiguous [B, H, S, D].
    offs_out = offs_s[:, None] * HEAD_DIM + offs_d[None, :]
    # A program's heads can straddle the end of q and the start of k: a branch per head picks the tensor.
    for i in range(HEADS_PER_PROGRAM):
        h = head_start + i
        if h < n_heads_q:
            _rotate_tile(
                q_ptr + b * stride_q_b + h * stride_q_h,
                q_out_ptr + (b * n_heads_q + h) * seq_len * HEAD_DIM,
                offs_s[:, None] * stride_q_s + offs_d[None, :],
                offs_out,
                mask,
                cos,
                sin,
                HALF,
            )
        elif h < n_heads_q + n_heads_k:
            h = h - n_heads_q
            _rotate_tile(
                k_ptr + b * stride_k_b + h * stride_k_h,
                k_out_ptr + (b * n_heads_k + h) * seq_len * HEAD_DIM,
                offs_s[:, None] * stride_k_s + offs_d[None, :],
                offs_out,
                mask,
                cos,
                sin,
                HALF,
            )


def check_table(op: str, name: str, t: torch.Tensor, x: torch.Tensor, batch: int, seq_len: int, head_dim: int):
    """cos or sin [1 or B, S, D] on x's device, as a [B, S, D] view with unit stride on D (errors name `op`)."""
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the activations are on {x.device}")
    if t.dim() != 3 or t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != (seq_len, head_dim):
        raise ValueError(
            f"{op}: {name} must be [1 or {batch}, {seq_len}, {head_dim}] for {tuple(x.shape)}, got {tuple(t.shape)}"
        )
    # The kernel reads rows of the table with unit stride; the table is small, so a copy is cheap when it is not.
    t = t if t.stride(-1) == 1 else t.contiguous()
    # A table shared by the batch is read through a zero batch stride.
    return t.expand(batch, seq_len, head_dim)


@torch.library.triton_op("dbrx_fast::rope", mutates_args={})
def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, S, D] and k [B, Hkv, S, D] by cos/sin [1 or B, S, D]; new contiguous tensors in q's dtype.

    backward=True applies the inverse rotation, which is the gradient of the forward with respect to q and k.
    """
    for name, t in (("q", q), ("k", k)):
        check_dtype(f"rope: {name}", t)
        if t.dim() != 4:
            raise ValueError(f"rope: {name} must be [B, H, S, D], got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"rope: {name} must have a unit stride on its last dimension, got strides {t.stride()}")
    if k.dtype != q.dtype:
        raise TypeError(f"rope: q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"rope: q is on {q.device} but k is on {k.device}")
    batch, n_heads_q, seq_len, head_dim = q.shape
    n_heads_k = k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq_len, head_dim):
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must share B, S and D")
    if head_dim < 2 or head_dim > MAX_HEAD_DIM or head_dim & (head_dim - 1):
        raise ValueError(f"rope: head dim must be an even power of two <= {MAX_HEAD_DIM}, got {head_dim}")
    cos = check_table("rope", "cos", cos, q, batch, seq_len, head_dim)
    sin = check_table("rope", "sin", sin, q, batch, seq_len, head_dim)

    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    if q_out.numel() + k_out.numel() == 0:
        return q_out, k_out

    def grid(meta):
        return (
            triton.cdiv(seq_len, meta["BLOCK_S"]),
            triton.cdiv(n_heads_q + n_heads_k, meta["HEADS_PER_PROGRAM"]),
            batch,
        )

    launch(
        _rope_kernel,
        grid,
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        n_heads_q,
        n_heads_k,
        seq_len,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        cos.stride(0),
        cos.stride(1),
        sin.stride(0),
        sin.stride(1),
        HEAD_DIM=head_dim,
        BACKWARD=backward,
    )
    return q_out, k_out


def compile_specs() -> list[CompileSpec]:
    """One spec per (dtype, head dim 64 and 128, direction, autotune config) the launcher can use."""
    specs = []
    ints = (
        "n_heads_q n_heads_k seq_len stride_q_b stride_q_h stride_q_s stride_k_b stride_k_h stride_k_s "
        "stride_cos_b stride_cos_s stride_sin_b stride_sin_s"
    ).split()
    for ty in TRITON_DTYPES.values():
        signature = {
            "q_ptr": f"*{ty}",
            "k_ptr": f"*{ty}",
            "cos_ptr": "*fp32",
            "sin_ptr": "*fp32",
            "q_out_ptr": f"*{ty}",
            "k_out_ptr": f"*{ty}",
            **dict.fromkeys(ints, "i32"),
        }
        for head_dim in (64, 128):
            for backward in (False, True):
                for config in _configs():
                    label = f"rope {ty} D={head_dim} backward={backward}"
                    meta = {"HEAD_DIM": head_dim, "BACKWARD": backward}
                    specs.append(config_spec(label, _rope_kernel.fn, signature, meta, config))
    return specs
