"""Grouped GLU expert GEMMs, backward, input gradients: the gradients of the activations and the routing weights of
out[t] = sum_j weights[t, j] * (silu(x[t] @ w1_e.T) * (x[t] @ v1_e.T)) @ w2_e.

Shapes and layouts as in kernels/moe_experts.py: x [T, H]; w1, v1, w2 [E*F, H] in Hugging Face's native layout, used
in place (strided views are fine); weights [T, k] float32; sorted_slots [T*k] int32 (slot s = t*k + j, grouped by
expert, ascending within an expert); expert_offsets [E+1] int32. The forward saved gate and up, [T*k, F] in x's dtype
and in sorted order (row p is slot sorted_slots[p], token sorted_slots[p] // k). dout [T, H] is the output's gradient.
The weight gradients are in kernels/moe_weight_grads.py.

Two grouped GEMMs over the sorted rows, each with a fused prologue or epilogue:
1. `moe_down_bwd`: dh'[p] = dout[t] @ w2_e.T, gathering the dout rows inside the GEMM. The epilogue recomputes
   h = silu(gate) * up and writes rowsum(h * dh') of its F-tile to a [F-tiles, T*k] float32 buffer, which a second
   kernel sums in tile order into dweights (no atomics). With dh = weights.flat[s] * dh' it stores
   dgate = dh * up * silu'(gate) and dup = dh * silu(gate), and (store_h) hw = weights.flat[s] * h, so that dw2
   (kernels/moe_weight_grads.py) is a plain GEMM instead of recomputing h once per H-tile.
2. `moe_up_dgrad`: dx_slot[s] = dgate[p] @ w1_e + dup[p] @ v1_e (two K loops back to back into one fp32
   accumulator, one dot per K-step so that the MMA pipeline never drains inside a loop), stored per slot in
   float32; the forward's `moe_combine` then sums each token's k slots in slot order and rounds once.

The M grids are the upper bound `num_m_tiles_upper_bound` mapped through `expert_tile` (no host synchronisation).
Every sum has a fixed order, so results are bitwise reproducible for a given autotune config. Every row and slot read
from the routing metadata is clamped or masked, so corrupt metadata gives undefined gradients but no access out of
bounds.

Limits: fp16, bf16 and fp32, every floating tensor in one dtype (the routing weights and dweights are float32); fp32
multiplies in full fp32 unless torch.set_float32_matmul_precision allows TF32; float64 raises TypeError so that
callers fall back to torch. Scratch memory: dx_slot, float32 [T*k, H] (3.2 GB at 32768 tokens, k = 4, H = 6144, like
the forward's y), the dweights partials, float32 [cdiv(F, 128), T*k], and with store_h hw [T*k, F] in the
activations' dtype (as large as the saved gate; freed once dw2 is computed).
"""

import torch
import triton
import triton.language as tl

from .compile_spec import CompileSpec
from .launch import launch
from .moe_checks import (
    check_down_grad_inputs,
    check_expert_weight,
    check_matrix,
    check_preact,
    check_routing,
    check_top_k,
)
from .moe_experts import moe_combine
from .moe_tiles import (
    autotuned_by_class,
    chunk_rows,
    config,
    dot,
    expert_tile,
    expert_weight_descriptor,
    gemm_path_specs,
    grouped_tile,
    kernel_spec,
    launch_gemm,
    launched_m_tiles,
    load_tile,
    num_m_tiles_upper_bound,
    span_rows,
    tile_descriptor,
    tile_rows,
)

# The dweights partial buffer has one row per F-tile and is allocated before the autotuner picks a config, so every
# moe_down_bwd config shares this BLOCK_N.
_DOWN_BWD_BLOCK_N = 128
_SUM_PARTIALS_BLOCK = 1024

# Tiles per GEMM class (see moe_tiles.py). Every one compiles for sm_80 and sm_90 without spilling, with Triton 3.6
# and 3.9 (their ptxas differ); the tiles left out spilled or overflowed sm_80's shared memory.


