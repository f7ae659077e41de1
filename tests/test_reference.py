"""The oracles themselves, where nothing else checks them: GQA attention with the compact AttentionMask."""

import pytest
import torch
import torch.nn.functional as F

from dbrx_fast import reference
from dbrx_fast.attention_mask import AttentionMask


@pytest.mark.parametrize("q_len, k_len", [(7, 7), (1, 9), (4, 11)])  # prefill, decode, chunked prefill
@pytest.mark.parametrize("group", [1, 2, 6])
def test_gqa_attention_matches_sdpa_with_an_explicit_mask(q_len, k_len, group):
    batch, kv_heads, head_dim = 2, 2, 16
    q = torch.randn(batch, kv_heads * group, q_len, head_dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, k_len, head_dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, k_len, head_dim, dtype=torch.float64)
    keep = torch.ones(batch, k_len, dtype=torch.bool)
    keep[1, :3] = False  # left padding of the second sequence

    # Query i sits at absolute position k_len - q_len + i and sees keys up to it.
    causal = torch.arange(k_len)[None, :] <= (k_len - q_len + torch.arange(q_len))[:, None]
    mask = causal[None, None] & keep[:, None, None, :]
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=0.25
    )
    out, lse = reference.gqa_attention(q, k, v, AttentionMask(torch.full((batch,), k_len - q_len), keep), 0.25)
    torch.testing.assert_close(out, expected.transpose(1, 2))
    scores = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * 0.25
    torch.testing.assert_close(lse, scores.masked_fill(~mask, float("-inf")).logsumexp(-1))


def test_gqa_attention_query_that_sees_no_key_returns_zeros():
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    v = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    keep = torch.tensor([[False, False, True]])  # queries 0 and 1 see only padded keys
    out, lse = reference.gqa_attention(q, k, v, AttentionMask(torch.zeros(1, dtype=torch.int32), keep), 0.5)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))
    assert torch.isfinite(out).all() and out[:, 2].abs().sum() > 0
    assert torch.isneginf(lse[:, :, :2]).all() and torch.isfinite(lse[:, :, 2]).all()


def test_packed_sequences_do_not_see_each_other():
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    key_start = torch.tensor([[0, 0, 2, 2, 2]], dtype=torch.int32)  # sequences [0, 2) and [2, 5)
    mask = AttentionMask(torch.zeros(1, dtype=torch.int32), key_start=key_start)
    out, _ = reference.gqa_attention(q, k, v, mask, 0.3)
    first, _ = reference.gqa_attention(
        q[:, :, :2], k[:, :, :2], v[:, :, :2], AttentionMask.bottom_right(1, 2, 2, "cpu"), 0.3
    )
    second, _ = reference.gqa_attention(
        q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], AttentionMask.bottom_right(1, 3, 3, "cpu"), 0.3
    )
    torch.testing.assert_close(out, torch.cat((first, second), dim=1))
