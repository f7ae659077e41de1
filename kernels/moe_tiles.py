"""What the grouped-GEMM MoE kernels (kernels/moe_experts.py, moe_input_grads.py, moe_weight_grads.py) share.

Mapping of a grouped GEMM's M-tiles onto experts. Rows are in "sorted order": expert e owns rows
expert_offsets[e]:expert_offsets[e+1] of a [T*k, ...] operand. Each expert's rows are cut into cdiv(count_e, BLOCK_M)
tiles, experts in ascending order, so tile boundaries never cross experts. The host never learns the counts (no
synchronisation, so a decode step stays CUDA-graph capturable): the launch grid is the upper bound from
`num_m_tiles_upper_bound` (`launched_m_tiles` inside a kernel), and a program whose tile index lies past the last real
tile gets expert -1 and returns. `expert_tile` finds a tile's expert and rows, `tile_rows` adds their slots and mask,
and `grouped_tile` orders the (M-tile, N-tile) programs for L2 reuse. The weight-gradient kernels instead walk one
expert's rows (`expert_rows`) in chunks (`chunk_rows`).

Also shared: the GEMM classes (`gemm_class`, `autotuned_by_class`) with `dot`, operand tiles through TMA descriptors or
pointers (`use_tma`, `tile_descriptor`, `load_tile`, `tma_workspace`), the launch that picks a class and path
(`launch_gemm`, the attention forward's too), and the compile-spec builders at DBRX's sizes: `gemm_path_specs` (both
paths of a launcher, over `gemm_specs`) and `kernel_spec`.
"""

import contextlib
import inspect
import os

import torch
import triton
import triton.language as tl

from .autotune import autotune
from .compile_spec import CompileSpec, config_spec
from .launch import launch

# DBRX's sizes, fixed in the compile specs. A launch specializes every integer argument divisible by 16 (hidden, ffn
# and the row strides at DBRX's shapes) and every one equal to 1 (inner strides), which proves the rows 16-byte
# aligned so that tiles load as vectors through cp.async. A CompileSpec cannot say "divisible by 16", so it fixes the
# values; left as plain i32 the check would judge unvectorized kernels that no launch at these shapes builds.
# (DBRX_ prefixed so that DBRX_NUM_EXPERTS is not read as the kernels' NUM_EXPERTS meta-parameter.)
DBRX_HIDDEN, DBRX_FFN, DBRX_NUM_EXPERTS = 6144, 10752, 16


@triton.jit
def expert_tile(pid_m, expert_offsets_ptr, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, row_start, row_end) of the pid_m-th M-tile; expert is -1 past the last tile.

    Rows row_start:row_end (at most BLOCK_M of them) all belong to `expert`. Walks the E experts summing
    cdiv(count_e, BLOCK_M); a count that is negative (corrupt offsets) counts as empty, so no tile reaches outside
    the offsets it was given.
    """
    # Derived from pid_m so that the loop-carried values are int32 scalars from the start, as the loop makes them.
    expert = pid_m * 0 - 1
    row_start = pid_m * 0
    row_end = pid_m * 0
    tiles_before = pid_m * 0
    start = tl.load(expert_offsets_ptr)
    for e in range(NUM_EXPERTS):
        end = tl.load(expert_offsets_ptr + e + 1)
        tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_M)
        hit = (pid_m >= tiles_before) & (pid_m < tiles_before + tiles)
        expert = tl.where(hit, e, expert)
        row_start = tl.where(hit, start + (pid_m - tiles_before) * BLOCK_M, row_start)
        row_end = tl.where(hit, end, row_end)
        tiles_before += tiles
        start = end
    return expert, row_start, tl.minimum(row_end, row_start + BLOCK_M)


@triton.jit
def tile_rows(pid_m, sorted_slots_ptr, expert_offsets_ptr, num_rows, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The expert of M-tile pid_m (-1 past the last tile), its sorted rows, their slots and the mask of real rows.

    Rows and slots outside [0, num_rows) are masked as well, so corrupt routing metadata cannot move a load or a
    store out of bounds.
    """
    expert, row_start, row_end = expert_tile(pid_m, expert_offsets_ptr, NUM_EXPERTS, BLOCK_M)
    rows, slots, row_mask = span_rows(row_start, row_end, sorted_slots_ptr, num_rows, BLOCK_M)
    return expert, rows, slots, row_mask


@triton.jit
def span_rows(row_start, row_end, sorted_slots_ptr, num_rows, BLOCK_M: tl.constexpr):
    """`tile_rows` of the span row_start:row_end from `expert_tile`: (rows, slots, row mask), for a kernel that also
    needs row_start as a scalar (a TMA block's start)."""
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = (rows >= 0) & (rows < row_end) & (rows < num_rows)
    slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
    row_mask &= (slots >= 0) & (slots < num_rows)
    return rows, slots, row_mask


