"""Split-KV attention decode: a few query tokens per sequence against a long KV cache (inference only).

q [B, Hq, Nq, D] with Nq <= 8 (one decode token, or a few for speculative decoding); k, v [B, Hkv, Nk, D] with any
strides but a unit stride on D: DynamicCache's tensors, or a StaticCache's whole `max_cache_len` storage. Query
head h reads KV head h // (Hq / Hkv). q_offset int32 [B] on the device is the key index aligned with query 0 (the
number of tokens cached before these queries); key_mask uint8 (or bool) [B, Nk] marks the keys that may be seen
(left padding), None for all. The mask rule is kernels/attention_mask.py's. Returns out [B, Nq, Hq, D] contiguous in
q's dtype; a query that sees no key gets 0.

Decode reads the KV cache once and does ~2 FLOPs per byte read: it is bound by memory bandwidth, and by how many
SMs take part in reading. So:
1. `_attention_decode_split_kernel`, grid (splits, KV heads x row tiles, B): one program reads one chunk of one KV
   head's keys and values, and serves every query of that head's group with it. The group's G query heads x Nq
   tokens are the rows of one M tile (row r = g * Nq + i: head g, token i), padded to 16 rows, tl.dot's minimum, and
   at most 32 (more rows take more tiles): the KV tile is loaded once for all of them, into shared memory by
   cp.async, several tiles ahead (num_stages), and multiplied with mma.sync (wgmma needs 64 rows; the MMA is not the
   limit). Scores and softmax in fp32 with exp2 (the scale is folded with log2(e)), online over the chunk's tiles
   of BLOCK_N keys. The program writes its normalised partial output (fp32) and partial log2-sum-exp per row.
   The causal bound hi = q_offset + Nq (and Nk) limits the keys read: the valid range [0, hi) is cut into `splits`
   equal chunks (whole BLOCK_N tiles) on the device, so with a StaticCache only the valid length is read and every
   live program gets a fair share of it; a program whose chunk starts at or past hi reads no key and writes
   lse = -inf for its rows. Keys past hi are never loaded (garbage there, even NaN, cannot leak in).
2. `_attention_decode_combine_kernel`, grid (Nq, Hq, B): one program merges one row's partials by log-sum-exp, in
   split order (deterministic: no atomics, the same bits on every run), and writes out[b, i, h, :].
The number of splits comes from static shapes only (B, Hkv, Nk and the SM count): no host sync, no data-dependent
shape, so a StaticCache decode step can be captured in a CUDA graph and replayed with a new q_offset.

Limits: fp16, bf16 or fp32 (fp32 multiplies as three TF32 products, about fp32's accuracy); head_dim a power of two
from 16 to 256; Hq a multiple of Hkv; Nq <= 8. Keys masked off by key_mask are read (their values must be finite, as a
cache's are); keys past the causal bound are not.
"""

import functools

import torch
import triton
import triton.language as tl

from .attention_fwd import LOG2_E
from .attention_mask import key_range, keys_allowed
from .compile_spec import CompileSpec, config_spec
from .dtypes import TRITON_DTYPES, check_dtype
from .launch import launch
from .moe_tiles import autotuned_by_class

MAX_QUERIES = 8
MAX_HEAD_DIM = 256
# Rows of one M tile: tl.dot's minimum of 16 up to 32 (DBRX's 6 heads x Nq <= 5 tokens fit one tile); more rows
# (Nq > 5, or MQA with many heads) take several row tiles, each reading its KV head again (from L2, mostly). A
# 64-row tile would need 8 warps to hold its fp32 scores and accumulator without spilling; fp32 inputs, whose
# three-way TF32 products need more registers, spill at 32 rows and take 16.
MIN_BLOCK_M, MAX_BLOCK_M = 16, 32
MAX_BLOCK_M_FP32 = 16
# Splits: enough programs for a few per SM, each with at least MIN_KEYS_PER_SPLIT keys of the cache to read (fewer
# and the partials' combine costs more than the split saves), at most MAX_SPLITS partials per row.
PROGRAMS_PER_SM = 2
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 64
# SMs counted without a GPU (the interpreter): several splits on small tests.
_CPU_SMS = 64
# Partials the combine kernel merges per step of its loop over a row's splits (at most MAX_SPLITS).
_COMBINE_BLOCK_S = 4


