"""GQA flash attention backward: dQ, dK, dV from the saved log-sum-exp, with no atomics (bitwise deterministic).

Inputs as the forward (kernels/attention_fwd.py) takes and returns them: q [B, Hq, Nq, D], k and v [B, Hkv, Nk, D]
(any strides with a unit last stride), out and dout [B, Nq, Hq, D], lse float32 [B, Hq, Nq] (natural log), and the
mask of kernels/attention_mask.py (q_offset, key_mask, key_start). Query head h reads KV head h // (Hq / Hkv).
Returns dq [B, Hq, Nq, D] and dk, dv [B, Hkv, Nk, D], contiguous, in q's dtype.

FlashAttention-2's algorithm in three launches, each program owning the outputs it writes, so nothing is summed
across programs and no float atomic is needed:
  1. delta = rowsum(dout * out) in fp32, per query and head.
  2. dK/dV: one program per (key block, KV head, batch). It loops over the Hq / Hkv query heads of its KV head and,
     for each, over the query blocks that can see its keys, recomputing p = exp2(s * scale * log2e - lse * log2e):
        dv += p^T @ dout        ds = p * (dout @ v^T - delta)        dk += ds^T @ q
     so dK and dV are summed over the group in registers. fp32 at head_dim 128 makes this launch twice, one
     gradient each (constexprs DK, DV; `dkdv_passes`): two [BLOCK_N, 128] fp32 accumulators beside fp32 K and V
     tiles exceed 255 registers on sm_90 and spill. The dV launch skips the dP and dS dots: 5 dots a tile, not 4.
     For 16 bits on sm_90 at head_dim 128, unpacked (`dkdv_defers`), the dV and dK dots are deferred (DEFER_DOT,
     see 3.) in one loop over (query head, query block), so that the deferral runs across the heads too.
  3. dQ: one program per (query block, query head, batch), over the key blocks its queries can see:
        dq += ds @ k
     For 16 bits on sm_90 that dot is deferred (DEFER_DOT, attention_fwd.defer_dot): the next step issues it after
     its own score dots, so that it runs on the tensor cores during that step's exp2 and ds (the compile tables'
     "drain+sfu||mma"), the same products in the same order, bit for bit. Its operand tile (k; q and dout in dK/dV)
     loads again there.
Products are fp32; operands enter the dots in their storage dtype (p and ds rounded to it), fp32 as IEEE or TF32
as kernels/moe_tiles.gemm_class decides. Masks come from kernels/attention_mask.keys_allowed. The dQ kernel masks
only the tiles the causal diagonal, padding or packing cut (a loop of its own); the dK/dV kernel runs one loop whose
tiles past the diagonal let every key through by a select, not a branch or a second loop (two copies of its tile
body spill), and applies the padding mask to its keys once, at the end, since a masked key's gradients are zero
whatever the queries. Rows whose lse is -inf (no allowed key) get zero gradients.

Bound: like the forward, by the tensor cores (five dots per tile, two of them chained through the exp), so the
sm_90 main loops must run on wgmma; they do, with their loads pipelined, but each tile's dots depend on each
other's results, so the loop drains the MMA pipeline once per tile (tests/test_compile_gpu_targets.py records it);
the deferred dots (2., 3.) overlap the softmax instead.
That drain costs less the more work a tile holds, so the 16-bit tiles are the largest that compile without spills
on sm_80 and sm_90 with Triton 3.6 and 3.9, chosen per head dim (`tile_configs`): dK/dV 32 queries x 128 keys at
D <= 64; at D = 128 16 x 64 on 3 stages (pipelined) and 32 x 64 on 2 (twice the work, its loads waited for every
tile), for a GPU's autotuner to weigh (8 warps); dQ 128 queries x 32 keys at D <= 64 and 64 x 32 at D = 128.
Limits: head_dim a power of two from 16 to 128; fp16, bf16, fp32 (at D = 128 a quarter more dK/dV dots, see 2.).
"""

import inspect
import itertools

import torch
import triton
import triton.language as tl

from .attention_fwd import LOG2_E, SPEC_HEADS, SPEC_KV_HEADS, SPEC_LENGTH, check_attention_args, defer_dot
from .attention_mask import key_range, keys_allowed, query_range
from .compile_spec import CompileSpec, describe
from .dtypes import TRITON_DTYPES
from .launch import launch
from .moe_tiles import GEMM_CLASS_DTYPES, autotuned_by_class, config, dot, gemm_class

DELTA_BLOCK_M = 32  # 64 spills at D = 128 on sm_80 with Triton 3.6

