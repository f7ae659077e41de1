"""Split-KV decode (kernels/attention_decode.py) against the float64 GQA reference, with SDPA in the same dtype as the
baseline of accuracy: query counts 1 and 3, contexts 1 to several splits, GQA ratios 1, 2, 6 and MQA, head_dim 64
and 128, left padding, a StaticCache-shaped cache with garbage past the valid length, strided views, determinism;
and (on a GPU) a CUDA-graph capture replayed at two decode steps."""

import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate

from dbrx_fast import reference
from dbrx_fast.attention_mask import AttentionMask
from dbrx_fast.kernels import attention_decode as decode_kernels
from dbrx_fast.kernels.attention_decode import attention_decode

pytestmark = pytest.mark.interpreter

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_qkv(batch, n_heads, kv_heads, num_queries, num_keys, head_dim, dtype, device):
    """q as a view of a fused [B, Nq, Hq, D] projection and k, v as views of one [B, Nk, 2, Hkv, D] buffer: any
    strides with a unit stride on D, as transformers passes them."""
    q = torch.randn(batch, num_queries, n_heads, head_dim, device=device).to(dtype).transpose(1, 2)
    kv = torch.randn(batch, num_keys, 2, kv_heads, head_dim, device=device).to(dtype)
    return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


def sdpa(q, k, v, mask: AttentionMask, scale):
    """Stock's attention in the inputs' dtype, out [B, Nq, Hq, D]; a query that sees no key gives 0, not NaN."""
    allowed = mask.dense(q.shape[2], k.shape[2])[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).nan_to_num(0.0)


def check(q, k, v, mask: AttentionMask, key_mask=None, what=""):
    scale = q.shape[-1] ** -0.5
    out = attention_decode(q, k, v, mask.q_offset, key_mask, scale)
    ref, _ = reference.gqa_attention(q.double(), k.double(), v.double(), mask, scale)
    assert_accurate(out, ref, sdpa(q, k, v, mask, scale), what=what)
    return out


# (batch, query heads, KV heads, queries, context, head_dim): context = q_offset + Nq keys, all valid.
CASES = {
    "mqa-ctx1": (2, 6, 1, 1, 1, 64),
    "ratio1-ctx17-nq3": (2, 4, 4, 3, 17, 128),
    "ratio6-ctx300": (1, 12, 2, 1, 300, 128),
    "ratio2-several-splits-nq3": (1, 4, 2, 3, 600, 64),
    "mqa-two-row-tiles-nq3": (1, 24, 1, 3, 40, 64),  # 24 heads x 3 tokens = 72 rows: two 64-row tiles
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, device):
    batch, n_heads, kv_heads, num_queries, context, head_dim = CASES[case]
    q, k, v = make_qkv(batch, n_heads, kv_heads, num_queries, context, head_dim, dtype, device)
    check(q, k, v, AttentionMask.bottom_right(batch, num_queries, context, device), what=case)


def test_several_splits_with_the_largest_scores_last(device):
    """The case that spans several splits, with its most recent keys scoring highest (as a query's own context
    does): the combine's running maximum then moves at its later steps. Several splits, two combine steps, and two
    runs give the same bits."""
    batch, n_heads, kv_heads, num_queries, context, head_dim = CASES["ratio2-several-splits-nq3"]
    splits = decode_kernels.num_splits(batch, kv_heads, 1, context, device)
    assert (
        splits > decode_kernels._COMBINE_BLOCK_S
        and decode_kernels.block_m(n_heads // kv_heads, num_queries, torch.bfloat16) == 16
    )
    q, k, v = make_qkv(batch, n_heads, kv_heads, num_queries, context, head_dim, torch.bfloat16, device)
    k[:, :, -100:] *= 3
    mask = AttentionMask.bottom_right(batch, num_queries, context, device)
    first = check(q, k, v, mask, what="largest scores last")
    assert torch.equal(first, attention_decode(q, k, v, mask.q_offset, None, head_dim**-0.5))


@pytest.mark.parametrize("mask_dtype", (torch.bool, torch.uint8), ids=("bool", "uint8"))
def test_left_padding_and_a_query_that_sees_no_key(mask_dtype, device):
    """Left-padded rows (their first keys masked), a row whose one allowed key is padding (output 0) and a row whose
    q_offset puts every key out of causal reach (output 0)."""
    batch, n_heads, kv_heads, num_queries, num_keys, head_dim = 4, 6, 2, 3, 150, 64
    q, k, v = make_qkv(batch, n_heads, kv_heads, num_queries, num_keys, head_dim, torch.float16, device)
    key_mask = torch.ones(batch, num_keys, dtype=torch.bool, device=device)
    key_mask[0, :37] = False
    key_mask[1, :140] = False
    key_mask[2, :1] = False
    q_offset = torch.tensor([num_keys - num_queries, num_keys - num_queries, 0, -num_queries], dtype=torch.int32)
    mask = AttentionMask(q_offset.to(device), key_mask)
    out = check(q, k, v, mask, key_mask.to(mask_dtype), what="left padding")
    assert (out[2, 0] == 0).all() and (out[2, 1:] != 0).all(), "row 2: query 0 sees only a padded key"
    assert (out[3] == 0).all(), "row 3: no key within causal reach"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d)[6:])