def _down_bwd_configs() -> dict[str, list]:
    """dh' = dout @ w2_e.T tiles (M = rows, N = F fixed at _DOWN_BWD_BLOCK_N, K = H). 128-row tiles need 8 warps and
    the split epilogue to fit in 16 bits, and spill in fp32. fp32_dot pins 32 rows: 64 rows with BLOCK_K = 16 spill
    with Triton 3.6 (its ptxas stops at 128 registers there)."""
    return {
        "16bit": [
            config(8, 3, BLOCK_M=128, BLOCK_K=64, GROUP_M=8),
            config(8, 4, BLOCK_M=64, BLOCK_K=64, GROUP_M=8),
            config(8, 3, BLOCK_M=64, BLOCK_K=128, GROUP_M=8),
            config(16, 3, BLOCK_M=128, BLOCK_K=64, GROUP_M=8),
        ],
        "tf32": [config(8, 4, BLOCK_M=64, BLOCK_K=32, GROUP_M=8), config(8, 3, BLOCK_M=64, BLOCK_K=64, GROUP_M=8)],
        "fp32_dot": [
            config(8, 3, BLOCK_M=32, BLOCK_K=16, GROUP_M=8),
            config(8, 2, BLOCK_M=64, BLOCK_K=32, GROUP_M=8),
            config(8, 2, BLOCK_M=32, BLOCK_K=32, GROUP_M=8),
        ],
    }


