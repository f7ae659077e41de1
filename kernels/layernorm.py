"""Bias-free LayerNorm over the last dimension (DBRX's norm_1, norm_2 and norm_f), forward and backward.

x [..., C] is read as N rows of C columns: rows may be strided, columns must be contiguous. weight is [C].
A row is processed in chunks of BLOCK_C columns. A row of up to 8192 columns is one chunk (ONE_CHUNK), held in
registers from load to store; a wider row loops over its chunks and re-reads them from cache. The backward keeps
an 8192-wide row in one chunk only when C and the row strides are multiples of 16 (ALIGNED, so that its loads are
vectorised; DBRX's C = 6144 is), and otherwise loops over 4096-column chunks.

Forward, one program per row:
    mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps),  y = (x - mean) * rstd * weight
The variance is taken about the mean (a second pass, not E[x^2] - mean^2), and the mean is corrected by the mean
of the deviations from it, so rows with a large mean keep their precision. y has x's dtype; mean and rstd are
float32 [N] and are saved for the backward.

Backward, with xhat = (x - mean) * rstd and g = weight * dy:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))        dweight = sum over rows of dy * xhat
dweight is deterministic: a fixed number of programs (a few per SM) each own one contiguous block of rows and sum
dy * xhat over it in float32, in row order, into their own row of a [programs, C] buffer (in registers for a
one-chunk row, in that buffer row itself otherwise); the launcher sums the buffer over its first dimension, a
fixed-order reduction. No float atomics.

Limits: x fp16, bf16 or fp32 (float64 is refused with a TypeError so that a caller can fall back to the eager path);
weight any of those three dtypes; any C >= 1.
"""

import torch
import triton
import triton.language as tl

from .autotune import autotune
from .compile_spec import CompileSpec, config_spec
from .dtypes import TRITON_DTYPES, check_dtype
from .launch import launch

# Widest chunk of a row: the forward's, and the backward's one-chunk row when its rows are 16-element aligned.
MAX_BLOCK_C = 8192
# The backward's chunk in its loop over a wide row, and its widest one-chunk row when not aligned: unvectorised, an
# 8192-column row with its weight and dweight needs more registers than an SM has (ptxas spills).
BWD_CHUNK = 4096
# Chunk elements per thread, (fewest, most): at least 4 so that no thread idles on a narrow row; at most 16 in the
# forward and 8 in the backward, whose row-sized float32 values (weight, xhat, g and the dweight accumulator) must
# stay in registers with room to spare.
_FWD_PER_THREAD = (4, 16)
_BWD_PER_THREAD = (4, 8)
# The pinned configs (interpreter, DBRX_FAST_AUTOTUNE=0) serve every width: the right ones for DBRX's C = 6144,
# and spill-free at every chunk width.
_FWD_PINNED_WARPS = 16
_BWD_PINNED_WARPS = 32
# Backward programs per SM: enough that one program's loads overlap another's reductions and stores.
_BWD_PROGRAMS_PER_SM = 4
# Backward programs without a GPU (the interpreter): several, so that the tests cover uneven row blocks.
_BWD_PROGRAMS_CPU = 4


def _configs(pinned_warps: int) -> list[triton.Config]:
    others = [nw for nw in (1, 2, 4, 8, 16, 32) if nw != pinned_warps]
    return [triton.Config({}, num_warps=nw) for nw in (pinned_warps, *others)]


