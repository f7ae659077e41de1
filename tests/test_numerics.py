"""NaN and inf in router logits and activations: exactly which outputs turn NaN (or non-finite), and every other
output bitwise the clean run's; never a wrong finite value.

A GPU's floating max ignores NaN (PTX max.f32) where other rules propagate it, and Triton 3.6's interpreter follows
the other rule for tl.maximum. So every test here runs under both (kernels/interpreter.py's `nan_rule`): a result
that depended on the rule would fail one of them. On a GPU only the hardware's rule runs, and the toy kernel checks
that it is the one `nan_rule("gpu")` emulates. `test_sm90_ptx` compiles the kernels for sm_90 and checks the
instructions these results rest on.
"""

import math
import os
import re
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from accuracy import assert_accurate

from dbrx_fast import reference
from dbrx_fast.inspect import inspect_specs
from dbrx_fast.kernels import layernorm, moe_routing, rope
from dbrx_fast.kernels.interpreter import nan_rule
from dbrx_fast.kernels.layernorm import layernorm_bwd, layernorm_fwd
from dbrx_fast.kernels.moe_routing import route_bwd, route_fwd
from dbrx_fast.kernels.rope import rope as rope_kernel

pytestmark = pytest.mark.interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
NAN, INF = float("nan"), float("inf")


# Not the id "gpu": conftest skips any test with that keyword on a machine without CUDA.
@pytest.fixture(params=["gpu", "propagate"], ids=["gpu-rule", "propagate-rule"])
def max_rule(request):
    """The NaN rule of the interpreter's floating max and min for this test (see kernels/interpreter.py)."""
    if not INTERPRETED:
        if request.param != "gpu":
            pytest.skip("a GPU has one NaN rule for max, its own")
        yield request.param
        return
    with nan_rule(request.param):
        yield request.param


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())


@triton.jit
def _max_toy(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr, tl.max(x, axis=0))
    tl.store(out_ptr + 1, tl.min(x, axis=0))
    tl.store(out_ptr + 2 + offs, tl.maximum(x, 0.0))
    tl.store(out_ptr + 2 + N + offs, tl.minimum(x, 0.0))


def test_nan_rule_is_in_force(max_rule, device):
    """The rule the other tests run under is really the one in force: tl.max / tl.min and tl.maximum / tl.minimum on
    [1, NaN, -1, 2]. On a GPU this checks that its max ignores NaN, as nan_rule("gpu") emulates."""
    x = torch.tensor([1.0, NAN, -1.0, 2.0], device=device)
    out = torch.full((10,), -7.0, device=device)
    _max_toy[(1,)](x, out, N=4)
    if max_rule == "gpu":
        expected = [2.0, -1.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0, -1.0, 0.0]
    else:
        expected = [NAN, NAN, 1.0, NAN, 0.0, 2.0, 0.0, NAN, -1.0, 0.0]
    assert torch.allclose(out.cpu(), torch.tensor(expected), rtol=0, atol=0, equal_nan=True), out.tolist()


# Routing: 300 tokens are three blocks of 128 at E = 16; rows in the first, second and last block are hit.
T, E, K = 300, 16, 4
ROWS = [5, 140, 299]


def _one(value):
    def hit(logits):
        for r in ROWS:
            logits[r, torch.randint(0, E, ()).item()] = value
        return ROWS

    return hit


def _row_of(value):
    def hit(logits):
        logits[ROWS] = value
        return ROWS

    return hit


def _nan_and_inf(logits):
    """Two NaN then two +inf: NaN first (lower index first), then +inf, although +inf sits at lower indices."""
    logits[ROWS, 9] = logits[ROWS, 3] = NAN
    logits[ROWS, 0] = logits[ROWS, 6] = INF
    return ROWS


