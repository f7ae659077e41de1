"""Fused MoE routing: softmax over experts, top-k, p-norm normalisation and the dispatch metadata, forward and backward.

Shapes: router_logits [T, E] (fp32, fp16 or bf16, any strides), E <= 256, 1 <= k <= E. Outputs (`Routing`):
weights [T, k] float32, expert_ids [T, k] int32, sorted_slots [T*k] int32 and expert_offsets [E+1] int32, exactly
`reference.dispatch` of the ids: slot s = t*k + j, grouped by expert, ascending slot order within an expert.

Forward, three launches and no host synchronisation (a decode step stays CUDA-graph capturable):
1. `_route_fwd_kernel`, BLOCK_T tokens per program: softmax in fp32 with the row maximum subtracted (logits of
   +-3e38 give no NaN), top-k by k passes of (largest logit, lowest index holding it), division by the p-norm of
   the k weights. It writes the weights and ids, each slot's rank among the block's earlier slots of its expert,
   and the block's expert histogram hist[block, E].
2. `_route_scan_kernel`: per expert, an exclusive scan of the histogram down the blocks (in place) and the count.
3. `_route_scatter_kernel`: slot s goes to position (slots of lower experts) + (slots of its expert in earlier
   blocks) + (its rank in its block). Program 0 also writes expert_offsets.
Every sum is over integers or in a fixed order, and no float atomics are used: results are bitwise reproducible.

Order and ties: experts are ranked by logit, which is the exact order of their probabilities (softmax is monotone),
so the choice does not depend on how exp rounds or underflows: experts whose fp32 probability underflows to 0 are
still ranked by logit, as a float64 softmax would rank them. Equal logits go to the lowest expert index first, as
`torch.sort(logits, descending=True, stable=True)` orders them; torch.topk leaves the order of equal values
unspecified (on the CPU it often returns a higher index first, and CPU and CUDA disagree; pytorch/pytorch#127196).

NaN and inf, the same on a GPU and under the interpreter: a NaN logit ranks above every number (+inf included), as
torch.sort ranks it, and the ranking compares integer keys, so no float max's NaN rule enters it. A token whose
logits hold a NaN or +inf, or are all -inf, gets NaN weights (a NaN numerator, from NaN or inf - inf, makes its
softmax sum NaN), NaN logit gradients and valid expert ids in [0, E); a -inf logit among finite ones is only a
probability of 0. Every float reduction runs along one token's row, so no other token's routing changes.

Backward (`route_bwd`, one launch): recomputes the fp32 softmax from the logits rather than saving [T, E]
probabilities. With w_m = p[e_m], N = ||w||_p and wn = w / N:
dL/dw_m = (g_m - (sum_j g_j wn_j) * wn_m^(p-1)) / N, scattered to the chosen experts as dL/dp; dl = p * (dp - p.dp).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .autotune import autotune
from .compile_spec import CompileSpec
from .dtypes import TRITON_DTYPES, check_dtype
from .launch import launch


class Routing(NamedTuple):
    """The router's decision for T tokens over E experts with top-k (the MoE data contract)."""

    weights: torch.Tensor  # [T, k] float32, normalised top-k routing weights
    expert_ids: torch.Tensor  # [T, k] int32
    sorted_slots: torch.Tensor  # [T*k] int32, slots grouped by expert, ascending within an expert
    expert_offsets: torch.Tensor  # [E+1] int32, expert e owns sorted positions offsets[e]:offsets[e+1]


MAX_EXPERTS = 256
# Elements of the [BLOCK_T, BLOCK_E] tile one routing program holds: a few fp32 tiles of this size stay in registers.
# The backward holds more of them (and three gathered [BLOCK_T] pointer vectors), so its tile is half the size.
_FWD_TILE = 2048
_BWD_TILE = 1024
_SCAN_BLOCK_P = 64
_SCAN_BLOCK_C = 32
# Elements of the scatter kernel's [BLOCK_S, BLOCK_E] comparison tile.
_SCATTER_TILE = 4096
# Ranking keys (see _rank_key): a logit's key lies in [-0x7F800000, 0x7F800000] (-inf to +inf), NaN's above it.
_NAN_KEY = tl.constexpr(0x7FFFFFFF)
_TAKEN_KEY = tl.constexpr(-0x7FFFFFFF)
# How normalize_p reaches the kernels: NORM_NONE skips the division; 1 and 2 have exact closed forms.
NORM_NONE, NORM_L1, NORM_L2, NORM_LP = 0, 1, 2, 3