def _up_dgrad_configs() -> dict[str, list]:
    """dx_slot = dgate @ w1_e + dup @ v1_e tiles (M = rows, N = H, K = F), two operand tiles per K-step (the two K
    loops run one after the other). The pinned 16-bit tile takes 128 registers on sm_90, two blocks per SM; 4-warp
    64x128 with BLOCK_K = 128 spills on sm_80."""
    return {
        "16bit": [
            config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            config(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
            config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            config(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        ],
        "tf32": [
            config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            config(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            config(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        ],
        "fp32_dot": [
            config(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8),
            config(4, 2, BLOCK_M=32, BLOCK_N=128, BLOCK_K=16, GROUP_M=8),
        ],
    }


@triton.jit
def _glu_bwd_half(
    dh_raw,
    weight,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    hw_ptr,
    local,
    cols,
    row_mask,
    ffn,
    stride_gate_p,
    stride_gate_f,
    stride_up_p,
    stride_up_f,
    STORE_H: tl.constexpr,
):
    """GLU backward of one column block: stores dgate = dh * up * silu'(gate) and dup = dh * silu(gate) with
    dh = weight * dh_raw, with STORE_H also hw = weight * h (h = silu(gate) * up, what dw2 needs), and returns the
    row sums of h * dh_raw. The pointers point at the tile's first row; local [BLOCK_M, 1] and cols [1, BLOCK] index
    within it. Masked rows and columns load zeros, so they add nothing."""
    mask = row_mask[:, None] & (cols < ffn)
    gate = tl.load(gate_ptr + local * stride_gate_p + cols * stride_gate_f, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + local * stride_up_p + cols * stride_up_f, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    row_sum = tl.sum(silu * up * dh_raw, axis=1)
    dh = dh_raw * weight
    out_offs = local * ffn + cols
    tl.store(dup_ptr + out_offs, (dh * silu).to(dup_ptr.dtype.element_ty), mask=mask)
    # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))).
    dgate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(dgate_ptr + out_offs, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        # Last, when gate and dh are dead (earlier it spills on sm_80 with Triton 3.6). Rounded once to the
        # activations' dtype, as the forward rounds h, so that dw2's dot takes it as it is.
        tl.store(hw_ptr + out_offs, (silu * up * weight).to(hw_ptr.dtype.element_ty), mask=mask)
    return row_sum


@triton.jit(do_not_specialize=["num_rows", "rows_bucket"])
def _moe_down_bwd_kernel(
    dout_ptr,
    gate_ptr,
    up_ptr,
    w2_ptr,
    weights_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    dgate_ptr,
    dup_ptr,
    hw_ptr,
    partial_ptr,
    num_rows,
    rows_bucket,  # autotune key only: next power of two of num_rows, so a new length does not re-tune
    hidden,
    ffn,
    top_k,
    stride_dout_t,
    stride_dout_h,
    stride_gate_p,
    stride_gate_f,
    stride_up_p,
    stride_up_f,
    stride_w2_r,
    stride_w2_h,
    stride_weights_t,
    stride_weights_k,
    NUM_EXPERTS: tl.constexpr,
    STORE_H: tl.constexpr,
    FP32_DOT: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dgate, dup and with STORE_H hw [num_rows, ffn] (contiguous, sorted order) and partial[pid_n, s] = sum over the
    F-tile of h * dh' (contiguous float32 [cdiv(ffn, BLOCK_N), num_rows], slot order) for the sorted rows p of
    expert e. USE_TMA loads w2 through a descriptor (its innermost stride must be 1); dout rows are gathered."""
    num_pid_m = launched_m_tiles(num_rows, NUM_EXPERTS, BLOCK_M)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(ffn, BLOCK_N), GROUP_M)
    expert, row_start, row_end = expert_tile(pid_m, expert_offsets_ptr, NUM_EXPERTS, BLOCK_M)
    if expert < 0:
        return
    # Clamped like expert_rows (moe_tiles.py): corrupt offsets must not move a load or a store out of bounds.
    row_start = tl.maximum(row_start, 0)
    slots, tokens, row_mask = chunk_rows(
        row_start, tl.minimum(row_end, num_rows), sorted_slots_ptr, num_rows, top_k, BLOCK_M
    )
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < ffn
    ks = tl.arange(0, BLOCK_K)
    dout_ptrs = dout_ptr + tokens[:, None] * stride_dout_t + ks[None, :] * stride_dout_h
    # w2_e.T as a [BLOCK_K, BLOCK_N] tile read straight from the [E*F, H] layout: an int64 offset to the tile's
    # first row, int32 offsets within it. USE_TMA: a [BLOCK_N, BLOCK_K] block of w2 as [E, F, H] (zero past the
    # expert's F rows), transposed in shared memory.
    w2_src = expert_weight_descriptor(w2_ptr, ffn, hidden, stride_w2_r, NUM_EXPERTS, BLOCK_N, BLOCK_K, USE_TMA)
    w2_ptrs = w2_ptr + (expert * ffn + pid_n * BLOCK_N).to(tl.int64) * stride_w2_r
    w2_ptrs += tl.arange(0, BLOCK_N)[None, :] * stride_w2_r + ks[:, None] * stride_w2_h
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = ks < hidden - k0
        dout_tile = tl.load(dout_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w2_tile = load_tile(
            w2_src, (expert, pid_n * BLOCK_N, k0), w2_ptrs, k_mask[:, None] & col_mask[None, :], USE_TMA
        )
        if USE_TMA:  # the block holds w2_e's rows: [BLOCK_N, BLOCK_K]
            w2_tile = tl.trans(w2_tile)
        acc = dot(dout_tile, w2_tile, acc, FP32_DOT)
        dout_ptrs += BLOCK_K * stride_dout_h
        w2_ptrs += BLOCK_K * stride_w2_h

    weight = tl.load(
        weights_ptr + tokens * stride_weights_t + (slots % top_k) * stride_weights_k, mask=row_mask, other=0.0
    )[:, None]
    # The tile's rows are consecutive: an int64 base offset per tensor and int32 offsets within the tile keep the
    # epilogue's pointer tensors small.
    base = row_start.to(tl.int64)
    gate_ptr += base * stride_gate_p
    up_ptr += base * stride_up_p
    dgate_ptr += base * ffn
    dup_ptr += base * ffn
    hw_ptr += base * ffn
    local = tl.arange(0, BLOCK_M)[:, None]
    # The epilogue runs on the two column halves of the tile in turn, so that it holds half as many fp32 values a
    # thread (a 128x128 tile is 64 registers a thread at 8 warps, and the GLU backward needs three such tiles).
    acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    half = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)[None, :]
    row_sum = _glu_bwd_half(
        acc_lo,
        weight,
        gate_ptr,
        up_ptr,
        dgate_ptr,
        dup_ptr,
        hw_ptr,
        local,
        half,
        row_mask,
        ffn,
        stride_gate_p,
        stride_gate_f,
        stride_up_p,
        stride_up_f,
        STORE_H,
    )
    row_sum += _glu_bwd_half(
        acc_hi,
        weight,
        gate_ptr,
        up_ptr,
        dgate_ptr,
        dup_ptr,
        hw_ptr,
        local,
        half + BLOCK_N // 2,
        row_mask,
        ffn,
        stride_gate_p,
        stride_gate_f,
        stride_up_p,
        stride_up_f,
        STORE_H,
    )
    tl.store(partial_ptr + pid_n.to(tl.int64) * num_rows + slots, row_sum, mask=row_mask)


@triton.jit(do_not_specialize=["num_rows"])
def _moe_sum_partials_kernel(partial_ptr, dweights_ptr, num_rows, num_partials, BLOCK: tl.constexpr):
    """dweights.flat[s] = sum_i partial[i, s], i ascending; partial float32 [num_partials, num_rows], contiguous."""
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = slots < num_rows
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = partial_ptr + slots
    for _ in range(num_partials):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += num_rows
    tl.store(dweights_ptr + slots, acc, mask=mask)


@triton.jit
def _accumulate_rows_times_expert(
    acc,
    a_ptr,
    b_ptr,
    num_rows,
    row_start,
    rows64,
    row_mask,
    expert,
    n0,
    cols,
    col_mask,
    hidden,
    ffn,
    stride_a_p,
    stride_a_f,
    stride_b_r,
    stride_b_h,
    NUM_EXPERTS: tl.constexpr,
    FP32_DOT: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc + a[rows] @ b_e[:, cols] over K = ffn (cols = n0 + arange(BLOCK_N)): a [num_rows, ffn] (sorted order),
    b [E*F, H] with b_e its rows e*F:(e+1)*F. One dot per K-step, so the MMA pipeline stays full (two dots into one
    accumulator would drain it between them). USE_TMA: a block of a past the expert's rows holds the next expert's
    rows or zeros (masked at the store), b as [E, F, H] zero-fills past the expert's F rows."""
    ks = tl.arange(0, BLOCK_K)
    a_src = tile_descriptor(a_ptr, (num_rows, ffn), (stride_a_p, 1), (BLOCK_M, BLOCK_K), USE_TMA)
    b_src = expert_weight_descriptor(b_ptr, ffn, hidden, stride_b_r, NUM_EXPERTS, BLOCK_K, BLOCK_N, USE_TMA)
    a_ptrs = a_ptr + rows64[:, None] * stride_a_p + ks[None, :] * stride_a_f
    b_ptrs = b_ptr + (expert * ffn + ks).to(tl.int64)[:, None] * stride_b_r + cols[None, :] * stride_b_h
    for k0 in range(0, ffn, BLOCK_K):
        k_mask = ks < ffn - k0
        a_tile = load_tile(a_src, (row_start, k0), a_ptrs, row_mask[:, None] & k_mask[None, :], USE_TMA)
        b_tile = load_tile(b_src, (expert, k0, n0), b_ptrs, k_mask[:, None] & col_mask[None, :], USE_TMA)
        acc = dot(a_tile, b_tile, acc, FP32_DOT)
        a_ptrs += BLOCK_K * stride_a_f
        b_ptrs += BLOCK_K * stride_b_r
    return acc


@triton.jit(do_not_specialize=["num_rows", "rows_bucket"])
def _moe_up_dgrad_kernel(
    dgate_ptr,
    dup_ptr,
    w1_ptr,
    v1_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    dx_slot_ptr,
    num_rows,
    rows_bucket,  # autotune key only: next power of two of num_rows, so a new length does not re-tune
    hidden,
    ffn,
    stride_dgate_p,
    stride_dgate_f,
    stride_dup_p,
    stride_dup_f,
    stride_w1_r,
    stride_w1_h,
    stride_v1_r,
    stride_v1_h,
    NUM_EXPERTS: tl.constexpr,
    FP32_DOT: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx_slot[s, n] = dgate[p] @ w1_e[:, n] + dup[p] @ v1_e[:, n] for sorted rows p of expert e, s = sorted_slots[p].

    Two K loops back to back into one accumulator (the dgate @ w1_e term, then the dup @ v1_e one), each one dot per
    K-step. dx_slot is contiguous float32 [num_rows, hidden] in slot order. USE_TMA loads dgate, dup (sorted order)
    and the weights through descriptors (innermost strides 1)."""
    num_pid_m = launched_m_tiles(num_rows, NUM_EXPERTS, BLOCK_M)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    expert, row_start, row_end = expert_tile(pid_m, expert_offsets_ptr, NUM_EXPERTS, BLOCK_M)
    rows, _, row_mask = span_rows(row_start, row_end, sorted_slots_ptr, num_rows, BLOCK_M)
    if expert < 0:
        return
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_rows_times_expert(
        acc, dgate_ptr, w1_ptr, num_rows, row_start, rows64, row_mask, expert, n0, cols, col_mask, hidden, ffn,
        stride_dgate_p, stride_dgate_f, stride_w1_r, stride_w1_h, NUM_EXPERTS, FP32_DOT, USE_TMA, BLOCK_M, BLOCK_N,
        BLOCK_K,
    )  # fmt: skip
    acc = _accumulate_rows_times_expert(
        acc, dup_ptr, v1_ptr, num_rows, row_start, rows64, row_mask, expert, n0, cols, col_mask, hidden, ffn,
        stride_dup_p, stride_dup_f, stride_v1_r, stride_v1_h, NUM_EXPERTS, FP32_DOT, USE_TMA, BLOCK_M, BLOCK_N,
        BLOCK_K,
    )  # fmt: skip

    # The slots again, here rather than kept live (in the store's layout, 16 a thread) across both K loops.
    _, _, slots, row_mask = tile_rows(pid_m, sorted_slots_ptr, expert_offsets_ptr, num_rows, NUM_EXPERTS, BLOCK_M)
    out_offs = slots.to(tl.int64)[:, None] * hidden + cols[None, :]
    tl.store(dx_slot_ptr + out_offs, acc, mask=row_mask[:, None] & col_mask[None, :])


# Keys: the row bucket, the widths and every constexpr a launch passes (each changes the code).
_DOWN_BWD = autotuned_by_class(
    _moe_down_bwd_kernel,
    _down_bwd_configs(),
    ["rows_bucket", "hidden", "ffn", "NUM_EXPERTS", "STORE_H", "FP32_DOT", "USE_TMA"],
)
_UP_DGRAD = autotuned_by_class(
    _moe_up_dgrad_kernel, _up_dgrad_configs(), ["rows_bucket", "hidden", "ffn", "NUM_EXPERTS", "FP32_DOT", "USE_TMA"]
)


@torch.library.triton_op("dbrx_fast::moe_down_bwd", mutates_args={})
def moe_down_bwd(
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    sorted_slots: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    store_h: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgate, dup, dweights, hw): dgate, dup [T*k, F] in sorted order and gate's dtype, dweights [T, k] float32, and
    with store_h hw = weights.flat[s] * silu(gate) * up [T*k, F] in sorted order and gate's dtype, rounded once, the
    operand `moe_down_wgrad` takes (else hw is [0, F]). hw is transient: as large as gate, and freed once dw2 is
    computed.

    dout [T, H]; gate, up [T*k, F] saved by the forward; w2 [E*F, H]; weights [T, k] float32.
    """
    sorted_slots, expert_offsets, num_experts, num_rows, hidden = check_down_grad_inputs(
        dout, gate, up, weights, sorted_slots, expert_offsets, top_k
    )
    ffn = gate.shape[1]
    check_expert_weight("w2", w2, gate, "gate", num_experts, hidden, ffn)

    dgate = gate.new_empty((num_rows, ffn))
    dup = gate.new_empty((num_rows, ffn))
    hw = gate.new_empty((num_rows if store_h else 0, ffn))
    num_partials = triton.cdiv(ffn, _DOWN_BWD_BLOCK_N)
    partial = gate.new_empty((num_partials, num_rows), dtype=torch.float32)
    dweights = gate.new_empty((dout.shape[0], top_k), dtype=torch.float32)
    if num_rows == 0 or ffn == 0:
        return dgate, dup, dweights.zero_(), hw

    def grid(meta):
        return (num_m_tiles_upper_bound(num_rows, num_experts, meta["BLOCK_M"]) * num_partials,)

    launch_gemm(
        _DOWN_BWD,
        grid,
        dout,
        gate,
        up,
        w2,
        weights,
        sorted_slots,
        expert_offsets,
        dgate,
        dup,
        hw if store_h else dgate,  # not written without STORE_H
        partial,
        num_rows,
        triton.next_power_of_2(num_rows),
        hidden,
        ffn,
        top_k,
        dout.stride(0),
        dout.stride(1),
        gate.stride(0),
        gate.stride(1),
        up.stride(0),
        up.stride(1),
        w2.stride(0),
        w2.stride(1),
        weights.stride(0),
        weights.stride(1),
        NUM_EXPERTS=num_experts,
        STORE_H=store_h,
        BLOCK_N=_DOWN_BWD_BLOCK_N,
        tma_operands=(w2,),
    )
    grid = (triton.cdiv(num_rows, _SUM_PARTIALS_BLOCK),)
    launch(
        _moe_sum_partials_kernel,
        grid,
        partial,
        dweights,
        num_rows,
        num_partials,
        BLOCK=_SUM_PARTIALS_BLOCK,
        num_warps=4,
    )
    return dgate, dup, dweights, hw


@torch.library.triton_op("dbrx_fast::moe_up_dgrad", mutates_args={})
def moe_up_dgrad(
    dgate: torch.Tensor,
    dup: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor,
    sorted_slots: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    num_tokens: int,
) -> torch.Tensor:
    """dx [T, H] in dgate's dtype: dx[t] = sum_j (dgate[p] @ w1_e + dup[p] @ v1_e) over the token's slots
    s = t*k + j (p the sorted row of s), summed in fp32 in slot order and rounded once.

    dgate, dup [T*k, F] in sorted order (from `moe_down_bwd`); w1, v1 [E*F, H].
    """
    check_top_k(top_k)
    check_preact(dgate, dup, ("dgate", "dup"))
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be non-negative, got {num_tokens}")
    num_rows, ffn = num_tokens * top_k, dgate.shape[1]
    check_matrix("dgate", dgate, (num_rows, ffn), "[T*k, F]")
    sorted_slots, expert_offsets, num_experts = check_routing(
        sorted_slots, expert_offsets, top_k, num_rows, dgate.device
    )
    check_expert_weight("w1", w1, dgate, "dgate", num_experts, ffn=ffn)
    hidden = w1.shape[1]
    check_expert_weight("v1", v1, dgate, "dgate", num_experts, hidden, ffn)

    if num_rows == 0 or hidden == 0 or ffn == 0:
        return dgate.new_zeros((num_tokens, hidden))
    dx_slot = dgate.new_empty((num_rows, hidden), dtype=torch.float32)

    def grid(meta):
        return (num_m_tiles_upper_bound(num_rows, num_experts, meta["BLOCK_M"]) * triton.cdiv(hidden, meta["BLOCK_N"]),)

    launch_gemm(
        _UP_DGRAD,
        grid,
        dgate,
        dup,
        w1,
        v1,
        sorted_slots,
        expert_offsets,
        dx_slot,
        num_rows,
        triton.next_power_of_2(num_rows),
        hidden,
        ffn,
        dgate.stride(0),
        dgate.stride(1),
        dup.stride(0),
        dup.stride(1),
        w1.stride(0),
        w1.stride(1),
        v1.stride(0),
        v1.stride(1),
        NUM_EXPERTS=num_experts,
        tma_operands=(dgate, dup, w1, v1),
    )
    return moe_combine(dx_slot, top_k, dgate.dtype)


def compile_specs() -> list[CompileSpec]:
    """Every (GEMM class, dtype, autotune config) the input-gradient kernels launch with, at DBRX's shapes (see
    `launch_args` in moe_tiles.py)."""
    specs = gemm_path_specs(
        "moe_down_bwd",
        _moe_down_bwd_kernel,
        _down_bwd_configs(),
        ("weights_ptr", "partial_ptr"),
        fixed={"BLOCK_N": _DOWN_BWD_BLOCK_N},
        variants=({"STORE_H": True}, {"STORE_H": False}),
    )
    specs += gemm_path_specs("moe_up_dgrad", _moe_up_dgrad_kernel, _up_dgrad_configs(), ("dx_slot_ptr",))
    name = f"moe_sum_partials fp32 BLOCK={_SUM_PARTIALS_BLOCK}"
    specs.append(kernel_spec(name, _moe_sum_partials_kernel, "fp32", (), 4, BLOCK=_SUM_PARTIALS_BLOCK))
    return specs
