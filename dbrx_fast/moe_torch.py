"""The MoE experts in plain, differentiable PyTorch, grouped by expert: the ``backend="torch"`` path.

Same contract as `reference.moe_experts_by_ids` (Hugging Face's native weight layout, used in place):
x [T, H]; w1, v1, w2 [E*F, H] (expert e owns rows e*F:(e+1)*F; w2 is used as stored: y = h @ w2_e);
weights and expert_ids [T, k]. out[t] = sum_j weights[t, j] * (silu(x[t] @ w1_e.T) * (x[t] @ v1_e.T)) @ w2_e.
In the three steps of `modules.FastDbrxExperts`: dispatch (`reference.dispatch`), `expert_outputs`, `combine`;
`moe_experts_grouped_by_ids` chains them.

Algorithm: sort the T*k slots by expert (`reference.dispatch`), gather the rows of x once into that order, then run
each projection as one matmul per expert over its contiguous segment of rows. On a GPU where `torch._grouped_mm` has
its fused kernel (sm_90 / sm_100, bf16, 16-byte aligned strides) the three projections are each one grouped GEMM
with no host synchronisation; elsewhere a loop over experts with split sizes does the same work. The GLU and the
routing weight are applied in float32 (float64 for float64 inputs) and rounded once; the k expert outputs of a token
are put back in slot order and summed in a fixed order, so the result and every gradient are deterministic.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .reference import compute_dtype, dispatch


def moe_experts_grouped_by_ids(
    x: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
) -> torch.Tensor:
    """GLU experts summed over each token's k experts; differentiable in x, w1, v1, w2 and weights.

    x [T, H] float; w1, v1, w2 [E*F, H] in x's dtype and device; weights [T, k] float (any precision: it is applied
    in float32); expert_ids [T, k] integer, every id in [0, E) (not checked on the device: that would need a host
    synchronisation; an id out of range fails inside the indexing ops). Returns out [T, H] in x's dtype.
    """
    _check_inputs(x, w1, v1, w2, weights, expert_ids, num_experts)
    sorted_slots, expert_offsets = dispatch(expert_ids, num_experts)
    return combine(expert_outputs(x, w1, v1, w2, weights, sorted_slots, expert_offsets), x.dtype)


def expert_outputs(
    x: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    sorted_slots: torch.Tensor,
    expert_offsets: torch.Tensor,
) -> torch.Tensor:
    """y [T, k, H] in x's dtype: y[t, j] = weights[t, j] * expert e's GLU of x[t], e the expert of slot t*k + j.

    Shapes as in `moe_experts_grouped_by_ids`; sorted_slots [T*k] and expert_offsets [E+1] from `reference.dispatch`
    (trusted: the inputs are checked by `moe_experts_grouped_by_ids`, or come from the model).
    """
    num_tokens, hidden = x.shape
    top_k = weights.shape[1]
    num_experts = expert_offsets.numel() - 1
    ffn = w1.shape[0] // num_experts
    slot_index = sorted_slots.long()
    xs = _GatherTokens.apply(x, slot_index, top_k)
    row_weights = weights.reshape(-1).index_select(0, slot_index)

    if _grouped_mm_ok(x, ffn, w1, v1, w2):
        # `offs` holds each group's end row; expert_offsets[0] is always 0.
        offs = expert_offsets[1:]
        gate = torch._grouped_mm(xs, w1.view(num_experts, ffn, hidden).transpose(1, 2), offs=offs)
        up = torch._grouped_mm(xs, v1.view(num_experts, ffn, hidden).transpose(1, 2), offs=offs)
        h = _weighted_glu(gate, up, row_weights)
        y = torch._grouped_mm(h, w2.view(num_experts, ffn, hidden), offs=offs)
    else:
        # The split sizes are read on the host: one synchronisation, acceptable for the CPU and fallback paths.
        counts = (expert_offsets[1:] - expert_offsets[:-1]).tolist()
        x_parts = xs.split(counts)
        gate = torch.cat([xe @ w1.narrow(0, e * ffn, ffn).T for e, xe in enumerate(x_parts)])
        up = torch.cat([xe @ v1.narrow(0, e * ffn, ffn).T for e, xe in enumerate(x_parts)])
        h = _weighted_glu(gate, up, row_weights)
        y = torch.cat([he @ w2.narrow(0, e * ffn, ffn) for e, he in enumerate(h.split(counts))])

    # Back to slot order (slot t*k + j). index_copy writes every row exactly once, and its backward is a gather, so
    # no atomics anywhere.
    return torch.empty_like(y).index_copy(0, slot_index, y).view(num_tokens, top_k, hidden)


def combine(y: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """out [T, H] = sum over k of y [T, k, H], in a fixed order (torch accumulates 16-bit sums in fp32)."""
    return y.sum(1).to(out_dtype)


def _check_inputs(x, w1, v1, w2, weights, expert_ids, num_experts):
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, H], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    num_tokens, hidden = x.shape
    for name, w in (("w1", w1), ("v1", v1), ("w2", w2)):
        if w.dim() != 2 or w.shape[1] != hidden or w.shape[0] % num_experts != 0 or w.shape[0] == 0:
            raise ValueError(
                f"{name} must be [E*F, H] = [{num_experts}*F, {hidden}] with F >= 1, got shape {tuple(w.shape)}"
            )
        if w.shape != w1.shape:
            raise ValueError(f"{name} has shape {tuple(w.shape)} but w1 has {tuple(w1.shape)}")
        if w.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but x has {x.dtype}")
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device} but x is on {x.device}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != num_tokens or expert_ids.shape[1] < 1:
        raise ValueError(f"expert_ids must be [T, k] = [{num_tokens}, k>=1], got shape {tuple(expert_ids.shape)}")
    if expert_ids.dtype.is_floating_point or expert_ids.dtype.is_complex or expert_ids.dtype == torch.bool:
        raise TypeError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
    if weights.shape != expert_ids.shape:
        raise ValueError(f"weights has shape {tuple(weights.shape)} but expert_ids has {tuple(expert_ids.shape)}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating tensor, got {weights.dtype}")
    for name, t in (("weights", weights), ("expert_ids", expert_ids)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _grouped_mm_ok(x: torch.Tensor, ffn: int, *ws: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs its fused kernel here.

    From torch's GroupedBlas.cpp / GroupedMMUtils.h: the fused (CUTLASS) path needs bf16 operands on compute
    capability 9.x or 10.x; anywhere else torch falls back to a loop of mm with a host synchronisation, which is
    what our own loop does. Every operand needs a 16-byte aligned data pointer and 16-byte aligned leading strides:
    H and F multiples of 8 in bf16 (x's rows, the [T*k, F] intermediate's rows) and weight row strides likewise,
    which also keeps every expert's [F, H] block aligned.
    """
    if not hasattr(torch, "_grouped_mm") or not x.is_cuda or x.dtype != torch.bfloat16 or x.shape[0] == 0:
        return False
    if torch.cuda.get_device_capability(x.device)[0] not in (9, 10):
        return False
    alignment = 16 // x.element_size()
    if x.shape[1] % alignment != 0 or ffn % alignment != 0:
        return False
    return all(w.stride(1) == 1 and w.stride(0) % alignment == 0 and w.data_ptr() % 16 == 0 for w in ws)


