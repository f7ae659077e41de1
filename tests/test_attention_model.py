"""dbrx-fast's attention inside transformers (attention_interface.py): the masks transformers builds for it, the
caches, packed sequences, the per-call fallbacks and bad input, on tiny random DBRX models against stock.

The triton cases patch only the attention (moe=False, norm=False) so that the interpreter runs just the QKV and
attention kernels; the torch backend runs the same plumbing on SDPA with the dense mask.
"""

import copy
import types

import pytest
import torch
from models import tiny_config, tiny_model

import dbrx_fast
from dbrx_fast import attention_interface, backend
from dbrx_fast.attention_interface import compact_causal_mask, packed_key_start
from dbrx_fast.attention_mask import AttentionMask

TRITON = pytest.param("triton", marks=pytest.mark.interpreter)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """One-time warnings are per process; each test sees its own."""
    monkeypatch.setattr(backend, "_warned", set())


def models(attn: str, backend_name: str, layers: int = 1):
    """(patched, stock) with the same weights; stock runs `attn`, the patched model was `attn` before patching."""
    stock = tiny_model(tiny_config(layers=layers, n_heads=6, kv_n_heads=2))
    stock.config._attn_implementation = attn
    only_attention = dict(moe=False, norm=False) if backend_name == "triton" else {}
    patched = dbrx_fast.patch(copy.deepcopy(stock), backend=backend_name, **only_attention)
    assert patched.config._attn_implementation == attention_interface.NAME
    return patched, stock


def left_padded_batch(batch: int = 2, length: int = 9, pad: int = 4):
    ids = torch.randint(1, 97, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, :pad], ids[0, :pad] = 0, 0
    return ids, mask


class Spy:
    """Records the arguments of one function of a module while still calling it."""

    def __init__(self, monkeypatch, module, name):
        self.calls, inner = [], getattr(module, name)

        def spy(*args, **kwargs):
            self.calls.append(args + tuple(kwargs.values()))
            return inner(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)


CACHES = {"dynamic": {}, "static": {"cache_implementation": "static"}, "no cache": {"use_cache": False}}


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_generate_on_a_left_padded_batch_matches_stock(attn, cache):
    patched, stock = models(attn, "torch")
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, **CACHES[cache])
    assert torch.equal(patched.generate(ids, **kwargs), stock.generate(ids, **kwargs))


@pytest.mark.interpreter
def test_triton_static_cache_generate_matches_stock_and_decode_reads_the_cache_storage(monkeypatch):
    """Prefill through ops.attention, then every step's k and v written by the QKV kernel straight into the
    StaticCache, and attention_decode on the cache's whole storage with q_offset = the tokens cached so far (the
    kernel reads only that far): no dense mask, no slicing or copy on the host."""
    from dbrx_fast.kernels import attention_decode
    from dbrx_fast.ops import attention, qkv

    prefill, decode = Spy(monkeypatch, attention, "attention"), Spy(monkeypatch, attention_decode, "attention_decode")
    qkv_calls = Spy(monkeypatch, qkv, "qkv_rope")
    patched, stock = models("sdpa", "triton")
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(patched.generate(ids, **kwargs), stock.generate(ids, **kwargs))

    assert len(prefill.calls) == 1 and isinstance(prefill.calls[0][3], AttentionMask)
    assert len(decode.calls) == 3
    max_cache_len = decode.calls[0][1].shape[2]
    assert max_cache_len > ids.shape[1] + 1  # the first steps get empty tail slots too
    for step, (q, k, _, q_offset, key_mask, _) in enumerate(decode.calls):
        assert q.shape[2] == 1 and k.shape[2] == max_cache_len
        assert q_offset.tolist() == [ids.shape[1] + step] * 2
        assert key_mask.shape == (2, max_cache_len) and not key_mask[0, :4].any()
        assert key_mask[0, 4 : q_offset[0] + 1].all()
    # The prefill allocates the cache (StaticLayer.update); each decode step writes into it (k_cache, v_cache, rows).
    assert [len(call) for call in qkv_calls.calls] == [6, 9, 9, 9]
    assert all(call[6] is k for call, (_, k, *_) in zip(qkv_calls.calls[1:], decode.calls, strict=True))


@pytest.mark.interpreter
def test_triton_static_cache_write_past_its_end_raises():
    """Stock's StaticLayer.update fails on tokens past max_cache_len (index_copy_); the direct cache write must too,
    not drop them silently."""
    from transformers import StaticCache

    patched, _ = models("sdpa", "triton")
    ids = torch.randint(1, 97, (1, 4))
    cache = StaticCache(config=patched.config, max_cache_len=5)
    with torch.no_grad():
        patched(ids, past_key_values=cache, use_cache=True)  # allocates the cache: 4 of 5 slots
        with pytest.raises(RuntimeError, match="past the StaticCache"):
            patched(ids[:, :2], past_key_values=cache, use_cache=True)