def _fitting_configs(configs: list[triton.Config], block_c: int, per_thread: tuple[int, int]) -> list[triton.Config]:
    """The configs that give each thread per_thread[0] to per_thread[1] elements of a chunk, or else (a row narrower
    than one warp's share) the one with the fewest warps."""
    fits = [c for c in configs if per_thread[0] <= block_c // (32 * c.num_warps) <= per_thread[1]]
    return fits or [min(configs, key=lambda c: c.num_warps)]


# The launchers pass BLOCK_C by keyword; look in both places, as torch.compile's wrapper may split them otherwise.
def _prune_fwd(configs, named_args, **kwargs):
    return _fitting_configs(configs, {**named_args, **kwargs}["BLOCK_C"], _FWD_PER_THREAD)


def _prune_bwd(configs, named_args, **kwargs):
    return _fitting_configs(configs, {**named_args, **kwargs}["BLOCK_C"], _BWD_PER_THREAD)


def _fwd_meta(n_cols: int) -> dict:
    block_c = min(triton.next_power_of_2(n_cols), MAX_BLOCK_C)
    return {"BLOCK_C": block_c, "ONE_CHUNK": n_cols <= block_c}


def _bwd_meta(n_cols: int, aligned: bool) -> dict:
    block_c = triton.next_power_of_2(n_cols)
    if block_c <= BWD_CHUNK or (aligned and block_c <= MAX_BLOCK_C):
        return {"BLOCK_C": block_c, "ONE_CHUNK": True, "ALIGNED": aligned}
    return {"BLOCK_C": BWD_CHUNK, "ONE_CHUNK": False, "ALIGNED": aligned}


def _aligned(n_cols: int, *tensors: torch.Tensor) -> bool:
    """C, the row strides and the start of every [N, C] tensor are multiples of 16 elements (torch allocations are
    aligned beyond that, so a view's storage offset decides). It only chooses hints and the one-chunk path, so a
    wrong answer would cost speed, never correctness."""
    return n_cols % 16 == 0 and all(t.stride(0) % 16 == 0 and t.storage_offset() % 16 == 0 for t in tensors)


@triton.jit
def _rstd(sum_sq, n_cols, eps):
    # A correctly rounded sqrt (the default is an approximation) and the 2-ulp division (stock's rsqrt is no better):
    # with an IEEE division as well, ptxas compiles the pair's slow paths as calls and reports their stack as spills.
    return 1.0 / tl.math.sqrt_rn(sum_sq / n_cols + eps)


# The number of rows is the grid, not an argument: a new one compiles nothing.
@autotune(_configs(_FWD_PINNED_WARPS), key=["n_cols"], prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _layernorm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    n_cols,
    eps,
    stride_x_row,
    stride_y_row,
    BLOCK_C: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_row
    y_row = y_ptr + row * stride_y_row
    cols = tl.arange(0, BLOCK_C)
    y_ty = y_ptr.dtype.element_ty

    # The mean is taken twice: sum(x) / C carries the rounding error of a long sum of large values, which the sum of
    # the (nearly exact) deviations x - mean measures; `shift` folds it back in. Without it, rows with a mean of 300
    # and a spread of 1 gave float32 y with errors near 1e-5 of the row's scale; with it, near 1e-7.
    if ONE_CHUNK:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
        shift = tl.sum(xc, axis=0) / n_cols
        xc = tl.where(mask, xc - shift, 0.0)
        rstd = _rstd(tl.sum(xc * xc, axis=0), n_cols, eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (xc * rstd * w).to(y_ty), mask=mask)
    else:
        # Three passes over the row (sum, deviations, normalise); the second and third re-read it from cache.
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_C):
            offs = start + cols
            acc += tl.load(x_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / n_cols
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_sq = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_C):
            offs = start + cols
            x = tl.load(x_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
            xc = tl.where(offs < n_cols, x - mean, 0.0)
            acc += xc
            acc_sq += xc * xc
        shift = tl.sum(acc, axis=0) / n_cols
        # sum((x - mean - shift)^2) = sum((x - mean)^2) - C * shift^2, and shift^2 is far below the variance's ulp.
        rstd = _rstd(tl.sum(acc_sq, axis=0), n_cols, eps)
        for start in range(0, n_cols, BLOCK_C):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + offs, ((x - mean - shift) * rstd * w).to(y_ty), mask=mask)
    tl.store(mean_ptr + row, mean + shift)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _hint(offs, mask, ALIGNED: tl.constexpr):
    """With ALIGNED the launcher has checked that C and every row stride are multiples of 16 elements: saying so
    lets the compiler vectorise the masked loads and stores. The JIT specialises such arguments the same way, but
    the compile check cannot see that specialisation, so the kernel states it."""
    if ALIGNED:
        offs = tl.multiple_of(offs, 16)
        mask = tl.max_constancy(mask, 16)
    return offs, mask


@triton.jit
def _bwd_chunk(dy_ptr, x_ptr, w, dy_offs, x_offs, mask, mean, rstd):
    """dy, xhat and g = weight * dy on one chunk of a row (weight w already loaded), in float32.

    On a masked column xhat is -mean * rstd, not 0, but dy and g are 0 there, so it adds to no sum.
    """
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0).to(tl.float32)
    return dy, (x - mean) * rstd, w * dy


