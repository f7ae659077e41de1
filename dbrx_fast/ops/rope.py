"""Differentiable rotary embedding of q and k: the Triton kernel forward, the same kernel with sin negated backward."""

import torch

from dbrx_fast.kernels.rope import rope as rope_kernel


class RopeFunction(torch.autograd.Function):
    """(q [B, Hq, S, D], k [B, Hkv, S, D], cos, sin [1 or B, S, D]) -> (q_rot, k_rot), new contiguous tensors.

    The rotation is orthogonal, so the gradient of q and k is the inverse rotation of the output gradients.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_kernel(q, k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        # The kernel reads rows with unit stride; an incoming gradient can be an expanded or transposed view.
        grad_q, grad_k = (g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k))
        grad_q, grad_k = rope_kernel(grad_q, grad_k, cos, sin, backward=True)
        # cos, sin: position tables, not trained.
        return grad_q, grad_k, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in Hugging Face's rotate-half convention, float32 maths, results in q's dtype."""
    return RopeFunction.apply(q, k, cos, sin)
