"""DBRX's QKV post-processing in one pass: clamp, split into heads, RoPE on q and k; forward and backward.

Forward: qkv = Wqkv(x) is [B, S, (Hq + 2*Hkv) * D] with any strides but a unit one on its last dimension. Each of its
Hq + 2*Hkv heads of D columns is read once, clamped to [-clip_qkv, clip_qkv] (when clip_qkv is set), the q and k
heads rotated (Hugging Face's rotate-half convention, float32 maths on float32 cos/sin [1 or B, S, D], as in
kernels/rope.py, whose rotation this reuses), and written in the layout the attention kernels read: q [B, Hq, S, D],
k and v [B, Hkv, S, D], contiguous, in qkv's dtype. For decode, k and v can instead go straight into a static
cache's storage [B, Hkv, L, D] (any strides, unit on D) at rows cache_position[s] (inference only).

Backward: dqkv [B, S, W] contiguous from dq, dk, dv (unit stride on D): the inverse rotation (the same kernel with sin
negated), then the clamp's gradient, which passes where -clip <= qkv <= clip, both ends included, with the bounds
rounded to qkv's dtype first, exactly as torch.clamp's backward compares them (qkv is saved for it).

The clamp bounds are rounded to qkv's dtype in the forward too: round(min(x, c)) = min(x, round(c)) for a
representable x, so the clamped values are stock's exactly, and the rotation then sees them without a rounding.

Each program owns BLOCK_S positions of one batch entry and HEADS_PER_PROGRAM heads of the list [q heads..., k
heads..., v heads...], which is also the order of the heads in qkv's columns: it loads its cos/sin tile once and moves
every head it owns with it. Memory-bound (a few flops per element): every element is read once and written once, and
the backward with a clamp also reads qkv once; the cos/sin tile is read once per program. A program's loads are rows
of D/2 contiguous elements (128 bytes at D = 128 in bf16), its stores rows of the [B, H, S, D] outputs.
Limits: D a power of two, 2 <= D <= 256; fp16, bf16 or fp32 (float64 raises a TypeError so a caller can fall back to
the eager path). Cache rows outside [0, L) are not written (there is no host check: it would sync, which CUDA-graph
capture forbids), so the caller must keep the positions inside the cache.
"""

import torch
import triton
import triton.language as tl

from .autotune import autotune
from .compile_spec import CompileSpec, config_spec
from .dtypes import TRITON_DTYPES, check_dtype
from .launch import launch
from .rope import MAX_HEAD_DIM, check_table, rotate_halves


def _configs() -> list[triton.Config]:
    # kernels/rope.py's tiles (BLOCK_S positions x HEADS_PER_PROGRAM heads, 8 elements of a half per thread at D =
    # 128) but its 16-warp one: at 512 threads a thread gets at most 128 registers, and the clamp's backward, which
    # also loads qkv, spills there.
    return [
        triton.Config({"BLOCK_S": bs, "HEADS_PER_PROGRAM": hp}, num_warps=nw)
        for bs, hp, nw in ((16, 4, 4), (16, 8, 4), (8, 8, 2), (32, 4, 8), (32, 8, 8))
    ]


