"""Grouped GLU expert GEMMs, backward, weight gradients: dw2, dw1 and dv1 of
out[t] = sum_j weights[t, j] * (silu(x[t] @ w1_e.T) * (x[t] @ v1_e.T)) @ w2_e.

Shapes and layouts as in kernels/moe_input_grads.py: x [T, H]; the routing metadata; hw, dgate and dup [T*k, F] from
`moe_down_bwd`, in sorted order (hw = weights.flat[s] * silu(gate) * up); dout [T, H]. The gradients are [E*F, H] in
Hugging Face's native layout, contiguous.

1. `moe_down_wgrad`: dw2_e = sum over the expert's rows of hw[p]^T dout[t]: a plain GEMM over stored operands (h is
   computed once, in `moe_down_bwd`'s epilogue, not once per H-tile).
2. `moe_up_wgrad`: dw1_e = sum_p dgate[p]^T x[t], dv1_e = sum_p dup[p]^T x[t], two accumulators sharing the gathered
   x rows.

One program per (expert, F-tile, H-tile) walks the expert's rows in order (their range read on the device: no host
synchronisation), so each sum is deterministic and an empty expert writes zeros. Every row range and slot read from the
routing metadata is clamped or masked, so corrupt metadata gives undefined gradients but no access out of bounds.

Grid order (`_wgrad_tile`): experts slowest, and within an expert groups of GROUP_H H-tiles sweep the F-tiles, so a
wave of programs covers GROUP_H H-tiles by a few F-tiles: the group's gathered [rows, BLOCK_H] slabs of dout (or x)
stay in L2 from wave to wave while the wave and its writes fit there (24 slabs of 128 columns: 24 MB at 4096 rows an
expert, T = 16384 at DBRX widths), so they are read about once and each [rows, BLOCK_F] slab of hw (or dgate/dup)
once per group (benchmarks/cost_model.py counts both, and the best order of these tiles). Main loop: the next
chunk's token ids are loaded one iteration ahead into registers, so the gathered loads' addresses come from a
loop-carried value and the software pipeliner keeps num_stages - 1 chunks of both operands in flight (an in-loop
index load made it wait for all copies every iteration). Bound: tensor-core FLOPs at DBRX widths and T = 16384, DRAM
bytes at small T.

Limits: fp16, bf16 and fp32, every floating tensor in one dtype (the routing weights are float32); fp32 multiplies in
full fp32 unless torch.set_float32_matmul_precision allows TF32; float64 raises TypeError so that callers fall back
to torch.
"""

import torch
import triton
import triton.language as tl

from .compile_spec import CompileSpec
from .moe_checks import (
    check_float,
    check_matrix,
    check_num_experts,
    check_preact,
    check_routing,
    check_top_k,
)
from .moe_tiles import (
    autotuned_by_class,
    chunk_rows,
    config,
    dot,
    expert_rows,
    gemm_path_specs,
    grouped_tile,
    launch_gemm,
    load_tile,
    tile_descriptor,
)

# Tiles per GEMM class (see moe_tiles.py). Every one compiles for sm_80 and sm_90 without spilling, with Triton 3.6
# and 3.9 (their ptxas differ); the tiles left out spilled or overflowed sm_80's shared memory. GROUP_H sets the H
# width of a group of programs (see _wgrad_tile): 3072 columns in 16 bits, the width that minimises the bytes
# benchmarks/cost_model.py counts at DBRX's shapes and T = 16384 in a 50 MB L2; 1536 in tf32 (twice the bytes a
# slab). The fp32_dot tiles, at ptxas' register limit, take groups they compile with unspilled on both releases.


def _down_wgrad_configs() -> dict[str, list]:
    """dw2 tiles (output [BLOCK_F, BLOCK_H], K = the expert's rows in steps of BLOCK_M). In 16 bits the 4-warp tiles
    with BLOCK_F = 128 step 16 rows: with 32 they spilled on sm_80 with Triton 3.6 (measured when the kernel still
    recomputed h). fp32_dot steps 16 rows: 64x128 with 32 spills on sm_80, and with the grid grouping H-tiles 64x128
    spilled a few bytes on sm_80 or sm_90 (Triton 3.6 or 3.9) whatever the group, 128x64 none."""
    return {
        "16bit": [
            config(8, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=32, GROUP_H=24),
            config(4, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=16, GROUP_H=24),
            config(4, 4, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32, GROUP_H=24),
            config(4, 4, BLOCK_F=128, BLOCK_H=64, BLOCK_M=16, GROUP_H=48),
        ],
        "tf32": [
            config(8, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=32, GROUP_H=12),
            config(4, 4, BLOCK_F=64, BLOCK_H=128, BLOCK_M=64, GROUP_H=12),
            config(4, 4, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32, GROUP_H=12),
            config(8, 4, BLOCK_F=128, BLOCK_H=64, BLOCK_M=32, GROUP_H=24),
        ],
        "fp32_dot": [
            config(8, 2, BLOCK_F=128, BLOCK_H=64, BLOCK_M=16, GROUP_H=48),
            config(4, 2, BLOCK_F=64, BLOCK_H=64, BLOCK_M=16, GROUP_H=24),
        ],
    }


