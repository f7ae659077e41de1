"""Differentiable bias-free LayerNorm: Triton forward and backward, a deterministic weight gradient."""

import torch

from dbrx_fast.kernels.layernorm import layernorm_bwd, layernorm_fwd


class LayerNormFunction(torch.autograd.Function):
    """(x [..., C], weight [C], eps) -> y = (x - mean) * rstd * weight, statistics over the last dimension in fp32."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, mean, rstd = layernorm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, rstd = ctx.saved_tensors
        # The kernel reads rows with unit stride; an incoming gradient can be an expanded or transposed view.
        grad_y = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
        grad_x, grad_weight = layernorm_bwd(grad_y, x, weight, mean, rstd)
        # grad_weight is None when weight is frozen; eps is a float.
        return grad_x, (grad_weight if ctx.needs_input_grad[1] else None), None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Bias-free LayerNorm of x over its last dimension (DBRX's norm_1, norm_2, norm_f)."""
    return LayerNormFunction.apply(x, weight, eps)
