"""Grouped GLU expert GEMMs, backward, weight gradients: dw2, dw1 and dv1 of
out[t] = sum_j weights[t, j] * (silu(x[t] @ w1_e.T) * (x[t] @ v1_e.T)) @ w2_e.

Shapes and layouts as in kernels/moe_input_grads.py: x [T, H]; weights [T, k] float32; the routing metadata; gate and
up [T*k, F] saved by the forward, in sorted order; dgate and dup [T*k, F] from `moe_down_bwd`; dout [T, H]. The
gradients are [E*F, H] in Hugging Face's native layout, contiguous.

1. `moe_down_wgrad`: dw2_e = sum over the expert's rows of h[p]^T (weights.flat[s] * dout[t]), h recomputed from the
   saved gate and up.
2. `moe_up_wgrad`: dw1_e = sum_p dgate[p]^T x[t], dv1_e = sum_p dup[p]^T x[t], two accumulators sharing the gathered
   x rows.

One program per (F-tile, H-tile, expert) walks the expert's rows in order (their range read on the device: no host
synchronisation), so each sum is deterministic and an empty expert writes zeros. Every row range and slot read from the
routing metadata is clamped or masked, so corrupt metadata gives undefined gradients but no access out of bounds.

Limits: fp16, bf16 and fp32, every floating tensor in one dtype (the routing weights are float32); fp32 multiplies in
full fp32 unless torch.set_float32_matmul_precision allows TF32; float64 raises TypeError so that callers fall back
to torch.
"""

import torch
import triton
import triton.language as tl

from .compile_spec import CompileSpec
from .launch import launch
from .moe_checks import (
    check_down_grad_inputs,
    check_float,
    check_matrix,
    check_num_experts,
    check_preact,
    check_routing,
    check_top_k,
)
from .moe_tiles import autotuned_by_class, chunk_rows, config, dot, expert_rows, gemm_class, gemm_specs

# Tiles per GEMM class (see moe_tiles.py). Every one compiles for sm_80 and sm_90 without spilling, with Triton 3.6
# and 3.9 (their ptxas differ); the tiles left out spilled or overflowed sm_80's shared memory.


def _down_wgrad_configs() -> dict[str, list]:
    """dw2 tiles (output [BLOCK_F, BLOCK_H], K = the expert's rows in steps of BLOCK_M). In 16 bits the 4-warp tiles
    with BLOCK_F = 128 step 16 rows: with 32 they spill on sm_80 with Triton 3.6."""
    return {
        "16bit": [
            config(8, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=32),
            config(4, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=16),
            config(4, 4, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32),
            config(4, 4, BLOCK_F=128, BLOCK_H=64, BLOCK_M=16),
        ],
        "tf32": [
            config(8, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=32),
            config(4, 4, BLOCK_F=64, BLOCK_H=128, BLOCK_M=64),
            config(4, 4, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32),
            config(8, 4, BLOCK_F=128, BLOCK_H=64, BLOCK_M=32),
        ],
        "fp32_dot": [
            config(8, 2, BLOCK_F=64, BLOCK_H=128, BLOCK_M=16),
            config(8, 2, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32),
        ],
    }


def _up_wgrad_configs() -> dict[str, list]:
    """dw1 and dv1 tiles: two fp32 accumulators, so 128x128 is the largest output tile. 4-warp tiles step 32 rows in
    16 bits and 16 in tf32: twice that spills on sm_80 with Triton 3.6."""
    return {
        "16bit": [
            config(8, 3, BLOCK_F=128, BLOCK_H=128, BLOCK_M=64),
            config(8, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=32),
            config(4, 3, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32),
            config(4, 3, BLOCK_F=128, BLOCK_H=64, BLOCK_M=32),
        ],
        "tf32": [
            config(8, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=16),
            config(4, 3, BLOCK_F=64, BLOCK_H=128, BLOCK_M=16),
            config(8, 3, BLOCK_F=64, BLOCK_H=128, BLOCK_M=32),
        ],
        "fp32_dot": [
            config(8, 2, BLOCK_F=64, BLOCK_H=128, BLOCK_M=16),
            config(4, 2, BLOCK_F=64, BLOCK_H=64, BLOCK_M=16),
            config(4, 2, BLOCK_F=32, BLOCK_H=128, BLOCK_M=16),
        ],
    }