@triton.jit
def _move_head(
    fused_ptr,
    x_ptr,
    head_ptr,
    offs_fused,
    offs_x,
    offs_head,
    mask,
    cos,
    sin,
    clip_lo,
    clip_hi,
    HALF: tl.constexpr,
    ROTATE: tl.constexpr,
    CLAMP: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """One [BLOCK_S, D] head tile between qkv's columns (fused) and a head-major tensor, in halves of HALF columns.

    Forward: fused -> clamp -> rotate -> head. Backward: head -> rotate (sin arrives negated) -> clamp's gradient,
    which reads the saved qkv (x) -> fused."""
    if BACKWARD:
        src_ptr, offs_src, dst_ptr, offs_dst = head_ptr, offs_head, fused_ptr, offs_fused
    else:
        src_ptr, offs_src, dst_ptr, offs_dst = fused_ptr, offs_fused, head_ptr, offs_head
    y1 = tl.load(src_ptr + offs_src, mask=mask, other=0.0).to(tl.float32)
    y2 = tl.load(src_ptr + offs_src + HALF, mask=mask, other=0.0).to(tl.float32)
    if CLAMP and not BACKWARD:
        # Comparisons, not minimum/maximum: a NaN stays NaN, as torch.clamp keeps it.
        y1 = tl.where(y1 < clip_lo, clip_lo, tl.where(y1 > clip_hi, clip_hi, y1))
        y2 = tl.where(y2 < clip_lo, clip_lo, tl.where(y2 > clip_hi, clip_hi, y2))
    if ROTATE:
        y1, y2 = rotate_halves(y1, y2, cos, sin)
    if CLAMP and BACKWARD:
        x1 = tl.load(x_ptr + offs_x, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + offs_x + HALF, mask=mask, other=0.0).to(tl.float32)
        y1 = tl.where((x1 >= clip_lo) & (x1 <= clip_hi), y1, 0.0)
        y2 = tl.where((x2 >= clip_lo) & (x2 <= clip_hi), y2, 0.0)
    out_ty = dst_ptr.dtype.element_ty
    tl.store(dst_ptr + offs_dst, y1.to(out_ty), mask=mask)
    tl.store(dst_ptr + offs_dst + HALF, y2.to(out_ty), mask=mask)


@triton.jit
def _cache_rows(head_ptr, stride_s, cache_pos_ptr, mask, in_seq, cache_len, BLOCK_S: tl.constexpr):
    """Row pointers [BLOCK_S, 1] of one cache head at the tile's cache positions, and the mask of those inside it."""
    rows = tl.load(cache_pos_ptr + tl.arange(0, BLOCK_S), mask=in_seq, other=0).to(tl.int64)[:, None]
    return head_ptr + rows * stride_s, mask & (rows >= 0) & (rows < cache_len)


# As for kernels/rope.py: seq_len is neither a key nor specialised on (a decode step would otherwise compile its own
# kernel), and the strides that change with it are multiples of HEAD_DIM, so their specialisation stays the same.
# The key holds every constexpr that changes the code besides the config's own.
@autotune(_configs(), key=["n_heads_q", "n_heads_kv", "HEAD_DIM", "BACKWARD", "CLAMP", "CACHE"])
@triton.jit(do_not_specialize=["seq_len"])
def _qkv_rope_kernel(
    fused_ptr,
    x_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    cache_pos_ptr,
    clip_lo,
    clip_hi,
    n_heads_q,
    n_heads_kv,
    seq_len,
    cache_len,
    stride_fused_b,
    stride_fused_s,
    stride_x_b,
    stride_x_s,
    stride_q_b,
    stride_q_h,
    stride_q_s,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_v_b,
    stride_v_h,
    stride_v_s,
    stride_cos_b,
    stride_cos_s,
    stride_sin_b,
    stride_sin_s,
    HEAD_DIM: tl.constexpr,
    BACKWARD: tl.constexpr,
    CLAMP: tl.constexpr,
    CACHE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    # Offsets into a fused qkv activation can pass 2**31: the bases of a program's tile (batch, first position, head)
    # are int64 scalars, and the offsets within a tile int32, computed once for every head it moves.
    s0 = tl.program_id(0).to(tl.int64) * BLOCK_S
    head_start = tl.program_id(1).to(tl.int64) * HEADS_PER_PROGRAM
    b = tl.program_id(2).to(tl.int64)

    rows = tl.arange(0, BLOCK_S)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    in_seq = s0 + tl.arange(0, BLOCK_S) < seq_len
    mask = in_seq[:, None]

    cos = tl.load(cos_ptr + b * stride_cos_b + s0 * stride_cos_s + rows * stride_cos_s + cols, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + b * stride_sin_b + s0 * stride_sin_s + rows * stride_sin_s + cols, mask=mask, other=0.0)
    cos = cos.to(tl.float32)
    sin = sin.to(tl.float32)
    if BACKWARD:
        sin = -sin

    fused_ptr += b * stride_fused_b + s0 * stride_fused_s
    x_ptr += b * stride_x_b + s0 * stride_x_s
    q_ptr += b * stride_q_b + s0 * stride_q_s
    k_ptr += b * stride_k_b
    v_ptr += b * stride_v_b
    offs_fused = rows * stride_fused_s + cols
    offs_x = rows * stride_x_s + cols
    offs_q = rows * stride_q_s + cols
    # k and v rows: the positions themselves, or (CACHE) the cache rows they go to, loaded where a head needs them:
    # held across the head loop, their int64 row offsets spill on sm_90 at 8 warps.
    kv_mask = mask
    if CACHE:
        offs_k = cols
        offs_v = cols
    else:
        k_ptr += s0 * stride_k_s
        v_ptr += s0 * stride_v_s
        offs_k = rows * stride_k_s + cols
        offs_v = rows * stride_v_s + cols

    n_heads = n_heads_q + 2 * n_heads_kv
    for i in range(HEADS_PER_PROGRAM):
        h = head_start + i
        # Head h is columns [h*D, (h+1)*D) of qkv in every part.
        fused_h, x_h = fused_ptr + h * HEAD_DIM, x_ptr + h * HEAD_DIM
        # A program's heads can straddle the parts: a branch per head picks the tensor.
        if h < n_heads_q:
            _move_head(
                fused_h, x_h, q_ptr + h * stride_q_h, offs_fused, offs_x, offs_q, mask, cos, sin, clip_lo, clip_hi,
                HALF, True, CLAMP, BACKWARD,
            )  # fmt: skip
        elif h < n_heads_q + n_heads_kv:
            k_h = k_ptr + (h - n_heads_q) * stride_k_h
            if CACHE:
                k_h, kv_mask = _cache_rows(k_h, stride_k_s, cache_pos_ptr + s0, mask, in_seq, cache_len, BLOCK_S)
            _move_head(
                fused_h, x_h, k_h, offs_fused, offs_x, offs_k, kv_mask, cos, sin, clip_lo, clip_hi,
                HALF, True, CLAMP, BACKWARD,
            )  # fmt: skip
        elif h < n_heads:
            v_h = v_ptr + (h - n_heads_q - n_heads_kv) * stride_v_h
            if CACHE:
                v_h, kv_mask = _cache_rows(v_h, stride_v_s, cache_pos_ptr + s0, mask, in_seq, cache_len, BLOCK_S)
            _move_head(
                fused_h, x_h, v_h, offs_fused, offs_x, offs_v, kv_mask, cos, sin, clip_lo, clip_hi,
                HALF, False, CLAMP, BACKWARD,
            )  # fmt: skip


def _check_activation(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    check_dtype(f"qkv_rope: {name}", t)
    if t.dim() != ndim:
        raise ValueError(f"qkv_rope: {name} must be {layout}, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"qkv_rope: {name} must have a unit stride on its last dimension, got strides {t.stride()}")


def _head_dim(qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> int:
    """D from qkv [B, S, (Hq + 2*Hkv) * D], checked."""
    _check_activation("qkv", qkv, 3, "[B, S, (Hq + 2*Hkv) * D]")
    if num_heads < 1 or num_kv_heads < 1:
        raise ValueError(f"qkv_rope: head counts must be positive, got {num_heads} and {num_kv_heads}")
    n_heads = num_heads + 2 * num_kv_heads
    head_dim = qkv.shape[-1] // n_heads
    if head_dim * n_heads != qkv.shape[-1]:
        raise ValueError(
            f"qkv_rope: qkv's width {qkv.shape[-1]} is not (Hq + 2*Hkv) * D for Hq = {num_heads}, Hkv = {num_kv_heads}"
        )
    _check_head_dim(head_dim)
    return head_dim


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 2 or head_dim > MAX_HEAD_DIM or head_dim & (head_dim - 1):
        raise ValueError(f"qkv_rope: head dim must be an even power of two <= {MAX_HEAD_DIM}, got {head_dim}")


def _clip_bounds(clip_qkv: float | None, dtype: torch.dtype) -> tuple[float, float]:
    """-clip and clip rounded to the activations' dtype, as torch.clamp compares them; (0, 0) when unused."""
    if clip_qkv is None:
        return 0.0, 0.0
    if not clip_qkv >= 0:
        raise ValueError(f"qkv_rope: clip_qkv must be None or >= 0, got {clip_qkv}")
    hi = torch.tensor(clip_qkv, dtype=dtype).item()
    return -hi, hi


def _launch(fused, x, q, k, v, cos, sin, cache_position, cache_len, clip_qkv, backward) -> None:
    """fused [B, S, W] <-> q [B, Hq, *, D], k and v [B, Hkv, *, D] (rows cache_position[s] when it is given)."""
    batch, seq_len, _ = fused.shape
    n_heads_q, n_heads_kv, head_dim = q.shape[1], k.shape[1], q.shape[3]
    if batch * seq_len == 0:
        return
    clip_lo, clip_hi = _clip_bounds(clip_qkv, fused.dtype)
    cos = check_table("qkv_rope", "cos", cos, fused, batch, seq_len, head_dim)
    sin = check_table("qkv_rope", "sin", sin, fused, batch, seq_len, head_dim)

    def grid(meta):
        return (
            triton.cdiv(seq_len, meta["BLOCK_S"]),
            triton.cdiv(n_heads_q + 2 * n_heads_kv, meta["HEADS_PER_PROGRAM"]),
            batch,
        )

    launch(
        _qkv_rope_kernel,
        grid,
        fused,
        x,
        q,
        k,
        v,
        cos,
        sin,
        fused if cache_position is None else cache_position,  # not read without CACHE
        clip_lo,
        clip_hi,
        n_heads_q,
        n_heads_kv,
        seq_len,
        cache_len,
        fused.stride(0),
        fused.stride(1),
        x.stride(0),
        x.stride(1),
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        cos.stride(0),
        cos.stride(1),
        sin.stride(0),
        sin.stride(1),
        HEAD_DIM=head_dim,
        BACKWARD=backward,
        CLAMP=clip_qkv is not None,
        CACHE=cache_position is not None,
    )


@torch.library.triton_op("dbrx_fast::qkv_rope_fwd", mutates_args={})
def qkv_rope_fwd(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, clip_qkv: float | None, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, S, (Hq + 2*Hkv) * D] -> new contiguous q [B, Hq, S, D], k and v [B, Hkv, S, D] in qkv's dtype."""
    head_dim = _head_dim(qkv, num_heads, num_kv_heads)
    batch, seq_len, _ = qkv.shape
    q = torch.empty(batch, num_heads, seq_len, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(batch, num_kv_heads, seq_len, head_dim, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty(batch, num_kv_heads, seq_len, head_dim, dtype=qkv.dtype, device=qkv.device)
    _launch(qkv, qkv, q, k, v, cos, sin, None, seq_len, clip_qkv, backward=False)
    return q, k, v


@torch.library.triton_op("dbrx_fast::qkv_rope_fwd_into_cache", mutates_args={"k_cache", "v_cache"})
def qkv_rope_fwd_into_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    clip_qkv: float | None,
    num_heads: int,
    num_kv_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
) -> torch.Tensor:
    """As qkv_rope_fwd, but k and v are written into k_cache, v_cache [B, Hkv, L, D] at rows cache_position [S]
    (int32 or int64, on qkv's device): no k/v tensors of their own. Returns q; the caches hold k and v."""
    head_dim = _head_dim(qkv, num_heads, num_kv_heads)
    batch, seq_len, _ = qkv.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_activation(name, t, 4, "[B, Hkv, L, D]")
        if t.dtype != qkv.dtype or t.device != qkv.device:
            raise TypeError(f"qkv_rope: {name} is {t.dtype} on {t.device}, qkv {qkv.dtype} on {qkv.device}")
        if (t.shape[0], t.shape[1], t.shape[3]) != (batch, num_kv_heads, head_dim):
            raise ValueError(f"qkv_rope: {name} must be [{batch}, {num_kv_heads}, L, {head_dim}], got {tuple(t.shape)}")
    if k_cache.shape[2] != v_cache.shape[2]:
        raise ValueError(f"qkv_rope: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in L")
    if cache_position.dtype not in (torch.int32, torch.int64) or cache_position.shape != (seq_len,):
        raise ValueError(
            f"qkv_rope: cache_position must be int32 or int64 [{seq_len}], "
            f"got {cache_position.dtype} {tuple(cache_position.shape)}"
        )
    if cache_position.device != qkv.device:
        raise ValueError(f"qkv_rope: cache_position is on {cache_position.device} but qkv is on {qkv.device}")
    q = torch.empty(batch, num_heads, seq_len, head_dim, dtype=qkv.dtype, device=qkv.device)
    _launch(qkv, qkv, q, k_cache, v_cache, cos, sin, cache_position, k_cache.shape[2], clip_qkv, backward=False)
    return q


@torch.library.triton_op("dbrx_fast::qkv_rope_bwd", mutates_args={})
def qkv_rope_bwd(
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
    grad_v: torch.Tensor,
    qkv: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    clip_qkv: float | None,
) -> torch.Tensor:
    """dqkv [B, S, (Hq + 2*Hkv) * D], contiguous in the gradients' dtype, from grad_q [B, Hq, S, D], grad_k, grad_v
    [B, Hkv, S, D] (unit stride on D); qkv, the forward's input, is needed (and read) only with clip_qkv."""
    for name, t in (("grad_q", grad_q), ("grad_k", grad_k), ("grad_v", grad_v)):
        _check_activation(name, t, 4, "[B, H, S, D]")
        if t.dtype != grad_q.dtype or t.device != grad_q.device:
            raise TypeError(f"qkv_rope: {name} is {t.dtype} on {t.device}, grad_q {grad_q.dtype} on {grad_q.device}")
    batch, n_heads_q, seq_len, head_dim = grad_q.shape
    n_heads_kv = grad_k.shape[1]
    if grad_k.shape != (batch, n_heads_kv, seq_len, head_dim) or grad_v.shape != grad_k.shape:
        raise ValueError(
            f"qkv_rope: grad_q {tuple(grad_q.shape)}, grad_k {tuple(grad_k.shape)} and grad_v "
            f"{tuple(grad_v.shape)} must share B, S and D, grad_k and grad_v their head count"
        )
    _check_head_dim(head_dim)
    width = (n_heads_q + 2 * n_heads_kv) * head_dim
    grad_qkv = torch.empty(batch, seq_len, width, dtype=grad_q.dtype, device=grad_q.device)
    if clip_qkv is not None:
        if qkv is None:
            raise ValueError("qkv_rope: the backward of a clamp needs the forward's qkv")
        if qkv.dtype != grad_q.dtype or qkv.device != grad_q.device or qkv.shape != grad_qkv.shape:
            raise ValueError(
                f"qkv_rope: qkv {qkv.dtype} {tuple(qkv.shape)} on {qkv.device} does not match the gradients' "
                f"{grad_q.dtype} {tuple(grad_qkv.shape)} on {grad_q.device}"
            )
        _head_dim(qkv, n_heads_q, n_heads_kv)
    x = qkv if clip_qkv is not None else grad_qkv  # not read without the clamp
    _launch(grad_qkv, x, grad_q, grad_k, grad_v, cos, sin, None, seq_len, clip_qkv, backward=True)
    return grad_qkv


def compile_specs() -> list[CompileSpec]:
    """One spec per (dtype, head dim 64 and 128, mode, autotune config) the launchers can use; the modes are forward,
    forward with the clamp, the cache-writing forward with the clamp, and backward with and without the clamp."""
    ints = (
        "n_heads_q n_heads_kv seq_len cache_len stride_fused_b stride_fused_s stride_x_b stride_x_s "
        "stride_q_b stride_q_h stride_q_s stride_k_b stride_k_h stride_k_s stride_v_b stride_v_h stride_v_s "
        "stride_cos_b stride_cos_s stride_sin_b stride_sin_s"
    ).split()
    modes = [
        (False, False, False),
        (False, True, False),
        (False, True, True),
        (True, False, False),
        (True, True, False),
    ]
    specs = []
    for ty in TRITON_DTYPES.values():
        for backward, clamp, cache in modes:
            signature = {
                **{name: f"*{ty}" for name in ("fused_ptr", "x_ptr", "q_ptr", "k_ptr", "v_ptr")},
                "cos_ptr": "*fp32",
                "sin_ptr": "*fp32",
                "cache_pos_ptr": "*i64" if cache else f"*{ty}",
                "clip_lo": "fp32",
                "clip_hi": "fp32",
                **dict.fromkeys(ints, "i32"),
            }
            for head_dim in (64, 128):
                for config in _configs():
                    label = f"qkv_rope {ty} D={head_dim} backward={backward} clamp={clamp} cache={cache}"
                    meta = {"HEAD_DIM": head_dim, "BACKWARD": backward, "CLAMP": clamp, "CACHE": cache}
                    specs.append(config_spec(label, _qkv_rope_kernel.fn, signature, meta, config))
    return specs
