"""MoE routing: softmax over experts, top-k, p-norm normalisation and the dispatch metadata in fused kernels.

Only the routing weights are differentiable (through the softmax and the normalisation to router_logits); the
expert ids and the dispatch metadata are integers and are marked non-differentiable.
"""

import torch

from dbrx_fast.kernels.moe_routing import Routing, route_bwd, route_fwd


class RoutingFunction(torch.autograd.Function):
    """Forward: the routing kernels. Backward: one kernel that recomputes the softmax from the saved logits."""

    @staticmethod
    def forward(ctx, router_logits, top_k, normalize_p):
        routing = route_fwd(router_logits, top_k, normalize_p)
        ctx.mark_non_differentiable(routing.expert_ids, routing.sorted_slots, routing.expert_offsets)
        ctx.save_for_backward(router_logits, routing.expert_ids, routing.weights)
        ctx.normalize_p = normalize_p
        return tuple(routing)

    @staticmethod
    def backward(ctx, grad_weights, _grad_ids, _grad_slots, _grad_offsets):
        router_logits, expert_ids, weights = ctx.saved_tensors
        grad_logits = route_bwd(grad_weights, router_logits, expert_ids, weights, ctx.normalize_p)
        # top_k and normalize_p: Python numbers, no gradient.
        return grad_logits, None, None


def route(router_logits: torch.Tensor, top_k: int, normalize_p: float | None) -> Routing:
    """`Routing` of router_logits [T, E]; its weights carry the gradient back to router_logits."""
    return Routing(*RoutingFunction.apply(router_logits, top_k, normalize_p))