def _signed_zeros(logits):
    """-0.0 ties +0.0, as in torch.sort: a row of alternating zeros takes experts 0..k-1 with equal weights."""
    logits[ROWS] = torch.tensor([0.0, -0.0] * (E // 2), dtype=logits.dtype)
    return ROWS


def _nan_every_token(logits):
    logits[torch.arange(T), torch.randint(0, E, (T,))] = NAN
    return list(range(T))


def _all_nan(logits):
    """Every logit NaN: every token takes experts 0..k-1."""
    logits.fill_(NAN)
    return list(range(T))


ROUTING_CASES = {
    "nan": _one(NAN),
    "+inf": _one(INF),
    "-inf": _one(-INF),
    "-inf-row": _row_of(-INF),
    "nan-and-inf": _nan_and_inf,
    "signed-zeros": _signed_zeros,
    "nan-every-token": _nan_every_token,
    "all-nan": _all_nan,
}


@pytest.mark.parametrize("case", list(ROUTING_CASES))
@pytest.mark.parametrize(
    "dtype, normalize_p", [(BF16, 1.0), (FP32, 3.5), (FP16, None)], ids=["bf16-p1", "fp32-p3.5", "fp16-none"]
)
def test_routing(max_rule, device, case, dtype, normalize_p):
    """A token with a NaN or +inf logit, or only -inf ones, gets NaN weights and NaN logit gradients; its expert ids
    are torch.sort's (NaN first), valid experts; every other token's weights, ids and gradients are the clean run's.
    Nothing is ever inf."""
    clean = torch.randn(T, E, device=device).to(dtype)
    logits = clean.clone()
    hit = torch.zeros(T, dtype=torch.bool, device=device)
    hit[ROUTING_CASES[case](logits)] = True
    r, c = route_fwd(logits, K, normalize_p), route_fwd(clean, K, normalize_p)

    ref_w, ref_ids = reference.route(logits.double(), K, normalize_p)
    assert bitwise_equal(r.expert_ids.long(), ref_ids)
    slots, offsets = reference.dispatch(ref_ids, E)
    assert bitwise_equal(r.sorted_slots, slots) and bitwise_equal(r.expert_offsets, offsets)
    if case == "nan-and-inf":
        assert r.expert_ids[ROWS].tolist() == [[3, 9, 0, 6]] * len(ROWS)
    if case == "all-nan":
        assert r.expert_ids.tolist() == [list(range(K))] * T

    bad = logits.isnan().any(1) | logits.isposinf().any(1) | logits.isneginf().all(1)
    assert bitwise_equal(r.weights.isnan(), bad[:, None].expand(T, K))
    assert bitwise_equal(ref_w.isnan(), r.weights.isnan())
    assert not r.weights.isinf().any()
    keep = ~hit
    assert bitwise_equal(r.weights[keep], c.weights[keep]) and bitwise_equal(r.expert_ids[keep], c.expert_ids[keep])
    finite = hit & ~bad
    if finite.any():  # a -inf among finite logits, signed zeros: ordinary weights
        base_w, _ = reference.route(logits, K, normalize_p)
        assert_accurate(r.weights[finite], ref_w[finite], base_w[finite], ulps=8)

    g = torch.randn(T, K, device=device)
    grad = route_bwd(g, logits, r.expert_ids, r.weights, normalize_p)
    grad_clean = route_bwd(g, clean, c.expert_ids, c.weights, normalize_p)
    assert bitwise_equal(grad.isnan(), bad[:, None].expand(T, E))
    assert not grad.isinf().any()
    assert bitwise_equal(grad[keep], grad_clean[keep])


# LayerNorm: C = 100 is one chunk; C = 9000 takes the chunked forward (C > 8192) and backward (unaligned C > 4096).
N_ROWS, ROW, COL = 6, 2, 17


def _layernorm_inputs(device, n_cols, dtype):
    x = (torch.randn(N_ROWS, n_cols, device=device) + 3.0).to(dtype)
    weight = (1.0 + 0.1 * torch.randn(n_cols, device=device)).to(dtype)
    dy = torch.randn(N_ROWS, n_cols, device=device).to(dtype)
    return x, weight, dy


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize(
    "n_cols, dtype", [(100, FP32), (100, BF16), (9000, FP32)], ids=["100-fp32", "100-bf16", "9000-fp32"]
)
def test_layernorm_nonfinite_x(max_rule, device, value, n_cols, dtype):
    """x[r, c] NaN or +-inf: row r of y, mean, rstd and dx all NaN; dweight all NaN (every column's sum holds row
    r's xhat), as in torch; every other row of y and dx bitwise the clean run's."""
    clean, weight, dy = _layernorm_inputs(device, n_cols, dtype)
    x = clean.clone()
    x[ROW, COL] = value
    y, mean, rstd = layernorm_fwd(x, weight, 1e-5)
    y_c, mean_c, rstd_c = layernorm_fwd(clean, weight, 1e-5)
    rows = torch.arange(N_ROWS, device=device) == ROW
    assert bitwise_equal(y.isnan(), rows[:, None].expand_as(y))
    assert bitwise_equal(mean.isnan(), rows) and bitwise_equal(rstd.isnan(), rows)
    assert bitwise_equal(reference.layer_norm(x.double(), weight.double(), 1e-5).isnan(), y.isnan())
    for out, out_c in ((y, y_c), (mean, mean_c), (rstd, rstd_c)):
        assert bitwise_equal(out[~rows], out_c[~rows])

    dx, dw = layernorm_bwd(dy, x, weight, mean, rstd)
    dx_c, _ = layernorm_bwd(dy, clean, weight, mean_c, rstd_c)
    assert bitwise_equal(dx.isnan(), rows[:, None].expand_as(dx))
    assert dw.isnan().all()
    assert bitwise_equal(dx[~rows], dx_c[~rows])


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "+inf"])
@pytest.mark.parametrize("n_cols", [100, 9000])
def test_layernorm_nonfinite_grad(max_rule, device, value, n_cols):
    """dy[r, c] NaN or inf: row r of dx non-finite (NaN for a NaN), column c of dweight non-finite; every other row of
    dx and column of dweight bitwise the clean run's."""
    x, weight, clean = _layernorm_inputs(device, n_cols, FP32)
    dy = clean.clone()
    dy[ROW, COL] = value
    _, mean, rstd = layernorm_fwd(x, weight, 1e-5)
    dx, dw = layernorm_bwd(dy, x, weight, mean, rstd)
    dx_c, dw_c = layernorm_bwd(clean, x, weight, mean, rstd)
    rows = torch.arange(N_ROWS, device=device) == ROW
    cols = torch.arange(n_cols, device=device) == COL
    bad_dx = dx.isnan() if math.isnan(value) else ~dx.isfinite()
    bad_dw = dw.isnan() if math.isnan(value) else ~dw.isfinite()
    assert bitwise_equal(bad_dx, rows[:, None].expand_as(dx)) and bitwise_equal(bad_dw, cols)
    assert bitwise_equal(dx[~rows], dx_c[~rows]) and bitwise_equal(dw[~cols], dw_c[~cols])