@triton.jit
def launched_m_tiles(num_rows, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """`num_m_tiles_upper_bound` inside a kernel: how many M-tiles the launch grid holds."""
    return tl.minimum(tl.cdiv(num_rows, BLOCK_M) + NUM_EXPERTS - 1, num_rows)


def num_m_tiles_upper_bound(num_rows: int, num_experts: int, block_m: int) -> int:
    """Grid size along M that covers every expert's tiles without knowing the counts.

    sum_e cdiv(count_e, BLOCK_M) <= cdiv(num_rows, BLOCK_M) + E - 1, and no tile is empty, so also <= num_rows.
    """
    return min(triton.cdiv(num_rows, block_m) + num_experts - 1, num_rows)


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) with GROUP_M consecutive M-tiles (mostly one expert) sweeping N together, so that a weight
    tile and the gathered rows are both reused from L2 (the Triton matmul tutorial's ordering)."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def expert_rows(expert_offsets_ptr, expert, num_rows):
    """Sorted rows [row_start, row_end) of `expert`, clamped to [0, num_rows) so corrupt offsets cannot move a load
    out of bounds or make the row loop run past the operands."""
    row_start = tl.maximum(tl.load(expert_offsets_ptr + expert), 0)
    row_end = tl.minimum(tl.load(expert_offsets_ptr + expert + 1), num_rows)
    return row_start, row_end


@triton.jit
def chunk_rows(p0, row_end, sorted_slots_ptr, num_rows, top_k, BLOCK_M: tl.constexpr):
    """Rows p0:p0+BLOCK_M of an expert: (slots, tokens as int64, mask of real rows with a valid slot)."""
    rows = p0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
    row_mask &= (slots >= 0) & (slots < num_rows)
    return slots, (slots // top_k).to(tl.int64), row_mask


# GEMM classes. Each kernel has its tiles per class, one autotuner each (`autotuned_by_class`): "16bit" (fp16 and bf16
# on tensor cores), "tf32" (fp32 on tensor cores, twice the shared memory a tile) and "fp32_dot" (FP32_DOT: full-fp32
# dots on CUDA cores, whose operands live in registers, so small tiles). The pinned config of each class comes first.
GEMM_CLASS_DTYPES = {"16bit": ("bf16", "fp16"), "tf32": ("fp32",), "fp32_dot": ("fp32",)}


@triton.jit
def dot(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a @ b. FP32_DOT multiplies in full fp32, for fp32 inputs when TF32 is not allowed (see `gemm_class`);
    otherwise a and b must be in their storage dtype, 16-bit or fp32 (TF32), as the tensor cores take them: a tile
    upcast on the way would double the shared memory and cut the MMA rate, and under the interpreter would hide the
    rounding the GPU does."""
    tl.static_assert(a.dtype == b.dtype, "dot: both operands in one dtype")
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    tl.static_assert(a.dtype.primitive_bitwidth == 16 or a.dtype == tl.float32, "dot: 16-bit or fp32 operands")
    return tl.dot(a, b, acc)


def gemm_class(dtype: torch.dtype) -> tuple[str, bool]:
    """(GEMM class, FP32_DOT) of a launch on `dtype` tensors, forward and backward alike: fp32 multiplies in full
    fp32 when torch's matmul precision is "highest" (torch.backends.cuda.matmul.allow_tf32 = True sets it to "high"),
    else in TF32. The same under the interpreter, which then emulates the tensor cores (kernels/interpreter.py)."""
    if dtype != torch.float32:
        return "16bit", False
    fp32_dot = torch.get_float32_matmul_precision() == "highest"
    return ("fp32_dot" if fp32_dot else "tf32"), fp32_dot


# TMA. An operand whose rows are contiguous in the order a GEMM reads them (not gathered) can load each tile with one
# `cp.async.bulk.tensor` on sm_90: the copy engine computes the addresses and zero-fills outside the descriptor's shape,
# so the main loop does no address arithmetic and no masking (moe_down at 128x128: 141 registers -> 104). The
# descriptors are made in the kernel (tl.make_tensor_descriptor), which Triton 3.6 and 3.9 both compile: the block
# shape follows the autotuned tile, and a 3-D view (or a shape cut at the expert's last row) bounds a block to one
# expert. The price: each program writes its descriptors to a global workspace (`tma_workspace`, 128 bytes each).
# Host-side descriptors (triton.tools.tensor_descriptor.TensorDescriptor, "tensordesc<bf16[128, 64]>" in a signature)
# fix the block shape on the host, so every autotune config would need a pre-hook, and on sm_80 they load without
# cp.async. In-kernel ones lower to cp.async on sm_80, but spill at some tiles there: the launchers keep the pointer
# path on sm_80, for gathered rows and for layouts TMA cannot take, and the compile specs of a TMA path say sm_90 only
# (CompileSpec.archs). The interpreter of both Triton versions runs descriptors, zero fill included, so the TMA path is
# tested on the CPU as well (DBRX_FAST_TMA=1).
TMA_ALIGNMENT = 16  # bytes: the start address and every stride but the innermost (which must be 1)


def use_tma(device: torch.device, *operands: torch.Tensor) -> bool:
    """Whether a launch on `device` loads `operands` through TMA descriptors. DBRX_FAST_TMA=0: never; =1: wherever
    their layout allows (the interpreter included); unset: on CUDA devices of compute capability 9.0 or newer. The
    layout: innermost stride 1, other strides and the start 16-byte aligned. The start of a traced (fake) tensor is
    unknown, so there its storage offset is judged (torch allocates storage aligned), as Triton's TensorDescriptor
    does."""
    setting = os.environ.get("DBRX_FAST_TMA", "")
    if setting == "0" or (
        setting != "1" and not (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)
    ):
        return False
    for t in operands:
        size = t.element_size()
        start = t.storage_offset() if type(t).__name__ in ("FakeTensor", "FunctionalTensor") else t.data_ptr() // size
        if t.stride(-1) != 1 or any((s * size) % TMA_ALIGNMENT for s in (start, *t.stride()[:-1])):
            return False
    return True


@contextlib.contextmanager
def tma_workspace(device: torch.device, enabled: bool):
    """Within the block, Triton allocates the global workspace of in-kernel TMA descriptors as torch tensors on
    `device` (when `enabled`; Triton has no allocator of its own). Set for the block only, then the caller's own
    allocator, if any, is back: torch.compile's launcher sets the same one before each launch."""
    if not enabled or device.type != "cuda":
        yield
        return
    from triton.runtime import _allocation  # its ContextVar, so the setting can be undone; 3.6 to 3.9 alike

    token = _allocation._allocator.set(
        lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device)
    )
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def launch_gemm(tuners: dict, grid, *args, tma_operands: tuple[torch.Tensor, ...], **meta) -> None:
    """launch(tuners[class], grid, *args, **meta) for the GEMM class of the operands' dtype (`gemm_class`), with its
    FP32_DOT, and with USE_TMA where the 16-bit class can load `tma_operands` through descriptors (`use_tma`; the
    workspace set around the launch). The class and device are those of tma_operands[0]: a launch's operands share
    both."""
    first = tma_operands[0]
    cls, fp32_dot = gemm_class(first.dtype)
    tma = cls == "16bit" and use_tma(first.device, *tma_operands)
    with tma_workspace(first.device, tma):
        launch(tuners[cls], grid, *args, **meta, FP32_DOT=fp32_dot, USE_TMA=tma)


@triton.jit
def tile_descriptor(base_ptr, shape, strides, block_shape, USE_TMA: tl.constexpr):
    """A tensor descriptor over `base_ptr` (innermost stride 1) for `load_tile` when USE_TMA, else `base_ptr`
    itself (the pointer path carries its own pointers)."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base_ptr, shape, strides, block_shape)
    else:
        return base_ptr


@triton.jit
def expert_weight_descriptor(
    w_ptr,
    ffn,
    hidden,
    stride_w_r,
    NUM_EXPERTS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """An expert weight [E*ffn, hidden] (row stride stride_w_r, columns contiguous) as an [E, ffn, hidden]
    `tile_descriptor` of [1, BLOCK_R, BLOCK_C] blocks: a block stops at its expert's last row (zeros past it)."""
    expert_stride = tl.cast(ffn, tl.int64) * stride_w_r
    return tile_descriptor(
        w_ptr, (NUM_EXPERTS, ffn, hidden), (expert_stride, stride_w_r, 1), (1, BLOCK_R, BLOCK_C), USE_TMA
    )


@triton.jit
def load_tile(source, offsets, ptrs, mask, USE_TMA: tl.constexpr):
    """A 2-D operand tile. USE_TMA: `source.load(offsets)` from a `tile_descriptor`, zero outside its shape (`ptrs`
    and `mask` unused: the compiler drops them), a leading block dimension of 1 dropped. Else
    tl.load(ptrs, mask, other=0)."""
    if USE_TMA:
        tile = source.load(offsets)
        if len(tile.shape) == 3:
            tile = tl.reshape(tile, (tile.shape[1], tile.shape[2]))
        return tile
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


def config(num_warps: int, num_stages: int, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def autotuned_by_class(kernel, configs: dict[str, list], key: list[str], **kwargs) -> dict[str, object]:
    """One autotuner per class of `configs` (the GEMM classes, or the decode kernel's dtype classes) over the same
    @triton.jit kernel, each with its class's tiles (pinned to the first under the interpreter or
    DBRX_FAST_AUTOTUNE=0); `kwargs` go to every `autotune` (prune_configs_by)."""
    return {cls: autotune(cfgs, key=key, **kwargs)(kernel) for cls, cfgs in configs.items()}


def launch_args(kernel, dtype: str, fp32_ptrs: tuple[str, ...] = ()) -> tuple[dict[str, str], dict[str, object]]:
    """(signature, constexprs) of the @triton.jit `kernel` at DBRX's shapes with contiguous tensors.

    Pointers: the routing metadata int32, those named in fp32_ptrs float32, the others in `dtype`. Sizes and strides
    are fixed at DBRX's values (see DBRX_HIDDEN): hidden, ffn and row strides 6144 or 10752, inner strides 1. What
    stays a plain i32 varies with the batch: the row count, its bucket, k and the routing weights' row stride.
    NUM_EXPERTS is DBRX's; the other constexprs are the caller's.
    """
    signature, constexprs = {}, {}
    # The Python function's own parameters: the JIT and interpreter wrappers describe them differently.
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if param.annotation is tl.constexpr:
            if name == "NUM_EXPERTS":
                constexprs[name] = DBRX_NUM_EXPERTS
        elif name in ("sorted_slots_ptr", "expert_offsets_ptr"):
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_ptrs else f"*{dtype}"
        elif name in ("hidden", "stride_dout_t", "stride_x_t", "stride_w1_r", "stride_v1_r", "stride_w2_r"):
            constexprs[name] = DBRX_HIDDEN
        elif name in ("ffn", "stride_h_r", "stride_gate_p", "stride_up_p", "stride_dgate_p", "stride_dup_p"):
            constexprs[name] = DBRX_FFN
        elif name.startswith("stride_") and name[-2:] in ("_h", "_f", "_k"):
            constexprs[name] = 1
        else:
            signature[name] = "i32"
    return signature, constexprs


def gemm_specs(
    name: str,
    kernel,
    configs: dict[str, list],
    fp32_ptrs: tuple[str, ...] = (),
    fixed: dict | None = None,
    variants: tuple[dict, ...] = ({},),
    archs: tuple[int, ...] = (80, 90),
) -> list[CompileSpec]:
    """A CompileSpec per (GEMM class, dtype of the class, variant, config) of a grouped-GEMM kernel (see
    `launch_args`); `fixed` holds constexprs every launch passes, `variants` the alternatives a launcher can take
    (SAVE_PREACT on and off, say), `archs` where it takes them (USE_TMA: sm_90). fp32_dot specs run no tensor cores,
    so they need no wgmma."""
    specs = []
    for cls, class_configs in configs.items():
        for dtype in GEMM_CLASS_DTYPES[cls]:
            signature, sizes = launch_args(kernel, dtype, fp32_ptrs)
            sizes = {**sizes, **(fixed or {}), "FP32_DOT": cls == "fp32_dot"}
            for variant in variants:
                label = " ".join((name, dtype, cls, *(f"{k}={v}" for k, v in variant.items())))
                for cfg in class_configs:
                    meta = {**sizes, **variant}
                    matrix = cls != "fp32_dot"
                    specs.append(config_spec(label, kernel, signature, meta, cfg, matrix=matrix, archs=archs))
    return specs


def gemm_path_specs(
    name: str,
    kernel,
    configs: dict[str, list],
    fp32_ptrs: tuple[str, ...] = (),
    fixed: dict | None = None,
    variants: tuple[dict, ...] = ({},),
    tma_dtypes: tuple[str, ...] = ("bf16",),
) -> list[CompileSpec]:
    """`gemm_specs` of both paths a launcher takes (`launch_gemm`): the pointer path (USE_TMA off) of every class on
    sm_80 and sm_90, then the TMA path of the 16-bit class on sm_90 only (sm_80 never takes it: Triton would lower
    it to cp.async, and spill at some tiles) in `tma_dtypes` (fp16 builds the same tiles as bf16 with another MMA
    type, and each spec costs a compile per release in CI)."""
    pointer = gemm_specs(name, kernel, configs, fp32_ptrs, {**(fixed or {}), "USE_TMA": False}, variants)
    tma_variants = tuple({**variant, "USE_TMA": True} for variant in variants)
    tma = gemm_specs(name, kernel, {"16bit": configs["16bit"]}, fp32_ptrs, fixed, tma_variants, archs=(90,))
    return pointer + [spec for spec in tma if spec.name.split()[1] in tma_dtypes]


def kernel_spec(name: str, kernel, dtype: str, fp32_ptrs: tuple[str, ...], num_warps: int, **meta) -> CompileSpec:
    """The CompileSpec of a launch of a kernel without autotune configs (see `launch_args`)."""
    signature, sizes = launch_args(kernel, dtype, fp32_ptrs)
    return CompileSpec(name=name, kernel=kernel, signature=signature, constexprs={**sizes, **meta}, num_warps=num_warps)
