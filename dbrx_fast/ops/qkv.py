"""Differentiable QKV post-processing: clamp, split into heads and RoPE in one kernel, forward and backward."""

import torch

from dbrx_fast.kernels.qkv_rope import qkv_rope_bwd, qkv_rope_fwd, qkv_rope_fwd_into_cache


class QkvRopeFunction(torch.autograd.Function):
    """qkv [B, S, (Hq + 2*Hkv) * D] -> (q [B, Hq, S, D], k, v [B, Hkv, S, D]), new contiguous tensors.

    The gradient is the inverse rotation of dq and dk (and dv as it is), masked where the clamp was active: qkv is
    saved for that mask only when clip_qkv is set."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, clip_qkv, num_heads, num_kv_heads):
        ctx.clip_qkv = clip_qkv
        # Without a clamp the backward needs nothing of qkv: it is not kept alive for it.
        ctx.save_for_backward(qkv if clip_qkv is not None else None, cos, sin)
        return qkv_rope_fwd(qkv, cos, sin, clip_qkv, num_heads, num_kv_heads)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        qkv, cos, sin = ctx.saved_tensors
        # The kernel reads rows with unit stride; an incoming gradient can be an expanded or transposed view.
        grads = [g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k, grad_v)]
        grad_qkv = qkv_rope_bwd(*grads, qkv, cos, sin, ctx.clip_qkv)
        # cos, sin: position tables, not trained; clip_qkv, num_heads, num_kv_heads: not tensors.
        return grad_qkv, None, None, None, None, None


def qkv_rope(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    clip_qkv: float | None,
    num_heads: int,
    num_kv_heads: int,
    *,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    cache_position: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DBRX's q, k, v from its fused projection qkv [B, S, (Hq + 2*Hkv) * D] (any strides, unit on the last):
    clamped to [-clip_qkv, clip_qkv] (None: no clamp), q and k rotated by cos/sin [1 or B, S, D] (Hugging Face's
    rotate-half convention, float32 maths), as contiguous q [B, Hq, S, D], k, v [B, Hkv, S, D] in qkv's dtype.

    With k_cache, v_cache [B, Hkv, L, D] (a StaticCache layer's keys and values) and cache_position [S] (int32/int64
    on qkv's device, inside [0, L)), k and v are written there instead, at those rows, and the caches themselves are
    returned as k and v: what StaticLayer.update returns, without the copy it makes. Inference only (no autograd).
    """
    clip_qkv = None if clip_qkv is None else float(clip_qkv)
    cache_args = (k_cache, v_cache, cache_position)
    if all(t is None for t in cache_args):
        return QkvRopeFunction.apply(qkv, cos, sin, clip_qkv, num_heads, num_kv_heads)
    if any(t is None for t in cache_args):
        raise ValueError("qkv_rope: give k_cache, v_cache and cache_position together, or none of them")
    if torch.is_grad_enabled() and qkv.requires_grad:
        raise ValueError("qkv_rope: writing into a cache is for inference; run it under torch.no_grad()")
    q = qkv_rope_fwd_into_cache(qkv, cos, sin, clip_qkv, num_heads, num_kv_heads, k_cache, v_cache, cache_position)
    return q, k_cache, v_cache