@pytest.mark.interpreter
def test_head_dims_routed_to_the_kernels_are_the_ones_every_kernel_serves():
    from dbrx_fast.kernels import attention_bwd, attention_decode, attention_fwd

    assert attention_interface.TRITON_HEAD_DIMS == attention_fwd.HEAD_DIMS
    # The backward takes the head dims the forward does: it checks its inputs with the forward's check.
    assert attention_bwd.check_attention_args is attention_fwd.check_attention_args
    assert max(attention_interface.TRITON_HEAD_DIMS) <= attention_decode.MAX_HEAD_DIM


def packed_batch():
    """Row 0 packs sequences of 5, 7 and 3 tokens; row 1 is one sequence of 15."""
    ids = torch.randint(1, 97, (2, 15))
    position_ids = torch.stack((torch.cat([torch.arange(n) for n in (5, 7, 3)]), torch.arange(15)))
    return ids, position_ids, [(0, 0, 5), (0, 5, 12), (0, 12, 15), (1, 0, 15)]


@pytest.mark.parametrize("backend_name", ["torch", TRITON])
@pytest.mark.parametrize("use_cache", [True, False])
def test_packed_sequences_are_isolated_with_and_without_a_cache(use_cache, backend_name):
    patched, stock = models("sdpa", backend_name)
    ids, position_ids, segments = packed_batch()
    with torch.no_grad():
        logits = patched(ids, position_ids=position_ids, use_cache=use_cache).logits
        for row, start, end in segments:
            alone = stock(ids[row : row + 1, start:end]).logits[0]
            torch.testing.assert_close(logits[row, start:end], alone, rtol=1e-4, atol=1e-5)
        # Stock isolates them only without a cache; with one it attends across the boundaries.
        stock_packed = stock(ids, position_ids=position_ids, use_cache=use_cache).logits
    assert torch.allclose(stock_packed, logits, rtol=1e-4, atol=1e-5) == (not use_cache)


