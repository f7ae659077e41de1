"""The grouped GLU expert forward kernels and the MoE autograd Function against float64 `reference.moe_experts_by_ids`.

The accuracy baseline is stock transformers `DbrxExperts` in the tested dtype (forward, and its autograd for the
gradients). Routing comes from `reference.route` / `reference.dispatch` (or chosen expert ids for the awkward cases),
so these tests need no routing kernel, except the one that runs the real router end to end. Every buffer a launcher
allocates starts as NaN, so an element it forgets to write fails.
"""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from accuracy import EPS, assert_accurate, rel_err
from moe_cases import BY_NAME, CASE_IDS, CASES, GEMM_CLASS_CASES, GEMM_CLASS_IDS, Case
from specialization import compiled_variants, unspecialised
from tf32 import TF32Matmuls, matmul_precision, tf32
from transformers.models.dbrx.modeling_dbrx import DbrxExperts
from triton.runtime import interpreter

from dbrx_fast import reference
from dbrx_fast.kernels import interpreter as gpu_interpreter
from dbrx_fast.kernels import moe_experts as fwd_kernels
from dbrx_fast.kernels import moe_tiles
from dbrx_fast.kernels.autotune import forced_config
from dbrx_fast.kernels.launch import launch
from dbrx_fast.kernels.moe_experts import moe_combine, moe_down, moe_glu_up
from dbrx_fast.kernels.moe_routing import Routing
from dbrx_fast.kernels.moe_tiles import dot
from dbrx_fast.ops.moe import moe_experts_by_routing
from dbrx_fast.ops.routing import route

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# The interpreter runs the backward GEMMs slowly: E = 16 with k = 4 once (one token, so twelve empty experts), then
# empty experts, k = 1 on one expert and k = E.
GRAD_CASES = [BY_NAME[name] for name in ("T1_E16_k4", "empty_experts", "k1_one_expert", "kE")]


