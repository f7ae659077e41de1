"""Grouped GLU expert GEMMs, forward: out[t] = sum_j weights[t, j] * (silu(x[t] @ w1_e.T) * (x[t] @ v1_e.T)) @ w2_e.

Shapes: x [T, H] (any row stride); w1, v1, w2 [E*F, H] in Hugging Face's native layout, used in place (strided views
are fine): expert e owns rows e*F:(e+1)*F, and w2_e [F, H] is multiplied as stored. Routing metadata as produced by
kernels/moe_routing.py: weights [T, k] float32, sorted_slots [T*k] int32 (slot s = t*k + j, grouped by expert, ascending
within an expert) and expert_offsets [E+1] int32.

Three launches, every intermediate in "sorted order" (row p is slot sorted_slots[p]):
1. `moe_glu_up`: one kernel computes both up projections of a tile with one dot per K-step on a B tile that
   interleaves rows of w1_e and v1_e (one fp32 accumulator, split for the epilogue), gathering the x row of token
   sorted_slots[p] // k inside the GEMM (no permuted copy of x); the epilogue forms h = silu(gate) * up and stores
   h, and gate and up when the backward needs them, in x's dtype.
2. `moe_down`: y[s] = weights.flat[s] * (h[p] @ w2_e) for s = sorted_slots[p], the routing weight applied to the fp32
   accumulator and the row scattered back to slot order; y stays float32 so that the output is rounded only once.
3. `moe_combine`: out[t] = sum_j y[t*k + j], summed in fp32 in slot order and rounded once to x's dtype.

The M grid is the upper bound `num_m_tiles_upper_bound` and each program finds its (expert, rows) with `expert_tile`,
so nothing synchronises with the host and a decode step can be captured in a CUDA graph. No atomics: every sum has a
fixed order, so results are bitwise reproducible. Limits: fp16, bf16 and fp32 (fp32 multiplies in full fp32 unless
torch.set_float32_matmul_precision allows TF32); float64 raises TypeError so that callers fall back to torch.
"""

import torch
import triton
import triton.language as tl

