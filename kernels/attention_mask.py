"""The kernel side of dbrx_fast/attention_mask.py: which keys of a tile a block of queries may see.

Every attention kernel (forward, backward, decode) asks these two functions, so the rule lives in one place:
query i of a batch row sees key j when j <= i + q_offset, key_mask[j] (when given) and j >= key_start[i] (when
given). `key_mask_row` and `key_start_row` point at the batch row's entries (uint8 and int32).
"""

import triton
import triton.language as tl


@triton.jit
def key_range(offs_q, q_valid, q_offset, num_keys, key_start_row, HAS_KEY_START: tl.constexpr):
    """[lo, hi): the keys any valid query of the block may see; hi <= lo when it sees none."""
    q_last = tl.max(tl.where(q_valid, offs_q, -1))
    hi = tl.minimum(num_keys, q_last + q_offset + 1)
    lo = 0
    if HAS_KEY_START:
        starts = tl.load(key_start_row + offs_q, mask=q_valid, other=2**30)
        lo = tl.maximum(tl.min(starts), 0)
    return lo, hi


@triton.jit
def keys_allowed(
    offs_q,
    q_valid,
    offs_k,
    q_offset,
    num_keys,
    key_mask_row,
    key_start_row,
    HAS_KEY_MASK: tl.constexpr,
    HAS_KEY_START: tl.constexpr,
):
    """bool [len(offs_q), len(offs_k)]: query offs_q[r] may see key offs_k[c] (False for rows or keys out of range)."""
    k_valid = offs_k < num_keys
    allowed = (offs_k[None, :] <= offs_q[:, None] + q_offset) & k_valid[None, :] & q_valid[:, None]
    if HAS_KEY_MASK:
        keep = tl.load(key_mask_row + offs_k, mask=k_valid, other=0)
        allowed = allowed & (keep != 0)[None, :]
    if HAS_KEY_START:
        starts = tl.load(key_start_row + offs_q, mask=q_valid, other=2**30)
        allowed = allowed & (offs_k[None, :] >= starts[:, None])
    return allowed


@triton.jit
def keys_all_see(offs_q, q_valid, q_offset, num_keys, key_start_row, HAS_KEY_START: tl.constexpr):
    """[lo, hi): the keys every valid query of the block sees, key_mask aside (a kernel may skip `keys_allowed` on
    tiles inside it); hi <= lo when there are none. offs_q ascends, so the first valid query has the tightest causal
    bound."""
    q_first = tl.min(tl.where(q_valid, offs_q, 2**30))
    hi = tl.minimum(num_keys, q_first + q_offset + 1)
    lo = 0
    if HAS_KEY_START:
        starts = tl.load(key_start_row + offs_q, mask=q_valid, other=0)
        lo = tl.maximum(tl.max(starts), 0)
    return lo, hi


@triton.jit
def query_range(k_first, k_last, q_offset, num_queries):
    """[lo, full): by the causal rule, queries before lo see none of the keys k_first..k_last, and queries from
    full on see all of them (lo <= full <= num_queries). Padding and packing can still hide keys from any query."""
    lo = tl.minimum(tl.maximum(k_first - q_offset, 0), num_queries)
    full = tl.minimum(tl.maximum(k_last - q_offset, lo), num_queries)
    return lo, full
