"""Grouped GLU expert GEMMs, backward of out[t] = sum_j weights[t, j] * (silu(x[t] @ w1_e.T) * (x[t] @ v1_e.T)) @ w2_e.

Shapes and layouts as in kernels/moe_experts.py: x [T, H]; w1, v1, w2 [E*F, H] in Hugging Face's native layout, used
in place (strided views are fine); weights [T, k] float32; sorted_slots [T*k] int32 (slot s = t*k + j, grouped by
expert, ascending within an expert); expert_offsets [E+1] int32. The forward saved gate and up, [T*k, F] in x's dtype
and in sorted order (row p is slot sorted_slots[p], token sorted_slots[p] // k). dout [T, H] is the output's gradient.

Four launches, each a grouped GEMM with a fused prologue or epilogue:
1. `moe_down_bwd`: dh'[p] = dout[t] @ w2_e.T, gathering the dout rows inside the GEMM. The epilogue recomputes
   h = silu(gate) * up and writes rowsum(h * dh') of its F-tile to a [F-tiles, T*k] float32 buffer, which a second
   kernel sums in tile order into dweights (no atomics). With dh = weights.flat[s] * dh' it stores
   dgate = dh * up * silu'(gate) and dup = dh * silu(gate).
2. `moe_down_wgrad`: dw2_e = sum over the expert's rows of h[p]^T (weights.flat[s] * dout[t]); one program per
   (F-tile, H-tile, expert) walks the expert's rows in order, so the sum is deterministic and an empty expert writes
   zeros.
3. `moe_up_dgrad`: dx_slot[s] = dgate[p] @ w1_e + dup[p] @ v1_e (two dots into one fp32 accumulator), stored per slot
   in float32; the forward's `moe_combine` then sums each token's k slots in slot order and rounds once.
4. `moe_up_wgrad`: dw1_e = sum_p dgate[p]^T x[t], dv1_e = sum_p dup[p]^T x[t], two accumulators sharing the gathered
   x rows, one program per (F-tile, H-tile, expert) as in 2.

The M grids of 1 and 3 are the upper bound `num_m_tiles_upper_bound` mapped through `expert_tile` (no host
synchronisation); 2 and 4 launch one program per expert and read its row range on the device. Every sum has a fixed
order, so results are bitwise reproducible for a given autotune config. Every row, slot and expert range read from
the routing metadata is clamped or masked, so corrupt metadata gives undefined gradients but no access out of bounds.

Limits: fp16, bf16 and fp32, every floating tensor in one dtype (the routing weights and dweights are float32); fp32
multiplies in full fp32 unless torch.set_float32_matmul_precision allows TF32; float64 raises TypeError so that
callers fall back to torch. Scratch memory: dx_slot, float32 [T*k, H] (3.2 GB at 32768 tokens, k = 4, H = 6144, like
the forward's y), and the dweights partials, float32 [cdiv(F, 128), T*k].
"""

import inspect

import torch
import triton
import triton.language as tl

from .autotune import pick
from .compile_spec import CompileSpec
from .moe_experts import moe_combine
from .moe_tiles import (
    DBRX_FFN,
    DBRX_HIDDEN,
    DBRX_NUM_EXPERTS,
    check_float,
    check_routing,
    describe,
    dot,
    expert_tile,
    grouped_tile,
    launched_m_tiles,
    num_m_tiles_upper_bound,
    tile_rows,
    use_fp32_dot,
)

# The dweights partial buffer has one row per F-tile and is allocated before the autotuner picks a config, so every
# moe_down_bwd config shares this BLOCK_N.
_DOWN_BWD_BLOCK_N = 128
_SUM_PARTIALS_BLOCK = 1024

# Each kernel has its tiles per GEMM class, one autotuner each (see `_autotuned`): "16bit" (fp16 and bf16 on tensor
# cores), "tf32" (fp32 on tensor cores, twice the shared memory a tile) and "fp32_dot" (FP32_DOT: full-fp32 dots on
# CUDA cores, whose operands live in registers, so small tiles). The pinned config of each class comes first. Every one
# compiles for sm_80 and sm_90 without spilling; the tiles left out spilled or overflowed sm_80's shared memory.