from .compile_spec import CompileSpec
from .dtypes import TRITON_DTYPES
from .launch import launch
from .moe_checks import check_expert_weight, check_float, check_routing, check_top_k, check_weights
from .moe_tiles import (
    autotuned_by_class,
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

_COMBINE_BLOCK_H = 1024


def _up_configs() -> dict[str, list]:
    """Tiles per GEMM class (see moe_tiles.py) for the up kernel. BLOCK_N is the width of its [w1|v1] B tile and of
    its MMA: a program computes BLOCK_N // 2 columns of h.

    16 bits: large-T tiles first (the first is the pinned one: m64n256 wgmma per warpgroup, the x tile read from
    shared memory once per 256 MMA columns), then decode tiles. 128x256 fits only with the epilogue split in column
    halves (sm_80 and Triton 3.6's ptxas reach 255 registers), 4-warp 128x128 spills on sm_80. Decode tiles keep
    BLOCK_M = 64, the smallest M-tile wgmma takes: with a handful of tokens each chosen expert then has exactly one
    M-tile, so its weights are read once, and narrow N-tiles with deep K-steps spread that read over many programs.
    fp32_dot: 32x128 at 4 warps spills with Triton 3.6 on sm_90, hence 8 warps.
    """
    return {
        "16bit": [
            config(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
            config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            config(8, 4, BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
            config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=1),
            config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
        ],
        "tf32": [
            config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        ],
        "fp32_dot": [
            config(8, 2, BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, GROUP_M=8),
            config(8, 2, BLOCK_M=32, BLOCK_N=128, BLOCK_K=16, GROUP_M=8),
        ],
    }


def _down_configs() -> dict[str, list]:
    """Tiles per GEMM class for the single-accumulator down kernel. 16 bits: large-T tiles first (the first is the
    pinned one), then decode tiles as in `_up_configs`; 128x256 and 4-warp 128x128 / 64x256 spill on sm_80 (fp32
    epilogue with the scatter). tf32 and fp32_dot take the backward's tiles for its single-accumulator GEMM."""
    return {
        "16bit": [
            config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            config(8, 4, BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
            config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            config(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
            config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
            config(4, 4, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=1),
        ],
        "tf32": [
            config(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        ],
        "fp32_dot": [
            config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, GROUP_M=8),
            config(4, 2, BLOCK_M=32, BLOCK_N=128, BLOCK_K=16, GROUP_M=8),
        ],
    }


@triton.jit
def _glu_store(acc, h_ptr, gate_ptr, up_ptr, out_rows, cols, row_mask, ffn, SAVE_PREACT: tl.constexpr):
    """Stores h = silu(gate) * up, and gate and up when SAVE_PREACT, of an accumulator whose columns interleave
    gate and up (2j and 2j + 1 are column cols[j]); out_rows [BLOCK_M, 1] the rows' int64 offsets."""
    gate, up = tl.split(tl.reshape(acc, (acc.shape[0], acc.shape[1] // 2, 2)))
    h = gate * tl.sigmoid(gate) * up
    out_offs = out_rows + cols
    out_mask = row_mask[:, None] & (cols < ffn)
    tl.store(h_ptr + out_offs, h.to(h_ptr.dtype.element_ty), mask=out_mask)
    if SAVE_PREACT:
        tl.store(gate_ptr + out_offs, gate.to(gate_ptr.dtype.element_ty), mask=out_mask)
        tl.store(up_ptr + out_offs, up.to(up_ptr.dtype.element_ty), mask=out_mask)


# The row count changes every call: not specialized (on 1 or on divisibility by 16), so a new length reuses the
# compiled kernel. Its bucket only keys the autotuner.
@triton.jit(do_not_specialize=["num_rows", "rows_bucket"])
def _moe_glu_up_fwd_kernel(
    x_ptr,
    w1_ptr,
    v1_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    h_ptr,
    gate_ptr,
    up_ptr,
    num_rows,
    rows_bucket,  # autotune key only: next power of two of num_rows, so a new length does not re-tune
    hidden,
    ffn,
    top_k,
    stride_x_t,
    stride_x_h,
    stride_w1_r,
    stride_w1_h,
    stride_v1_r,
    stride_v1_h,
    NUM_EXPERTS: tl.constexpr,
    SAVE_PREACT: tl.constexpr,
    FP32_DOT: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """h[p, n] = silu(x[tok] @ w1_e[n]) * (x[tok] @ v1_e[n]) for sorted rows p of expert e, tok = sorted_slots[p] // k.

    One dot per K-step: the B tile holds BLOCK_N // 2 rows of w1_e and the same rows of v1_e, interleaved (column
    2j is w1_e[n_j], column 2j + 1 is v1_e[n_j]), so the MMA is BLOCK_N wide and the x tile is read once per K-step.
    The accumulator's (gate, up) column pairs sit side by side in a thread's registers, so the split is free.
    h, gate and up are contiguous [num_rows, ffn]; a program owns BLOCK_N // 2 of their columns."""
    num_pid_m = launched_m_tiles(num_rows, NUM_EXPERTS, BLOCK_M)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(ffn, BLOCK_N // 2), GROUP_M)
    expert, rows, slots, row_mask = tile_rows(
        pid_m, sorted_slots_ptr, expert_offsets_ptr, num_rows, NUM_EXPERTS, BLOCK_M
    )
    if expert < 0:
        return
    ks = tl.arange(0, BLOCK_K)
    tokens = (slots // top_k).to(tl.int64)
    x_ptrs = x_ptr + tokens[:, None] * stride_x_t + ks[None, :] * stride_x_h
    if USE_TMA:
        # w1_e and v1_e as [E, F, H] views: a block stops at the expert's last row (zero fill past it). Two B tiles
        # and two dots of BLOCK_N // 2 columns: TMA cannot interleave two tensors' rows into one shared-memory tile.
        n0 = pid_n * (BLOCK_N // 2)
        w1_src = expert_weight_descriptor(w1_ptr, ffn, hidden, stride_w1_r, NUM_EXPERTS, BLOCK_N // 2, BLOCK_K, USE_TMA)
        v1_src = expert_weight_descriptor(v1_ptr, ffn, hidden, stride_v1_r, NUM_EXPERTS, BLOCK_N // 2, BLOCK_K, USE_TMA)
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            x_tile = tl.load(x_ptrs, mask=row_mask[:, None] & (ks < hidden - k0)[None, :], other=0.0)
            w1_tile = load_tile(w1_src, (expert, n0, k0), None, None, USE_TMA)
            v1_tile = load_tile(v1_src, (expert, n0, k0), None, None, USE_TMA)
            acc_gate = dot(x_tile, tl.trans(w1_tile), acc_gate, FP32_DOT)
            acc_up = dot(x_tile, tl.trans(v1_tile), acc_up, FP32_DOT)
            x_ptrs += BLOCK_K * stride_x_h
        acc = tl.reshape(tl.join(acc_gate, acc_up), (BLOCK_M, BLOCK_N))
    else:
        # [w1_e | v1_e].T as one interleaved [BLOCK_K, BLOCK_N] tile read straight from the two [E*F, H] layouts.
        pair = tl.arange(0, BLOCK_N)
        is_up = (pair % 2 == 1)[None, :]
        w_cols = pid_n * (BLOCK_N // 2) + pair // 2
        w_rows = (expert * ffn + w_cols).to(tl.int64)[None, :]
        w_ptrs = tl.where(
            is_up,
            v1_ptr + w_rows * stride_v1_r + ks[:, None] * stride_v1_h,
            w1_ptr + w_rows * stride_w1_r + ks[:, None] * stride_w1_h,
        )
        w_step = tl.where(is_up, BLOCK_K * stride_v1_h, BLOCK_K * stride_w1_h)
        w_col_mask = (w_cols < ffn)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k_mask = ks < hidden - k0
            x_tile = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_tile = tl.load(w_ptrs, mask=k_mask[:, None] & w_col_mask, other=0.0)
            acc = dot(x_tile, w_tile, acc, FP32_DOT)
            x_ptrs += BLOCK_K * stride_x_h
            w_ptrs += w_step

    # The epilogue runs on the two column halves of the tile in turn, so that it holds half as many fp32 values a
    # thread (a 128x256 tile is 128 registers a thread at 8 warps before the GLU).
    acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    out_rows = rows.to(tl.int64)[:, None] * ffn
    cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 4)[None, :]
    _glu_store(acc_lo, h_ptr, gate_ptr, up_ptr, out_rows, cols, row_mask, ffn, SAVE_PREACT)
    _glu_store(acc_hi, h_ptr, gate_ptr, up_ptr, out_rows, cols + BLOCK_N // 4, row_mask, ffn, SAVE_PREACT)


@triton.jit(do_not_specialize=["num_rows", "rows_bucket"])
def _moe_down_fwd_kernel(
    h_ptr,
    w2_ptr,
    weights_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    y_ptr,
    num_rows,
    rows_bucket,  # autotune key only: next power of two of num_rows, so a new length does not re-tune
    hidden,
    ffn,
    top_k,
    stride_h_r,
    stride_h_f,
    stride_w2_r,
    stride_w2_h,
    stride_weights_t,
    stride_weights_k,
    NUM_EXPERTS: tl.constexpr,
    FP32_DOT: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[s, n] = weights.flat[s] * (h[p] @ w2_e[:, n]) for sorted rows p of expert e, s = sorted_slots[p].

    y is contiguous float32 [num_rows, hidden] in slot order. USE_TMA loads both operands through descriptors (h's
    innermost stride and w2's must then be 1): h rows past the expert's end are the next expert's or zero, harmless
    since they are masked at the store, and w2 as [E, F, H] zero-fills past the expert's F rows."""
    num_pid_m = launched_m_tiles(num_rows, NUM_EXPERTS, BLOCK_M)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    expert, row_start, row_end = expert_tile(pid_m, expert_offsets_ptr, NUM_EXPERTS, BLOCK_M)
    if expert < 0:
        return
    rows, slots, row_mask = span_rows(row_start, row_end, sorted_slots_ptr, num_rows, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    h_src = tile_descriptor(h_ptr, (num_rows, ffn), (stride_h_r, 1), (BLOCK_M, BLOCK_K), USE_TMA)
    w2_src = expert_weight_descriptor(w2_ptr, ffn, hidden, stride_w2_r, NUM_EXPERTS, BLOCK_K, BLOCK_N, USE_TMA)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h_r + ks[None, :] * stride_h_f
    w2_ptrs = w2_ptr + (expert * ffn + ks).to(tl.int64)[:, None] * stride_w2_r + cols[None, :] * stride_w2_h
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, ffn, BLOCK_K):
        k_mask = ks < ffn - k0
        h_tile = load_tile(h_src, (row_start, k0), h_ptrs, row_mask[:, None] & k_mask[None, :], USE_TMA)
        w2_tile = load_tile(
            w2_src, (expert, k0, pid_n * BLOCK_N), w2_ptrs, k_mask[:, None] & col_mask[None, :], USE_TMA
        )
        acc = dot(h_tile, w2_tile, acc, FP32_DOT)
        h_ptrs += BLOCK_K * stride_h_f
        w2_ptrs += BLOCK_K * stride_w2_r

    tokens = (slots // top_k).to(tl.int64)
    weight = tl.load(weights_ptr + tokens * stride_weights_t + (slots % top_k) * stride_weights_k, mask=row_mask)
    y = acc * weight.to(tl.float32)[:, None]
    y_offs = slots.to(tl.int64)[:, None] * hidden + cols[None, :]
    tl.store(y_ptr + y_offs, y, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _moe_combine_kernel(y_ptr, out_ptr, hidden, top_k, BLOCK_H: tl.constexpr):
    """out[t, n] = sum_j y[t*k + j, n] in fp32, j ascending, rounded once. y float32 [T*k, hidden], out [T, hidden]."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in range(top_k):
        acc += tl.load(y_ptr + (token * top_k + j) * hidden + cols, mask=mask, other=0.0)
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Keys: the row bucket, the widths and every constexpr a launch passes (each changes the code).
_GLU_UP = autotuned_by_class(
    _moe_glu_up_fwd_kernel,
    _up_configs(),
    ["rows_bucket", "hidden", "ffn", "NUM_EXPERTS", "SAVE_PREACT", "FP32_DOT", "USE_TMA"],
)
_DOWN = autotuned_by_class(
    _moe_down_fwd_kernel, _down_configs(), ["rows_bucket", "hidden", "ffn", "NUM_EXPERTS", "FP32_DOT", "USE_TMA"]
)


@torch.library.triton_op("dbrx_fast::moe_glu_up", mutates_args={})
def moe_glu_up(
    x: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor,
    sorted_slots: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    save_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, gate, up), each [T*k, F] in x's dtype and in sorted order; h = silu(gate) * up.

    x [T, H]; w1, v1 [E*F, H]. gate and up are written only when `save_preact` (the backward needs them); otherwise
    they are empty tensors.
    """
    check_float("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    num_rows = x.shape[0] * top_k
    sorted_slots, expert_offsets, num_experts = check_routing(sorted_slots, expert_offsets, top_k, num_rows, x.device)
    ffn = check_expert_weight("w1", w1, x, "x", num_experts, hidden=x.shape[1])
    if check_expert_weight("v1", v1, x, "x", num_experts, hidden=x.shape[1]) != ffn:
        raise ValueError(f"v1 {tuple(v1.shape)} and w1 {tuple(w1.shape)} must have the same shape")

    h = x.new_empty((num_rows, ffn))
    gate = x.new_empty((num_rows, ffn) if save_preact else (0,))
    up = x.new_empty((num_rows, ffn) if save_preact else (0,))
    if num_rows == 0:
        return h, gate, up

    def grid(meta):
        # A program owns BLOCK_N // 2 columns of h (its B tile holds those rows of w1 and of v1).
        return (
            num_m_tiles_upper_bound(num_rows, num_experts, meta["BLOCK_M"]) * triton.cdiv(ffn, meta["BLOCK_N"] // 2),
        )

    # TMA for the weights (x rows are gathered: pointer loads).
    launch_gemm(
        _GLU_UP,
        grid,
        x,
        w1,
        v1,
        sorted_slots,
        expert_offsets,
        h,
        gate,
        up,
        num_rows,
        triton.next_power_of_2(num_rows),
        x.shape[1],
        ffn,
        top_k,
        x.stride(0),
        x.stride(1),
        w1.stride(0),
        w1.stride(1),
        v1.stride(0),
        v1.stride(1),
        NUM_EXPERTS=num_experts,
        SAVE_PREACT=save_preact,
        tma_operands=(w1, v1),
    )
    return h, gate, up


@torch.library.triton_op("dbrx_fast::moe_down", mutates_args={})
def moe_down(
    h: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    sorted_slots: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """y [T*k, H] float32 in slot order: y[s] = weights.flat[s] * (h[p] @ w2_e) with s = sorted_slots[p].

    h [T*k, F] in sorted order (from `moe_glu_up`); w2 [E*F, H] in h's dtype; weights [T, k] float32.
    """
    check_float("h", h)
    if h.dim() != 2:
        raise ValueError(f"h must be [T*k, F], got shape {tuple(h.shape)}")
    num_rows = check_weights(weights, top_k, h.device) * top_k
    if h.shape[0] != num_rows:
        raise ValueError(f"h has {h.shape[0]} rows, expected T*k = {num_rows}")
    sorted_slots, expert_offsets, num_experts = check_routing(sorted_slots, expert_offsets, top_k, num_rows, h.device)
    check_expert_weight("w2", w2, h, "h", num_experts, ffn=h.shape[1])
    ffn, hidden = h.shape[1], w2.shape[1]

    y = h.new_empty((num_rows, hidden), dtype=torch.float32)
    if num_rows == 0:
        return y

    def grid(meta):
        return (num_m_tiles_upper_bound(num_rows, num_experts, meta["BLOCK_M"]) * triton.cdiv(hidden, meta["BLOCK_N"]),)

    # TMA for the 16-bit class, the one DBRX runs; fp32 keeps the pointer path (and half the compile specs).
    launch_gemm(
        _DOWN,
        grid,
        h,
        w2,
        weights,
        sorted_slots,
        expert_offsets,
        y,
        num_rows,
        triton.next_power_of_2(num_rows),
        hidden,
        ffn,
        top_k,
        h.stride(0),
        h.stride(1),
        w2.stride(0),
        w2.stride(1),
        weights.stride(0),
        weights.stride(1),
        NUM_EXPERTS=num_experts,
        tma_operands=(h, w2),
    )
    return y


@torch.library.triton_op("dbrx_fast::moe_combine", mutates_args={})
def moe_combine(y: torch.Tensor, top_k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """out [T, H] in out_dtype: out[t] = sum_j y[t*k + j], in fp32 with j ascending, rounded once.

    y [T*k, H] float32 from `moe_down`, read as contiguous (it always is).
    """
    if y.dtype != torch.float32:
        raise TypeError(f"y must be float32, got {y.dtype}")
    if out_dtype not in TRITON_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    check_top_k(top_k)
    if y.dim() != 2 or y.shape[0] % top_k:
        raise ValueError(f"y must be [T*k, H] with k = {top_k}, got shape {tuple(y.shape)}")
    y = y.contiguous()
    num_tokens, hidden = y.shape[0] // top_k, y.shape[1]
    out = y.new_empty((num_tokens, hidden), dtype=out_dtype)
    if num_tokens == 0 or hidden == 0:
        return out
    grid = (num_tokens, triton.cdiv(hidden, _COMBINE_BLOCK_H))
    launch(_moe_combine_kernel, grid, y, out, hidden, top_k, BLOCK_H=_COMBINE_BLOCK_H, num_warps=4)
    return out


def compile_specs() -> list[CompileSpec]:
    """Every (GEMM class, dtype, mode, autotune config) of the forward kernels at DBRX's shapes with contiguous tensors
    (see `launch_args` in moe_tiles.py), and the combine in every output dtype."""
    save_preact = ({"SAVE_PREACT": True}, {"SAVE_PREACT": False})
    specs = gemm_path_specs("moe_glu_up", _moe_glu_up_fwd_kernel, _up_configs(), variants=save_preact)
    down_ptrs = ("weights_ptr", "y_ptr")
    specs += gemm_path_specs("moe_down", _moe_down_fwd_kernel, _down_configs(), down_ptrs, tma_dtypes=("bf16", "fp16"))
    for dtype in TRITON_DTYPES.values():
        name = f"moe_combine {dtype} BLOCK_H={_COMBINE_BLOCK_H}"
        specs.append(kernel_spec(name, _moe_combine_kernel, dtype, ("y_ptr",), 4, BLOCK_H=_COMBINE_BLOCK_H))
    return specs
