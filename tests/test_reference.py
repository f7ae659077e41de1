"""The oracles themselves, where nothing else checks them yet: GQA attention (its kernels are a later issue)."""

import pytest
import torch
import torch.nn.functional as F

from dbrx_fast import reference


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
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask
    )
    out = reference.gqa_attention(q, k, v, key_padding_mask=keep)
    torch.testing.assert_close(out, expected)


def test_gqa_attention_query_that_sees_no_key_returns_zeros():
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    v = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    keep = torch.tensor([[False, False, True]])  # queries 0 and 1 see only padded keys
    out = reference.gqa_attention(q, k, v, key_padding_mask=keep)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert torch.isfinite(out).all() and out[:, :, 2].abs().sum() > 0