def _configs() -> list:
    """Warps per routing program; the tile size is fixed by E (the scan and scatter kernels must know it).

    Not 2 warps: the forward at E = 16 then needs all 255 registers, one compiler change away from spilling.
    """
    return [triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)]


def _block_e(num_experts: int) -> int:
    """At least 16 columns: every E <= 16 shares one compiled kernel, and padded experts cost nothing."""
    return max(16, triton.next_power_of_2(num_experts))


def _block_t(block_e: int, tile: int) -> int:
    return tile // block_e


def _block_s(block_e: int) -> int:
    return _SCATTER_TILE // block_e


def _norm_mode(normalize_p: float | None) -> int:
    if normalize_p is None:
        return NORM_NONE
    return {1.0: NORM_L1, 2.0: NORM_L2}.get(float(normalize_p), NORM_LP)


@triton.jit
def _load_logits(logits_ptr, rows, cols, row_mask, col_mask, stride_l_t, stride_l_e):
    """The logits of rows `rows` (int64) over experts `cols` in fp32; padded experts read -inf.

    Rows past T read zeros rather than -inf, so that everything computed from them stays finite (it is never stored).
    """
    ptrs = logits_ptr + rows[:, None] * stride_l_t + cols[None, :] * stride_l_e
    logits = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    return tl.where(col_mask[None, :], logits, float("-inf"))


@triton.jit
def _rank_key(logits):
    """Integer keys of fp32 logits, ordered as the logits are: sign times the magnitude bits (so -0.0 ties +0.0),
    and NaN above +inf, as torch.sort and torch.topk rank it.

    The ranking takes integer max and min, exact on every backend: it never meets a float max, whose NaN rule differs
    (the GPU's max.f32 ignores a NaN operand)."""
    bits = logits.to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    key = tl.where(bits < 0, -magnitude, magnitude)
    return tl.where(magnitude > 0x7F800000, _NAN_KEY, key)


@triton.jit
def _softmax(logits):
    """Row softmax of a [BLOCK_T, BLOCK_E] fp32 tile, the row maximum subtracted (as torch.softmax does).

    The row max ignores NaN on a GPU (max.f32) and in the interpreter (np.nanmax) alike, and the result does not depend
    on it: a NaN logit gives a NaN numerator, so a NaN row sum and every probability of the row NaN.
    """
    num = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return num / tl.sum(num, axis=1)[:, None]


@triton.jit
def _pnorm(w, norm_p, NORM: tl.constexpr):
    """p-norm of each row of w [BLOCK_T, BLOCK_E] (non-negative, zero off the chosen experts), as torch.norm.

    The general p scales by the row maximum first, so that w^p neither underflows for large p nor loses the sum.
    The NaN weights of a NaN row stay NaN whatever that maximum's NaN rule makes of the norm: their numerator is NaN.
    """
    if NORM == 1:
        norm = tl.sum(w, axis=1)
    elif NORM == 2:
        norm = tl.sqrt(tl.sum(w * w, axis=1))
    else:
        w_max = tl.max(w, axis=1)
        # log2 of 1 instead of 0 off the chosen experts, then masked: no -inf passes through the arithmetic.
        ratio = tl.where(w > 0, w / w_max[:, None], 1.0)
        ratio_p = tl.where(w > 0, tl.exp2(norm_p * tl.log2(ratio)), 0.0)
        norm = w_max * tl.exp2(tl.log2(tl.sum(ratio_p, axis=1)) / norm_p)
    return norm