@triton.jit
def _bwd_row_chunk(
    dy_ptr, x_ptr, w_ptr, r, cols, n_cols, stride_dy_row, stride_x_row, mean, rstd, ALIGNED: tl.constexpr
):
    """Columns `cols` of row r, for the chunked backward's two passes: (offsets, mask, dy, xhat, g)."""
    offs, mask = _hint(cols, cols < n_cols, ALIGNED)
    dy_offs, _ = _hint(r * stride_dy_row + offs, mask, ALIGNED)
    x_offs, _ = _hint(r * stride_x_row + offs, mask, ALIGNED)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy, xhat, g = _bwd_chunk(dy_ptr, x_ptr, w, dy_offs, x_offs, mask, mean, rstd)
    return offs, mask, dy, xhat, g


# The row counts change with every batch and only bound loops: not specialised on, so that a new count (1 in a decode
# step) compiles nothing.
@autotune(_configs(_BWD_PINNED_WARPS), key=["n_cols", "ALIGNED"], prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
def _layernorm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    n_rows,
    n_cols,
    rows_per_program,
    stride_dy_row,
    stride_x_row,
    stride_dx_row,
    stride_dw_partial_row,
    BLOCK_C: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    dx_ty = dx_ptr.dtype.element_ty
    row_start = pid * rows_per_program
    own_rows = tl.minimum(rows_per_program, n_rows - row_start)

    if ONE_CHUNK:
        cols, mask = _hint(cols, cols < n_cols, ALIGNED)
        # Loaded once: holding weight costs fewer registers than holding its pointers for a reload per row.
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        for i in range(0, own_rows):
            r = row_start + i
            mean = tl.load(mean_ptr + r)
            rstd = tl.load(rstd_ptr + r)
            dy_offs, _ = _hint(r * stride_dy_row + cols, mask, ALIGNED)
            x_offs, _ = _hint(r * stride_x_row + cols, mask, ALIGNED)
            dy, xhat, g = _bwd_chunk(dy_ptr, x_ptr, w, dy_offs, x_offs, mask, mean, rstd)
            # dy is done with here, before the reductions: one row-sized value fewer held across them.
            dw += dy * xhat
            mean_g = tl.sum(g, axis=0) / n_cols
            mean_g_xhat = tl.sum(g * xhat, axis=0) / n_cols
            dx = (g - mean_g - xhat * mean_g_xhat) * rstd
            dx_offs, _ = _hint(r * stride_dx_row + cols, mask, ALIGNED)
            tl.store(dx_ptr + dx_offs, dx.to(dx_ty), mask=mask)
        dw_offs, _ = _hint(pid * stride_dw_partial_row + cols, mask, ALIGNED)
        tl.store(dw_partial_ptr + dw_offs, dw, mask=mask)
    else:
        # The program's dweight row is too wide for registers: it accumulates in the program's own row of the
        # buffer. A barrier after each update orders it before the next read, whichever thread the compiler gives
        # an element to.
        for start in range(0, n_cols, BLOCK_C):
            dw_offs, mask = _hint(pid * stride_dw_partial_row + start + cols, start + cols < n_cols, ALIGNED)
            tl.store(dw_partial_ptr + dw_offs, tl.zeros([BLOCK_C], dtype=tl.float32), mask=mask)
        tl.debug_barrier()
        for i in range(0, own_rows):
            r = row_start + i
            mean = tl.load(mean_ptr + r)
            rstd = tl.load(rstd_ptr + r)
            sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
            sum_g_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_C):
                offs, mask, dy, xhat, g = _bwd_row_chunk(
                    dy_ptr, x_ptr, w_ptr, r, start + cols, n_cols, stride_dy_row, stride_x_row, mean, rstd, ALIGNED
                )
                sum_g += g
                sum_g_xhat += g * xhat
            mean_g = tl.sum(sum_g, axis=0) / n_cols
            mean_g_xhat = tl.sum(sum_g_xhat, axis=0) / n_cols
            for start in range(0, n_cols, BLOCK_C):
                offs, mask, dy, xhat, g = _bwd_row_chunk(
                    dy_ptr, x_ptr, w_ptr, r, start + cols, n_cols, stride_dy_row, stride_x_row, mean, rstd, ALIGNED
                )
                dx = (g - mean_g - xhat * mean_g_xhat) * rstd
                dx_offs, _ = _hint(r * stride_dx_row + offs, mask, ALIGNED)
                tl.store(dx_ptr + dx_offs, dx.to(dx_ty), mask=mask)
                dw_offs, _ = _hint(pid * stride_dw_partial_row + offs, mask, ALIGNED)
                dw = tl.load(dw_partial_ptr + dw_offs, mask=mask, other=0.0)
                tl.store(dw_partial_ptr + dw_offs, dw + dy * xhat, mask=mask)
            tl.debug_barrier()