# Tiles per GEMM class; the first of each class is pinned under the interpreter. The dK/dV program holds its
# accumulators (two, or one in an fp32 launch of one gradient) and its K and V tiles, the dQ program one accumulator
# and its Q and dO tiles; at D = 128 those leave room for little else. These are the tiles that compile without
# spills on sm_80 and sm_90 with Triton 3.6 and 3.9 at D = 64 and 128, every mask variant and pass. BLOCK_N = 64 keys
# is the least for wgmma in the dK/dV dots, BLOCK_M = 64 queries in the dQ dots. Three stages keep two loads in flight
# during the MMA; the TF32 dK/dV tile gets one stage and 4 warps (8 spill on sm_90 in the dK launch at D = 128 and on
# sm_80 in the dV launch at D = 64 under 3.6), and fp32_dot runs its dots on CUDA cores.
# The 16-bit tiles depend on the head dim (`tile_configs`): the sm_90 loops drain the MMA every tile, so a tile must
# carry as much work as fits. Readings, registers on sm_80 / sm_90 for the causal, masked variants:
#   dK/dV, D <= 64: 32 queries x 128 keys, 8 warps, 1 stage. Triton 3.9: 240, 234 / 176, 167; 3.6: 232, 230 / 148,
#     163. wgmma n32 (scores) and n64 (dV, dK, a K-extent of 32). With 2 or 3 stages it spills on sm_80 under 3.6 (20
#     to 44), as do 32 x 64 on 4 warps (44, 60) and 64 x 64 or 64 x 128 (hundreds). One stage leaves the causal
#     variant's loads unpipelined; the masked variant's never are (its packed-block branch).
#   dK/dV, D = 128: 32 x 64, 8 warps, 2 stages. Triton 3.9: 216, 214 / 201, 235; 3.6: 218, 202 / 222, 218. wgmma n16
#     and n64. 3 stages spill on sm_90 under 3.6 (40), 32 x 64 on 4 warps on sm_80 (12 to 100), 16 x 128 on sm_80
#     under 3.6 (36, 68), and 32 x 128 on 8 warps thousands on sm_80 (on sm_90 it fits: 235 to 254, n32 and n128).
#   These have 4 (D <= 64) and 2 (D = 128) times the work of the 16 x 64 tile before them (n8 score dots, one k-step
#   in each accumulating dot).
#   dQ, D <= 64: 128 queries x 32 keys, 8 warps, 3 stages. Triton 3.9: 248, 192 / 112, 111; 3.6: 246, 210 / 108, 126.
#     wgmma n32 and n64, each warpgroup 64 queries as in the 64 x 32 tile on 4 warps, which it keeps at D = 128 (3.9:
#     242, 247 / 180, 172; n32 and n128): its K and V tiles serve twice the queries. 64 x 64 or 128 x 64 spill on sm_80
#     (28 to 196), as do 128 x 32 on 4 warps (12) and, at D = 128, 128 x 32 on 8 warps (12, 32). 64 x 64 on 8 warps
#     fits at D = 128 but splits each warpgroup's dQ dot to n64 at the same work per warpgroup.
#   At D = 128 the 2-stage 32 x 64 dK/dV tile waits for its loads every tile, so the 16 x 64 tile on 3 stages
#   (pipelined; 3.9: 177, 212 / 175, 203; n8 and n64) stays first, and a GPU's autotuner weighs the two.
_TILES_16BIT = {  # head dim -> kernel -> tiles
    64: {"dkdv": [config(8, 1, BLOCK_M=32, BLOCK_N=128)], "dq": [config(8, 3, BLOCK_M=128, BLOCK_N=32)]},
    128: {
        "dkdv": [config(8, 3, BLOCK_M=16, BLOCK_N=64), config(8, 2, BLOCK_M=32, BLOCK_N=64)],
        "dq": [config(4, 3, BLOCK_M=64, BLOCK_N=32)],
    },
}
_CONFIGS = {
    "dkdv": {
        "16bit": [cfg for tiles in _TILES_16BIT.values() for cfg in tiles["dkdv"]],
        "tf32": [config(4, 1, BLOCK_M=16, BLOCK_N=64)],
        "fp32_dot": [config(4, 1, BLOCK_M=16, BLOCK_N=16)],
    },
    "dq": {
        "16bit": [cfg for tiles in _TILES_16BIT.values() for cfg in tiles["dq"]],
        "tf32": [config(8, 3, BLOCK_M=64, BLOCK_N=16), config(4, 2, BLOCK_M=64, BLOCK_N=16)],
        "fp32_dot": [config(4, 1, BLOCK_M=16, BLOCK_N=16)],
    },
}


def tile_configs(kernel: str, cls: str, head_dim: int) -> list[triton.Config]:
    """The configs that launches of `kernel` ("dkdv" or "dq") of GEMM class `cls` at `head_dim` tune over (and the
    compile specs hold): for 16 bits the tiles of its head dim, else the class's list."""
    if cls != "16bit":
        return _CONFIGS[kernel][cls]
    return _TILES_16BIT[64 if head_dim <= 64 else 128][kernel]