def _config(block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Per class of input dtype; the first of each is the pinned one (interpreter, DBRX_FAST_AUTOTUNE=0). Several stages
# keep the next KV tiles' loads in flight while one is multiplied: the loop is all loads. Every config fits sm_80's
# shared memory and neither architecture's registers spill (checked for M tiles of 16 and 32 rows): fp32 tiles are
# twice as large and their three-way TF32 products need more registers, so fp32 takes small tiles on 8 warps.
CONFIGS = {
    "16bit": [_config(64, 4, 3), _config(64, 4, 4), _config(128, 8, 3)],
    "fp32_dot": [_config(32, 8, 3)],
}


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32_dot" if dtype == torch.float32 else "16bit"


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b: 16-bit operands on the tensor cores; fp32 ones there too, split in three TF32 products, which
    is about as accurate as fp32 ("ieee" multiplies with FMAs and spills at these tiles)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


# The per-call sizes are not specialised on (nor in the autotune key): Nk grows by one every DynamicCache step and
# the number of splits follows it; recompiling or retuning per step would cost more than it saves.
@triton.jit(do_not_specialize=["num_queries", "num_keys", "num_splits"])
def _attention_decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_offset_ptr,
    key_mask_ptr,
    part_out_ptr,
    part_lse_ptr,
    num_queries,
    num_keys,
    group,
    num_splits,
    qk_scale,
    stride_q_b,
    stride_q_h,
    stride_q_n,
    stride_k_b,
    stride_k_h,
    stride_k_n,
    stride_v_b,
    stride_v_h,
    stride_v_n,
    stride_key_mask_b,
    HEAD_DIM: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    KV_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    row_tiles = tl.cdiv(group * num_queries, BLOCK_M)
    kv_head = (tl.program_id(1) // row_tiles).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n_heads_q = tl.num_programs(1) // row_tiles * group

    # Rows of the tile: query head g of the group, token i.
    rows = (tl.program_id(1) % row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = rows // num_queries
    token = rows - g * num_queries
    row_valid = g < group
    head = kv_head * group + g  # int64

    q_offset = tl.load(q_offset_ptr + b)
    key_mask_row = key_mask_ptr + b * stride_key_mask_b
    _, hi = key_range(token, row_valid, q_offset, num_keys, key_mask_row, False)
    hi = tl.maximum(hi, 0)  # a negative q_offset can put every key out of reach
    # This program's chunk of [0, hi): whole BLOCK_N tiles, the same for every split of the batch row.
    chunk = tl.cdiv(tl.cdiv(hi, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, hi)
    live = (tl.zeros([BLOCK_M], tl.int32) + start) < end  # per row, for the load masks

    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + b * stride_q_b + head * stride_q_h + token * stride_q_n
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=(row_valid & live)[:, None], other=0.0)
    k_head = b * stride_k_b + kv_head * stride_k_h
    v_head = b * stride_v_b + kv_head * stride_v_h
    if KV_ALIGNED:
        # The launcher has checked that every K and V stride is a multiple of 16 elements: saying so lets the
        # compiler load 16-byte vectors, which cp.async can pipeline. The JIT specialises such strides the same way,
        # but the compile check cannot see that. (Inline: a hint set inside a @triton.jit helper is lost.)
        k_head = tl.multiple_of(k_head, 16)
        v_head = tl.multiple_of(v_head, 16)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = (offs_n < end)[:, None]
        # int32 offsets from an int64 head offset: one KV head's slice stays far below 2**31 elements.
        k_offs = offs_n[:, None] * stride_k_n + offs_d[None, :]
        v_offs = offs_n[:, None] * stride_v_n + offs_d[None, :]
        if KV_ALIGNED:
            k_offs = tl.multiple_of(k_offs, [16, 16])
            v_offs = tl.multiple_of(v_offs, [16, 16])
        k = tl.load(k_ptr + k_head + k_offs, mask=in_range, other=0.0)
        v = tl.load(v_ptr + v_head + v_offs, mask=in_range, other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32)) * qk_scale
        allowed = keys_allowed(
            token, row_valid, offs_n, q_offset, num_keys, key_mask_row, key_mask_row, HAS_KEY_MASK, False
        )
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no allowed key so far keeps m = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    seen = l_i > 0
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    # Partials are [B, Hq, Nq, splits] (+ [D]): row (b, head, token)'s splits side by side for the combine.
    part_row = ((b * n_heads_q + head) * num_queries + token) * num_splits + split
    tl.store(part_lse_ptr + part_row, lse, mask=row_valid)
    # The combine reads a partial output only where its lse is finite.
    tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=(row_valid & seen)[:, None])


# One autotuner per dtype class, keyed on every code-changing constexpr (triton adds the tensors' dtypes).
SPLIT_KERNELS = autotuned_by_class(
    _attention_decode_split_kernel, CONFIGS, ["BLOCK_M", "HEAD_DIM", "HAS_KEY_MASK", "KV_ALIGNED"]
)


@triton.jit(do_not_specialize=["num_queries", "num_splits"])
def _attention_decode_combine_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    num_queries,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_heads_q = tl.num_programs(1)
    part_row = ((b * n_heads_q + head) * num_queries + token) * num_splits
    offs_d = tl.arange(0, HEAD_DIM)

    m = tl.full([1], float("-inf"), tl.float32)
    l_sum = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(part_lse_ptr + part_row + offs_s, mask=offs_s < num_splits, other=float("-inf"))
        finite = lse > float("-inf")
        o = tl.load(
            part_out_ptr + (part_row + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=finite[:, None], other=0.0
        )
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        l_sum = l_sum * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        m = m_new
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)  # no key seen: acc = 0, out 0
    out_row = ((b * num_queries + token) * n_heads_q + head) * HEAD_DIM
    tl.store(out_ptr + out_row + offs_d, out.to(out_ptr.dtype.element_ty))


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _CPU_SMS


def block_m(group: int, num_queries: int, dtype: torch.dtype) -> int:
    """Rows of the M tile for a group of `group` query heads per KV head and `num_queries` tokens."""
    most = MAX_BLOCK_M_FP32 if dtype == torch.float32 else MAX_BLOCK_M
    return min(most, max(MIN_BLOCK_M, triton.next_power_of_2(group * num_queries)))


def num_splits(batch: int, kv_heads: int, row_tiles: int, num_keys: int, device: torch.device) -> int:
    """How many programs share one KV head's keys: from static sizes only (CUDA-graph safe)."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), batch * kv_heads * row_tiles)
    return max(1, min(wanted, MAX_SPLITS, triton.cdiv(num_keys, MIN_KEYS_PER_SPLIT)))


def _check(q, k, v, q_offset, key_mask) -> torch.Tensor | None:
    """ValueError / TypeError naming what does not fit; returns key_mask as uint8 (or None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention_decode: {name} must be 4-D, got shape {tuple(t.shape)}")
        check_dtype(f"attention_decode: {name}", t)
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"attention_decode: {name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"attention_decode: {name} needs a unit stride on head_dim, got strides {t.stride()}")
    batch, n_heads_q, num_queries, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"attention_decode: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    if n_heads_q % k.shape[1]:
        raise ValueError(f"attention_decode: {n_heads_q} query heads are not a multiple of {k.shape[1]} KV heads")
    if not 1 <= num_queries <= MAX_QUERIES:
        raise ValueError(f"attention_decode: 1 to {MAX_QUERIES} queries per sequence, got {num_queries}")
    if head_dim < 16 or head_dim > MAX_HEAD_DIM or head_dim & (head_dim - 1):
        raise ValueError(f"attention_decode: head_dim must be a power of two in [16, {MAX_HEAD_DIM}], got {head_dim}")
    if q_offset.shape != (batch,) or q_offset.dtype != torch.int32 or q_offset.device != q.device:
        raise ValueError(
            f"attention_decode: q_offset must be int32 [{batch}] on {q.device}, got {q_offset.dtype} "
            f"{tuple(q_offset.shape)} on {q_offset.device}"
        )
    if key_mask is None:
        return None
    if key_mask.dtype == torch.bool:
        key_mask = key_mask.view(torch.uint8)
    if (
        key_mask.shape != (batch, k.shape[2])
        or key_mask.dtype != torch.uint8
        or key_mask.device != q.device
        or key_mask.stride(-1) != 1
    ):
        raise ValueError(
            f"attention_decode: key_mask must be uint8 or bool [{batch}, {k.shape[2]}] on {q.device} with a unit "
            f"last stride, got {key_mask.dtype} {tuple(key_mask.shape)} on {key_mask.device}"
        )
    return key_mask


@torch.library.triton_op("dbrx_fast::attention_decode", mutates_args={})
def attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offset: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of q [B, Hq, Nq <= 8, D] over the cache k, v [B, Hkv, Nk, D]: out [B, Nq, Hq, D] (see the module
    docstring). q_offset int32 [B] is the number of keys before query 0; key_mask uint8 or bool [B, Nk] or None."""
    key_mask = _check(q, k, v, q_offset, key_mask)
    batch, n_heads_q, num_queries, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    group = n_heads_q // kv_heads
    out = torch.empty((batch, num_queries, n_heads_q, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if num_keys == 0:
        return out.zero_()
    rows = block_m(group, num_queries, q.dtype)
    row_tiles = triton.cdiv(group * num_queries, rows)
    splits = num_splits(batch, kv_heads, row_tiles, num_keys, q.device)
    part_lse = torch.empty((batch, n_heads_q, num_queries, splits), dtype=torch.float32, device=q.device)
    part_out = torch.empty((*part_lse.shape, head_dim), dtype=torch.float32, device=q.device)
    has_key_mask = key_mask is not None
    launch(
        SPLIT_KERNELS[_dtype_class(q.dtype)],
        (splits, kv_heads * row_tiles, batch),
        q,
        k,
        v,
        q_offset,
        key_mask if has_key_mask else q_offset,  # never read without a mask
        part_out,
        part_lse,
        num_queries,
        num_keys,
        group,
        splits,
        scale * LOG2_E.value,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        key_mask.stride(0) if has_key_mask else 0,
        HEAD_DIM=head_dim,
        HAS_KEY_MASK=has_key_mask,
        KV_ALIGNED=all(t.stride(d) % 16 == 0 for t in (k, v) for d in range(3)),
        BLOCK_M=rows,
    )
    launch(
        _attention_decode_combine_kernel,
        (num_queries, n_heads_q, batch),
        part_out,
        part_lse,
        out,
        num_queries,
        splits,
        HEAD_DIM=head_dim,
        BLOCK_S=_COMBINE_BLOCK_S,
    )
    return out


def compile_specs() -> list[CompileSpec]:
    """One spec per (dtype, head_dim 64 and 128, M tile of 16 rows and the dtype's largest, key mask or not,
    autotune config) of the split kernel, and the combine kernel per (dtype, head_dim)."""
    ints = (
        "num_queries num_keys group num_splits stride_q_b stride_q_h stride_q_n stride_k_b stride_k_h stride_k_n "
        "stride_v_b stride_v_h stride_v_n stride_key_mask_b"
    ).split()
    specs = []
    for dtype, ty in TRITON_DTYPES.items():
        signature = {
            "q_ptr": f"*{ty}",
            "k_ptr": f"*{ty}",
            "v_ptr": f"*{ty}",
            "q_offset_ptr": "*i32",
            "key_mask_ptr": "*u8",
            "part_out_ptr": "*fp32",
            "part_lse_ptr": "*fp32",
            **dict.fromkeys(ints, "i32"),
            "qk_scale": "fp32",
        }
        combine_signature = {
            "part_out_ptr": "*fp32",
            "part_lse_ptr": "*fp32",
            "out_ptr": f"*{ty}",
            "num_queries": "i32",
            "num_splits": "i32",
        }
        for head_dim in (64, 128):
            for rows in sorted({MIN_BLOCK_M, block_m(MAX_BLOCK_M, 1, dtype)}):
                for has_key_mask in (False, True):
                    for config in CONFIGS[_dtype_class(dtype)]:
                        label = f"attention_decode {ty} D={head_dim} BLOCK_M={rows} key_mask={has_key_mask}"
                        meta = {"HEAD_DIM": head_dim, "HAS_KEY_MASK": has_key_mask, "KV_ALIGNED": True, "BLOCK_M": rows}
                        # Not a `matrix` spec: wgmma needs 64 rows; these tiles multiply with mma.sync, which is
                        # enough for a kernel bound by its loads.
                        specs.append(config_spec(label, _attention_decode_split_kernel, signature, meta, config))
            specs.append(
                CompileSpec(
                    name=f"attention_decode_combine {ty} D={head_dim}",
                    kernel=_attention_decode_combine_kernel,
                    signature=combine_signature,
                    constexprs={"HEAD_DIM": head_dim, "BLOCK_S": _COMBINE_BLOCK_S},
                    num_warps=4,
                    num_stages=1,
                )
            )
    return specs