def test_a_padding_gap_inside_a_row_is_not_a_sequence_boundary():
    """generate's position ids give padding position 1, so they restart inside a padding gap: the row stays one
    sequence (as in stock), only the padded keys are masked."""
    patched, stock = models("sdpa", "torch")
    ids = torch.randint(1, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 3:5] = 0
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        ours = patched(ids, attention_mask=mask, position_ids=position_ids).logits
        theirs = stock(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("asked_in", ["forward", "config"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_output_attentions_falls_back_to_eager_with_one_warning(attn, asked_in):
    patched, stock = models(attn, "torch", layers=2)
    ids, mask = left_padded_batch()
    stock.config._attn_implementation = "eager"  # the only one that computes the weights
    for model in (patched, stock):
        if asked_in == "config":  # set past transformers' setter, which refuses it for any attention but eager
            model.config._output_attentions = True
    kwargs = {"output_attentions": True} if asked_in == "forward" else {}
    with torch.no_grad(), pytest.warns(UserWarning, match="output_attentions") as record:
        out = patched(ids, attention_mask=mask, **kwargs)
    assert len(record) == 1
    with torch.no_grad():
        base = stock(ids, attention_mask=mask, **kwargs)
    assert len(out.attentions) == 2
    for ours, theirs in zip(out.attentions, base.attentions, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_attention_dropout_in_training_falls_back_with_one_warning():
    patched, stock = models("eager", "torch", layers=2)
    for model in (patched, stock):
        for block in model.transformer.blocks:
            block.norm_attn_norm.attn.attention_dropout = 0.5
        model.train()
    ids = torch.randint(1, 97, (2, 8))
    torch.manual_seed(7)  # the same dropout masks: both run transformers' eager attention
    with pytest.warns(UserWarning, match="attention dropout") as record:
        ours = patched(ids).logits
    assert len(record) == 1
    torch.manual_seed(7)
    torch.testing.assert_close(ours, stock(ids).logits, rtol=1e-4, atol=1e-5)


def test_bad_masks_raise_or_fall_back():
    patched, stock = models("sdpa", "torch")
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match=r"2D padding mask \[2, keys\]"):
        patched(ids, attention_mask=torch.ones(3, ids.shape[1], dtype=torch.long))
    with pytest.raises(ValueError, match="2D padding mask"):
        patched(ids, attention_mask=torch.ones(2, 1, ids.shape[1], dtype=torch.long))
    # A 4D mask the caller prepared is passed through by transformers: transformers' sdpa serves it, as in stock.
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    mask4d = (causal & mask.bool()[:, None, :])[:, None]
    with torch.no_grad(), pytest.warns(UserWarning, match="prepared 4D attention mask"):
        ours = patched(ids, attention_mask=mask4d).logits
    with torch.no_grad():
        torch.testing.assert_close(ours, stock(ids, attention_mask=mask4d).logits, rtol=1e-4, atol=1e-5)


class FakeAttention(torch.nn.Module):
    """What the attention functions (ours and transformers' sdpa) read of their module."""

    def __init__(self, backend_name: str, groups: int):
        super().__init__()
        self.dbrx_fast_options = types.SimpleNamespace(backend=backend_name)
        self.num_key_value_groups = groups
        self.is_causal = True


def qkv(batch=2, heads=4, kv_heads=2, nq=5, nk=5, head_dim=16, dtype=torch.float32):
    return (
        torch.randn(batch, heads, nq, head_dim, dtype=dtype),
        torch.randn(batch, kv_heads, nk, head_dim, dtype=dtype),
        torch.randn(batch, kv_heads, nk, head_dim, dtype=dtype),
    )


@pytest.mark.parametrize("case", ["head_dim 8", "float64"])
def test_what_the_triton_kernels_cannot_serve_falls_back_with_one_warning(case):
    q, k, v = qkv(head_dim=8) if case == "head_dim 8" else qkv(dtype=torch.float64)
    mask = AttentionMask.bottom_right(2, 5, 5, q.device)
    module = FakeAttention("triton", 2)
    with pytest.warns(UserWarning, match=case) as record:
        for _ in range(2):
            out, _ = attention_interface.attention_forward(module, q, k, v, mask, scaling=0.3)
    assert len(record) == 1
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_mixed_dtypes_and_masks_of_the_wrong_shape_raise():
    q, k, v = qkv()
    module = FakeAttention("torch", 2)
    with pytest.raises(TypeError, match="share a dtype"):
        attention_interface.attention_forward(module, q, k.half(), v, AttentionMask.bottom_right(2, 5, 5, q.device))
    with pytest.raises(ValueError, match="key_mask"):
        bad = AttentionMask(torch.zeros(2, dtype=torch.int32), torch.ones(2, 4, dtype=torch.bool))
        attention_interface.attention_forward(module, q, k, v, bad)
    with pytest.raises(ValueError, match="sliding window"):
        compact_causal_mask(2, 5, 5, local_size=4)


def test_masks_for_a_static_cache_need_no_host_sync():
    """On the meta device any host sync (.item(), .all() in an `if`, a data-dependent shape) raises: building the
    mask and the packing starts of a StaticCache step stays CUDA-graph capturable."""
    meta = torch.device("meta")
    cached = torch.empty((), dtype=torch.int64, device=meta)  # StaticLayer's cumulative_length
    padding = torch.empty(3, 7, dtype=torch.bool, device=meta)
    mask = compact_causal_mask(3, 12, 64, q_offset=cached, attention_mask=padding, device=meta)
    assert mask.q_offset.shape == (3,) and mask.q_offset.dtype == torch.int32
    assert mask.key_mask.shape == (3, 64) and mask.key_start is None
    key_start = packed_key_start(torch.empty(1, 12, dtype=torch.int64, device=meta), mask, 12)
    assert key_start.shape == (3, 12) and key_start.dtype == torch.int32


def test_mask_arguments_become_the_compact_mask():
    """transformers' mask arguments: q_offset (cache length) minus kv_offset aligns query i with key slot i + q_offset;
    the padding mask is padded with False up to a StaticCache's length."""
    padding = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    mask = compact_causal_mask(2, 1, 8, q_offset=torch.tensor(3), attention_mask=padding)
    assert mask.q_offset.tolist() == [3, 3]
    assert mask.key_mask.tolist() == [[False, True, True, True] + [False] * 4, [True] * 4 + [False] * 4]
    assert compact_causal_mask(2, 2, 6, q_offset=4, kv_offset=2).q_offset.tolist() == [2, 2]
    assert compact_causal_mask(2, 2, 6, attention_mask=mask) is mask  # generate's prepared mask passes through

    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [1, 1, 0, 1, 2, 3]])  # packed; left-padded by two
    plain = AttentionMask(torch.zeros(2, dtype=torch.int32), torch.tensor([[True] * 6, [False] * 2 + [True] * 4]))
    assert packed_key_start(positions, plain, 6).tolist() == [[0, 0, 0, 3, 3, 5], [0, 0, 0, 0, 0, 0]]
    chunk = AttentionMask(torch.full((2,), 10, dtype=torch.int32))  # a chunk after 10 cached tokens
    assert packed_key_start(positions[:1], chunk, 6).tolist() == [[0, 0, 0, 13, 13, 15]] * 2


def test_a_config_not_set_to_ours_after_patch_still_works():
    """Setting another attn_implementation after patch: the patched modules run it (transformers builds its masks)."""
    patched, stock = models("eager", "torch")
    patched.config._attn_implementation = "sdpa"
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ours, theirs = patched(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=1e-4, atol=1e-5)
    dbrx_fast.unpatch(patched)
    assert patched.config._attn_implementation == "sdpa"  # the user's choice stays