def _tuners(kernel: str, fn, key: list[str]) -> dict[str, object]:
    """One autotuner per GEMM class over `fn`, each launch pruned to `tile_configs` at its head dim, or to all its
    configs when those hold none of them: the one config pinned under the interpreter, or forced by a test, runs at
    any head dim."""

    def prune(configs, named_args, **kwargs):
        head_dim = {**named_args, **kwargs}["HEAD_DIM"]
        fits = [c for c in configs if any(c in tile_configs(kernel, cls, head_dim) for cls in _CONFIGS[kernel])]
        return fits or configs

    return autotuned_by_class(fn, _CONFIGS[kernel], key, prune_configs_by={"early_config_prune": prune})


_KEY = ["HEAD_DIM", "FP32_DOT", "HAS_KEY_MASK", "HAS_KEY_START"]
BOTH, DV_ONLY, DK_ONLY = (True, True), (False, True), (True, False)  # (DK, DV) of a dK/dV launch


def dkdv_passes(cls: str, head_dim: int) -> tuple[tuple[bool, bool], ...]:
    """(DK, DV) of each dK/dV launch: both gradients in one, but for fp32 at D = 128, whose two [BLOCK_N, 128] fp32
    accumulators beside fp32 K and V tiles spill on sm_90 (TF32 at every tile tried, fp32_dot under Triton 3.6):
    one launch per gradient there. fp32 at D = 64 keeps one launch, as its passes would spill on sm_80 (3.6)."""
    return (DV_ONLY, DK_ONLY) if cls != "16bit" and head_dim > 64 else (BOTH,)


def dkdv_defers(cls: str, head_dim: int, packed: bool) -> bool:
    """Whether a dK/dV launch defers its dots where `defer_dot` allows: 16 bits (both gradients in one launch),
    unpacked (packing's skip of hidden blocks would have to flush them) and head_dim above 64 (the tile there runs
    one stage: nothing is pipelined, so nothing would stay in flight)."""
    return cls == "16bit" and not packed and head_dim > 64


@triton.jit(do_not_specialize=["num_queries"])
def _attention_bwd_delta_kernel(
    out_ptr,
    dout_ptr,
    delta_ptr,
    num_queries,
    n_heads,
    stride_out_b,
    stride_out_m,
    stride_out_h,
    stride_dout_b,
    stride_dout_m,
    stride_dout_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[b, h, m] = sum_d dout[b, m, h, d] * out[b, m, h, d], in fp32; delta is contiguous [B, Hq, Nq]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m.to(tl.int64)[:, None]
    mask = (offs_m < num_queries)[:, None]
    o = tl.load(out_ptr + b * stride_out_b + h * stride_out_h + rows * stride_out_m + offs_d[None, :], mask=mask)
    do = tl.load(dout_ptr + b * stride_dout_b + h * stride_dout_h + rows * stride_dout_m + offs_d[None, :], mask=mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + (b * n_heads + h) * num_queries + offs_m, delta, mask=offs_m < num_queries)


@triton.jit
def _row_stats(lse_row, delta_row, offs_m, q_valid):
    """lse * log2e and delta of the queries offs_m. A row that sees no key (lse -inf) and a row past the end get
    lse +inf, so that their p = exp2(s - lse) is 0 in every tile, masked or not, and no inf or NaN arises."""
    lse = tl.load(lse_row + offs_m, mask=q_valid, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_row + offs_m, mask=q_valid, other=0.0)
    return lse * LOG2_E, delta


@triton.jit
def _q_dout_tile(q_head, dout_head, offs_m, valid, stride_q_m, stride_dout_m, HEAD_DIM: tl.constexpr):
    """q transposed to [HEAD_DIM, len(offs_m)] and dout [len(offs_m), HEAD_DIM] of the queries offs_m of one head;
    zeros where not valid."""
    rows = offs_m.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q_t = tl.load(q_head + rows[None, :] * stride_q_m + offs_d[:, None], mask=valid[None, :], other=0.0)
    do = tl.load(dout_head + rows[:, None] * stride_dout_m + offs_d[None, :], mask=valid[:, None], other=0.0)
    return q_t, do


@triton.jit
def _dkdv_tile(
    dk,
    dv,
    k,
    v,
    q_head,
    dout_head,
    lse_row,
    delta_row,
    key_start_row,
    m0,
    offs_n,
    q_offset,
    num_queries,
    num_keys,
    qk_scale,
    stride_q_m,
    stride_dout_m,
    whole,
    HEAD_DIM: tl.constexpr,
    FP32_DOT: tl.constexpr,
    HAS_KEY_START: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
):
    """dk (if DK), dv (if DV) plus the contribution of queries m0..m0+BLOCK_M of one query head to the keys offs_n."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q_valid = offs_m < num_queries
    visible = True
    if HAS_KEY_START and (FP32_DOT or (DK and DV)):
        # Packing: a block whose queries' sequences all start after these keys adds nothing, and with many short
        # sequences that is most blocks; skipping them keeps the work to the sequences' own triangles. Not in the
        # TF32 passes of one gradient: there the branch makes ptxas spill (and fp32_dot spills without it).
        starts = tl.load(key_start_row + offs_m, mask=q_valid, other=2**30)
        visible = tl.min(starts) <= tl.max(offs_n)
    if visible:
        q_t, do = _q_dout_tile(q_head, dout_head, offs_m, q_valid, stride_q_m, stride_dout_m, HEAD_DIM)
        lse2, delta = _row_stats(lse_row, delta_row, offs_m, q_valid)
        s_t = dot(k, q_t, tl.zeros((k.shape[0], BLOCK_M), tl.float32), FP32_DOT)
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        # The padding mask is left to the end of the kernel (None here): it hides keys from every query alike.
        allowed = keys_allowed(offs_m, q_valid, offs_n, q_offset, num_keys, None, key_start_row, False, HAS_KEY_START)
        p_t = tl.where(tl.trans(allowed) | whole, p_t, 0.0)
        if DV:
            dv = dot(p_t.to(do.dtype), do, dv, FP32_DOT)
        if DK:
            dp_t = dot(v, tl.trans(do), tl.zeros((k.shape[0], BLOCK_M), tl.float32), FP32_DOT)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, FP32_DOT)
    return dk, dv


@triton.jit
def _deferred_dkdv_dots(dk, dv, p_t, ds_t, q_head, dout_head, m0, lo, num_queries, stride_q_m, stride_dout_m,
                        HEAD_DIM: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """dv + p_t @ dout and dk + ds_t @ q for the queries m0..m0+BLOCK_M of one head, one step late (DEFER_DOT).
    Their q and dout load again (from L2), not carried over: Triton leaves a dot in flight only if its shared-memory
    operands come from the loop's pipelined buffers. Rows before lo (before the first step: p_t, ds_t zeros) read
    zeros."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q_t, do = _q_dout_tile(q_head, dout_head, offs_m, (offs_m >= lo) & (offs_m < num_queries), stride_q_m,
                           stride_dout_m, HEAD_DIM)  # fmt: skip
    dv = dot(p_t.to(do.dtype), do, dv, FP32_DOT)
    dk = dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, FP32_DOT)
    return dk, dv


