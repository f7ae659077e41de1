"""GQA flash attention, forward: out = softmax(scale * q @ k.T, masked) @ v per query head, and its log-sum-exp.

Shapes: q [B, Hq, Nq, D]; k, v [B, Hkv, Nk, D], any strides with a contiguous last dim (the transposed views
transformers passes, a cache's views); query head h reads KV head h // (Hq // Hkv) where it lies (no repeated K/V).
The mask is the compact AttentionMask of dbrx_fast/attention_mask.py, its rule kernels/attention_mask.py's: q_offset
int32 [B], key_mask [B, Nk] (bool or its uint8 view) or None, key_start int32 [B, Nq] or None. Returns out
[B, Nq, Hq, D] contiguous in q's dtype (what transformers' attention functions return) and lse float32 [B, Hq, Nq],
the natural log of the softmax's denominator, for the backward. A query that sees no key gets out 0 and lse -inf.

Algorithm (FlashAttention-2): one program per (query block, query head, batch row) keeps its BLOCK_M queries in
registers and walks the key tiles the block may see (`key_range`: tiles past the causal diagonal or before the
packed sequence are never loaded), with a running row max m, row sum l and an fp32 accumulator (online softmax). The
softmax runs in base 2: scale * log2(e) folds into one multiply of the scores, exp2 is the SFU's native exponential.
Tiles that every query of the block sees whole (`keys_all_see`) run without a mask; only the tiles on the causal
diagonal and past Nk pay for `keys_allowed` (and every tile with a key_mask or key_start: padding can fall anywhere,
and a separate loop for the tiles at a packing boundary spilled on sm_80). Programs are independent (no atomics):
the result does not depend on their order.

Bound: the tensor cores at long sequences (4 * Nq * Nk * D FLOPs per head, halved when causal, against
(Nq + 2 * Nk) * D elements read), with one exp2 per score on the SFU beside every 2 * D multiply-adds; memory only
for short sequences. What the sm_90 main loop makes of it (16 bits; python -m dbrx_fast.inspect): K and V come
through a three-stage cp.async ring or TMA (loads overlapped). The softmax needs each tile's q @ k.T, which Triton
3.6 to 3.9 wait for with `wgmma.wait_group 0` (their WGMMA pipeliner keeps a dot in flight only when nothing but the
next wgmma's accumulator reads it), and that wait retires every wgmma issued before it. So on sm_90 each tile's
p @ v is deferred (DEFER_DOT, `defer_dot`): the next iteration issues it right after its own wait for q @ k.T, and it
runs on the tensor cores while that tile's exp2 run on the SFU, until the wait after the next q @ k.T (the compile
tables' "drain+sfu||mma"). The product is the same, in the same order, bit for bit. The value tile loads again in the
deferring iteration (Triton keeps a dot in flight only if its shared-memory operands come from the loop's pipelined
buffers); the p carried over costs registers (D = 128: 250 on the pointer path, 191 with TMA, Triton 3.9). What stays
serial is q @ k.T against the softmax that reads it: FlashAttention-3 overlaps that too, with two warpgroups taking
turns (ping-pong), which needs explicit waits and barriers (Gluon) that `tl` does not offer. sm_80 (mma.sync is
synchronous) keeps each tile's p @ v in its own iteration.

TMA (16 bits on sm_90, kernels/moe_tiles.py `use_tma`; DBRX_FAST_TMA=0|1 overrides): Q, K and V tiles load through
in-kernel descriptors of each (batch, head)'s [N, D] rows, whatever the strides (transformers' transposed views
too), zero past N: no address arithmetic or masks in the loop, 50-60 fewer registers at head_dim 128 (128 x 64,
DEFER_DOT: 250 -> 191 on Triton 3.9, 230 -> 179 on 3.6). That fits the 64 x 64 tile on 4 warps in two blocks per SM
(186 and 168 registers, 115712 bytes), whose pointer version spills: two independent CTAs of one warpgroup each, so
that one CTA's MMAs can run during the other's q @ k.T wait and softmax. The pointer path stays for
sm_80, fp32 and rows TMA cannot take (a start or stride not a multiple of 16 bytes).

Limits: head_dim 16, 32, 64 or 128 (`HEAD_DIMS`); fp16, bf16 and fp32 (fp32 multiplies in full fp32 when torch's
matmul precision is "highest", in TF32 otherwise: `gemm_class`); float64 raises TypeError so that callers fall back.
"""

