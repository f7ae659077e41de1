"""The torch grouped MoE path (`dbrx_fast.moe_torch`) against float64 `reference.moe_experts_by_ids`.

Baseline for the tolerance: transformers' stock `DbrxExperts` module run in the same dtype with the same weights
(it takes the routing weights in the activations' dtype, as the stock model produces them).
"""

import functools

import pytest
import torch
from accuracy import assert_accurate, rel_err
from transformers import DbrxConfig
from transformers.models.dbrx.modeling_dbrx import DbrxExperts

from dbrx_fast import moe_torch, reference
from dbrx_fast.moe_torch import moe_experts_grouped_by_ids

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """These ops are tiny: on a small shared CPU, intra-op threads only spin against each other (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(device, dtype, T, H, F, E, k, experts=None):
    """Random activations and weights, and a routing where each token picks k distinct experts.

    `experts` restricts the choice to a subset (the others get no token). Routing weights are positive, drawn at
    random and normalised like DBRX (p = 1), so every slot contributes and a dropped slot shows in the output.
    """
    pool = torch.arange(E) if experts is None else torch.tensor(experts)
    ids = pool[torch.rand(T, len(pool)).argsort(-1)[:, :k]].to(torch.int32)
    weights = torch.rand(T, k) + 0.1
    weights = weights / weights.sum(-1, keepdim=True)
    x = torch.randn(T, H)
    w1, v1, w2 = (torch.randn(E * F, H) / H**0.5 for _ in range(3))
    to = dict(device=device)
    return x.to(dtype=dtype, **to), *(w.to(dtype=dtype, **to) for w in (w1, v1, w2)), weights.to(**to), ids.to(**to)


@functools.cache
def _stock_module(H, F, E, dtype, device):
    cfg = DbrxConfig(d_model=H, n_heads=1, n_layers=1, ffn_config={"ffn_hidden_size": F, "moe_num_experts": E})
    return DbrxExperts(cfg.ffn_config).to(device=device, dtype=dtype)


def _stock(x, w1, v1, w2, weights, ids, E):
    """transformers' DbrxExperts forward with these weights, in x's dtype (the module is built once per shape)."""
    experts = _stock_module(x.shape[1], w1.shape[0] // E, E, x.dtype, x.device)
    for p, w in zip((experts.mlp.w1, experts.mlp.v1, experts.mlp.w2), (w1, v1, w2), strict=True):
        p.grad = None
        with torch.no_grad():
            p.copy_(w)
    return experts, experts(x, ids.long(), weights.to(x.dtype)).reshape(x.shape)


def _ref64(x, w1, v1, w2, weights, ids, E):
    return reference.moe_experts_by_ids(*(t.double() for t in (x, w1, v1, w2, weights)), ids, E)


CASES = {
    # name: (T, H, F, E, k, experts restricted to)
    "ragged": (37, 80, 48, 6, 3, None),
    "one_token": (1, 80, 48, 6, 2, None),
    "k1": (29, 64, 40, 5, 1, None),
    "k_eq_E": (13, 48, 24, 4, 4, None),
    "dbrx_E16_k4": (21, 64, 32, 16, 4, None),
    "empty_experts": (25, 56, 40, 8, 2, [1, 4, 6]),
    "all_on_one_expert": (17, 48, 32, 4, 1, [2]),
    "unaligned_widths": (19, 44, 36, 4, 2, None),
}


def _draws(tokens: int) -> int:
    """Independent input draws for one check: enough that about 32 tokens are compared in all.

    The tolerance is twice stock's error, judged by the maximum error over max |reference|. Over a handful of
    numbers (one token's k routing-weight gradients, dot products over H that can cancel) both sides of that
    comparison are noisy and stock is sometimes lucky by more than 2x; pooling independent draws steadies them.
    """
    return -(-32 // max(tokens, 1))


def _assert_pooled(name: str, outs: list, refs: list, stocks: list):
    """`assert_accurate` on the draws flattened and concatenated: one comparison over all of them."""
    try:
        assert_accurate(*(torch.cat([t.detach().flatten() for t in ts]) for ts in (outs, refs, stocks)))
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(device, dtype, case):
    T, H, F, E, k, experts = CASES[case]
    outs, refs, stocks = [], [], []
    for _ in range(_draws(T)):
        x, w1, v1, w2, weights, ids = _inputs(device, dtype, T, H, F, E, k, experts)
        outs.append(moe_experts_grouped_by_ids(x, w1, v1, w2, weights, ids, E))
        assert outs[-1].dtype == dtype and outs[-1].shape == (T, H)
        refs.append(_ref64(x, w1, v1, w2, weights, ids, E))
        stocks.append(_stock(x, w1, v1, w2, weights, ids, E)[1])
    _assert_pooled("out", outs, refs, stocks)


GRAD_NAMES = ("x", "w1", "v1", "w2", "weights")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["ragged", "k1", "k_eq_E", "empty_experts", "one_token"])
def test_gradients_match_float64_autograd(device, dtype, case):
    T, H, F, E, k, experts = CASES[case]
    grads = {name: ([], [], []) for name in GRAD_NAMES}  # ours, float64 reference, stock
    for _ in range(_draws(T)):
        x, w1, v1, w2, weights, ids = _inputs(device, dtype, T, H, F, E, k, experts)
        grad_out = torch.randn(T, H, device=device, dtype=dtype)

        leaves = [t.detach().clone().requires_grad_() for t in (x, w1, v1, w2, weights)]
        moe_experts_grouped_by_ids(*leaves, ids, E).backward(grad_out)

        leaves64 = [t.detach().double().requires_grad_() for t in (x, w1, v1, w2, weights)]
        reference.moe_experts_by_ids(*leaves64, ids, E).backward(grad_out.double())

        sx = x.detach().clone().requires_grad_()
        sw = weights.detach().to(dtype).requires_grad_()
        module, stock = _stock(sx, w1, v1, w2, sw, ids, E)
        stock.backward(grad_out)
        stock_grads = [sx.grad, module.mlp.w1.grad, module.mlp.v1.grad, module.mlp.w2.grad, sw.grad]

        for name, ours, ref, base in zip(GRAD_NAMES, leaves, leaves64, stock_grads, strict=True):
            assert ours.grad is not None and ours.grad.dtype == ours.dtype, name
            for pool, t in zip(grads[name], (ours.grad, ref.grad, base), strict=True):
                pool.append(t)

        for e in sorted(set(range(E)) - set(experts or range(E))):
            rows = slice(e * F, (e + 1) * F)
            for w in leaves[1:4]:
                assert torch.equal(w.grad[rows], torch.zeros_like(w.grad[rows])), f"expert {e} has no token"

    for name in GRAD_NAMES:
        _assert_pooled(f"grad of {name}", *grads[name])


def _cpu_grouped_mm_works() -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        torch._grouped_mm(torch.ones(2, 8), torch.ones(1, 8, 8), offs=torch.tensor([2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _cpu_grouped_mm_works(), reason="this torch has no CPU torch._grouped_mm to force the path")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["ragged", "empty_experts", "one_token"])
def test_grouped_mm_path_forced_on_cpu(monkeypatch, dtype, case):
    """The grouped_mm branch (expert views, offsets, transposes) runs on a GPU only; torch's CPU fallback of
    `_grouped_mm` lets it be checked here, forward and gradients, against float64 autograd of the reference. The
    baseline is the loop path in the same dtype (itself checked against stock above)."""
    T, H, F, E, k, experts = CASES[case]
    x, w1, v1, w2, weights, ids = _inputs("cpu", dtype, T, H, F, E, k, experts)
    grad_out = torch.randn(T, H, dtype=dtype)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, w1, v1, w2, weights)]
        out = moe_experts_grouped_by_ids(*leaves, ids, E)
        out.backward(grad_out)
        return [out] + [t.grad for t in leaves]

    loop = run()
    monkeypatch.setattr(moe_torch, "_grouped_mm_ok", lambda *args: True)
    grouped = run()
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w1, v1, w2, weights)]
    ref = reference.moe_experts_by_ids(*leaves64, ids, E)
    ref.backward(grad_out.double())
    refs = [ref] + [t.grad for t in leaves64]
    for name, ours, r, base in zip(("out", "x", "w1", "v1", "w2", "weights"), grouped, refs, loop, strict=True):
        try:
            assert_accurate(ours, r, base)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_grouped_mm_gate_on_cpu_is_off():
    x, w1, v1, w2, *_ = _inputs("cpu", torch.bfloat16, 4, 64, 32, 4, 2)
    assert not moe_torch._grouped_mm_ok(x, 32, w1, v1, w2)


@pytest.mark.gpu
def test_grouped_mm_gate_on_gpu():
    """bf16 on sm_90/sm_100 with 16-byte aligned widths takes the grouped GEMM; unaligned widths or fp32 do not."""
    x, w1, v1, w2, *_ = _inputs("cuda", torch.bfloat16, 4, 64, 32, 4, 2)
    fused = torch.cuda.get_device_capability()[0] in (9, 10)
    assert moe_torch._grouped_mm_ok(x, 32, w1, v1, w2) == fused
    assert not moe_torch._grouped_mm_ok(x.float(), 32, w1.float(), v1.float(), w2.float())
    x, w1, v1, w2, *_ = _inputs("cuda", torch.bfloat16, 4, 64, 36, 4, 2)
    assert not moe_torch._grouped_mm_ok(x, 36, w1, v1, w2)


def test_every_intermediate_row_is_written(device):
    """Buffers the path allocates uninitialised (slot-order outputs and gradients) come back NaN-filled (the
    `poisoned` fixture): a row left unwritten would show as NaN in the output or a gradient."""
    x, w1, v1, w2, weights, ids = _inputs(device, torch.float32, 23, 48, 24, 6, 3, [0, 3, 5])
    leaves = [t.requires_grad_() for t in (x, w1, v1, w2, weights)]
    out = moe_experts_grouped_by_ids(*leaves, ids, 6)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all()
    for t in leaves:
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic(device, dtype):
    x, w1, v1, w2, weights, ids = _inputs(device, dtype, 41, 64, 40, 8, 4)
    grad_out = torch.randn(41, 64, device=device, dtype=dtype)
    results = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w1, v1, w2, weights)]
        out = moe_experts_grouped_by_ids(*leaves, ids, 8)
        out.backward(grad_out)
        results.append([out] + [t.grad for t in leaves])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_no_tokens(device):
    x, w1, v1, w2, weights, ids = _inputs(device, torch.float32, 0, 32, 16, 4, 2)
    out = moe_experts_grouped_by_ids(x, w1, v1, w2, weights, ids, 4)
    assert out.shape == (0, 32) and out.dtype == torch.float32


def test_float64_inputs_match_reference(device):
    """float64 goes through the loop path in float64 (the patcher's fallback for float64 models)."""
    x, w1, v1, w2, weights, ids = _inputs(device, torch.float64, 15, 40, 24, 4, 2)
    out = moe_experts_grouped_by_ids(x, w1, v1, w2, weights, ids, 4)
    assert rel_err(out, _ref64(x, w1, v1, w2, weights, ids, 4)) < 1e-12


def test_bad_input_raises(device):
    x, w1, v1, w2, weights, ids = _inputs(device, torch.float32, 5, 32, 16, 4, 2)
    with pytest.raises(ValueError, match="x must be 2-D"):
        moe_experts_grouped_by_ids(x[None], w1, v1, w2, weights, ids, 4)
    with pytest.raises(TypeError, match="x must be a floating"):
        moe_experts_grouped_by_ids(x.long(), w1, v1, w2, weights, ids, 4)
    with pytest.raises(ValueError, match=r"w1 must be \[E\*F, H\]"):
        moe_experts_grouped_by_ids(x, w1[:, :16], v1, w2, weights, ids, 4)
    with pytest.raises(ValueError, match=r"v1 must be \[E\*F, H\]"):
        moe_experts_grouped_by_ids(x, w1, v1[:-1], w2, weights, ids, 4)
    with pytest.raises(ValueError, match="w2 has shape"):
        moe_experts_grouped_by_ids(x, w1, v1, torch.cat((w2, w2)), weights, ids, 4)
    with pytest.raises(ValueError, match="must be \\[E\\*F, H\\]"):
        moe_experts_grouped_by_ids(x, w1, v1, w2, weights, ids, 3)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        moe_experts_grouped_by_ids(x, w1, v1, w2, weights, ids, 0)
    with pytest.raises(TypeError, match="v1 has dtype"):
        moe_experts_grouped_by_ids(x, w1, v1.double(), w2, weights, ids, 4)
    with pytest.raises(TypeError, match="expert_ids must be an integer"):
        moe_experts_grouped_by_ids(x, w1, v1, w2, weights, ids.float(), 4)
    with pytest.raises(ValueError, match="expert_ids must be"):
        moe_experts_grouped_by_ids(x, w1, v1, w2, weights, ids[:-1], 4)
    with pytest.raises(ValueError, match="weights has shape"):
        moe_experts_grouped_by_ids(x, w1, v1, w2, weights[:, :1], ids, 4)
    with pytest.raises(TypeError, match="weights must be a floating"):
        moe_experts_grouped_by_ids(x, w1, v1, w2, ids, ids, 4)


@pytest.mark.gpu
def test_device_mismatch_raises():
    x, w1, v1, w2, weights, ids = _inputs("cuda", torch.bfloat16, 5, 32, 16, 4, 2)
    with pytest.raises(ValueError, match="w2 is on cpu"):
        moe_experts_grouped_by_ids(x, w1, v1, w2.cpu(), weights, ids, 4)
    with pytest.raises(ValueError, match="expert_ids is on cpu"):
        moe_experts_grouped_by_ids(x, w1, v1, w2, weights, ids.cpu(), 4)
