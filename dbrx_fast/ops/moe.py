"""The MoE expert block: grouped GLU experts of every routed token, summed with their routing weights.

out[t] = sum_j weights[t, j] * (silu(x[t] @ w1_e.T) * (x[t] @ v1_e.T)) @ w2_e with e = expert_ids[t, j], on Hugging
Face's native [E*F, H] weights. Differentiable in x, w1, v1, w2 and the routing weights; the dispatch metadata
(sorted_slots, expert_offsets) is integer and carries no gradient.
"""

import torch

from dbrx_fast.kernels.moe_experts import moe_combine, moe_down, moe_glu_up
from dbrx_fast.kernels.moe_input_grads import moe_down_bwd, moe_up_dgrad
from dbrx_fast.kernels.moe_routing import Routing
from dbrx_fast.kernels.moe_weight_grads import moe_down_wgrad, moe_up_wgrad


class MoeExpertsFunction(torch.autograd.Function):
    """Forward: up GEMMs (both projections and the GLU in one kernel), down GEMM with the routing weight, combine.

    Saves x, the pre-activations gate and up, the routing weights and the dispatch metadata; h and the per-slot
    outputs are not kept (the backward recomputes h from gate and up). `grad_enabled` is torch.is_grad_enabled() at
    the call: ctx.needs_input_grad is True for a parameter even under torch.no_grad, and inference must not pay for
    writing gate and up.
    """

    @staticmethod
    def forward(ctx, x, w1, v1, w2, weights, sorted_slots, expert_offsets, grad_enabled):
        top_k = weights.shape[1]
        save_preact = grad_enabled and any(ctx.needs_input_grad[:5])
        h, gate, up = moe_glu_up(x, w1, v1, sorted_slots, expert_offsets, top_k, save_preact)
        out = moe_combine(moe_down(h, w2, weights, sorted_slots, expert_offsets, top_k), top_k, x.dtype)
        if save_preact:
            ctx.save_for_backward(x, w1, v1, w2, gate, up, weights, sorted_slots, expert_offsets)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w1, v1, w2, gate, up, weights, sorted_slots, expert_offsets = ctx.saved_tensors
        top_k, num_experts = weights.shape[1], expert_offsets.numel() - 1
        need_x, need_w1, need_v1, need_w2, need_weights = ctx.needs_input_grad[:5]
        dx = dw1 = dv1 = dw2 = dweights = None
        if need_x or need_w1 or need_v1 or need_weights:
            dgate, dup, dweights = moe_down_bwd(dout, gate, up, w2, weights, sorted_slots, expert_offsets, top_k)
            if need_x:
                dx = moe_up_dgrad(dgate, dup, w1, v1, sorted_slots, expert_offsets, top_k, x.shape[0])
            if need_w1 or need_v1:
                dw1, dv1 = moe_up_wgrad(dgate, dup, x, sorted_slots, expert_offsets, top_k, num_experts)
        if need_w2:
            dw2 = moe_down_wgrad(gate, up, dout, weights, sorted_slots, expert_offsets, top_k, num_experts)
        # sorted_slots and expert_offsets: integer dispatch metadata, no gradient; grad_enabled: a Python bool.
        return dx, dw1, dv1, dw2, dweights, None, None, None


def moe_experts(
    x: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor,
    w2: torch.Tensor,
    routing: Routing,
    num_experts: int,
) -> torch.Tensor:
    """out [T, H] in x's dtype for x [T, H], w1, v1, w2 [E*F, H] and the router's `Routing` of the T tokens."""
    if routing.expert_offsets.numel() != num_experts + 1:
        raise ValueError(
            f"routing.expert_offsets has {routing.expert_offsets.numel()} entries, expected E+1 = {num_experts + 1}"
        )
    return MoeExpertsFunction.apply(
        x, w1, v1, w2, routing.weights, routing.sorted_slots, routing.expert_offsets, torch.is_grad_enabled()
    )