import math

import torch
import triton
import triton.language as tl

from .attention_mask import key_range, keys_all_see, keys_allowed
from .compile_spec import CompileSpec, describe
from .dtypes import check_dtype
from .moe_tiles import (
    GEMM_CLASS_DTYPES,
    autotuned_by_class,
    config,
    dot,
    gemm_class,
    launch_gemm,
    load_tile,
    tile_descriptor,
)

HEAD_DIMS = (16, 32, 64, 128)
LOG2_E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x * LOG2_E); a constexpr, so kernels can read it too


def defer_dot(device: torch.device, cls: str) -> bool:
    """DEFER_DOT of an attention launch (this forward and the backward's dQ): each tile's last dot (p @ v, ds @ k)
    runs in the next iteration, issued after that tile's score dots, so that on sm_90 the asynchronous wgmma runs
    while the next tile's softmax does (Triton leaves such a dot in flight until the next score dot's wait). For the
    16-bit class on sm_90 and newer, and under the interpreter, which runs what sm_90 runs. Not on sm_80, whose
    mma.sync is synchronous and where the tile carried over spills at head_dim 128, nor for fp32 (it spills there)."""
    return cls == "16bit" and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9)


# Tiles that only the TMA path offers (`_prune_by_path`): 64 x 64 on 4 warps and 3 stages, two blocks per SM on sm_90
# at head_dim 128 (186 registers on Triton 3.9, 168 on 3.6, with DEFER_DOT; see the module docstring); its pointer
# version spills 32 bytes (3.9, before DEFER_DOT).
_TMA_ONLY = (config(4, 3, BLOCK_M=64, BLOCK_N=64),)


def _configs() -> dict[str, list]:
    """Tiles per GEMM class (kernels/moe_tiles.py), the pinned one first.

    16 bits: 128 queries per program over 8 warps (two warpgroups of 64 rows, as wgmma takes them) and key tiles of
    64. Measured with ptxas (python -m dbrx_fast.inspect): 128 x 128 tiles spill at head_dim 128 (8 warps: sm_80 and
    sm_90), as do 128 x 64 tiles on 4 warps and 64 x 64 tiles on 4 warps (sm_90, Triton 3.9); two stages wait for
    every load in the loop. A second block per SM at head_dim 128 (another CTA's MMAs during this one's softmax)
    fits no tile on both releases (sm_90, pointer loads): 128 x 64 on 8 warps takes 182-200 registers before
    DEFER_DOT and 205-250 with it (two blocks need <= 128; maxnreg=128 spills), 64 x 64 on 4 warps and 3 stages
    246 on Triton 3.6 but 255 and 32 bytes of spills on 3.9, 128 x 32 has n32 wgmma for q @ k.T (and 136
    registers on 3.9), all before DEFER_DOT. The TMA path fits 64 x 64 on 4
    warps and 3 stages (`_TMA_ONLY`); the pinned tile stays first, the one the interpreter and an untuned GPU run,
    and a GPU's autotuner weighs the two. tf32 tiles take twice the shared memory of 16-bit ones. fp32_dot
    multiplies on the CUDA cores with its operands in registers: small tiles, two stages (one stage, and 32 x 32
    tiles, spill on sm_90).
    """
    return {
        "16bit": [
            config(8, 3, BLOCK_M=128, BLOCK_N=64),
            *_TMA_ONLY,
        ],
        "tf32": [
            config(8, 2, BLOCK_M=128, BLOCK_N=32),
            config(4, 2, BLOCK_M=64, BLOCK_N=16),
        ],
        "fp32_dot": [
            config(8, 2, BLOCK_M=32, BLOCK_N=16),
        ],
    }


