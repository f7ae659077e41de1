"""Differentiable GQA flash attention: the Triton forward (kernels/attention_fwd.py) and backward
(kernels/attention_bwd.py), the mask in the compact form of dbrx_fast/attention_mask.py."""

import torch

from dbrx_fast.attention_mask import AttentionMask
from dbrx_fast.kernels.attention_fwd import attention_fwd


class AttentionFunction(torch.autograd.Function):
    """(q [B, Hq, Nq, D], k, v [B, Hkv, Nk, D], the mask's tensors, scale) -> out [B, Nq, Hq, D] contiguous.

    The forward keeps the log-sum-exp, so the backward recomputes the probabilities tile by tile from it."""

    @staticmethod
    def forward(ctx, q, k, v, q_offset, key_mask, key_start, scale):
        out, lse = attention_fwd(q, k, v, q_offset, key_mask, key_start, scale)
        ctx.save_for_backward(q, k, v, out, lse, q_offset, key_mask, key_start)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        # Imported here: the backward kernel is its own module, and a forward-only caller need not load it.
        from dbrx_fast.kernels.attention_bwd import attention_bwd

        q, k, v, out, lse, q_offset, key_mask, key_start = ctx.saved_tensors
        dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, q_offset, key_mask, key_start, ctx.scale)
        # q_offset, key_mask, key_start: the mask, not differentiable; scale: a float.
        return dq, dk, dv, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float) -> torch.Tensor:
    """softmax(scale * q @ k.T under `mask`) @ v with query head h reading KV head h // (Hq // Hkv): out
    [B, Nq, Hq, D] contiguous in q's dtype (what transformers' attention functions return). A query that sees no key
    gets 0. Raises ValueError for a mask that does not fit the call (AttentionMask.check)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D [B, heads, length, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}")
    mask.check(q.shape[0], q.shape[2], k.shape[2], q.device)
    key_mask = None if mask.key_mask is None else mask.key_mask.view(torch.uint8)
    return AttentionFunction.apply(q, k, v, mask.q_offset, key_mask, mask.key_start, scale)