def _rows(name: str, t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """t [..., C] as a [N, C] view with a row stride (a copy only when the leading dimensions cannot be merged)."""
    if t.stride(-1) != 1:
        raise ValueError(f"layernorm: {name} must have a unit stride on its last dimension, got strides {t.stride()}")
    return t.reshape(-1, n_cols)


def _check_input(name: str, x: torch.Tensor, weight: torch.Tensor) -> int:
    check_dtype(f"layernorm: {name}", x)
    check_dtype("layernorm: weight", weight)
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"layernorm: weight {tuple(weight.shape)} must be [C] for {name} {tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"layernorm: weight is on {weight.device} but {name} is on {x.device}")
    if weight.stride(0) != 1:
        raise ValueError(f"layernorm: weight must be contiguous, got stride {weight.stride(0)}")
    n_cols = x.shape[-1]
    if n_cols == 0:
        raise ValueError(f"layernorm: {name} has an empty last dimension")
    return n_cols


@torch.library.triton_op("dbrx_fast::layernorm_fwd", mutates_args={})
def layernorm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bias-free LayerNorm of x [..., C]: (y with x's shape and dtype, mean [N] float32, rstd [N] float32)."""
    n_cols = _check_input("x", x, weight)
    x2 = _rows("x", x, n_cols)
    n_rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, mean, rstd
    launch(
        _layernorm_fwd_kernel,
        (n_rows,),
        x2,
        weight,
        y,
        mean,
        rstd,
        n_cols,
        eps,
        x2.stride(0),
        n_cols,
        **_fwd_meta(n_cols),
    )
    return y, mean, rstd


def _bwd_programs(device: torch.device, n_rows: int) -> int:
    if device.type == "cuda":
        return min(n_rows, _BWD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, _BWD_PROGRAMS_CPU)


@torch.library.triton_op("dbrx_fast::layernorm_bwd", mutates_args={})
def layernorm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of layernorm_fwd: (dx with x's shape and dtype, dweight with weight's shape and dtype).

    mean and rstd are the forward's float32 [N] statistics. dweight is bitwise reproducible on a given device.
    """
    n_cols = _check_input("x", x, weight)
    if dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(
            f"layernorm: dy {tuple(dy.shape)} {dy.dtype} on {dy.device} must match x {tuple(x.shape)} {x.dtype} "
            f"on {x.device}"
        )
    x2 = _rows("x", x, n_cols)
    dy2 = _rows("dy", dy, n_cols)
    n_rows = x2.shape[0]
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.dtype != torch.float32 or t.shape != (n_rows,) or t.stride(0) != 1 or t.device != x.device:
            raise ValueError(
                f"layernorm: {name} must be a contiguous float32 [{n_rows}] tensor on {x.device}, got "
                f"{t.dtype} {tuple(t.shape)} on {t.device}"
            )
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    programs = _bwd_programs(x.device, n_rows)
    dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    launch(
        _layernorm_bwd_kernel,
        (programs,),
        dy2,
        x2,
        weight,
        mean,
        rstd,
        dx,
        dw_partial,
        n_rows,
        n_cols,
        triton.cdiv(n_rows, programs),
        dy2.stride(0),
        x2.stride(0),
        n_cols,
        n_cols,
        # dx and dw_partial are fresh allocations with rows of n_cols: aligned exactly when n_cols is.
        **_bwd_meta(n_cols, _aligned(n_cols, dy2, x2)),
    )
    return dx, dw_partial.sum(0).to(weight.dtype)


def compile_specs() -> list[CompileSpec]:
    """One spec per (dtype, row width, kernel, alignment for the backward, config that can launch there: those the
    pruning keeps and the pinned one).

    Row widths: C = 100 (a ragged row), 1024, 4000 (the backward's widest unaligned one-chunk row), DBRX's 6144
    (one 8192-column chunk; in the backward only when aligned, else the loop over 4096-column chunks) and 16384,
    which stands for every wider row (the same loops).
    """
    specs = []
    for ty in TRITON_DTYPES.values():
        fwd_signature = {
            "x_ptr": f"*{ty}",
            "w_ptr": f"*{ty}",
            "y_ptr": f"*{ty}",
            "mean_ptr": "*fp32",
            "rstd_ptr": "*fp32",
            "n_cols": "i32",
            "eps": "fp32",
            "stride_x_row": "i32",
            "stride_y_row": "i32",
        }
        bwd_signature = {
            "dy_ptr": f"*{ty}",
            "x_ptr": f"*{ty}",
            "w_ptr": f"*{ty}",
            "mean_ptr": "*fp32",
            "rstd_ptr": "*fp32",
            "dx_ptr": f"*{ty}",
            "dw_partial_ptr": "*fp32",
            **dict.fromkeys(
                "n_rows n_cols rows_per_program stride_dy_row stride_x_row stride_dx_row stride_dw_partial_row".split(),
                "i32",
            ),
        }
        for n_cols in (100, 1024, 4000, 6144, 16384):
            launches = [
                ("fwd", _layernorm_fwd_kernel, fwd_signature, _fwd_meta(n_cols), _FWD_PINNED_WARPS, _FWD_PER_THREAD)
            ]
            for aligned in sorted({False, n_cols % 16 == 0}):
                meta = _bwd_meta(n_cols, aligned)
                launches.append(("bwd", _layernorm_bwd_kernel, bwd_signature, meta, _BWD_PINNED_WARPS, _BWD_PER_THREAD))
            for direction, kernel, signature, meta, pinned_warps, per_thread in launches:
                # The configs autotuning can choose at this width, and the pinned one (used at every width).
                configs = _fitting_configs(_configs(pinned_warps), meta["BLOCK_C"], per_thread)
                configs += [c for c in _configs(pinned_warps)[:1] if c not in configs]
                for config in configs:
                    label = f"layernorm_{direction} {ty} C={n_cols} " + " ".join(f"{k}={v}" for k, v in meta.items())
                    specs.append(config_spec(label, kernel.fn, signature, meta, config))
    return specs