def _routing(case: Case, device) -> Routing:
    """Routing metadata as the contract defines it, from the reference router (or forced expert ids)."""
    logits = torch.randn(case.tokens, case.experts, device=device)
    if case.routing == "skewed":
        logits[:, case.experts // 2 :] -= 100.0
    weights, ids = reference.route(logits, case.top_k, 1.0)
    if case.routing == "one":
        ids = torch.full_like(ids, case.experts - 1)
    sorted_slots, expert_offsets = reference.dispatch(ids, case.experts)
    return Routing(weights.float(), ids.to(torch.int32), sorted_slots, expert_offsets)


def _problem(case: Case, dtype: torch.dtype, device):
    """x [T, H] and w1, v1, w2 [E*F, H] scaled so that every intermediate is O(1), plus the routing."""
    x = torch.randn(case.tokens, case.hidden, device=device).to(dtype)
    rows = case.experts * case.ffn
    w1 = (torch.randn(rows, case.hidden, device=device) * case.hidden**-0.5).to(dtype)
    v1 = (torch.randn(rows, case.hidden, device=device) * case.hidden**-0.5).to(dtype)
    w2 = (torch.randn(rows, case.hidden, device=device) * case.ffn**-0.5).to(dtype)
    return x, w1, v1, w2, _routing(case, device)


def _reference64(x, w1, v1, w2, routing, num_experts):
    args = [t.detach().double() for t in (x, w1, v1, w2, routing.weights)]
    return reference.moe_experts_by_ids(*args, routing.expert_ids.long(), num_experts)


def _stock(x, w1, v1, w2, routing, num_experts):
    """Stock DbrxExperts in x's dtype, run on the given tensors (as its parameters) so that autograd reaches them."""
    config = SimpleNamespace(
        hidden_size=x.shape[1],
        ffn_hidden_size=w1.shape[0] // num_experts,
        moe_num_experts=num_experts,
        ffn_act_fn={"name": "silu"},
    )
    experts = DbrxExperts(config).to(device=x.device)
    for name, w in (("w1", w1), ("v1", v1), ("w2", w2)):
        # A plain attribute in place of the parameter: nn.Parameter(w) would be a new leaf, cut off from w.
        delattr(experts.mlp, name)
        setattr(experts.mlp, name, w)
    out = experts(x, routing.expert_ids.long(), routing.weights.to(x.dtype))
    return out.reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_reference(case, dtype, device):
    x, w1, v1, w2, routing = _problem(case, dtype, device)
    out = moe_experts_by_routing(x, w1, v1, w2, routing, case.experts)
    assert out.dtype == dtype and out.shape == x.shape
    with torch.no_grad():
        baseline = _stock(x, w1, v1, w2, routing, case.experts)
    assert_accurate(out, _reference64(x, w1, v1, w2, routing, case.experts), baseline)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_launchers_in_sorted_and_slot_order(dtype, device):
    """h, gate and up row p belong to slot sorted_slots[p]; y row s to slot s, with the routing weight applied."""
    case = Case("stages", 37, 8, 2, routing="skewed")
    x, w1, v1, w2, routing = _problem(case, dtype, device)
    k, slots = case.top_k, routing.sorted_slots.long()
    h, gate, up = moe_glu_up(x, w1, v1, routing.sorted_slots, routing.expert_offsets, k, True)

    experts = routing.expert_ids.reshape(-1).long()[slots]
    rows = experts[:, None] * case.ffn + torch.arange(case.ffn, device=device)
    xs = x.double()[slots // k]
    gate64 = torch.einsum("ph,pfh->pf", xs, w1.double()[rows])
    up64 = torch.einsum("ph,pfh->pf", xs, v1.double()[rows])
    h64 = torch.nn.functional.silu(gate64) * up64
    for name, got, want in (("gate", gate, gate64), ("up", up, up64), ("h", h, h64)):
        assert got.dtype == dtype, name
        assert_accurate(got, want, want.to(dtype))

    h_only, no_gate, no_up = moe_glu_up(x, w1, v1, routing.sorted_slots, routing.expert_offsets, k, False)
    assert no_gate.numel() == 0 and no_up.numel() == 0
    assert torch.equal(h_only, h)

    y = moe_down(h, w2, routing.weights, routing.sorted_slots, routing.expert_offsets, k)
    assert y.dtype == torch.float32
    y64 = torch.empty(case.tokens * k, case.hidden, dtype=torch.float64, device=device)
    y64[slots] = torch.einsum("pf,pfh->ph", h.double(), w2.double()[rows])
    y64 *= routing.weights.double().reshape(-1, 1)
    assert_accurate(y, y64)

    out = moe_combine(y, k, dtype)
    assert_accurate(out, y.double().reshape(case.tokens, k, -1).sum(1), ulps=2)


def test_strided_inputs(device):
    """x with a row stride, weights as transposed and sliced views, routing weights with a column stride."""
    case = Case("strided", 37, 4, 2)
    x, w1, v1, w2, routing = _problem(case, torch.float32, device)
    x_strided = torch.full((case.tokens, case.hidden + 7), float("nan"), device=device)[:, 3 : 3 + case.hidden]
    x_strided.copy_(x)
    w1_t = w1.T.contiguous().T  # stride (1, E*F)
    v1_wide = torch.full((w1.shape[0], case.hidden * 2), float("nan"), device=device)[:, ::2]
    v1_wide.copy_(v1)
    w2_t = w2.T.contiguous().T
    weights_wide = torch.full((case.tokens, 2 * case.top_k), float("nan"), device=device)[:, 1::2]
    weights_wide.copy_(routing.weights)
    strided = routing._replace(weights=weights_wide)
    out = moe_experts_by_routing(x_strided, w1_t, v1_wide, w2_t, strided, case.experts)
    assert torch.equal(out, moe_experts_by_routing(x, w1, v1, w2, routing, case.experts))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_tokens(dtype, device):
    case = Case("empty", 0, 4, 2)
    x, w1, v1, w2, routing = _problem(case, dtype, device)
    out = moe_experts_by_routing(x, w1, v1, w2, routing, case.experts)
    assert out.shape == (0, case.hidden) and out.dtype == dtype
    h, gate, up = moe_glu_up(x, w1, v1, routing.sorted_slots, routing.expert_offsets, 2, True)
    assert h.shape == gate.shape == up.shape == (0, case.ffn)


def test_forward_is_deterministic(device):
    case = Case("det", 19, 16, 4)
    x, w1, v1, w2, routing = _problem(case, torch.bfloat16, device)
    first = moe_experts_by_routing(x, w1, v1, w2, routing, case.experts)
    assert torch.equal(first, moe_experts_by_routing(x, w1, v1, w2, routing, case.experts))


# Corrupt offsets over the 10 sorted rows of T = 5, k = 2, E = 3, and the expert whose result each of rows 1-9 must
# hold ("02": either expert 0's or 2's; None: unspecified). Row 0's slot is made invalid as well.
CORRUPT = {
    # Expert 1 runs backwards (an empty expert), expert 2 runs past T*k (cut there) and overlaps expert 0.
    "backwards_past_end": ([0, 8, 4, 1000], [0, 0, 0, "02", "02", "02", "02", 2, 2]),
    # A count below -BLOCK_M: still empty, so it must not shift expert 2's tiles onto expert 0's (rows 8-9: the
    # launched tiles of expert 2 lie below row 0).
    "very_negative": ([0, 8, -300, 10], [0, 0, 0, 0, 0, 0, 0, None, None]),
}


@pytest.mark.races_allowed("corrupt offsets can give a row to two experts: which store lands last is undefined")
@pytest.mark.parametrize("corrupt", CORRUPT)
def test_corrupt_offsets_stay_in_bounds(device, poisoned, corrupt):
    """Offsets that run backwards or past T*k must neither fault nor write past the buffers (the guard bands of the
    `poisoned` fixture, checked after each launch): a negative count is an empty expert, a run past T*k is cut there,
    rows two experts cover hold one expert's result, and a row whose slot lies outside [0, T*k) is skipped, so it keeps
    its poison, as does the y row of the slot it lost."""
    case = Case("corrupt", 5, 3, 2)
    x, w1, v1, w2, routing = _problem(case, torch.float32, device)
    k, ffn = case.top_k, case.ffn
    offsets, owners = CORRUPT[corrupt]
    offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
    slots = routing.sorted_slots.clone()
    lost = slots[0].item()
    slots[0] = 1 << 30
    h, _, _ = moe_glu_up(x, w1, v1, slots, offsets, k, False)
    y = moe_down(h, w2, routing.weights, slots, offsets, k)
    poisoned.check()
    assert h.shape == (10, ffn) and y.shape == (10, case.hidden)
    assert h[0].isnan().all() and y[lost].isnan().all(), "the row of an invalid slot must stay unwritten"

    def glu(e, rows):  # float64 h of sorted rows as expert e computes them
        xs, w = x.double()[slots[rows].long() // k], slice(e * ffn, (e + 1) * ffn)
        return F.silu(xs @ w1.double()[w].T) * (xs @ v1.double()[w].T)

    def down(e, rows):  # float64 y of those rows' slots from the h stored
        w = slice(e * ffn, (e + 1) * ffn)
        return routing.weights.double().flatten()[slots[rows].long(), None] * (h[rows].double() @ w2.double()[w])

    checked = [i for i, owner in enumerate(owners) if owner is not None]
    rows = torch.tensor(checked, device=device) + 1
    for name, got, want in (("h", h[rows], glu), ("y", y[slots[rows].long()], down)):
        by_expert = {e: want(e, rows) for e in (0, 2)}
        closer = torch.where((got - by_expert[0]).abs() <= (got - by_expert[2]).abs(), by_expert[0], by_expert[2])
        expected = torch.stack(
            [closer[i] if owners[r] == "02" else by_expert[owners[r]][i] for i, r in enumerate(checked)]
        )
        assert_accurate(got, expected, expected.float(), what=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.name for c in GRAD_CASES])
def test_gradients_match_reference(case, dtype, device):
    x, w1, v1, w2, routing = _problem(case, dtype, device)
    leaves = [t.detach().requires_grad_() for t in (x, w1, v1, w2, routing.weights)]
    leaf_routing = routing._replace(weights=leaves[4])
    out = moe_experts_by_routing(*leaves[:4], leaf_routing, case.experts)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.moe_experts_by_ids(*ref_leaves, routing.expert_ids.long(), case.experts)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())

    stock_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    stock = _stock(*stock_leaves[:4], routing._replace(weights=stock_leaves[4]), case.experts)
    stock_grads = torch.autograd.grad(stock, stock_leaves, dout)

    names = ("x", "w1", "v1", "w2", "weights")
    for name, got, want, base, leaf in zip(names, grads, ref_grads, stock_grads, leaves, strict=True):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        if name == "weights":
            # float32, but formed from the gate and up the forward saved in `dtype`: its round-off is dtype's.
            bound = 2 * rel_err(base, want) + 4 * EPS[dtype]
            assert rel_err(got, want) <= bound, f"dweights: relative error {rel_err(got, want):.3g} > {bound:.3g}"
        else:
            try:
                assert_accurate(got, want, base)
            except AssertionError as exc:
                raise AssertionError(f"d{name}: {exc}") from None


def test_gradients_are_deterministic(device):
    case = Case("det", 37, 8, 2, routing="skewed")
    x, w1, v1, w2, routing = _problem(case, torch.bfloat16, device)

    def run():
        leaves = [t.detach().requires_grad_() for t in (x, w1, v1, w2, routing.weights)]
        out = moe_experts_by_routing(*leaves[:4], routing._replace(weights=leaves[4]), case.experts)
        torch.manual_seed(1)
        return torch.autograd.grad(out, leaves, torch.randn_like(out))

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


def test_partial_gradients(device):
    """Only the inputs that need a gradient get one; with none, nothing is saved for a backward."""
    case = Case("partial", 9, 4, 2)
    x, w1, v1, w2, routing = _problem(case, torch.float32, device)
    w2 = w2.detach().requires_grad_()
    out = moe_experts_by_routing(x, w1, v1, w2, routing, case.experts)
    (dw2,) = torch.autograd.grad(out, [w2], torch.ones_like(out))
    w2_64 = w2.detach().double().requires_grad_()
    ref = reference.moe_experts_by_ids(
        x.double(), w1.double(), v1.double(), w2_64, routing.weights.double(), routing.expert_ids.long(), case.experts
    )
    assert_accurate(dw2, torch.autograd.grad(ref, [w2_64], torch.ones_like(ref))[0])

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        moe_experts_by_routing(x, w1, v1, w2.detach(), routing, case.experts)
    assert saved == []


def test_inference_writes_no_preactivations(device, monkeypatch):
    """Under torch.no_grad, parameters that require grad must not make the forward store gate and up."""
    case = Case("no_grad", 9, 4, 2)
    x, w1, v1, w2, routing = _problem(case, torch.float32, device)
    calls = []

    def spy(*args):
        calls.append(args[-1])
        return moe_glu_up(*args)

    monkeypatch.setattr("dbrx_fast.ops.moe.moe_glu_up", spy)
    params = [torch.nn.Parameter(w) for w in (w1, v1, w2)]
    with torch.no_grad():
        moe_experts_by_routing(x, *params, routing, case.experts)
    moe_experts_by_routing(x, *params, routing, case.experts)
    assert calls == [False, True]


def test_saves_no_h_or_y(device):
    """The forward keeps x, gate, up, the weights and the routing metadata, and neither h nor the per-slot y."""
    case = Case("saved", 9, 4, 2)
    x, w1, v1, w2, routing = _problem(case, torch.bfloat16, device)
    leaves = [t.detach().requires_grad_() for t in (x, w1, v1, w2)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        moe_experts_by_routing(*leaves, routing, case.experts)
    shapes = sorted(tuple(t.shape) for t in saved)
    rows, ffn = case.tokens * case.top_k, case.ffn
    assert shapes.count((rows, ffn)) == 2, shapes  # gate and up; h would make a third
    assert all(t.dtype != torch.float32 or t.shape != (rows, case.hidden) for t in saved)
    assert len(saved) == 9


def test_end_to_end_with_the_router(device):
    """Router logits -> routing kernels -> experts, and the gradient back to the logits and x."""
    tokens, experts, top_k, hidden, ffn = 19, 8, 2, 80, 48
    logits = torch.randn(tokens, experts, device=device, requires_grad=True)
    case = Case("e2e", tokens, experts, top_k, hidden, ffn)
    x, w1, v1, w2, _ = _problem(case, torch.float32, device)
    x.requires_grad_()
    out = moe_experts_by_routing(x, w1, v1, w2, route(logits, top_k, 1.0), experts)
    dout = torch.randn_like(out)
    dx, dlogits = torch.autograd.grad(out, [x, logits], dout)

    x64, logits64 = x.detach().double().requires_grad_(), logits.detach().double().requires_grad_()
    weights64, ids = reference.route(logits64, top_k, 1.0)
    ref = reference.moe_experts_by_ids(x64, w1.double(), v1.double(), w2.double(), weights64, ids, experts)
    dx64, dlogits64 = torch.autograd.grad(ref, [x64, logits64], dout.double())
    assert_accurate(out, ref)
    assert_accurate(dx, dx64)
    assert rel_err(dlogits, dlogits64) < 1e-5


def _bad_input_cases(device):
    x = torch.randn(4, 16, device=device)
    w = torch.randn(2 * 8, 16, device=device)
    weights, ids = reference.route(torch.randn(4, 2, device=device), 1, 1.0)
    slots, offsets = reference.dispatch(ids, 2)
    up = dict(x=x, w1=w, v1=w, sorted_slots=slots, expert_offsets=offsets, top_k=1, save_preact=False)
    h = torch.randn(4, 8, device=device)
    down = dict(h=h, w2=w, weights=weights.float(), sorted_slots=slots, expert_offsets=offsets, top_k=1)
    meta = torch.device("meta")
    return [
        (moe_glu_up, {**up, "x": x.double()}, TypeError, "float64"),
        (moe_glu_up, {**up, "x": x.to(torch.int32)}, TypeError, "float16, bfloat16 or float32"),
        (moe_glu_up, {**up, "x": x[None]}, ValueError, r"x must be \[T, H\]"),
        (moe_glu_up, {**up, "w1": w.half()}, TypeError, "must match x"),
        (moe_glu_up, {**up, "v1": w.to(meta)}, TypeError, "must match x"),
        (moe_glu_up, {**up, "w1": w[:, :8]}, ValueError, r"w1 must be \[E\*F, H\]"),
        (moe_glu_up, {**up, "w1": w[:15]}, ValueError, "not a positive multiple of E"),
        (moe_glu_up, {**up, "v1": w[:8]}, ValueError, "same shape"),
        (moe_glu_up, {**up, "sorted_slots": slots.long()}, TypeError, "sorted_slots must be int32"),
        (moe_glu_up, {**up, "expert_offsets": offsets.to(meta)}, ValueError, "expert_offsets is on meta"),
        (moe_glu_up, {**up, "sorted_slots": slots[:3]}, ValueError, "expected T\\*k = 4"),
        (moe_glu_up, {**up, "top_k": 0}, ValueError, "top_k must be at least 1"),
        (moe_glu_up, {**up, "expert_offsets": offsets[:1]}, ValueError, "E\\+1 >= 2"),
        (moe_down, {**down, "h": h.double()}, TypeError, "float64"),
        (moe_down, {**down, "weights": weights.half()}, TypeError, "weights must be float32"),
        (moe_down, {**down, "weights": weights.float().to(meta)}, ValueError, "weights is on meta"),
        (moe_down, {**down, "weights": weights.float()[:, :1].expand(4, 2)}, ValueError, r"\[T, k\] with k = 1"),
        (moe_down, {**down, "h": h[:3]}, ValueError, "expected T\\*k = 4"),
        (moe_down, {**down, "w2": w.half()}, TypeError, "must match h"),
        (moe_down, {**down, "w2": w[:12]}, ValueError, r"w2 must be \[E\*F, H\]"),
        (moe_combine, dict(y=h.half(), top_k=1, out_dtype=torch.float16), TypeError, "y must be float32"),
        (moe_combine, dict(y=h, top_k=3, out_dtype=torch.float16), ValueError, r"\[T\*k, H\] with k = 3"),
        (moe_combine, dict(y=h, top_k=1, out_dtype=torch.float64), TypeError, "out_dtype"),
    ]


def test_bad_input_raises(device):
    for launcher, kwargs, error, match in _bad_input_cases(device):
        with pytest.raises(error, match=match):
            launcher(**kwargs)


def test_functional_checks_num_experts(device):
    case = Case("e", 4, 4, 2)
    x, w1, v1, w2, routing = _problem(case, torch.float32, device)
    with pytest.raises(ValueError, match="expected E\\+1 = 9"):
        moe_experts_by_routing(x, w1, v1, w2, routing, 8)


@pytest.mark.parametrize("dtype, precision, gemm_class, fp32_dot", GEMM_CLASS_CASES, ids=GEMM_CLASS_IDS)
def test_gemm_class_of_each_launch(dtype, precision, gemm_class, fp32_dot, device, monkeypatch):
    """Every GEMM launch takes its dtype's class and FP32_DOT as on a GPU, under the interpreter too: 16 bits on the
    tensor-core path (no fp32 upcast), fp32 in full fp32 only when torch's matmul precision is "highest"."""
    seen = []

    def spy(kernel, grid, *args, **meta):
        seen.append((kernel, meta["FP32_DOT"]))
        launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(moe_tiles, "launch", spy)  # every GEMM launch goes through moe_tiles.launch_gemm
    case = BY_NAME["T37_E4_k2"]
    x, w1, v1, w2, routing = _problem(case, dtype, device)
    with matmul_precision(precision):
        h, _, _ = moe_glu_up(x, w1, v1, routing.sorted_slots, routing.expert_offsets, case.top_k, False)
        moe_down(h, w2, routing.weights, routing.sorted_slots, routing.expert_offsets, case.top_k)
    assert seen == [(fwd_kernels._GLU_UP[gemm_class], fp32_dot), (fwd_kernels._DOWN[gemm_class], fp32_dot)]


@pytest.mark.parametrize("case", [BY_NAME["T37_E4_k2"], BY_NAME["multi_tile"]], ids=["T37_E4_k2", "multi_tile"])
def test_forward_tf32(case, device):
    """fp32 with TF32 allowed: the tf32 dots against float64, judged against stock in fp32 with every matmul operand
    truncated to TF32 as the tensor cores read it (tests/tf32.py). The error must be TF32's, not fp32's: were the dots
    full fp32, the mode would be untested."""
    x, w1, v1, w2, routing = _problem(case, torch.float32, device)
    k = case.top_k
    with matmul_precision("high"):
        h, _, _ = moe_glu_up(x, w1, v1, routing.sorted_slots, routing.expert_offsets, k, False)
        y = moe_down(h, w2, routing.weights, routing.sorted_slots, routing.expert_offsets, k)
    out = moe_combine(y, k, torch.float32)
    with torch.no_grad(), TF32Matmuls():
        baseline = _stock(x, w1, v1, w2, routing, case.experts)
    ref = _reference64(x, w1, v1, w2, routing, case.experts)
    assert_accurate(out, ref, baseline)
    assert rel_err(out, ref) > 2**-16, "TF32 mode multiplied in full fp32"


@triton.jit
def _dot_toy_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr, FP32_DOT: tl.constexpr):
    offs = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
    c = dot(tl.load(a_ptr + offs), tl.load(b_ptr + offs), tl.zeros((N, N), dtype=tl.float32), FP32_DOT)
    tl.store(c_ptr + offs, c)


@pytest.mark.parametrize(
    "dtype, fp32_dot", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, False), (torch.float32, True)]
)
def test_dot_multiplies_as_tensor_cores(dtype, fp32_dot, device, monkeypatch):
    """`dot`, which every expert GEMM uses, on one 32x32 tile: bf16 and fp16 products exact and summed in fp32; fp32
    on operands truncated to TF32, or in full fp32 with FP32_DOT. On a GPU this checks the hardware (TF32 truncation
    included); under the interpreter it checks kernels/interpreter.py's create_dot, and that the interpreter's own
    gets bf16 and TF32 wrong, so that the fix is what makes the 16-bit and TF32 tests mean anything."""
    n = 32
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    c = torch.empty(n, n, device=device)
    _dot_toy_kernel[(1,)](a, b, c, N=n, FP32_DOT=fp32_dot)
    rounded = (a, b) if dtype != torch.float32 or fp32_dot else (tf32(a), tf32(b))
    ref = rounded[0].double() @ rounded[1].double()
    assert_accurate(c, ref)
    if INTERPRETED and (dtype == torch.bfloat16 or (dtype == torch.float32 and not fp32_dot)):
        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", gpu_interpreter.interpreter_create_dot)
        _dot_toy_kernel[(1,)](a, b, c, N=n, FP32_DOT=fp32_dot)
        assert rel_err(c, ref) > 1e-5, "the interpreter's own create_dot is right here: the fix would not matter"