@triton.jit(do_not_specialize=["num_rows", "rows_bucket"])
def _moe_down_wgrad_kernel(
    gate_ptr,
    up_ptr,
    dout_ptr,
    weights_ptr,
    sorted_slots_ptr,
    expert_offsets_ptr,
    dw2_ptr,
    num_rows,
    rows_bucket,  # autotune key only: next power of two of num_rows, so a new length does not re-tune
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
    row_start, row_end = expert_rows(expert_offsets_ptr, expert, num_rows)
    acc = tl.zeros((BLOCK_F, BLOCK_H), dtype=tl.float32)
    for p0 in range(row_start, row_end, BLOCK_M):
        slots, tokens, row_mask = chunk_rows(p0, row_end, sorted_slots_ptr, num_rows, top_k, BLOCK_M)
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
    row_start, row_end = expert_rows(expert_offsets_ptr, expert, num_rows)
    acc_w1 = tl.zeros((BLOCK_F, BLOCK_H), dtype=tl.float32)
    acc_v1 = tl.zeros((BLOCK_F, BLOCK_H), dtype=tl.float32)
    for p0 in range(row_start, row_end, BLOCK_M):
        slots, tokens, row_mask = chunk_rows(p0, row_end, sorted_slots_ptr, num_rows, top_k, BLOCK_M)
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


# Keys: the row bucket (it sets each program's trip count), the widths and FP32_DOT.
_DOWN_WGRAD = autotuned_by_class(
    _moe_down_wgrad_kernel, _down_wgrad_configs(), ["rows_bucket", "hidden", "ffn", "FP32_DOT"]
)
_UP_WGRAD = autotuned_by_class(_moe_up_wgrad_kernel, _up_wgrad_configs(), ["rows_bucket", "hidden", "ffn", "FP32_DOT"])


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
    sorted_slots, expert_offsets, _, num_rows, hidden = check_down_grad_inputs(
        dout, gate, up, weights, sorted_slots, expert_offsets, top_k
    )
    check_num_experts(expert_offsets, num_experts)
    ffn = gate.shape[1]

    dw2 = gate.new_empty((num_experts * ffn, hidden))
    if dw2.numel() == 0:
        return dw2

    def grid(meta):
        return (triton.cdiv(ffn, meta["BLOCK_F"]), triton.cdiv(hidden, meta["BLOCK_H"]), num_experts)

    cls, fp32_dot = gemm_class(gate.dtype)
    launch(
        _DOWN_WGRAD[cls],
        grid,
        gate,
        up,
        dout,
        weights,
        sorted_slots,
        expert_offsets,
        dw2,
        num_rows,
        triton.next_power_of_2(num_rows),
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

    def grid(meta):
        return (triton.cdiv(ffn, meta["BLOCK_F"]), triton.cdiv(hidden, meta["BLOCK_H"]), num_experts)

    cls, fp32_dot = gemm_class(x.dtype)
    launch(
        _UP_WGRAD[cls],
        grid,
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
        FP32_DOT=fp32_dot,
    )
    return dw1, dv1


def compile_specs() -> list[CompileSpec]:
    """Every (GEMM class, dtype, autotune config) the weight-gradient kernels launch with, at DBRX's shapes (see
    `launch_args` in moe_tiles.py)."""
    specs = gemm_specs("moe_down_wgrad", _moe_down_wgrad_kernel, _down_wgrad_configs(), ("weights_ptr",))
    return specs + gemm_specs("moe_up_wgrad", _moe_up_wgrad_kernel, _up_wgrad_configs())
