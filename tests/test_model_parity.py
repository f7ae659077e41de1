"""Patched vs stock on tiny random DBRX models: logits, loss, every gradient, aux loss, greedy generation.

The oracle is the stock model in float64. The patched model in fp32 must be no further from it than about twice
the stock fp32 model (plus round-off), for both backends; the triton backend runs its kernels through the
interpreter on a machine without a GPU. fp32 only: in bf16, stock takes the router softmax in bf16 and may choose
other experts than dbrx-fast's fp32 routing (the kernel tests cover bf16 against a reference with the same choices).
"""

import copy

import pytest
import torch
from accuracy import assert_accurate
from models import tiny_config, tiny_model
from transformers.models.dbrx.modeling_dbrx import DbrxPreTrainedModel

import dbrx_fast

CONFIGS = {
    # GQA ratio 1, top-1 of 4 experts, no normalisation, clip 8
    "gqa1-e4k1-clip8-pnone": dict(n_heads=4, kv_n_heads=4, experts=4, top_k=1, clip_qkv=8.0, normalize=None),
    # GQA ratio 2, a clip that never binds, L1 normalisation (DBRX's)
    "gqa2-e4k2-clipbig-p1": dict(n_heads=4, kv_n_heads=2, experts=4, top_k=2, clip_qkv=1e4, normalize=1.0),
    # GQA ratio 4, DBRX's 16 experts top-4, L2 normalisation
    "gqa4-e16k4-clip8-p2": dict(n_heads=8, kv_n_heads=2, experts=16, top_k=4, clip_qkv=8.0, normalize=2.0),
    # 16 experts top-1; a clip small enough to bind on many q/k/v values
    "gqa2-e16k1-clip0.5-p1": dict(n_heads=4, kv_n_heads=2, experts=16, top_k=1, clip_qkv=0.5, normalize=1.0),
    # k = E (every token on every expert), top-2 of 16 with no normalisation
    "gqa4-e4k4-p2": dict(n_heads=4, kv_n_heads=1, experts=4, top_k=4, clip_qkv=8.0, normalize=2.0),
    "gqa1-e16k2-pnone": dict(n_heads=2, kv_n_heads=2, experts=16, top_k=2, clip_qkv=8.0, normalize=None),
}
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def three_models(config_kw: dict, backend: str, device: torch.device, **extra):
    """(patched fp32, stock fp32, stock float64) with the same weights, on `device`."""
    stock = tiny_model(tiny_config(**config_kw, **extra)).to(device)
    oracle = copy.deepcopy(stock).double()
    patched = dbrx_fast.patch(copy.deepcopy(stock), backend=backend)
    return patched, stock, oracle


def run(model, ids, labels):
    out = model(ids, labels=labels)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config_kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_logits_loss_and_every_gradient(config_kw, backend, device):
    patched, stock, oracle = three_models(config_kw, backend, device)
    ids = torch.randint(0, 97, (2, 13), device=device)
    labels = torch.randint(0, 97, (2, 13), device=device)
    out, grads = run(patched, ids, labels)
    base, base_grads = run(stock, ids, labels)
    ref, ref_grads = run(oracle, ids, labels)

    assert_accurate(out.logits, ref.logits, base.logits)
    assert_accurate(out.loss.reshape(1), ref.loss.reshape(1), base.loss.reshape(1))
    # With top-1 routing and normalisation the router's gradient is zero in exact arithmetic (w / |w| = 1), so in any
    # dtype it is round-off noise: measure such a gradient against the scale of the model's gradients instead.
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient"
        floor = scale if ref_grads[name].abs().max() < 1e-9 * scale else 1e-30
        assert_accurate(grad, ref_grads[name], base_grads[name], floor=floor, what=name)


@pytest.mark.skipif(
    "router_logits" not in DbrxPreTrainedModel._can_record_outputs,
    reason="this transformers version does not record router logits, so stock itself cannot compute the aux loss",
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_router_logits_and_aux_loss(backend, device):
    patched, stock, oracle = three_models(CONFIGS["gqa4-e16k4-clip8-p2"], backend, device)
    ids = torch.randint(0, 97, (2, 11), device=device)
    out, base, ref = (m(ids, labels=ids, output_router_logits=True) for m in (patched, stock, oracle))
    assert len(out.router_logits) == patched.config.n_layers
    for name in ("loss", "aux_loss"):
        assert_accurate(getattr(out, name).reshape(1), getattr(ref, name).reshape(1), getattr(base, name).reshape(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_generate_with_cache_on_a_left_padded_batch(attn, backend, device):
    config_kw = CONFIGS["gqa4-e16k4-clip8-p2"]
    patched, stock, _ = three_models(config_kw, backend, device)
    for model in (patched, stock):
        model.config._attn_implementation = attn
    ids = torch.randint(1, 97, (2, 9), device=device)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # the first row is left-padded
    ids[0, :4] = 0

    with torch.no_grad():
        logits = patched(ids, attention_mask=mask).logits
        stock_logits = stock(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], stock_logits[real], rtol=1e-4, atol=1e-5)

    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = patched.generate(ids, **kwargs)
    assert torch.equal(tokens, stock.generate(ids, **kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_jitter_in_training_keeps_stock_semantics(backend, device):
    """The stock router multiplies its input by noise in place, so the experts see the jittered tokens too."""
    patched, stock, _ = three_models(CONFIGS["gqa2-e4k2-clipbig-p1"], backend, device, moe_jitter_eps=0.05)
    ids = torch.randint(0, 97, (2, 7), device=device)
    results = []
    for model in (patched, stock):
        model.train()
        torch.manual_seed(1234)  # the same noise for both
        results.append(run(model, ids, ids))
    (out, grads), (base, base_grads) = results
    torch.testing.assert_close(out.logits, base.logits, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, base_grads[name], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_attentions_and_hidden_states_match_stock(backend, device):
    patched, stock, _ = three_models(CONFIGS["gqa2-e4k2-clipbig-p1"], backend, device)
    ids = torch.randint(0, 97, (2, 8), device=device)
    with torch.no_grad():
        out = patched(ids, output_attentions=True, output_hidden_states=True)
        base = stock(ids, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == len(base.attentions) == patched.config.n_layers
    for ours, theirs in zip(out.attentions + out.hidden_states, base.attentions + base.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