def _up_wgrad_configs() -> dict[str, list]:
    """dw1 and dv1 tiles: two fp32 accumulators, so 128x128 is the largest output tile. 4-warp tiles step 32 rows in
    16 bits and 16 in tf32: twice that spills on sm_80 with Triton 3.6."""
    return {
        "16bit": [
            config(8, 3, BLOCK_F=128, BLOCK_H=128, BLOCK_M=64, GROUP_H=24),
            config(8, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=32, GROUP_H=24),
            config(4, 3, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32, GROUP_H=24),
            config(4, 3, BLOCK_F=128, BLOCK_H=64, BLOCK_M=32, GROUP_H=48),
        ],
        "tf32": [
            config(8, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=16, GROUP_H=12),
            config(4, 3, BLOCK_F=64, BLOCK_H=128, BLOCK_M=16, GROUP_H=12),
            config(8, 3, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32, GROUP_H=12),
        ],
        "fp32_dot": [
            config(8, 2, BLOCK_F=64, BLOCK_H=128, BLOCK_M=16, GROUP_H=24),
            config(4, 2, BLOCK_F=64, BLOCK_H=64, BLOCK_M=16, GROUP_H=24),
            config(4, 2, BLOCK_F=32, BLOCK_H=128, BLOCK_M=16, GROUP_H=12),
        ],
    }


@triton.jit
def _wgrad_tile(ffn, hidden, BLOCK_F: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_H: tl.constexpr):
    """(expert, F columns, H columns, their masks) of this program. Experts are the slowest axis; within one, groups
    of GROUP_H H-tiles sweep the F-tiles together (`grouped_tile`), so the group's gathered slabs stay in L2 while
    the waves of programs stream the F-side slabs past them."""
    num_h = tl.cdiv(hidden, BLOCK_H)
    per_expert = tl.cdiv(ffn, BLOCK_F) * num_h
    pid = tl.program_id(0)
    expert = pid // per_expert
    pid_h, pid_f = grouped_tile(pid - expert * per_expert, num_h, tl.cdiv(ffn, BLOCK_F), GROUP_H)
    fs = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    return expert, fs, hs, fs < ffn, hs < hidden


@triton.jit
def _rows_t(src, ptr, p0, f0, row_end, fs, f_mask, stride_p, stride_f, BLOCK_M: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows p0:p0+BLOCK_M of a [T*k, F] operand in sorted order, transposed: a [BLOCK_F, BLOCK_M] tile (columns fs,
    the first f0). USE_TMA: from `src`, a [row_end, F] `tile_descriptor`, so a chunk past the expert's last row is
    zero, not the next expert's rows. Else through pointers, with a mask that depends on the loop index only (not on
    the slots), so the pipeliner can issue it stages ahead; a row with a bad slot meets a zero gathered row. An int64
    offset to the first row, int32 offsets within the chunk."""
    if USE_TMA:
        return tl.trans(load_tile(src, (p0, f0), None, None, USE_TMA))
    else:
        local = tl.arange(0, BLOCK_M)[None, :]
        mask = f_mask[:, None] & (p0 + local < row_end)
        offs = tl.cast(p0, tl.int64) * stride_p + (local * stride_p + fs[:, None] * stride_f)
        return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _gathered(ptr, tokens, row_mask, hs, h_mask, stride_t, stride_h):
    """The [BLOCK_M, BLOCK_H] tile of the chunk's token rows of a [T, H] operand; masked rows are zero."""
    mask = row_mask[:, None] & h_mask[None, :]
    return tl.load(ptr + tokens[:, None] * stride_t + hs[None, :] * stride_h, mask=mask, other=0.0)