@triton.jit(do_not_specialize=["num_queries", "num_keys"])
def _attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    q_offset_ptr,
    key_mask_ptr,
    key_start_ptr,
    dk_ptr,
    dv_ptr,
    scale,
    num_queries,
    num_keys,
    n_heads_kv,
    group,
    stride_q_b,
    stride_q_h,
    stride_q_m,
    stride_k_b,
    stride_k_h,
    stride_k_n,
    stride_v_b,
    stride_v_h,
    stride_v_n,
    stride_dout_b,
    stride_dout_m,
    stride_dout_h,
    stride_lse_b,
    stride_lse_h,
    stride_key_mask_b,
    stride_key_start_b,
    HEAD_DIM: tl.constexpr,
    FP32_DOT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_KEY_START: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    DEFER_DOT: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_valid = offs_n < num_keys
    keys = offs_n.to(tl.int64)[:, None]
    kv_mask = k_valid[:, None]
    k = tl.load(k_ptr + b * stride_k_b + hk * stride_k_h + keys * stride_k_n + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_v_b + hk * stride_v_h + keys * stride_v_n + offs_d[None, :], mask=kv_mask, other=0.0)
    q_offset = tl.load(q_offset_ptr + b)
    key_start_row = key_start_ptr + b * stride_key_start_b
    # Query blocks from `lo` to `full` meet the causal diagonal of these keys; packing can cut any block.
    lo, full = query_range(n0, n0 + BLOCK_N - 1, q_offset, num_queries)
    if HAS_KEY_START:
        masked_end = num_queries
    else:
        masked_end = lo + tl.cdiv(full - lo, BLOCK_M) * BLOCK_M
    qk_scale = scale * LOG2_E
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    if DEFER_DOT:
        # One loop over (query head, query block), so that a block's dV and dK dots, issued one step late after the
        # next block's score dots, run during its softmax, across the heads too: one drain at the end, not per head.
        tl.static_assert(DK and DV and not HAS_KEY_START, "DEFER_DOT: both gradients, no packing")
        blocks = tl.cdiv(tl.maximum(num_queries - lo, 0), BLOCK_M)
        p_t = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        ds_t = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        q_prev, dout_prev, m_prev = q_ptr, dout_ptr, lo - BLOCK_M  # before the first step: nothing to add
        for step in range(0, group * blocks):
            h = hk * group + step // blocks
            m0 = lo + (step % blocks) * BLOCK_M
            q_head = q_ptr + b * stride_q_b + h * stride_q_h
            dout_head = dout_ptr + b * stride_dout_b + h * stride_dout_h
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q_valid = offs_m < num_queries
            q_t, do = _q_dout_tile(q_head, dout_head, offs_m, q_valid, stride_q_m, stride_dout_m, HEAD_DIM)
            lse_row = lse_ptr + b * stride_lse_b + h * stride_lse_h
            lse2, delta = _row_stats(lse_row, delta_ptr + (b * n_heads_kv * group + h) * num_queries, offs_m, q_valid)
            s_t = dot(k, q_t, tl.zeros((BLOCK_N, BLOCK_M), tl.float32), FP32_DOT)
            dp_t = dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), FP32_DOT)
            dk, dv = _deferred_dkdv_dots(dk, dv, p_t, ds_t, q_prev, dout_prev, m_prev, lo, num_queries, stride_q_m,
                                         stride_dout_m, HEAD_DIM, FP32_DOT, BLOCK_M)  # fmt: skip
            # As in _dkdv_tile: the padding mask is left to the end of the kernel.
            allowed = keys_allowed(offs_m, q_valid, offs_n, q_offset, num_keys, None, key_start_row, False, False)
            p_t = tl.where(tl.trans(allowed) | (m0 >= masked_end), tl.exp2(s_t * qk_scale - lse2[None, :]), 0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            q_prev, dout_prev, m_prev = q_head, dout_head, m0
        # The last step's dots.
        dk, dv = _deferred_dkdv_dots(dk, dv, p_t, ds_t, q_prev, dout_prev, m_prev, lo, num_queries, stride_q_m,
                                     stride_dout_m, HEAD_DIM, FP32_DOT, BLOCK_M)  # fmt: skip
    else:
        for i in range(group):
            h = hk * group + i
            q_head = q_ptr + b * stride_q_b + h * stride_q_h
            dout_head = dout_ptr + b * stride_dout_b + h * stride_dout_h
            lse_row = lse_ptr + b * stride_lse_b + h * stride_lse_h
            delta_row = delta_ptr + (b * n_heads_kv * group + h) * num_queries
            for m0 in range(lo, num_queries, BLOCK_M):
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, q_head, dout_head, lse_row, delta_row, key_start_row, m0, offs_n, q_offset,
                    num_queries, num_keys, qk_scale, stride_q_m, stride_dout_m, m0 >= masked_end,
                    HEAD_DIM, FP32_DOT, HAS_KEY_START, BLOCK_M, DK, DV,
                )  # fmt: skip
    dk *= scale
    if HAS_KEY_MASK:
        keep = tl.load(key_mask_ptr + b * stride_key_mask_b + offs_n, mask=k_valid, other=0) != 0
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
    out = (b * n_heads_kv + hk) * num_keys * HEAD_DIM + keys * HEAD_DIM + offs_d[None, :]
    if DK:
        tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty), mask=k_valid[:, None])
    if DV:
        tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=k_valid[:, None])