def _weighted_glu(gate: torch.Tensor, up: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * row_weight, in float32 (float64 for float64) and rounded once to gate's dtype.

    Under autograd it is checkpointed: only gate, up and the weights are kept for the backward, which recomputes the
    float32 intermediates, so the saved activations are the same two [T*k, F] tensors the stock module keeps instead
    of four float32 ones.
    """
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad or row_weights.requires_grad):
        return checkpoint(_weighted_glu_math, gate, up, row_weights, use_reentrant=False, preserve_rng_state=False)
    return _weighted_glu_math(gate, up, row_weights)


def _weighted_glu_math(gate, up, row_weights):
    dt = compute_dtype(gate)
    return (F.silu(gate.to(dt)) * up.to(dt) * row_weights.to(dt)[:, None]).to(gate.dtype)


class _GatherTokens(torch.autograd.Function):
    """xs[p] = x[slot_index[p] // k]: the rows of x in sorted-slot order.

    index_select's own backward is index_add_, which on CUDA adds each token's k copies with float atomics, in no
    fixed order. This backward puts the rows back in slot order and sums each token's k rows in a fixed order.
    """

    @staticmethod
    def forward(ctx, x, slot_index, top_k):
        ctx.save_for_backward(slot_index)
        ctx.top_k = top_k
        return x.index_select(0, torch.div(slot_index, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_xs):
        (slot_index,) = ctx.saved_tensors
        grad_slots = torch.empty_like(grad_xs).index_copy_(0, slot_index, grad_xs)
        grad_x = grad_slots.view(-1, ctx.top_k, grad_xs.shape[1]).sum(1)
        return (
            grad_x,
            None,  # slot_index
            None,  # top_k
        )