@triton.jit(do_not_specialize=["num_rows", "rows_bucket"])
def _moe_down_wgrad_kernel(
    h_ptr,
    dout_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    dw2_ptr,
    num_rows,
    rows_bucket,  # autotune key only: next power of two of num_rows, so a new length does not re-tune
    hidden,
    ffn,
    top_k,
    stride_h_r,
    stride_h_f,
    stride_dout_t,
    stride_dout_h,
    FP32_DOT: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_H: tl.constexpr,
):
    """dw2[e*F + f, n] = sum_p hw[p, f] * dout[t, n] over expert e's sorted rows p, in row order, where
    hw = weights.flat[s] * h is `moe_down_bwd`'s. dw2 is contiguous [E*ffn, hidden]. USE_TMA loads hw through a
    descriptor (innermost stride 1); dout rows are gathered."""
    expert, fs, hs, f_mask, h_mask = _wgrad_tile(ffn, hidden, BLOCK_F, BLOCK_H, GROUP_H)
    row_start, row_end = expert_rows(expert_offsets_ptr, expert, num_rows)
    h_src = tile_descriptor(h_ptr, (row_end, ffn), (stride_h_r, 1), (BLOCK_M, BLOCK_F), USE_TMA)
    f0 = tl.min(fs, axis=0)
    acc = tl.zeros((BLOCK_F, BLOCK_H), dtype=tl.float32)
    _, tokens, row_mask = chunk_rows(row_start, row_end, sorted_slots_ptr, num_rows, top_k, BLOCK_M)
    for p0 in range(row_start, row_end, BLOCK_M):
        dout = _gathered(dout_ptr, tokens, row_mask, hs, h_mask, stride_dout_t, stride_dout_h)
        _, tokens, row_mask = chunk_rows(p0 + BLOCK_M, row_end, sorted_slots_ptr, num_rows, top_k, BLOCK_M)
        hw_t = _rows_t(h_src, h_ptr, p0, f0, row_end, fs, f_mask, stride_h_r, stride_h_f, BLOCK_M, USE_TMA)
        acc = dot(hw_t, dout, acc, FP32_DOT)
    out_offs = (expert * ffn + fs).to(tl.int64)[:, None] * hidden + hs[None, :]
    tl.store(dw2_ptr + out_offs, acc.to(dw2_ptr.dtype.element_ty), mask=f_mask[:, None] & h_mask[None, :])