@autotune(_configs(), key=["num_experts", "top_k", "NORM"])
@triton.jit(do_not_specialize=["num_tokens"])
def _route_fwd_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    rank_ptr,
    hist_ptr,
    num_tokens,
    num_experts,
    top_k,
    norm_p,
    stride_l_t,
    stride_l_e,
    NORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Softmax, top-k and normalisation of BLOCK_T tokens; weights, ids, in-block ranks and the block histogram."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < num_tokens
    col_mask = cols < num_experts
    logits = _load_logits(logits_ptr, rows, cols, row_mask, col_mask, stride_l_t, stride_l_e)
    probs = _softmax(logits)

    # Rank by logit: softmax is monotone, so this is the exact order of the probabilities, whatever exp's rounding
    # or underflow makes of them. Equal keys go to the lowest index, so a real expert at -inf still comes before the
    # padded ones, and k <= E never reaches those. A taken expert's key drops below every logit's.
    key = _rank_key(logits)
    # slot_j[t, e] = j if expert e is token t's j-th choice, else -1.
    slot_j = tl.full([BLOCK_T, BLOCK_E], -1, tl.int32)
    for j in range(top_k):
        best = tl.max(key, axis=1)
        pick_e = tl.min(tl.where(key == best[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == pick_e[:, None]
        slot_j = tl.where(hit, j, slot_j)
        key = tl.where(hit, _TAKEN_KEY, key)

    # Rows past T choose too (their logits read as zeros), which keeps their norm finite; they are never stored.
    weights = tl.where(slot_j >= 0, probs, 0.0)
    if NORM != 0:
        weights = weights / _pnorm(weights, norm_p, NORM)[:, None]
    chosen = (slot_j >= 0) & row_mask[:, None]
    # Stores straight from the [token, expert] tile: expert e of token t lands in slot t*k + slot_j[t, e].
    dst = rows[:, None] * top_k + slot_j
    tl.store(weights_ptr + dst, weights, mask=chosen)
    tl.store(ids_ptr + dst, tl.broadcast_to(cols[None, :], [BLOCK_T, BLOCK_E]), mask=chosen)
    # Token ids ascend with rows and a token picks an expert at most once, so a slot's rank among the block's slots
    # of its expert is the number of earlier rows that chose it.
    taken = chosen.to(tl.int32)
    tl.store(rank_ptr + dst, tl.cumsum(taken, axis=0) - taken, mask=chosen)
    tl.store(hist_ptr + pid.to(tl.int64) * num_experts + cols, tl.sum(taken, axis=0), mask=col_mask)


@triton.jit(do_not_specialize=["num_blocks"])
def _route_scan_kernel(hist_ptr, counts_ptr, num_blocks, num_experts, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """hist [blocks, E] -> per expert, the exclusive running sum over blocks (in place); counts [E] = column sums."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < num_experts
    running = tl.zeros([BLOCK_C], dtype=tl.int32)
    for start in range(0, num_blocks, BLOCK_P):
        blocks = start + tl.arange(0, BLOCK_P)
        ptrs = hist_ptr + blocks.to(tl.int64)[:, None] * num_experts + cols[None, :]
        mask = (blocks < num_blocks)[:, None] & col_mask[None, :]
        hist = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, running[None, :] + tl.cumsum(hist, axis=0) - hist, mask=mask)
        running += tl.sum(hist, axis=0)
    tl.store(counts_ptr + cols, running, mask=col_mask)


@triton.jit(do_not_specialize=["num_slots"])
def _route_scatter_kernel(
    ids_ptr,
    rank_ptr,
    base_ptr,
    counts_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    num_slots,
    num_experts,
    top_k,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """sorted_slots[start(e) + base[block, e] + rank[s]] = s for the BLOCK_S slots of this program.

    ids are the forward kernel's (always in [0, E)), so every position lies in [0, T*k) and each is written once.
    """
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < num_experts
    counts = tl.load(counts_ptr + experts, mask=expert_mask, other=0)
    if tl.program_id(0) == 0:
        ends = tl.cumsum(counts, axis=0)
        tl.store(expert_offsets_ptr + experts, ends - counts, mask=expert_mask)
        tl.store(expert_offsets_ptr + 1 + experts, ends, mask=experts == num_experts - 1)

    slots = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    slot_mask = slots < num_slots
    ids = tl.load(ids_ptr + slots, mask=slot_mask, other=0)
    rank = tl.load(rank_ptr + slots, mask=slot_mask, other=0)
    block = slots // top_k // BLOCK_T
    base = tl.load(base_ptr + block * num_experts + ids, mask=slot_mask, other=0)
    # Slots of every lower expert come first: sum the counts below each slot's expert.
    start = tl.sum(tl.where(experts[None, :] < ids[:, None], counts[None, :], 0), axis=1)
    tl.store(sorted_slots_ptr + start + base + rank, slots.to(tl.int32), mask=slot_mask)


@autotune(_configs(), key=["num_experts", "top_k", "NORM"])
@triton.jit(do_not_specialize=["num_tokens"])
def _route_bwd_kernel(
    grad_weights_ptr,
    logits_ptr,
    ids_ptr,
    weights_ptr,
    grad_logits_ptr,
    num_tokens,
    num_experts,
    top_k,
    norm_p,
    stride_gw_t,
    stride_gw_k,
    stride_l_t,
    stride_l_e,
    stride_ids_t,
    stride_ids_k,
    stride_w_t,
    stride_w_k,
    NORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """grad_logits [T, E] (contiguous, logits' dtype) of BLOCK_T tokens from grad_weights and the saved routing.

    Ids outside [0, E) match no expert, so they cannot move an access out of bounds.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < num_tokens
    col_mask = cols < num_experts
    probs = _softmax(_load_logits(logits_ptr, rows, cols, row_mask, col_mask, stride_l_t, stride_l_e))

    # Spread the k (id, grad, weight) columns onto the [token, expert] tile.
    grad = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    wn = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    chosen = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
    for j in range(top_k):
        # Rows past T take experts 0..k-1 with weight 1, which keeps their maths finite; they are never stored.
        ids = tl.load(ids_ptr + rows * stride_ids_t + j * stride_ids_k, mask=row_mask, other=j)
        hit = cols[None, :] == ids[:, None]
        g = tl.load(grad_weights_ptr + rows * stride_gw_t + j * stride_gw_k, mask=row_mask, other=0.0)
        grad = tl.where(hit, g[:, None], grad)
        if NORM != 0:
            w = tl.load(weights_ptr + rows * stride_w_t + j * stride_w_k, mask=row_mask, other=1.0)
            wn = tl.where(hit, w[:, None], wn)
        chosen = chosen | hit

    if NORM == 0:
        dprobs = grad
    else:
        w = tl.where(chosen, probs, 0.0)
        norm = _pnorm(w, norm_p, NORM)
        # dN/dw_m = (w_m / N)^(p-1), taken as 0 where w_m = 0 (as torch.norm's backward does).
        if NORM == 1:
            dnorm = tl.where(w > 0, 1.0, 0.0)
        elif NORM == 2:
            dnorm = wn
        else:
            dnorm = tl.where(w > 0, tl.exp2((norm_p - 1.0) * tl.log2(tl.where(w > 0, wn, 1.0))), 0.0)
        gw = tl.sum(grad * wn, axis=1)
        dprobs = tl.where(chosen, (grad - gw[:, None] * dnorm) / norm[:, None], 0.0)
    dlogits = probs * (dprobs - tl.sum(probs * dprobs, axis=1)[:, None])
    ptrs = grad_logits_ptr + rows[:, None] * num_experts + cols[None, :]
    tl.store(ptrs, dlogits.to(grad_logits_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _check_logits(router_logits: torch.Tensor) -> None:
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    check_dtype("router_logits", router_logits)
    if not 1 <= router_logits.shape[1] <= MAX_EXPERTS:
        raise ValueError(f"the router supports 1 to {MAX_EXPERTS} experts, got E = {router_logits.shape[1]}")


def _check_top_k_p(top_k: int, num_experts: int, normalize_p: float | None) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..E = {num_experts}, got {top_k}")
    if normalize_p is not None and not 0 < normalize_p < float("inf"):
        raise ValueError(f"normalize_p must be None or a finite p > 0, got {normalize_p}")


@torch.library.triton_op("dbrx_fast::moe_route_fwd", mutates_args={})
def _route_fwd(
    router_logits: torch.Tensor, top_k: int, normalize_p: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_logits(router_logits)
    num_tokens, num_experts = router_logits.shape
    _check_top_k_p(top_k, num_experts, normalize_p)
    if num_tokens * top_k >= 2**31:
        raise ValueError(f"T*k = {num_tokens * top_k} slots do not fit the int32 dispatch metadata")
    device = router_logits.device
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=device)
    expert_ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=device)
    sorted_slots = torch.empty(num_tokens * top_k, dtype=torch.int32, device=device)
    if num_tokens == 0:
        return weights, expert_ids, sorted_slots, torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    expert_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)

    block_e = _block_e(num_experts)
    block_t = _block_t(block_e, _FWD_TILE)
    num_blocks = triton.cdiv(num_tokens, block_t)
    rank = torch.empty(num_tokens * top_k, dtype=torch.int32, device=device)
    hist = torch.empty((num_blocks, num_experts), dtype=torch.int32, device=device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    launch(
        _route_fwd_kernel,
        (num_blocks,),
        router_logits,
        weights,
        expert_ids,
        rank,
        hist,
        num_tokens,
        num_experts,
        top_k,
        0.0 if normalize_p is None else float(normalize_p),
        router_logits.stride(0),
        router_logits.stride(1),
        NORM=_norm_mode(normalize_p),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
    )
    launch(
        _route_scan_kernel,
        (triton.cdiv(num_experts, _SCAN_BLOCK_C),),
        hist,
        counts,
        num_blocks,
        num_experts,
        BLOCK_P=_SCAN_BLOCK_P,
        BLOCK_C=_SCAN_BLOCK_C,
        num_warps=4,
    )
    block_s = _block_s(block_e)
    launch(
        _route_scatter_kernel,
        (triton.cdiv(num_tokens * top_k, block_s),),
        expert_ids,
        rank,
        hist,
        counts,
        sorted_slots,
        expert_offsets,
        num_tokens * top_k,
        num_experts,
        top_k,
        BLOCK_T=block_t,
        BLOCK_S=block_s,
        BLOCK_E=block_e,
        num_warps=4,
    )
    return weights, expert_ids, sorted_slots, expert_offsets


def route_fwd(router_logits: torch.Tensor, top_k: int, normalize_p: float | None) -> Routing:
    """Route T tokens: softmax of router_logits [T, E] in fp32, top-k (ties to the lower expert), weights divided by
    their p-norm (none when normalize_p is None), and the dispatch metadata. Not differentiable: see ops/routing.py.
    """
    return Routing(*_route_fwd(router_logits, top_k, normalize_p))


@torch.library.triton_op("dbrx_fast::moe_route_bwd", mutates_args={})
def route_bwd(
    grad_weights: torch.Tensor,
    router_logits: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    normalize_p: float | None,
) -> torch.Tensor:
    """grad_logits [T, E] in the logits' dtype from grad_weights [T, k] float32 and the forward's expert_ids and
    (normalised) weights. The softmax is recomputed in fp32 from router_logits."""
    _check_logits(router_logits)
    num_tokens, num_experts = router_logits.shape
    for name, t, dtype in (
        ("grad_weights", grad_weights, torch.float32),
        ("expert_ids", expert_ids, torch.int32),
        ("weights", weights, torch.float32),
    ):
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if t.device != router_logits.device:
            raise ValueError(f"{name} is on {t.device}, router_logits on {router_logits.device}")
        if t.dim() != 2 or t.shape != expert_ids.shape or t.shape[0] != num_tokens:
            raise ValueError(f"{name} must be [T, k] = [{num_tokens}, k] like expert_ids, got {tuple(t.shape)}")
    top_k = expert_ids.shape[1]
    _check_top_k_p(top_k, num_experts, normalize_p)
    grad_logits = torch.empty((num_tokens, num_experts), dtype=router_logits.dtype, device=router_logits.device)
    if num_tokens == 0:
        return grad_logits
    block_e = _block_e(num_experts)
    block_t = _block_t(block_e, _BWD_TILE)
    launch(
        _route_bwd_kernel,
        (triton.cdiv(num_tokens, block_t),),
        grad_weights,
        router_logits,
        expert_ids,
        weights,
        grad_logits,
        num_tokens,
        num_experts,
        top_k,
        0.0 if normalize_p is None else float(normalize_p),
        grad_weights.stride(0),
        grad_weights.stride(1),
        router_logits.stride(0),
        router_logits.stride(1),
        expert_ids.stride(0),
        expert_ids.stride(1),
        weights.stride(0),
        weights.stride(1),
        NORM=_norm_mode(normalize_p),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
    )
    return grad_logits


def compile_specs() -> list[CompileSpec]:
    """Every (kernel, logits dtype, autotune config) at DBRX's E = 16 with p = 1, and at the largest E = 256 with
    the general p; the other normalisations once each. The scan and scatter kernels see only int32."""
    specs = []

    def routing_spec(kernel, name, dtype, cfg, num_experts, norm):
        block_e = _block_e(num_experts)
        if kernel is _route_fwd_kernel:
            pointers = {"logits_ptr": f"*{dtype}", "weights_ptr": "*fp32", "ids_ptr": "*i32", "rank_ptr": "*i32"}
            pointers["hist_ptr"] = "*i32"
            strides = ("stride_l_t", "stride_l_e")
            tile = _FWD_TILE
        else:
            pointers = {"grad_weights_ptr": "*fp32", "logits_ptr": f"*{dtype}", "ids_ptr": "*i32"}
            pointers.update({"weights_ptr": "*fp32", "grad_logits_ptr": f"*{dtype}"})
            strides = ("stride_gw_t", "stride_gw_k", "stride_l_t", "stride_l_e", "stride_ids_t", "stride_ids_k")
            strides += ("stride_w_t", "stride_w_k")
            tile = _BWD_TILE
        return CompileSpec(
            name=f"{name} {dtype} E={num_experts} NORM={norm} num_warps={cfg.num_warps}",
            kernel=kernel.fn,
            signature={
                **pointers,
                **dict.fromkeys(("num_tokens", "num_experts", "top_k"), "i32"),
                "norm_p": "fp32",
                **dict.fromkeys(strides, "i32"),
            },
            constexprs={"NORM": norm, "BLOCK_T": _block_t(block_e, tile), "BLOCK_E": block_e},
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    for kernel, name in ((_route_fwd_kernel, "route_fwd"), (_route_bwd_kernel, "route_bwd")):
        for dtype in TRITON_DTYPES.values():
            for cfg in _configs():
                specs.append(routing_spec(kernel, name, dtype, cfg, 16, NORM_L1))
                specs.append(routing_spec(kernel, name, dtype, cfg, MAX_EXPERTS, NORM_LP))
        for norm in (NORM_NONE, NORM_L2):
            specs.append(routing_spec(kernel, name, "bf16", _configs()[0], 16, norm))
    specs.append(
        CompileSpec(
            name=f"route_scan BLOCK_P={_SCAN_BLOCK_P} BLOCK_C={_SCAN_BLOCK_C}",
            kernel=_route_scan_kernel,
            signature={"hist_ptr": "*i32", "counts_ptr": "*i32", "num_blocks": "i32", "num_experts": "i32"},
            constexprs={"BLOCK_P": _SCAN_BLOCK_P, "BLOCK_C": _SCAN_BLOCK_C},
            num_warps=4,
        )
    )
    for num_experts in (16, MAX_EXPERTS):
        block_e = _block_e(num_experts)
        specs.append(
            CompileSpec(
                name=f"route_scatter E={num_experts}",
                kernel=_route_scatter_kernel,
                signature={
                    **dict.fromkeys(
                        ("ids_ptr", "rank_ptr", "base_ptr", "counts_ptr", "sorted_slots_ptr", "expert_offsets_ptr"),
                        "*i32",
                    ),
                    **dict.fromkeys(("num_slots", "num_experts", "top_k"), "i32"),
                },
                constexprs={"BLOCK_T": _block_t(block_e, _FWD_TILE), "BLOCK_S": _block_s(block_e), "BLOCK_E": block_e},
                num_warps=4,
            )
        )
    return specs
