"""The MoE expert block: grouped GLU experts of every routed token, summed with their routing weights.

out[t] = sum_j weights[t, j] * (silu(x[t] @ w1_e.T) * (x[t] @ v1_e.T)) @ w2_e with e = expert_ids[t, j], on Hugging
Face's native [E*F, H] weights, in the two differentiable steps `modules.FastDbrxExperts` calls after the dispatch:
`expert_outputs` (the grouped GEMMs: per-slot outputs y [T, k, H] float32) and `combine` (each token's k slots summed
in a fixed order, rounded once). Differentiable in x, w1, v1, w2 and the routing weights; the dispatch metadata
(sorted_slots, expert_offsets) is integer and carries no gradient. `moe_experts_by_routing` chains the two for a
`Routing` from the routing kernel.
"""

import torch

from dbrx_fast.kernels.moe_experts import moe_combine, moe_down, moe_glu_up
from dbrx_fast.kernels.moe_input_grads import moe_down_bwd, moe_up_dgrad
from dbrx_fast.kernels.moe_routing import Routing
from dbrx_fast.kernels.moe_weight_grads import moe_down_wgrad, moe_up_wgrad


class ExpertOutputsFunction(torch.autograd.Function):
    """Forward: up GEMMs (both projections and the GLU in one kernel), down GEMM with the routing weight: y [T, k, H].

    Saves x, the pre-activations gate and up, the routing weights and the dispatch metadata; h and y are not kept (the
    backward's `moe_down_bwd` rebuilds h, weighted, once, for dw2). `grad_enabled` is torch.is_grad_enabled() at the
    call: ctx.needs_input_grad is True for a parameter even under torch.no_grad, and inference must not pay for
    writing gate and up.
    """

    @staticmethod
    def forward(ctx, x, w1, v1, w2, weights, sorted_slots, expert_offsets, grad_enabled):
        num_tokens, top_k = weights.shape
        save_preact = grad_enabled and any(ctx.needs_input_grad[:5])
        h, gate, up = moe_glu_up(x, w1, v1, sorted_slots, expert_offsets, top_k, save_preact)
        y = moe_down(h, w2, weights, sorted_slots, expert_offsets, top_k)
        if save_preact:
            ctx.save_for_backward(x, w1, v1, w2, gate, up, weights, sorted_slots, expert_offsets)
        return y.view(num_tokens, top_k, w2.shape[1])

    @staticmethod
    def backward(ctx, dy):
        x, w1, v1, w2, gate, up, weights, sorted_slots, expert_offsets = ctx.saved_tensors
        num_tokens, top_k = weights.shape
        num_experts = expert_offsets.numel() - 1
        need_x, need_w1, need_v1, need_w2, need_weights = ctx.needs_input_grad[:5]
        if top_k == 1 or dy.stride(1) == 0:
            # The combine's gradient: one row per token broadcast over its k slots, which the kernels read per slot.
            dout, down_k, down_weights = dy[:, 0].to(x.dtype), top_k, weights
        else:
            # Any other gradient is per slot: the down-projection kernels take it as T*k tokens of one slot each.
            dout, down_k, down_weights = dy.reshape(num_tokens * top_k, dy.shape[2]).to(x.dtype), 1, weights.view(-1, 1)
        dx = dw1 = dv1 = dw2 = None
        # moe_down_bwd runs for every gradient, dw2 included: its epilogue is where hw = weight * silu(gate) * up is
        # made once for dw2's GEMM. A dw2-only backward (everything else frozen) pays its dout @ w2.T for nothing; a
        # separate element-wise hw kernel would save that rare case a GEMM at the cost of a second code path.
        dgate, dup, dweights, hw = moe_down_bwd(
            dout, gate, up, w2, down_weights, sorted_slots, expert_offsets, down_k, need_w2
        )
        dweights = dweights.view(num_tokens, top_k) if need_weights else None
        if need_w2:
            dw2 = moe_down_wgrad(hw, dout, sorted_slots, expert_offsets, down_k, num_experts)
        del hw  # transient, as large as gate: freed before the up-projection's gradients allocate theirs
        if need_x:
            dx = moe_up_dgrad(dgate, dup, w1, v1, sorted_slots, expert_offsets, top_k, num_tokens)
        if need_w1 or need_v1:
            dw1, dv1 = moe_up_wgrad(dgate, dup, x, sorted_slots, expert_offsets, top_k, num_experts)
        # sorted_slots and expert_offsets: integer dispatch metadata, no gradient; grad_enabled: a Python bool.
        return dx, dw1, dv1, dw2, dweights, None, None, None


class CombineFunction(torch.autograd.Function):
    """out[t] = sum_j y[t, j] in fp32, j ascending, rounded once to out_dtype; the gradient is dout broadcast over k."""

    @staticmethod
    def forward(ctx, y, out_dtype):
        ctx.top_k = y.shape[1]
        return moe_combine(y.view(y.shape[0] * ctx.top_k, y.shape[2]), ctx.top_k, out_dtype)

    @staticmethod
    def backward(ctx, dout):
        # In y's dtype (float32) already, so that autograd does not materialise the broadcast to cast it.
        dy = dout.float().unsqueeze(1).expand(-1, ctx.top_k, -1)
        return dy, None  # out_dtype: a dtype


def expert_outputs(
    x: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    sorted_slots: torch.Tensor,
    expert_offsets: torch.Tensor,
) -> torch.Tensor:
    """y [T, k, H] float32: y[t, j] = weights[t, j] * expert e's GLU of x[t], e the expert of slot t*k + j.

    x [T, H]; w1, v1, w2 [E*F, H] in x's dtype; weights [T, k] float32; sorted_slots [T*k] and expert_offsets [E+1]
    int32 (the routing kernel's, or `reference.dispatch`'s).
    """
    return ExpertOutputsFunction.apply(x, w1, v1, w2, weights, sorted_slots, expert_offsets, torch.is_grad_enabled())


def combine(y: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """out [T, H] in out_dtype: each token's k slots of y [T, k, H] float32 summed in a fixed order."""
    return CombineFunction.apply(y, out_dtype)


def moe_experts_by_routing(
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
    y = expert_outputs(x, w1, v1, w2, routing.weights, routing.sorted_slots, routing.expert_offsets)
    return combine(y, x.dtype)
