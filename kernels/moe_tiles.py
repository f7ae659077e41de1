"""Mapping of a grouped GEMM's M-tiles onto experts, shared by every MoE kernel.

Rows are in "sorted order": expert e owns rows expert_offsets[e]:expert_offsets[e+1] of a [T*k, ...] operand. Each
expert's rows are cut into cdiv(count_e, BLOCK_M) tiles, experts in ascending order, so tile boundaries never cross
experts. The host never learns the counts (no synchronisation, so a decode step stays CUDA-graph capturable): the
launch grid is the upper bound from `num_m_tiles_upper_bound`, and a program whose tile index lies past the last real
tile gets expert -1 and returns.
"""

import triton
import triton.language as tl


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


def num_m_tiles_upper_bound(num_rows: int, num_experts: int, block_m: int) -> int:
    """Grid size along M that covers every expert's tiles without knowing the counts.

    sum_e cdiv(count_e, BLOCK_M) <= cdiv(num_rows, BLOCK_M) + E - 1, and no tile is empty, so also <= num_rows.
    """
    return min(triton.cdiv(num_rows, block_m) + num_experts - 1, num_rows)