# RoPE: one spot in each half of q's head dimension and one in k; position 0 has sin = 0 exactly, so an inf there
# meets inf * 0 = NaN.
B, HQ, HKV, S, D = 2, 4, 2, 37, 64
Q_SPOTS, K_SPOTS = [(1, 2, 0, 3), (0, 1, 20, 40)], [(1, 1, 36, 63)]


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_rope(max_rule, device, value, backward, dtype):
    """x[b, h, s, d] NaN or +-inf: exactly out[b, h, s, d] and its rotation partner d +- D/2 are non-finite, NaN
    exactly where the float32 torch rotation gives NaN; every other output bitwise the clean run's."""
    q_c = torch.randn(B, HQ, S, D, device=device).to(dtype)
    k_c = torch.randn(B, HKV, S, D, device=device).to(dtype)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=FP32, device=device) / D)
    cos, sin = reference.rope_cos_sin(torch.arange(S, device=device)[None], inv_freq)
    q, k = q_c.clone(), k_c.clone()
    expected = []
    for x, spots in ((q, Q_SPOTS), (k, K_SPOTS)):
        mask = torch.zeros(x.shape, dtype=torch.bool, device=device)
        for b, h, s, d in spots:
            x[b, h, s, d] = value
            mask[b, h, s, d] = mask[b, h, s, (d + D // 2) % D] = True
        expected.append(mask)
    outs = rope_kernel(q, k, cos, sin, backward=backward)
    outs_c = rope_kernel(q_c, k_c, cos, sin, backward=backward)
    refs = reference.rope(q.float(), k.float(), cos, -sin if backward else sin)
    for out, out_c, ref, mask in zip(outs, outs_c, refs, expected, strict=True):
        assert bitwise_equal(~out.isfinite(), mask)
        assert bitwise_equal(out.isnan(), ref.isnan())
        assert bitwise_equal(out[~mask], out_c[~mask])


def ptx_specs():
    """Spec source for test_sm90_ptx's compile subprocess: routing with the general p (softmax, p-norm and ranking),
    its backward, and one launch of each RoPE and LayerNorm kernel."""
    prefixes = ("route_fwd fp32 E=256 NORM=3", "route_bwd fp32 E=256 NORM=3", "rope fp32 D=128 backward=False")
    prefixes += ("layernorm_fwd fp32 C=6144", "layernorm_bwd fp32 C=6144")
    specs = moe_routing.compile_specs() + rope.compile_specs() + layernorm.compile_specs()
    return [next(s for s in specs if s.name.startswith(p)) for p in prefixes]


def test_sm90_ptx(monkeypatch, tmp_path):
    """What the results above rest on, in the code a GPU runs:
    - routing ranks experts by integer keys (max.s32 / min.s32) and tests NaN on the bits (magnitude > 0x7F800000);
    - its float maxes are max.f32, which ignores NaN: the rule nan_rule("gpu") emulates, and the softmax's and
      p-norm's outputs do not depend on it (the tests pass under both rules);
    - RoPE and LayerNorm take no float max or min at all."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    records = inspect_specs(archs=(90,), source=f"{__file__}:ptx_specs")
    assert len(records) == 5 and not [r.problems for r in records if r.problems]
    ptx = {p.stem: p.read_text() for p in Path(tmp_path).rglob("*.ptx")}
    float_minmax = re.compile(r"\b(max|min)(\.NaN|\.xorsign\.abs|\.ftz)*\.f(16|32)")
    for name in ("_route_fwd_kernel", "_route_bwd_kernel"):
        found = set(m.group(0) for m in float_minmax.finditer(ptx[name]))
        assert found == {"max.f32"}, f"{name}: {found}"
    assert "max.s32" in ptx["_route_fwd_kernel"] and "min.s32" in ptx["_route_fwd_kernel"]
    assert re.search(r"setp\.gt\.[us]32\s+%p\d+, %r\d+, 2139095040;", ptx["_route_fwd_kernel"])
    for name in ("_rope_kernel", "_layernorm_fwd_kernel", "_layernorm_bwd_kernel"):
        assert not float_minmax.search(ptx[name]), name