@triton.jit
def _deferred_pv(acc, p, alpha, v_src, v_head_ptr, v_offs, stride_v_n, n0, first, num_keys, FP32_DOT: tl.constexpr,
                 USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """acc * alpha + p @ v for p and alpha of the key tile n0, one iteration late (DEFER_DOT). The value tile loads
    anew (an L2 hit), not carried over from its iteration: Triton leaves a dot in flight only if its shared-memory
    operands come from the loop's pipelined buffers. Before the first tile (n0 = first - BLOCK_N, p zeros) it
    reads zeros, as it does past num_keys."""
    offs_v = n0 + tl.arange(0, BLOCK_N)
    v_ptrs = v_head_ptr + tl.cast(n0, tl.int64) * stride_v_n + v_offs
    v = load_tile(v_src, (n0, 0), v_ptrs, ((offs_v >= first) & (offs_v < num_keys))[:, None], USE_TMA)
    return dot(p.to(v.dtype), v, acc * alpha[:, None], FP32_DOT)


@triton.jit
def _attend_tiles(
    acc,
    m_i,
    l_i,
    p_prev,
    alpha_prev,
    q,
    k_src,
    v_src,
    k_head_ptr,
    v_head_ptr,
    stride_k_n,
    stride_v_n,
    first,
    start,
    end,
    offs_q,
    q_valid,
    q_offset,
    num_keys,
    key_mask_row,
    key_start_row,
    qk_scale,
    MASKED: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_KEY_START: tl.constexpr,
    FP32_DOT: tl.constexpr,
    USE_TMA: tl.constexpr,
    DEFER_DOT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The online softmax over key tiles start, start + BLOCK_N, ... below `end` (start a multiple of BLOCK_N).

    Unmasked tiles must lie inside [0, num_keys) and be seen whole by every query of the block. m_i is in base 2
    (scores times qk_scale = scale * log2(e)); a row that has seen no key keeps m_i = -inf, l_i = 0, acc = 0.
    K and V tiles come from k_src and v_src, descriptors of this head's [num_keys, HEAD_DIM] rows when USE_TMA (zero
    past num_keys: no mask), else from pointers off k_head_ptr and v_head_ptr. DEFER_DOT: a tile's p @ v runs in
    the next iteration (p_prev and alpha_prev carry it there, zeros and ones before the first tile, at `first`), and
    the caller runs the last one."""
    # Tile offsets stay loop-invariant and the tile's first row moves as a scalar: a loop-carried tensor of 64-bit
    # pointers would hold two registers per element (it spilled on sm_80).
    offs_d = tl.arange(0, HEAD_DIM)
    k_offs = tl.arange(0, BLOCK_N)[:, None] * stride_k_n + offs_d[None, :]
    v_offs = tl.arange(0, BLOCK_N)[:, None] * stride_v_n + offs_d[None, :]
    for n0 in range(start, end, BLOCK_N):
        offs_k = n0 + tl.arange(0, BLOCK_N)
        k_ptrs = k_head_ptr + tl.cast(n0, tl.int64) * stride_k_n + k_offs
        v_ptrs = v_head_ptr + tl.cast(n0, tl.int64) * stride_v_n + v_offs
        if MASKED or USE_TMA:
            k = load_tile(k_src, (n0, 0), k_ptrs, (offs_k < num_keys)[:, None], USE_TMA)
            if not DEFER_DOT:
                v = load_tile(v_src, (n0, 0), v_ptrs, (offs_k < num_keys)[:, None], USE_TMA)
        else:
            k = tl.load(k_ptrs)
            if not DEFER_DOT:
                v = tl.load(v_ptrs)
        qk = dot(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32), FP32_DOT)
        if DEFER_DOT:  # the previous tile's p @ v, issued after the wait for qk: it runs during this tile's softmax
            acc = _deferred_pv(acc, p_prev, alpha_prev, v_src, v_head_ptr, v_offs, stride_v_n, n0 - BLOCK_N, first,
                               num_keys, FP32_DOT, USE_TMA, BLOCK_N)  # fmt: skip
        if MASKED:
            allowed = keys_allowed(
                offs_q, q_valid, offs_k, q_offset, num_keys, key_mask_row, key_start_row, HAS_KEY_MASK, HAS_KEY_START
            )
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_sub = m_new
        if MASKED:  # a row with no allowed key yet subtracts 0, so that exp2(-inf - m) is 0 and not NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if DEFER_DOT:
            p_prev, alpha_prev = p, alpha
        else:
            acc = dot(p.to(v.dtype), v, acc * alpha[:, None], FP32_DOT)
    return acc, m_i, l_i, p_prev, alpha_prev


# Lengths change every call: not specialized (on 1 or on divisibility by 16), so a new length reuses the compiled
# kernel; their buckets only key the autotuner. The mask rows' strides are the lengths too.
@triton.jit(
    do_not_specialize=[
        "num_queries",
        "num_keys",
        "q_bucket",
        "k_bucket",
        "stride_key_mask_b",
        "stride_key_start_b",
    ]
)
def _attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_offset_ptr,
    key_mask_ptr,
    key_start_ptr,
    out_ptr,
    lse_ptr,
    num_queries,
    num_keys,
    q_bucket,  # autotune key only: next power of two of num_queries
    k_bucket,  # autotune key only: next power of two of num_keys
    num_q_heads,
    group,
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
    stride_key_start_b,
    HEAD_DIM: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_KEY_START: tl.constexpr,
    FP32_DOT: tl.constexpr,
    USE_TMA: tl.constexpr,
    DEFER_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Queries pid_m*BLOCK_M ... of query head program_id(1) in batch row program_id(2); see the module docstring."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    kv_head = head // group
    offs_q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_valid = offs_q < num_queries
    q_offset = tl.load(q_offset_ptr + batch)
    key_mask_row = key_mask_ptr + batch * stride_key_mask_b
    key_start_row = key_start_ptr + batch * stride_key_start_b

    q_head_ptr = q_ptr + batch * stride_q_b + head.to(tl.int64) * stride_q_h
    k_head_ptr = k_ptr + batch * stride_k_b + kv_head.to(tl.int64) * stride_k_h
    v_head_ptr = v_ptr + batch * stride_v_b + kv_head.to(tl.int64) * stride_v_h
    # USE_TMA: descriptors of this (batch, head)'s rows only, so that a tile past num_queries or num_keys reads zeros,
    # never the next head's rows (else pointers off the head pointers).
    q_src = tile_descriptor(q_head_ptr, (num_queries, HEAD_DIM), (stride_q_n, 1), (BLOCK_M, HEAD_DIM), USE_TMA)
    q = load_tile(q_src, (pid_m * BLOCK_M, 0), q_head_ptr + offs_q[:, None] * stride_q_n + offs_d[None, :],
                  q_valid[:, None], USE_TMA)  # fmt: skip
    k_src = tile_descriptor(k_head_ptr, (num_keys, HEAD_DIM), (stride_k_n, 1), (BLOCK_N, HEAD_DIM), USE_TMA)
    v_src = tile_descriptor(v_head_ptr, (num_keys, HEAD_DIM), (stride_v_n, 1), (BLOCK_N, HEAD_DIM), USE_TMA)

    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    alpha = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    lo, hi = key_range(offs_q, q_valid, q_offset, num_keys, key_start_row, HAS_KEY_START)
    lo = (lo // BLOCK_N) * BLOCK_N
    # Two runs of tiles: unmasked (every query sees them whole), then masked (the causal diagonal and the ragged end).
    # With padding or packing every tile is masked: padding can fall anywhere, and a third loop for the tiles before
    # a packing boundary spilled on sm_80 (Triton 3.9).
    mid_hi = lo
    if not (HAS_KEY_MASK or HAS_KEY_START):
        _, all_hi = keys_all_see(offs_q, q_valid, q_offset, num_keys, key_start_row, HAS_KEY_START)
        mid_hi = tl.maximum((tl.maximum(all_hi, 0) // BLOCK_N) * BLOCK_N, lo)
        acc, m_i, l_i, p, alpha = _attend_tiles(
            acc, m_i, l_i, p, alpha, q, k_src, v_src, k_head_ptr, v_head_ptr, stride_k_n, stride_v_n, lo, lo, mid_hi,
            offs_q, q_valid, q_offset, num_keys, key_mask_row, key_start_row, qk_scale,
            False, HAS_KEY_MASK, HAS_KEY_START, FP32_DOT, USE_TMA, DEFER_DOT, HEAD_DIM, BLOCK_N,
        )  # fmt: skip
    acc, m_i, l_i, p, alpha = _attend_tiles(
        acc, m_i, l_i, p, alpha, q, k_src, v_src, k_head_ptr, v_head_ptr, stride_k_n, stride_v_n, lo, mid_hi, hi,
        offs_q, q_valid, q_offset, num_keys, key_mask_row, key_start_row, qk_scale,
        True, HAS_KEY_MASK, HAS_KEY_START, FP32_DOT, USE_TMA, DEFER_DOT, HEAD_DIM, BLOCK_N,
    )  # fmt: skip

    if DEFER_DOT:  # the last tile's p @ v (p is zeros if there was no tile)
        last = lo + (tl.cdiv(hi - lo, BLOCK_N) - 1) * BLOCK_N
        v_offs = tl.arange(0, BLOCK_N)[:, None] * stride_v_n + offs_d[None, :]
        acc = _deferred_pv(acc, p, alpha, v_src, v_head_ptr, v_offs, stride_v_n, last, lo, num_keys, FP32_DOT, USE_TMA,
                           BLOCK_N)  # fmt: skip
    seen = l_i > 0.0
    out = acc * (1.0 / tl.where(seen, l_i, 1.0))[:, None]  # acc is 0 where no key was seen
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row_stride = num_q_heads * HEAD_DIM
    out_ptrs = out_ptr + batch * num_queries * row_stride + offs_q[:, None] * row_stride + head * HEAD_DIM
    tl.store(out_ptrs + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_valid[:, None])
    tl.store(lse_ptr + (batch * num_q_heads + head) * num_queries + offs_q, lse, mask=q_valid)


def _on_path(configs: list, tma: bool) -> list:
    """`configs` without `_TMA_ONLY` on the pointer path."""
    return [c for c in configs if tma or c not in _TMA_ONLY]


def _prune_by_path(configs, named_args, **kwargs):
    return _on_path(configs, {**named_args, **kwargs}["USE_TMA"])


# One autotuner per GEMM class (pinned to its first config under the interpreter or DBRX_FAST_AUTOTUNE=0). Keys: both
# length buckets and every constexpr a launch passes (each changes the code).
_ATTENTION_FWD = autotuned_by_class(
    _attention_fwd_kernel,
    _configs(),
    ["q_bucket", "k_bucket", "HEAD_DIM", "HAS_KEY_MASK", "HAS_KEY_START", "FP32_DOT", "USE_TMA", "DEFER_DOT"],
    prune_configs_by={"early_config_prune": _prune_by_path},
)


def offered(cls: str, tma: bool) -> list[triton.Config]:
    """The configs a launch of GEMM class `cls` may take on the TMA path (tma) or the pointer path."""
    return _on_path(_ATTENTION_FWD[cls].all_configs, tma)


def check_attention_args(q, k, v, q_offset, key_mask, key_start) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raises, naming the argument, unless q [B, Hq, Nq, D], k and v [B, Hkv, Nk, D] share one supported dtype and
    device with Hq a multiple of Hkv and D in HEAD_DIMS, and the mask tensors fit (see the module docstring).
    Returns (q_offset, key_mask as uint8 or None, key_start), each with a contiguous last dim."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, length, head_dim], got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} ({t.dtype}, {t.device}) must match q ({q.dtype}, {q.device})")
    batch, num_q_heads, num_queries, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [B, Hkv, Nk, D] with q's B = {batch} and "
            f"D = {head_dim}"
        )
    if k.shape[1] == 0 or num_q_heads % k.shape[1]:
        raise ValueError(f"q's {num_q_heads} heads must be a multiple of k and v's {k.shape[1]} heads")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported by the attention kernels; supported: {HEAD_DIMS}")
    expected = {
        "q_offset": (q_offset, (batch,), (torch.int32,)),
        "key_mask": (key_mask, (batch, k.shape[2]), (torch.bool, torch.uint8)),
        "key_start": (key_start, (batch, num_queries), (torch.int32,)),
    }
    for name, (t, shape, dtypes) in expected.items():
        if t is not None and (tuple(t.shape) != shape or t.dtype not in dtypes or t.device != q.device):
            raise ValueError(
                f"{name}: {tuple(t.shape)} {t.dtype} on {t.device}, expected {shape} {dtypes[0]} on {q.device}"
            )
    if q_offset is None:
        raise ValueError("q_offset is required (int32 [B]; Nk - Nq for plain causal attention)")
    if key_mask is not None:
        key_mask = key_mask.view(torch.uint8) if key_mask.dtype == torch.bool else key_mask
    return tuple(t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (q_offset, key_mask, key_start))


@torch.library.triton_op("dbrx_fast::attention_fwd", mutates_args={})
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offset: torch.Tensor,
    key_mask: torch.Tensor | None,
    key_start: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Nq, Hq, D] contiguous in q's dtype, lse float32 [B, Hq, Nq]); see the module docstring.

    A q, k or v whose last dim is not contiguous is copied first; any other strides are read in place."""
    q_offset, key_mask, key_start = check_attention_args(q, k, v, q_offset, key_mask, key_start)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, num_q_heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    out = q.new_empty((batch, num_queries, num_q_heads, head_dim))
    lse = q.new_empty((batch, num_q_heads, num_queries), dtype=torch.float32)
    if out.numel() == 0:
        return out, lse

    def grid(meta):
        return (triton.cdiv(num_queries, meta["BLOCK_M"]), num_q_heads, batch)

    # TMA for the 16-bit class on sm_90 (DBRX_FAST_TMA overrides); fp32 keeps the pointer path, as do unaligned strides.
    # Absent mask tensors: q_offset stands in for the pointer, never read (its flag is off).
    launch_gemm(
        _ATTENTION_FWD,
        grid,
        q,
        k,
        v,
        q_offset,
        q_offset.view(torch.uint8) if key_mask is None else key_mask,
        q_offset if key_start is None else key_start,
        out,
        lse,
        num_queries,
        num_keys,
        triton.next_power_of_2(num_queries),
        triton.next_power_of_2(num_keys),
        num_q_heads,
        num_q_heads // k.shape[1],
        scale * LOG2_E.value,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        0 if key_mask is None else key_mask.stride(0),
        0 if key_start is None else key_start.stride(0),
        HEAD_DIM=head_dim,
        HAS_KEY_MASK=key_mask is not None,
        HAS_KEY_START=key_start is not None,
        DEFER_DOT=defer_dot(q.device, gemm_class(q.dtype)[0]),
        tma_operands=(q, k, v),
    )
    return out, lse


# DBRX's attention at a 4096-token prefill, in the layout the compile specs fix: q [B, 48, N, D] and k, v
# [B, 8, N, D] contiguous. A launch specializes strides divisible by 16 (every one at these shapes), which proves the
# rows 16-byte aligned so that tiles load as vectors; a CompileSpec cannot say "divisible by 16", so it fixes values.
SPEC_HEADS, SPEC_KV_HEADS, SPEC_LENGTH = 48, 8, 4096
# What compile specs check besides the plain causal launch: padding and packing, with the pinned tiles.
_MASK_VARIANTS = ({"HAS_KEY_MASK": True}, {"HAS_KEY_START": True}, {"HAS_KEY_MASK": True, "HAS_KEY_START": True})


def _spec(
    label: str, dtype: str, head_dim: int, cls: str, cfg: triton.Config, variant: dict, archs: tuple[int, ...]
) -> CompileSpec:
    ints = "num_queries num_keys q_bucket k_bucket stride_key_mask_b stride_key_start_b".split()
    signature = {
        **{f"{t}_ptr": f"*{dtype}" for t in ("q", "k", "v", "out")},
        "q_offset_ptr": "*i32",
        "key_mask_ptr": "*u8",
        "key_start_ptr": "*i32",
        "lse_ptr": "*fp32",
        **dict.fromkeys(ints, "i32"),
        "qk_scale": "fp32",
    }
    strides = {}
    for t, heads in (("q", SPEC_HEADS), ("k", SPEC_KV_HEADS), ("v", SPEC_KV_HEADS)):
        strides |= {f"stride_{t}_b": heads * SPEC_LENGTH * head_dim, f"stride_{t}_h": SPEC_LENGTH * head_dim}
        strides[f"stride_{t}_n"] = head_dim
    constexprs = {
        "num_q_heads": SPEC_HEADS,
        "group": SPEC_HEADS // SPEC_KV_HEADS,
        **strides,
        "HEAD_DIM": head_dim,
        "HAS_KEY_MASK": False,
        "HAS_KEY_START": False,
        "FP32_DOT": cls == "fp32_dot",
        "USE_TMA": False,
        "DEFER_DOT": False,
        **variant,
        **cfg.kwargs,
    }
    flags = " ".join(f"{k}={v}" for k, v in variant.items())
    return CompileSpec(
        name=" ".join(filter(None, (label, dtype, cls, f"D={head_dim}", flags, describe(cfg)))),
        kernel=_attention_fwd_kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        matrix=cls != "fp32_dot",
        archs=archs,
    )


def _paths(cls: str) -> list[tuple[dict, tuple[int, ...]]]:
    """(constexprs, archs) of each path a launch of GEMM class `cls` takes: for 16 bits, pointers on sm_80, and
    on sm_90 the deferred p @ v (`defer_dot`) with pointers or TMA (`use_tma`)."""
    if cls != "16bit":
        return [({}, (80, 90))]
    return [({}, (80,)), ({"DEFER_DOT": True}, (90,)), ({"USE_TMA": True, "DEFER_DOT": True}, (90,))]


def compile_specs() -> list[CompileSpec]:
    """Every (GEMM class, dtype, head_dim 64 and 128, autotune config) of the causal launch at DBRX's shapes on each
    path a launch of the class takes (`_paths`), and with padding, packing
    and both at head_dim 128: the pinned config of each class (bf16 for 16 bits), every config of the TMA path."""
    specs = []
    for cls in _ATTENTION_FWD:
        for path, archs in _paths(cls):
            tma = path.get("USE_TMA", False)
            configs = offered(cls, tma)
            for dtype in GEMM_CLASS_DTYPES[cls]:
                for head_dim in (64, 128):
                    specs += [_spec("attention_fwd", dtype, head_dim, cls, cfg, path, archs) for cfg in configs]
            # The mask modes change the tile loops, not the dtype's code path: one dtype per class is checked in each.
            dtype = GEMM_CLASS_DTYPES[cls][0]
            for cfg in configs if tma else configs[:1]:
                specs += [_spec("attention_fwd", dtype, 128, cls, cfg, path | v, archs) for v in _MASK_VARIANTS]
    return specs