def _cfg(num_warps: int, num_stages: int, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def _down_bwd_configs() -> dict[str, list]:
    """dh' = dout @ w2_e.T tiles (M = rows, N = F fixed at _DOWN_BWD_BLOCK_N, K = H). 128-row tiles need 8 warps and
    the split epilogue to fit in 16 bits, and spill in fp32."""
    return {
        "16bit": [
            _cfg(8, 3, BLOCK_M=128, BLOCK_K=64, GROUP_M=8),
            _cfg(8, 4, BLOCK_M=64, BLOCK_K=64, GROUP_M=8),
            _cfg(8, 3, BLOCK_M=64, BLOCK_K=128, GROUP_M=8),
            _cfg(16, 3, BLOCK_M=128, BLOCK_K=64, GROUP_M=8),
        ],
        "tf32": [_cfg(8, 4, BLOCK_M=64, BLOCK_K=32, GROUP_M=8), _cfg(8, 3, BLOCK_M=64, BLOCK_K=64, GROUP_M=8)],
        "fp32_dot": [
            _cfg(8, 3, BLOCK_M=64, BLOCK_K=16, GROUP_M=8),
            _cfg(8, 2, BLOCK_M=64, BLOCK_K=32, GROUP_M=8),
            _cfg(8, 2, BLOCK_M=32, BLOCK_K=32, GROUP_M=8),
        ],
    }


def _up_dgrad_configs() -> dict[str, list]:
    """dx_slot = dgate @ w1_e + dup @ v1_e tiles (M = rows, N = H, K = F). Four operand tiles per K-step: a 16-bit
    128x128 tile takes BLOCK_K = 32, as three stages of BLOCK_K = 64 exceed sm_80's shared memory and two spill."""
    return {
        "16bit": [
            _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            _cfg(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        ],
        "tf32": [
            _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            _cfg(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            _cfg(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        ],
        "fp32_dot": [
            _cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8),
            _cfg(4, 2, BLOCK_M=32, BLOCK_N=128, BLOCK_K=16, GROUP_M=8),
        ],
    }


def _down_wgrad_configs() -> dict[str, list]:
    """dw2 tiles (output [BLOCK_F, BLOCK_H], K = the expert's rows in steps of BLOCK_M)."""
    return {
        "16bit": [
            _cfg(8, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=32),
            _cfg(4, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=32),
            _cfg(4, 4, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32),
            _cfg(4, 4, BLOCK_F=128, BLOCK_H=64, BLOCK_M=32),
        ],
        "tf32": [
            _cfg(8, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=32),
            _cfg(4, 4, BLOCK_F=64, BLOCK_H=128, BLOCK_M=64),
            _cfg(4, 4, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32),
            _cfg(8, 4, BLOCK_F=128, BLOCK_H=64, BLOCK_M=32),
        ],
        "fp32_dot": [_cfg(8, 2, BLOCK_F=64, BLOCK_H=128, BLOCK_M=16), _cfg(8, 2, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32)],
    }


def _up_wgrad_configs() -> dict[str, list]:
    """dw1 and dv1 tiles: two fp32 accumulators, so 128x128 is the largest output tile."""
    return {
        "16bit": [
            _cfg(8, 3, BLOCK_F=128, BLOCK_H=128, BLOCK_M=64),
            _cfg(8, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=32),
            _cfg(4, 3, BLOCK_F=64, BLOCK_H=128, BLOCK_M=64),
            _cfg(4, 3, BLOCK_F=128, BLOCK_H=64, BLOCK_M=64),
        ],
        "tf32": [
            _cfg(8, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=16),
            _cfg(4, 3, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32),
            _cfg(8, 3, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32),
        ],
        "fp32_dot": [
            _cfg(8, 2, BLOCK_F=64, BLOCK_H=128, BLOCK_M=16),
            _cfg(4, 2, BLOCK_F=64, BLOCK_H=64, BLOCK_M=16),
            _cfg(4, 2, BLOCK_F=32, BLOCK_H=128, BLOCK_M=16),
        ],
    }


def _autotuned(kernel, configs: dict[str, list], key: list[str]) -> dict[str, object]:
    """One autotuner per GEMM class over the same @triton.jit kernel, each with its class's tiles (pinned to the
    first under the interpreter or DBRX_FAST_AUTOTUNE=0). Autotune keys are shape sizes only."""
    return {cls: triton.autotune(configs=pick(cfgs), key=key)(kernel) for cls, cfgs in configs.items()}


def _gemm_class(dtype: torch.dtype) -> tuple[str, bool]:
    """(GEMM class, FP32_DOT) of a launch on `dtype` tensors."""
    fp32_dot = use_fp32_dot(dtype)
    if dtype != torch.float32:
        return "16bit", fp32_dot
    return ("fp32_dot" if fp32_dot else "tf32"), fp32_dot


@triton.jit
def _expert_rows(expert_offsets_ptr, expert, num_rows):
    """Sorted rows [row_start, row_end) of `expert`, clamped to [0, num_rows) so corrupt offsets cannot move a load
    out of bounds or make the row loop run past the operands."""
    row_start = tl.maximum(tl.load(expert_offsets_ptr + expert), 0)
    row_end = tl.minimum(tl.load(expert_offsets_ptr + expert + 1), num_rows)
    return row_start, row_end


@triton.jit
def _chunk_rows(p0, row_end, sorted_slots_ptr, num_rows, top_k, BLOCK_M: tl.constexpr):
    """Rows p0:p0+BLOCK_M of an expert: (slots, tokens as int64, mask of real rows with a valid slot)."""
    rows = p0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
    row_mask &= (slots >= 0) & (slots < num_rows)
    return slots, (slots // top_k).to(tl.int64), row_mask


@triton.jit
def _glu_bwd_half(
    dh_raw,
    weight,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    local,
    cols,
    row_mask,
    ffn,
    stride_gate_p,
    stride_gate_f,
    stride_up_p,
    stride_up_f,
):
    """GLU backward of one column block: stores dgate = dh * up * silu'(gate) and dup = dh * silu(gate) with
    dh = weight * dh_raw, and returns the row sums of h * dh_raw. The pointers point at the tile's first row; local
    [BLOCK_M, 1] and cols [1, BLOCK] index within it. Masked rows and columns load zeros, so they add nothing."""
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
    return row_sum


@triton.jit
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
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dgate, dup [num_rows, ffn] (contiguous, sorted order) and partial[pid_n, s] = sum over the F-tile of h * dh'
    (contiguous float32 [cdiv(ffn, BLOCK_N), num_rows], slot order) for the sorted rows p of expert e."""
    num_pid_m = launched_m_tiles(num_rows, NUM_EXPERTS, BLOCK_M)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(ffn, BLOCK_N), GROUP_M)
    expert, row_start, row_end = expert_tile(pid_m, expert_offsets_ptr, NUM_EXPERTS, BLOCK_M)
    if expert < 0:
        return
    # Clamped like _expert_rows: corrupt offsets must not move a load or a store out of bounds.
    row_start = tl.maximum(row_start, 0)
    slots, tokens, row_mask = _chunk_rows(
        row_start, tl.minimum(row_end, num_rows), sorted_slots_ptr, num_rows, top_k, BLOCK_M
    )
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < ffn
    ks = tl.arange(0, BLOCK_K)
    dout_ptrs = dout_ptr + tokens[:, None] * stride_dout_t + ks[None, :] * stride_dout_h
    # w2_e.T as a [BLOCK_K, BLOCK_N] tile read straight from the [E*F, H] layout: an int64 offset to the tile's
    # first row, int32 offsets within it.
    w2_ptrs = w2_ptr + (expert * ffn + pid_n * BLOCK_N).to(tl.int64) * stride_w2_r
    w2_ptrs += tl.arange(0, BLOCK_N)[None, :] * stride_w2_r + ks[:, None] * stride_w2_h
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = ks < hidden - k0
        dout_tile = tl.load(dout_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w2_tile = tl.load(w2_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
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
        local,
        half,
        row_mask,
        ffn,
        stride_gate_p,
        stride_gate_f,
        stride_up_p,
        stride_up_f,
    )
    row_sum += _glu_bwd_half(
        acc_hi,
        weight,
        gate_ptr,
        up_ptr,
        dgate_ptr,
        dup_ptr,
        local,
        half + BLOCK_N // 2,
        row_mask,
        ffn,
        stride_gate_p,
        stride_gate_f,
        stride_up_p,
        stride_up_f,
    )
    tl.store(partial_ptr + pid_n.to(tl.int64) * num_rows + slots, row_sum, mask=row_mask)


@triton.jit
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
def _moe_down_wgrad_kernel(
    gate_ptr,
    up_ptr,
    dout_ptr,
    weights_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    dw2_ptr,
    num_rows,
    hidden,
    ffn,
    top_k,
    stride_gate_p,
    stride_gate_f,
    stride_up_p,
    stride_up_f,
    stride_dout_t,
    stride_dout_h,
    stride_weights_t,
    stride_weights_k,
    FP32_DOT: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dw2[e*F + f, n] = sum_p h[p, f] * weights.flat[s] * dout[t, n] over expert e's sorted rows p, in row order.

    dw2 is contiguous [E*ffn, hidden]."""
    fs = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    expert = tl.program_id(2)
    f_mask = fs < ffn
    h_mask = hs < hidden
    row_start, row_end = _expert_rows(expert_offsets_ptr, expert, num_rows)
    acc = tl.zeros((BLOCK_F, BLOCK_H), dtype=tl.float32)
    for p0 in range(row_start, row_end, BLOCK_M):
        slots, tokens, row_mask = _chunk_rows(p0, row_end, sorted_slots_ptr, num_rows, top_k, BLOCK_M)
        # (weights.flat[s] * h[p]).T as a [BLOCK_F, BLOCK_M] tile, recomputed from the saved gate and up. The
        # routing weight goes on h so that the dout rows feed the dot straight from memory. The chunk's rows are
        # consecutive: an int64 offset to its first row, int32 offsets within it.
        local = tl.arange(0, BLOCK_M)[None, :]
        t_mask = f_mask[:, None] & row_mask[None, :]
        first = tl.cast(p0, tl.int64)
        gate_ptrs = gate_ptr + first * stride_gate_p + (local * stride_gate_p + fs[:, None] * stride_gate_f)
        up_ptrs = up_ptr + first * stride_up_p + (local * stride_up_p + fs[:, None] * stride_up_f)
        gate = tl.load(gate_ptrs, mask=t_mask, other=0.0).to(tl.float32)
        # other=0: a masked row's weight must not turn its zero h into NaN.
        weight = tl.load(
            weights_ptr + tokens * stride_weights_t + (slots % top_k) * stride_weights_k, mask=row_mask, other=0.0
        )
        h_t = gate * tl.sigmoid(gate) * tl.load(up_ptrs, mask=t_mask, other=0.0).to(tl.float32) * weight[None, :]
        dout = tl.load(
            dout_ptr + tokens[:, None] * stride_dout_t + hs[None, :] * stride_dout_h,
            mask=row_mask[:, None] & h_mask[None, :],
            other=0.0,
        )
        # Rounded to the activations' dtype (the forward rounded h likewise) so that the dot runs on tensor cores.
        acc = dot(h_t.to(dout.dtype), dout, acc, FP32_DOT)
    out_offs = (expert * ffn + fs).to(tl.int64)[:, None] * hidden + hs[None, :]
    tl.store(dw2_ptr + out_offs, acc.to(dw2_ptr.dtype.element_ty), mask=f_mask[:, None] & h_mask[None, :])


@triton.jit
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx_slot[s, n] = dgate[p] @ w1_e[:, n] + dup[p] @ v1_e[:, n] for sorted rows p of expert e, s = sorted_slots[p].

    dx_slot is contiguous float32 [num_rows, hidden] in slot order."""
    num_pid_m = launched_m_tiles(num_rows, NUM_EXPERTS, BLOCK_M)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    expert, rows, slots, row_mask = tile_rows(
        pid_m, sorted_slots_ptr, expert_offsets_ptr, num_rows, NUM_EXPERTS, BLOCK_M
    )
    if expert < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    dgate_ptrs = dgate_ptr + rows64[:, None] * stride_dgate_p + ks[None, :] * stride_dgate_f
    dup_ptrs = dup_ptr + rows64[:, None] * stride_dup_p + ks[None, :] * stride_dup_f
    w_rows = (expert * ffn + ks).to(tl.int64)
    w1_ptrs = w1_ptr + w_rows[:, None] * stride_w1_r + cols[None, :] * stride_w1_h
    v1_ptrs = v1_ptr + w_rows[:, None] * stride_v1_r + cols[None, :] * stride_v1_h
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, ffn, BLOCK_K):
        k_mask = ks < ffn - k0
        a_mask = row_mask[:, None] & k_mask[None, :]
        b_mask = k_mask[:, None] & col_mask[None, :]
        acc = dot(tl.load(dgate_ptrs, mask=a_mask, other=0.0), tl.load(w1_ptrs, mask=b_mask, other=0.0), acc, FP32_DOT)
        acc = dot(tl.load(dup_ptrs, mask=a_mask, other=0.0), tl.load(v1_ptrs, mask=b_mask, other=0.0), acc, FP32_DOT)
        dgate_ptrs += BLOCK_K * stride_dgate_f
        dup_ptrs += BLOCK_K * stride_dup_f
        w1_ptrs += BLOCK_K * stride_w1_r
        v1_ptrs += BLOCK_K * stride_v1_r

    out_offs = slots.to(tl.int64)[:, None] * hidden + cols[None, :]
    tl.store(dx_slot_ptr + out_offs, acc, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _moe_up_wgrad_kernel(
    dgate_ptr,
    dup_ptr,
    x_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    dw1_ptr,
    dv1_ptr,
    num_rows,
    hidden,
    ffn,
    top_k,
    stride_dgate_p,
    stride_dgate_f,
    stride_dup_p,
    stride_dup_f,
    stride_x_t,
    stride_x_h,
    FP32_DOT: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dw1[e*F + f, n] = sum_p dgate[p, f] * x[t, n] and dv1 likewise with dup, over expert e's sorted rows p in
    row order. dw1 and dv1 are contiguous [E*ffn, hidden]."""
    fs = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    expert = tl.program_id(2)
    f_mask = fs < ffn
    h_mask = hs < hidden
    row_start, row_end = _expert_rows(expert_offsets_ptr, expert, num_rows)
    acc_w1 = tl.zeros((BLOCK_F, BLOCK_H), dtype=tl.float32)
    acc_v1 = tl.zeros((BLOCK_F, BLOCK_H), dtype=tl.float32)
    for p0 in range(row_start, row_end, BLOCK_M):
        slots, tokens, row_mask = _chunk_rows(p0, row_end, sorted_slots_ptr, num_rows, top_k, BLOCK_M)
        # dgate.T and dup.T as [BLOCK_F, BLOCK_M] tiles (the chunk's rows are consecutive: an int64 offset to its
        # first row, int32 offsets within it), and the x rows of the chunk's tokens.
        local = tl.arange(0, BLOCK_M)[None, :]
        t_mask = f_mask[:, None] & row_mask[None, :]
        first = tl.cast(p0, tl.int64)
        dgate_ptrs = dgate_ptr + first * stride_dgate_p
        dgate_t = tl.load(dgate_ptrs + local * stride_dgate_p + fs[:, None] * stride_dgate_f, mask=t_mask, other=0.0)
        dup_ptrs = dup_ptr + first * stride_dup_p
        dup_t = tl.load(dup_ptrs + local * stride_dup_p + fs[:, None] * stride_dup_f, mask=t_mask, other=0.0)
        x_tile = tl.load(
            x_ptr + tokens[:, None] * stride_x_t + hs[None, :] * stride_x_h,
            mask=row_mask[:, None] & h_mask[None, :],
            other=0.0,
        )
        acc_w1 = dot(dgate_t, x_tile, acc_w1, FP32_DOT)
        acc_v1 = dot(dup_t, x_tile, acc_v1, FP32_DOT)
    out_offs = (expert * ffn + fs).to(tl.int64)[:, None] * hidden + hs[None, :]
    out_mask = f_mask[:, None] & h_mask[None, :]
    tl.store(dw1_ptr + out_offs, acc_w1.to(dw1_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv1_ptr + out_offs, acc_v1.to(dv1_ptr.dtype.element_ty), mask=out_mask)


_DOWN_BWD = _autotuned(_moe_down_bwd_kernel, _down_bwd_configs(), ["rows_bucket", "hidden", "ffn"])
_DOWN_WGRAD = _autotuned(_moe_down_wgrad_kernel, _down_wgrad_configs(), ["hidden", "ffn"])
_UP_DGRAD = _autotuned(_moe_up_dgrad_kernel, _up_dgrad_configs(), ["rows_bucket", "hidden", "ffn"])
_UP_WGRAD = _autotuned(_moe_up_wgrad_kernel, _up_wgrad_configs(), ["hidden", "ffn"])


def _check_like(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """`t` is a supported float tensor in `like`'s dtype and on its device."""
    check_float(name, t)
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{name} ({t.dtype}, {t.device}) must match {like_name} ({like.dtype}, {like.device})")


def _check_matrix(name: str, t: torch.Tensor, shape: tuple[int, int], what: str) -> None:
    if t.dim() != 2 or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {what} = {list(shape)}, got shape {tuple(t.shape)}")


def _check_preact(gate: torch.Tensor, up: torch.Tensor, names: tuple[str, str] = ("gate", "up")) -> None:
    """gate and up (or dgate and dup): [T*k, F] in one supported dtype, on one device."""
    check_float(names[0], gate)
    if gate.dim() != 2:
        raise ValueError(f"{names[0]} must be [T*k, F], got shape {tuple(gate.shape)}")
    _check_like(names[1], up, names[0], gate)
    _check_matrix(names[1], up, tuple(gate.shape), f"[T*k, F] like {names[0]}")


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")


def _check_weights(weights: torch.Tensor, num_tokens: int, top_k: int, device: torch.device) -> None:
    if weights.dtype != torch.float32:
        raise TypeError(f"weights must be float32, got {weights.dtype}")
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device}, the activations on {device}")
    _check_matrix("weights", weights, (num_tokens, top_k), "[T, k]")


def _check_num_experts(expert_offsets: torch.Tensor, num_experts: int) -> None:
    if num_experts < 1 or expert_offsets.numel() != num_experts + 1:
        raise ValueError(
            f"num_experts = {num_experts} needs expert_offsets of E+1 entries, got {expert_offsets.numel()}"
        )


def _check_expert_weight(name: str, w: torch.Tensor, num_experts: int, ffn: int, hidden: int) -> None:
    _check_matrix(name, w, (num_experts * ffn, hidden), "[E*F, H]")


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgate, dup, dweights): dgate, dup [T*k, F] in sorted order and gate's dtype, dweights [T, k] float32.

    dout [T, H]; gate, up [T*k, F] saved by the forward; w2 [E*F, H]; weights [T, k] float32.
    """
    _check_preact(gate, up)
    _check_like("dout", dout, "gate", gate)
    _check_like("w2", w2, "gate", gate)
    if dout.dim() != 2:
        raise ValueError(f"dout must be [T, H], got shape {tuple(dout.shape)}")
    _check_top_k(top_k)
    num_rows, hidden = dout.shape[0] * top_k, dout.shape[1]
    _check_weights(weights, dout.shape[0], top_k, gate.device)
    _check_matrix("gate", gate, (num_rows, gate.shape[1]), "[T*k, F]")
    sorted_slots, expert_offsets, num_experts = check_routing(
        sorted_slots, expert_offsets, top_k, num_rows, gate.device
    )
    ffn = gate.shape[1]
    _check_expert_weight("w2", w2, num_experts, ffn, hidden)

    dgate = gate.new_empty((num_rows, ffn))
    dup = gate.new_empty((num_rows, ffn))
    num_partials = triton.cdiv(ffn, _DOWN_BWD_BLOCK_N)
    partial = gate.new_empty((num_partials, num_rows), dtype=torch.float32)
    dweights = gate.new_empty((dout.shape[0], top_k), dtype=torch.float32)
    if num_rows == 0 or ffn == 0:
        return dgate, dup, dweights.zero_()

    def grid(meta):
        return (num_m_tiles_upper_bound(num_rows, num_experts, meta["BLOCK_M"]) * num_partials,)

    gemm_class, fp32_dot = _gemm_class(gate.dtype)
    torch.library.wrap_triton(_DOWN_BWD[gemm_class])[grid](
        dout,
        gate,
        up,
        w2,
        weights,
        sorted_slots,
        expert_offsets,
        dgate,
        dup,
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
        FP32_DOT=fp32_dot,
        BLOCK_N=_DOWN_BWD_BLOCK_N,
    )
    torch.library.wrap_triton(_moe_sum_partials_kernel)[(triton.cdiv(num_rows, _SUM_PARTIALS_BLOCK),)](
        partial, dweights, num_rows, num_partials, BLOCK=_SUM_PARTIALS_BLOCK, num_warps=4
    )
    return dgate, dup, dweights


@torch.library.triton_op("dbrx_fast::moe_down_wgrad", mutates_args={})
def moe_down_wgrad(
    gate: torch.Tensor,
    up: torch.Tensor,
    dout: torch.Tensor,
    weights: torch.Tensor,
    sorted_slots: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    num_experts: int,
) -> torch.Tensor:
    """dw2 [E*F, H] in gate's dtype: dw2_e = sum over expert e's sorted rows p of h[p]^T (weights.flat[s] * dout[t]),
    with h = silu(gate) * up. An expert with no rows gets zeros."""
    _check_preact(gate, up)
    _check_like("dout", dout, "gate", gate)
    if dout.dim() != 2:
        raise ValueError(f"dout must be [T, H], got shape {tuple(dout.shape)}")
    _check_top_k(top_k)
    num_rows, hidden = dout.shape[0] * top_k, dout.shape[1]
    _check_weights(weights, dout.shape[0], top_k, gate.device)
    _check_matrix("gate", gate, (num_rows, gate.shape[1]), "[T*k, F]")
    sorted_slots, expert_offsets, _ = check_routing(sorted_slots, expert_offsets, top_k, num_rows, gate.device)
    _check_num_experts(expert_offsets, num_experts)
    ffn = gate.shape[1]

    dw2 = gate.new_empty((num_experts * ffn, hidden))
    if dw2.numel() == 0:
        return dw2

    def grid(meta):
        return (triton.cdiv(ffn, meta["BLOCK_F"]), triton.cdiv(hidden, meta["BLOCK_H"]), num_experts)

    gemm_class, fp32_dot = _gemm_class(gate.dtype)
    torch.library.wrap_triton(_DOWN_WGRAD[gemm_class])[grid](
        gate,
        up,
        dout,
        weights,
        sorted_slots,
        expert_offsets,
        dw2,
        num_rows,
        hidden,
        ffn,
        top_k,
        gate.stride(0),
        gate.stride(1),
        up.stride(0),
        up.stride(1),
        dout.stride(0),
        dout.stride(1),
        weights.stride(0),
        weights.stride(1),
        FP32_DOT=fp32_dot,
    )
    return dw2


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
    _check_preact(dgate, dup, ("dgate", "dup"))
    _check_like("w1", w1, "dgate", dgate)
    _check_like("v1", v1, "dgate", dgate)
    _check_top_k(top_k)
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be non-negative, got {num_tokens}")
    num_rows, ffn = num_tokens * top_k, dgate.shape[1]
    _check_matrix("dgate", dgate, (num_rows, ffn), "[T*k, F]")
    sorted_slots, expert_offsets, num_experts = check_routing(
        sorted_slots, expert_offsets, top_k, num_rows, dgate.device
    )
    if w1.dim() != 2:
        raise ValueError(f"w1 must be [E*F, H], got shape {tuple(w1.shape)}")
    hidden = w1.shape[1]
    _check_expert_weight("w1", w1, num_experts, ffn, hidden)
    _check_expert_weight("v1", v1, num_experts, ffn, hidden)

    if num_rows == 0 or hidden == 0 or ffn == 0:
        return dgate.new_zeros((num_tokens, hidden))
    dx_slot = dgate.new_empty((num_rows, hidden), dtype=torch.float32)

    def grid(meta):
        return (num_m_tiles_upper_bound(num_rows, num_experts, meta["BLOCK_M"]) * triton.cdiv(hidden, meta["BLOCK_N"]),)

    gemm_class, fp32_dot = _gemm_class(dgate.dtype)
    torch.library.wrap_triton(_UP_DGRAD[gemm_class])[grid](
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
        FP32_DOT=fp32_dot,
    )
    return moe_combine(dx_slot, top_k, dgate.dtype)


@torch.library.triton_op("dbrx_fast::moe_up_wgrad", mutates_args={})
def moe_up_wgrad(
    dgate: torch.Tensor,
    dup: torch.Tensor,
    x: torch.Tensor,
    sorted_slots: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dw1, dv1), each [E*F, H] in x's dtype: dw1_e = sum over expert e's sorted rows p of dgate[p]^T x[t], dv1_e
    likewise with dup, t = sorted_slots[p] // k. An expert with no rows gets zeros."""
    _check_preact(dgate, dup, ("dgate", "dup"))
    _check_like("x", x, "dgate", dgate)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    _check_top_k(top_k)
    num_rows, hidden, ffn = x.shape[0] * top_k, x.shape[1], dgate.shape[1]
    _check_matrix("dgate", dgate, (num_rows, ffn), "[T*k, F]")
    sorted_slots, expert_offsets, _ = check_routing(sorted_slots, expert_offsets, top_k, num_rows, x.device)
    _check_num_experts(expert_offsets, num_experts)

    dw1 = x.new_empty((num_experts * ffn, hidden))
    dv1 = x.new_empty((num_experts * ffn, hidden))
    if dw1.numel() == 0:
        return dw1, dv1

    def grid(meta):
        return (triton.cdiv(ffn, meta["BLOCK_F"]), triton.cdiv(hidden, meta["BLOCK_H"]), num_experts)

    gemm_class, fp32_dot = _gemm_class(x.dtype)
    torch.library.wrap_triton(_UP_WGRAD[gemm_class])[grid](
        dgate,
        dup,
        x,
        sorted_slots,
        expert_offsets,
        dw1,
        dv1,
        num_rows,
        hidden,
        ffn,
        top_k,
        dgate.stride(0),
        dgate.stride(1),
        dup.stride(0),
        dup.stride(1),
        x.stride(0),
        x.stride(1),
        FP32_DOT=fp32_dot,
    )
    return dw1, dv1


def _launch_args(kernel, dtype: str, fp32_ptrs: tuple[str, ...]) -> tuple[dict[str, str], dict[str, object]]:
    """(signature, constexprs) of the @triton.jit `kernel`'s runtime arguments at DBRX's shapes with contiguous tensors.

    Pointers: the routing metadata int32, those named in fp32_ptrs float32, the others in `dtype`. A launch
    specializes every integer divisible by 16 and every one equal to 1, which proves the rows 16-byte aligned so that
    tiles load as vectors through cp.async; a CompileSpec cannot say "divisible by 16", so, as in moe_tiles.py, the
    sizes and strides are fixed at DBRX's values (hidden, ffn and row strides 6144 or 10752, inner strides 1). What
    stays a plain i32 varies with the batch: the row count, its bucket, k and the routing weights' row stride.
    """
    signature, constexprs = {}, {}
    # The Python function's own parameters: the JIT and interpreter wrappers describe them differently.
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if param.annotation is tl.constexpr:
            continue
        if name in ("sorted_slots_ptr", "expert_offsets_ptr"):
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_ptrs else f"*{dtype}"
        elif name in ("hidden", "stride_dout_t", "stride_x_t", "stride_w1_r", "stride_v1_r", "stride_w2_r"):
            constexprs[name] = DBRX_HIDDEN
        elif name in ("ffn", "stride_gate_p", "stride_up_p", "stride_dgate_p", "stride_dup_p"):
            constexprs[name] = DBRX_FFN
        elif name.startswith("stride_") and name[-2:] in ("_h", "_f", "_k"):
            constexprs[name] = 1
        else:
            signature[name] = "i32"
    return signature, constexprs


def compile_specs() -> list[CompileSpec]:
    """Every (dtype, autotune config) the backward kernels launch with, at DBRX's shapes (see `_launch_args`): the
    16-bit class in fp16 and bf16, the tf32 and fp32_dot classes in fp32 (FP32_DOT: no tensor cores, so no wgmma)."""
    kernels = (
        ("moe_down_bwd", _moe_down_bwd_kernel, _down_bwd_configs(), ("weights_ptr", "partial_ptr")),
        ("moe_down_wgrad", _moe_down_wgrad_kernel, _down_wgrad_configs(), ("weights_ptr",)),
        ("moe_up_dgrad", _moe_up_dgrad_kernel, _up_dgrad_configs(), ("dx_slot_ptr",)),
        ("moe_up_wgrad", _moe_up_wgrad_kernel, _up_wgrad_configs(), ()),
    )
    dtypes = {"16bit": ("bf16", "fp16"), "tf32": ("fp32",), "fp32_dot": ("fp32",)}
    specs = []
    for name, kernel, configs, fp32_ptrs in kernels:
        fixed = {"NUM_EXPERTS": DBRX_NUM_EXPERTS} if "NUM_EXPERTS" in kernel.arg_names else {}
        if kernel is _moe_down_bwd_kernel:
            fixed["BLOCK_N"] = _DOWN_BWD_BLOCK_N
        for gemm_class, class_configs in configs.items():
            for dtype in dtypes[gemm_class]:
                signature, sizes = _launch_args(kernel, dtype, fp32_ptrs)
                for cfg in class_configs:
                    specs.append(
                        CompileSpec(
                            name=f"{name} {dtype} {gemm_class} {describe(cfg)}",
                            kernel=kernel,
                            signature=signature,
                            constexprs={**sizes, **fixed, "FP32_DOT": gemm_class == "fp32_dot", **cfg.kwargs},
                            num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages,
                            matrix=gemm_class != "fp32_dot",
                        )
                    )
    signature, sizes = _launch_args(_moe_sum_partials_kernel, "fp32", ())
    specs.append(
        CompileSpec(
            name=f"moe_sum_partials fp32 BLOCK={_SUM_PARTIALS_BLOCK}",
            kernel=_moe_sum_partials_kernel,
            signature=signature,
            constexprs={**sizes, "BLOCK": _SUM_PARTIALS_BLOCK},
            num_warps=4,
        )
    )
    return specs