def test_static_cache_reads_only_the_valid_length(dtype, device):
    """A StaticCache hands over all max_cache_len slots: the slots past q_offset + Nq hold garbage (NaN, then other
    random values), which must not reach the output; per-row valid lengths differ (one inside the first split)."""
    batch, n_heads, kv_heads, num_queries, max_len, head_dim = 3, 6, 1, 1, 512, 128
    q, k, v = make_qkv(batch, n_heads, kv_heads, num_queries, max_len, head_dim, dtype, device)
    valid = torch.tensor([5, 200, 383])
    q_offset = (valid - num_queries).to(torch.int32).to(device)
    past = torch.arange(max_len)[None, :] >= valid[:, None]
    past = past[:, None, :, None].to(device)
    k_nan, v_nan = k.masked_fill(past, float("nan")), v.masked_fill(past, float("nan"))
    mask = AttentionMask(q_offset)
    scale = head_dim**-0.5
    out = attention_decode(q, k_nan, v_nan, q_offset, None, scale)
    ref, _ = reference.gqa_attention(q.double(), k.double(), v.double(), mask, scale)
    assert_accurate(out, ref, sdpa(q, k, v, mask, scale), what="static cache")
    k_other = torch.where(past, torch.randn_like(k), k)
    v_other = torch.where(past, torch.randn_like(v), v)
    assert torch.equal(out, attention_decode(q, k_other, v_other, q_offset, None, scale)), "garbage leaked in"


def test_rejects_bad_input(device):
    q, k, v = make_qkv(1, 4, 2, 1, 8, 64, torch.float32, device)
    q_offset = torch.zeros(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="1 to 8 queries"):
        attention_decode(q.expand(1, 4, 9, 64), k, v, q_offset, None, 1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        attention_decode(q[:, :3], k, v, q_offset, None, 1.0)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        attention_decode(q.double(), k.double(), v.double(), q_offset, None, 1.0)
    with pytest.raises(TypeError, match="q is torch.float32"):
        attention_decode(q, k.half(), v.half(), q_offset, None, 1.0)
    with pytest.raises(ValueError, match="q_offset must be int32"):
        attention_decode(q, k, v, q_offset.long(), None, 1.0)
    with pytest.raises(ValueError, match="key_mask must be"):
        attention_decode(q, k, v, q_offset, torch.ones(1, 7, dtype=torch.bool, device=device), 1.0)
    with pytest.raises(ValueError, match="head_dim must be"):
        attention_decode(q[..., :48], k[..., :48], v[..., :48], q_offset, None, 1.0)


@pytest.mark.gpu
def test_cuda_graph_replays_two_decode_steps_with_a_new_q_offset():
    """A StaticCache-shaped decode step captured once replays at two later steps: the new q_offset (and the cache
    slot written in between) is read on the device, and each replay gives the eager call's bits."""
    device = torch.device("cuda")
    batch, n_heads, kv_heads, max_len, head_dim = 2, 48, 8, 4096, 128
    q, k, v = make_qkv(batch, n_heads, kv_heads, 1, max_len, head_dim, torch.bfloat16, device)
    q_offset = torch.tensor([1000, 1500], dtype=torch.int32, device=device)
    key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
    key_mask[0, :10] = False
    scale = head_dim**-0.5
    attention_decode(q, k, v, q_offset, key_mask, scale)  # tunes and compiles before the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attention_decode(q, k, v, q_offset, key_mask, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        static_out = attention_decode(q, k, v, q_offset, key_mask, scale)
    for step in (1, 2):
        q.copy_(torch.randn_like(q))
        q_offset.add_(step * 7)
        k.index_fill_(2, q_offset.long(), 1.0)  # the cache slots at the new positions written
        graph.replay()
        torch.cuda.synchronize()
        eager = attention_decode(q, k, v, q_offset, key_mask, scale)
        assert torch.equal(static_out, eager), f"step {step}"
        mask = AttentionMask(q_offset, key_mask)
        ref, _ = reference.gqa_attention(q.double(), k.double(), v.double(), mask, scale)
        assert_accurate(static_out, ref, sdpa(q, k, v, mask, scale), what=f"graph step {step}")