@triton.jit
def _keys_t(head, offs_n, valid, stride_n, HEAD_DIM: tl.constexpr):
    """Rows offs_n of one head's keys (or values), transposed to [HEAD_DIM, len(offs_n)]; zeros where not valid."""
    rows = offs_n.to(tl.int64)[None, :]
    return tl.load(head + rows * stride_n + tl.arange(0, HEAD_DIM)[:, None], mask=valid[None, :], other=0.0)


@triton.jit
def _dq_tile(
    dq,
    ds_prev,
    q,
    do,
    lse2,
    delta,
    k_head,
    v_head,
    n0,
    lo,
    offs_m,
    q_valid,
    q_offset,
    num_keys,
    qk_scale,
    key_mask_row,
    key_start_row,
    stride_k_n,
    stride_v_n,
    HEAD_DIM: tl.constexpr,
    FP32_DOT: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_KEY_START: tl.constexpr,
    DEFER_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dq plus the contribution of keys n0..n0+BLOCK_N to the queries offs_m, in a loop over the key blocks lo,
    lo + BLOCK_N, ... Returns (dq, this block's ds). DEFER_DOT: this block's ds @ k waits for the next step, which
    issues it after its own score dots, and this step issues the previous block's (ds_prev, zeros before the first)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k_valid = offs_n < num_keys
    k_t = _keys_t(k_head, offs_n, k_valid, stride_k_n, HEAD_DIM)
    v_t = _keys_t(v_head, offs_n, k_valid, stride_v_n, HEAD_DIM)
    s = dot(q, k_t, tl.zeros((q.shape[0], BLOCK_N), tl.float32), FP32_DOT)
    if DEFER_DOT:
        dp = dot(do, v_t, tl.zeros((q.shape[0], BLOCK_N), tl.float32), FP32_DOT)
        # The previous block's keys load again (an L2 hit) rather than carried over in registers: Triton leaves a
        # dot in flight only if its shared-memory operands come from the loop's pipelined buffers.
        prev = offs_n - BLOCK_N
        k_prev = _keys_t(k_head, prev, (prev >= lo) & (prev < num_keys), stride_k_n, HEAD_DIM)
        dq = dot(ds_prev.to(k_t.dtype), tl.trans(k_prev), dq, FP32_DOT)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASKED:
        allowed = keys_allowed(
            offs_m, q_valid, offs_n, q_offset, num_keys, key_mask_row, key_start_row, HAS_KEY_MASK, HAS_KEY_START
        )
        p = tl.where(allowed, p, 0.0)
    if not DEFER_DOT:  # sm_80's order: ptxas allocates it without spills (fp32 on sm_90 too)
        dp = dot(do, v_t, tl.zeros((q.shape[0], BLOCK_N), tl.float32), FP32_DOT)
    ds = p * (dp - delta[:, None])
    if not DEFER_DOT:
        dq = dot(ds.to(k_t.dtype), tl.trans(k_t), dq, FP32_DOT)
    return dq, ds if DEFER_DOT else ds_prev  # nothing carried over when not deferred


@triton.jit(do_not_specialize=["num_queries", "num_keys"])
def _attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    q_offset_ptr,
    key_mask_ptr,
    key_start_ptr,
    dq_ptr,
    scale,
    num_queries,
    num_keys,
    n_heads,
    group,
    stride_q_b,
    stride_q_h,
    stride_q_m,
    stride_k_b,
    stride_k_h,
    stride_k_n,
    stride_v_b,
    stride_v_h,
    stride_v_n,
    stride_dout_b,
    stride_dout_m,
    stride_dout_h,
    stride_lse_b,
    stride_lse_h,
    stride_key_mask_b,
    stride_key_start_b,
    HEAD_DIM: tl.constexpr,
    FP32_DOT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_KEY_START: tl.constexpr,
    DEFER_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_valid = offs_m < num_queries
    rows = offs_m.to(tl.int64)[:, None]
    q = tl.load(
        q_ptr + b * stride_q_b + h * stride_q_h + rows * stride_q_m + offs_d[None, :], mask=q_valid[:, None], other=0.0
    )
    do = tl.load(
        dout_ptr + b * stride_dout_b + h * stride_dout_h + rows * stride_dout_m + offs_d[None, :],
        mask=q_valid[:, None],
        other=0.0,
    )
    lse2, delta = _row_stats(
        lse_ptr + b * stride_lse_b + h * stride_lse_h, delta_ptr + (b * n_heads + h) * num_queries, offs_m, q_valid
    )
    q_offset = tl.load(q_offset_ptr + b)
    key_mask_row = key_mask_ptr + b * stride_key_mask_b
    key_start_row = key_start_ptr + b * stride_key_start_b
    k_head = k_ptr + b * stride_k_b + hk * stride_k_h
    v_head = v_ptr + b * stride_v_b + hk * stride_v_h
    lo, hi = key_range(offs_m, q_valid, q_offset, num_keys, key_start_row, HAS_KEY_START)
    # Key blocks before `unmasked_end` are seen whole by every query of the block (none when padding or packing
    # can hide keys); the rest meet the causal diagonal or the end of the keys.
    if HAS_KEY_MASK or HAS_KEY_START:
        unmasked_end = lo
    else:
        unmasked_end = tl.maximum(tl.minimum(m0 + q_offset + 1, num_keys), 0) // BLOCK_N * BLOCK_N
    qk_scale = scale * LOG2_E
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    ds = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for n0 in range(lo, unmasked_end, BLOCK_N):
        dq, ds = _dq_tile(
            dq, ds, q, do, lse2, delta, k_head, v_head, n0, lo, offs_m, q_valid, q_offset, num_keys, qk_scale,
            key_mask_row, key_start_row, stride_k_n, stride_v_n,
            HEAD_DIM, FP32_DOT, False, HAS_KEY_MASK, HAS_KEY_START, DEFER_DOT, BLOCK_N,
        )  # fmt: skip
    for n0 in range(unmasked_end, hi, BLOCK_N):
        dq, ds = _dq_tile(
            dq, ds, q, do, lse2, delta, k_head, v_head, n0, lo, offs_m, q_valid, q_offset, num_keys, qk_scale,
            key_mask_row, key_start_row, stride_k_n, stride_v_n,
            HEAD_DIM, FP32_DOT, True, HAS_KEY_MASK, HAS_KEY_START, DEFER_DOT, BLOCK_N,
        )  # fmt: skip
    if DEFER_DOT:  # the last block's ds @ k (ds is zeros if there was no block)
        last = lo + (tl.cdiv(hi - lo, BLOCK_N) - 1) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_last = _keys_t(k_head, last, (last >= lo) & (last < num_keys), stride_k_n, HEAD_DIM)
        dq = dot(ds.to(k_last.dtype), tl.trans(k_last), dq, FP32_DOT)
    dq *= scale
    out = (b * n_heads + h) * num_queries * HEAD_DIM + rows * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptr + out, dq.to(dq_ptr.dtype.element_ty), mask=q_valid[:, None])


_DKDV = _tuners("dkdv", _attention_bwd_dkdv_kernel, key=[*_KEY, "DK", "DV", "DEFER_DOT"])
_DQ = _tuners("dq", _attention_bwd_dq_kernel, key=[*_KEY, "DEFER_DOT"])


def _check(dout, q, k, v, out, lse, q_offset, key_mask, key_start):
    """The forward's checks (`check_attention_args`), then those of dout, out and lse and of the unit last strides
    the kernels read with: ValueError or TypeError naming the argument. Returns (q_offset, key_mask, key_start) as
    `check_attention_args` does."""
    masks = check_attention_args(q, k, v, q_offset, key_mask, key_start)
    batch, n_heads, num_queries, head_dim = q.shape
    for name, t in (("dout", dout), ("out", out)):
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"attention_bwd: {name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
        if tuple(t.shape) != (batch, num_queries, n_heads, head_dim):
            raise ValueError(f"attention_bwd: {name} must be {(batch, num_queries, n_heads, head_dim)}, got {t.shape}")
    for name, t in (("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"attention_bwd: {name} needs a unit last stride, got strides {t.stride()}")
    shape = (batch, n_heads, num_queries)
    if tuple(lse.shape) != shape or lse.dtype != torch.float32 or lse.device != q.device or lse.stride(-1) != 1:
        raise ValueError(
            f"attention_bwd: lse must be float32 {shape} on {q.device} with a unit last stride, got {lse.dtype} "
            f"{tuple(lse.shape)} on {lse.device} strides {lse.stride()}"
        )
    return masks


@torch.library.triton_op("dbrx_fast::attention_bwd", mutates_args={})
def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_offset: torch.Tensor,
    key_mask: torch.Tensor | None,
    key_start: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [B, Hq, Nq, D], dk [B, Hkv, Nk, D], dv [B, Hkv, Nk, D]) of the attention the forward computed; see the
    module docstring. key_mask is uint8 or bool, key_start int32; None for neither."""
    q_offset, key_mask, key_start = _check(dout, q, k, v, out, lse, q_offset, key_mask, key_start)
    batch, n_heads, num_queries, head_dim = q.shape
    n_heads_kv, num_keys = k.shape[1], k.shape[2]
    if q.numel() == 0 or k.numel() == 0:  # nothing to attend to or from: every gradient is zero
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    launch(
        _attention_bwd_delta_kernel,
        (triton.cdiv(num_queries, DELTA_BLOCK_M), n_heads, batch),
        out,
        dout,
        delta,
        num_queries,
        n_heads,
        *(out.stride(0), out.stride(1), out.stride(2)),
        *(dout.stride(0), dout.stride(1), dout.stride(2)),
        HEAD_DIM=head_dim,
        BLOCK_M=DELTA_BLOCK_M,
        num_warps=4,
    )
    cls, fp32_dot = gemm_class(q.dtype)
    # An absent mask is read by no program; its pointer is a real one of the right type all the same.
    key_mask_arg = q_offset.view(torch.uint8) if key_mask is None else key_mask
    key_start_arg = q_offset if key_start is None else key_start
    inputs = (q, k, v, dout, lse, delta, q_offset, key_mask_arg, key_start_arg)
    strides = (
        *(q.stride(0), q.stride(1), q.stride(2)),
        *(k.stride(0), k.stride(1), k.stride(2)),
        *(v.stride(0), v.stride(1), v.stride(2)),
        *(dout.stride(0), dout.stride(1), dout.stride(2)),
        *(lse.stride(0), lse.stride(1)),
        0 if key_mask is None else key_mask.stride(0),
        0 if key_start is None else key_start.stride(0),
    )
    meta = dict(HEAD_DIM=head_dim, FP32_DOT=fp32_dot, HAS_KEY_MASK=key_mask is not None)
    meta["HAS_KEY_START"] = key_start is not None
    group = n_heads // n_heads_kv
    for do_dk, do_dv in dkdv_passes(cls, head_dim):
        launch(
            _DKDV[cls],
            lambda m: (triton.cdiv(num_keys, m["BLOCK_N"]), n_heads_kv, batch),
            *inputs,
            dk,
            dv,
            scale,
            num_queries,
            num_keys,
            n_heads_kv,
            group,
            *strides,
            **meta,
            DK=do_dk,
            DV=do_dv,
            DEFER_DOT=defer_dot(q.device, cls) and dkdv_defers(cls, head_dim, packed=key_start is not None),
        )
    launch(
        _DQ[cls],
        lambda m: (triton.cdiv(num_queries, m["BLOCK_M"]), n_heads, batch),
        *inputs,
        dq,
        scale,
        num_queries,
        num_keys,
        n_heads,
        group,
        *strides,
        **meta,
        DEFER_DOT=defer_dot(q.device, cls),
    )
    return dq, dk, dv


def _spec_strides(head_dim: int) -> dict[str, int]:
    """The strides of the forward's compile specs (attention_fwd.SPEC_HEADS: DBRX's heads, contiguous tensors at a
    4096-token sequence), with dout's and lse's."""
    n, hq, hk, d = SPEC_LENGTH, SPEC_HEADS, SPEC_KV_HEADS, head_dim
    strides = {"stride_q_b": hq * n * d, "stride_q_h": n * d, "stride_q_m": d}
    for t in ("k", "v"):
        strides.update({f"stride_{t}_b": hk * n * d, f"stride_{t}_h": n * d, f"stride_{t}_n": d})
    strides.update({"stride_dout_b": n * hq * d, "stride_dout_m": hq * d, "stride_dout_h": d})
    strides.update({"stride_lse_b": hq * n, "stride_lse_h": n, "stride_key_mask_b": n, "stride_key_start_b": n})
    return strides


def _signature(kernel, dtype: str, strides: dict[str, int]) -> dict[str, str]:
    types = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "q_offset_ptr": "*i32", "key_start_ptr": "*i32"}
    types |= {"key_mask_ptr": "*u8", "scale": "fp32"}
    names = [n for n, p in inspect.signature(kernel.fn).parameters.items() if p.annotation is not tl.constexpr]
    return {n: types.get(n, f"*{dtype}" if n.endswith("_ptr") else "i32") for n in names if n not in strides}


def _launches(kernel: str, cls: str, head_dim: int, packed: bool) -> list[tuple[str, dict, tuple[int, ...]]]:
    """(label, constexprs, archs) of each launch of `kernel` ("dkdv" or "dq") per config: a dK/dV launch of one
    gradient is named for it (`dkdv_passes`); 16 bits defer their dots on sm_90 only (`defer_dot`, and for dK/dV
    `dkdv_defers`)."""
    names = {BOTH: "", DV_ONLY: " dv", DK_ONLY: " dk"}
    launches = []
    for grads in dkdv_passes(cls, head_dim) if kernel == "dkdv" else (None,):
        label = f"attention_bwd_{kernel}" + names.get(grads, "")
        meta = {} if grads is None else {"DK": grads[0], "DV": grads[1]}
        if cls == "16bit" and (kernel == "dq" or dkdv_defers(cls, head_dim, packed)):
            launches += [(label, {**meta, "DEFER_DOT": False}, (80,)), (label, {**meta, "DEFER_DOT": True}, (90,))]
        else:
            launches.append((label, {**meta, "DEFER_DOT": False}, (80, 90)))
    return launches


def compile_specs() -> list[CompileSpec]:
    """Every launch: the delta kernel per dtype and head dim; dK/dV and dQ per GEMM class, dtype of the class, head
    dim 64 and 128, mask variant (causal only; padding and packing), launch (`_launches`) and config of `tile_configs`
    at the head dim."""
    specs = []
    for dtype in TRITON_DTYPES.values():
        for head_dim in (64, 128):
            specs.append(
                CompileSpec(
                    name=f"attention_bwd_delta {dtype} D={head_dim}",
                    kernel=_attention_bwd_delta_kernel,
                    signature=_signature(_attention_bwd_delta_kernel, dtype, {}),
                    constexprs={"HEAD_DIM": head_dim, "BLOCK_M": DELTA_BLOCK_M},
                )
            )
    for name, kernel in (
        ("dkdv", _attention_bwd_dkdv_kernel),
        ("dq", _attention_bwd_dq_kernel),
    ):
        params = inspect.signature(kernel.fn).parameters
        for cls in GEMM_CLASS_DTYPES:
            for dtype, head_dim, masks in itertools.product(GEMM_CLASS_DTYPES[cls], (64, 128), (False, True)):
                for cfg in tile_configs(name, cls, head_dim):
                    strides = {k: v for k, v in _spec_strides(head_dim).items() if k in params}
                    meta = {"HEAD_DIM": head_dim, "FP32_DOT": cls == "fp32_dot", "HAS_KEY_MASK": masks}
                    meta["HAS_KEY_START"] = masks
                    for label, launch_meta, archs in _launches(name, cls, head_dim, packed=masks):
                        specs.append(
                            CompileSpec(
                                name=f"{label} {dtype} {cls} D={head_dim} masks={masks}"
                                + (" DEFER_DOT=True" if launch_meta.get("DEFER_DOT") else "")
                                + f" {describe(cfg)}",
                                kernel=kernel,
                                signature=_signature(kernel, dtype, strides),
                                constexprs={**strides, **meta, **launch_meta, **cfg.kwargs},
                                num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages,
                                matrix=cls != "fp32_dot",
                                archs=archs,
                            )
                        )
    return specs
