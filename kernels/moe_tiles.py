"""What the grouped-GEMM MoE kernels (kernels/moe_experts.py and kernels/moe_experts_backward.py) share.

Mapping of a grouped GEMM's M-tiles onto experts. Rows are in "sorted order": expert e owns rows
expert_offsets[e]:expert_offsets[e+1] of a [T*k, ...] operand. Each expert's rows are cut into cdiv(count_e, BLOCK_M)
tiles, experts in ascending order, so tile boundaries never cross experts. The host never learns the counts (no
synchronisation, so a decode step stays CUDA-graph capturable): the launch grid is the upper bound from
`num_m_tiles_upper_bound` (`launched_m_tiles` inside a kernel), and a program whose tile index lies past the last real
tile gets expert -1 and returns. `expert_tile` finds a tile's expert and rows, `tile_rows` adds their slots and mask,
and `grouped_tile` orders the (M-tile, N-tile) programs for L2 reuse.

Also shared: `dot` and `use_fp32_dot` (when and how the GEMMs multiply in full fp32), the launchers' checks
`check_float` and `check_routing`, and for the compile specs DBRX's sizes and `describe`.
"""

import os

import torch
import triton
import triton.language as tl

TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

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
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = (rows >= 0) & (rows < row_end) & (rows < num_rows)
    slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
    row_mask &= (slots >= 0) & (slots < num_rows)
    return expert, rows, slots, row_mask


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
def dot(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a @ b. FP32_DOT multiplies in full fp32: for fp32 inputs when TF32 is not allowed, and under the Triton
    interpreter, whose bf16 tl.dot is wrong."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def use_fp32_dot(dtype: torch.dtype) -> bool:
    """Whether the GEMMs must multiply in full fp32 (see `dot`): the FP32_DOT meta-parameter of a launch on `dtype`."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def check_float(name: str, t: torch.Tensor, like: torch.Tensor | None = None, like_name: str = "x") -> None:
    """t is fp16, bf16 or fp32 (float64 raises TypeError so that callers fall back to torch), and has the dtype and
    device of `like` when given."""
    if t.dtype == torch.float64:
        raise TypeError(f"{name} is float64, which the MoE kernels do not support; use the torch reference path")
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if like is not None and (t.dtype != like.dtype or t.device != like.device):
        raise TypeError(f"{name} ({t.dtype}, {t.device}) must match {like_name} ({like.dtype}, {like.device})")


def check_routing(
    sorted_slots: torch.Tensor, expert_offsets: torch.Tensor, top_k: int, num_rows: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validates the dispatch metadata; returns it contiguous (a no-op for the router's output) and E."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    for name, t in (("sorted_slots", sorted_slots), ("expert_offsets", expert_offsets)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the activations on {device}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if sorted_slots.numel() != num_rows:
        raise ValueError(f"sorted_slots has {sorted_slots.numel()} entries, expected T*k = {num_rows}")
    if expert_offsets.numel() < 2:
        raise ValueError(f"expert_offsets must have E+1 >= 2 entries, got {expert_offsets.numel()}")
    return sorted_slots.contiguous(), expert_offsets.contiguous(), expert_offsets.numel() - 1


def describe(cfg: triton.Config) -> str:
    """An autotune config as it appears in a compile spec's name: its meta-parameters, warps and stages."""
    meta = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{meta} warps={cfg.num_warps} stages={cfg.num_stages}"