@triton.jit(do_not_specialize=["num_rows", "rows_bucket"])
def _moe_up_wgrad_kernel(
    dgate_ptr,
    dup_ptr,
    x_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    dw1_ptr,
    dv1_ptr,
    num_rows,
    rows_bucket,  # autotune key only: next power of two of num_rows, so a new length does not re-tune
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
    USE_TMA: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_H: tl.constexpr,
):
    """dw1[e*F + f, n] = sum_p dgate[p, f] * x[t, n] and dv1 likewise with dup, over expert e's sorted rows p in
    row order. dw1 and dv1 are contiguous [E*ffn, hidden]."""
    expert, fs, hs, f_mask, h_mask = _wgrad_tile(ffn, hidden, BLOCK_F, BLOCK_H, GROUP_H)
    row_start, row_end = expert_rows(expert_offsets_ptr, expert, num_rows)
    dgate_src = tile_descriptor(dgate_ptr, (row_end, ffn), (stride_dgate_p, 1), (BLOCK_M, BLOCK_F), USE_TMA)
    dup_src = tile_descriptor(dup_ptr, (row_end, ffn), (stride_dup_p, 1), (BLOCK_M, BLOCK_F), USE_TMA)
    f0 = tl.min(fs, axis=0)
    acc_w1 = tl.zeros((BLOCK_F, BLOCK_H), dtype=tl.float32)
    acc_v1 = tl.zeros((BLOCK_F, BLOCK_H), dtype=tl.float32)
    _, tokens, row_mask = chunk_rows(row_start, row_end, sorted_slots_ptr, num_rows, top_k, BLOCK_M)
    for p0 in range(row_start, row_end, BLOCK_M):
        x_tile = _gathered(x_ptr, tokens, row_mask, hs, h_mask, stride_x_t, stride_x_h)
        _, tokens, row_mask = chunk_rows(p0 + BLOCK_M, row_end, sorted_slots_ptr, num_rows, top_k, BLOCK_M)
        dgate_t = _rows_t(
            dgate_src, dgate_ptr, p0, f0, row_end, fs, f_mask, stride_dgate_p, stride_dgate_f, BLOCK_M, USE_TMA
        )
        acc_w1 = dot(dgate_t, x_tile, acc_w1, FP32_DOT)
        dup_t = _rows_t(dup_src, dup_ptr, p0, f0, row_end, fs, f_mask, stride_dup_p, stride_dup_f, BLOCK_M, USE_TMA)
        acc_v1 = dot(dup_t, x_tile, acc_v1, FP32_DOT)
    out_offs = (expert * ffn + fs).to(tl.int64)[:, None] * hidden + hs[None, :]
    out_mask = f_mask[:, None] & h_mask[None, :]
    tl.store(dw1_ptr + out_offs, acc_w1.to(dw1_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv1_ptr + out_offs, acc_v1.to(dv1_ptr.dtype.element_ty), mask=out_mask)


# Keys: the row bucket (it sets each program's trip count), the widths and FP32_DOT.
_DOWN_WGRAD = autotuned_by_class(
    _moe_down_wgrad_kernel, _down_wgrad_configs(), ["rows_bucket", "hidden", "ffn", "FP32_DOT", "USE_TMA"]
)
_UP_WGRAD = autotuned_by_class(
    _moe_up_wgrad_kernel, _up_wgrad_configs(), ["rows_bucket", "hidden", "ffn", "FP32_DOT", "USE_TMA"]
)


def _grid(num_experts: int, ffn: int, hidden: int):
    """One program per (expert, F-tile, H-tile), ordered by `_wgrad_tile`."""

    def grid(meta):
        return (num_experts * triton.cdiv(ffn, meta["BLOCK_F"]) * triton.cdiv(hidden, meta["BLOCK_H"]),)

    return grid


@torch.library.triton_op("dbrx_fast::moe_down_wgrad", mutates_args={})
def moe_down_wgrad(
    hw: torch.Tensor,
    dout: torch.Tensor,
    sorted_slots: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    num_experts: int,
) -> torch.Tensor:
    """dw2 [E*F, H] in hw's dtype: dw2_e = sum over expert e's sorted rows p of hw[p]^T dout[t], t = sorted_slots[p]
    // k. hw [T*k, F] is `moe_down_bwd`'s weights.flat[s] * silu(gate) * up; dout [T, H]. An expert with no rows gets
    zeros."""
    check_top_k(top_k)
    check_float("hw", hw)
    check_float("dout", dout, hw, "hw")
    if dout.dim() != 2 or hw.dim() != 2:
        raise ValueError(f"dout must be [T, H] and hw [T*k, F], got shapes {tuple(dout.shape)}, {tuple(hw.shape)}")
    num_rows, hidden, ffn = dout.shape[0] * top_k, dout.shape[1], hw.shape[1]
    check_matrix("hw", hw, (num_rows, ffn), "[T*k, F]")
    sorted_slots, expert_offsets, _ = check_routing(sorted_slots, expert_offsets, top_k, num_rows, hw.device)
    check_num_experts(expert_offsets, num_experts)

    dw2 = hw.new_empty((num_experts * ffn, hidden))
    if dw2.numel() == 0:
        return dw2
    launch_gemm(
        _DOWN_WGRAD,
        _grid(num_experts, ffn, hidden),
        hw,
        dout,
        sorted_slots,
        expert_offsets,
        dw2,
        num_rows,
        triton.next_power_of_2(num_rows),
        hidden,
        ffn,
        top_k,
        hw.stride(0),
        hw.stride(1),
        dout.stride(0),
        dout.stride(1),
        tma_operands=(hw,),
    )
    return dw2


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
    check_top_k(top_k)
    check_preact(dgate, dup, ("dgate", "dup"))
    check_float("x", x, dgate, "dgate")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    num_rows, hidden, ffn = x.shape[0] * top_k, x.shape[1], dgate.shape[1]
    check_matrix("dgate", dgate, (num_rows, ffn), "[T*k, F]")
    sorted_slots, expert_offsets, _ = check_routing(sorted_slots, expert_offsets, top_k, num_rows, x.device)
    check_num_experts(expert_offsets, num_experts)

    dw1 = x.new_empty((num_experts * ffn, hidden))
    dv1 = x.new_empty((num_experts * ffn, hidden))
    if dw1.numel() == 0:
        return dw1, dv1

    launch_gemm(
        _UP_WGRAD,
        _grid(num_experts, ffn, hidden),
        dgate,
        dup,
        x,
        sorted_slots,
        expert_offsets,
        dw1,
        dv1,
        num_rows,
        triton.next_power_of_2(num_rows),
        hidden,
        ffn,
        top_k,
        dgate.stride(0),
        dgate.stride(1),
        dup.stride(0),
        dup.stride(1),
        x.stride(0),
        x.stride(1),
        tma_operands=(dgate, dup),
    )
    return dw1, dv1


def compile_specs() -> list[CompileSpec]:
    """Every (GEMM class, dtype, autotune config) the weight-gradient kernels launch with, at DBRX's shapes (see
    `launch_args` in moe_tiles.py)."""
    specs = gemm_path_specs("moe_down_wgrad", _moe_down_wgrad_kernel, _down_wgrad_configs())
    return specs + gemm_path_specs("moe_up_wgrad", _moe_up_wgrad_kernel, _up_wgrad_configs())