def test_row_counts_are_not_specialised():
    """The row count and its bucket only bound masks, loops and the autotune key: not specialised on, so that a new
    T (1 in decode) compiles nothing."""
    for kernel in (fwd_kernels._moe_glu_up_fwd_kernel, fwd_kernels._moe_down_fwd_kernel):
        assert unspecialised(kernel) == {"num_rows", "rows_bucket"}


@pytest.mark.gpu
def test_new_row_counts_compile_nothing(device):
    """Decode (T = 1) and prefills of any length share each forward kernel's one compiled variant per config."""
    case = BY_NAME["T37_E16_k4"]
    up, down = fwd_kernels._GLU_UP["16bit"], fwd_kernels._DOWN["16bit"]
    counts = []
    with forced_config(up, up.all_configs[0]), forced_config(down, down.all_configs[0]):
        for tokens in (1, 7, 300, 1000):
            x, w1, v1, w2, routing = _problem(Case("rows", tokens, case.experts, case.top_k), torch.bfloat16, device)
            h, _, _ = moe_glu_up(x, w1, v1, routing.sorted_slots, routing.expert_offsets, case.top_k, False)
            moe_down(h, w2, routing.weights, routing.sorted_slots, routing.expert_offsets, case.top_k)
            counts.append((compiled_variants(up), compiled_variants(down)))
    assert counts == counts[:1] * 4
