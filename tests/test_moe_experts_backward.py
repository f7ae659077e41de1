"""The grouped GLU expert backward kernels against float64 autograd.

Inputs come from `reference.route` / `reference.dispatch`, and the forward's saved gate and up are formed with torch,
so these tests need no forward kernel. Each launcher is compared with float64 autograd of the same sorted-order chain
(checked once against `reference.moe_experts_by_ids`, end to end), with stock eager autograd in the tested dtype as the
accuracy baseline. Every buffer a launcher allocates is filled with NaN first, so an element it forgets to write fails.
"""

import contextlib
import inspect
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from accuracy import EPS, assert_accurate, rel_err
from moe_cases import BY_NAME, CASE_IDS, CASES, GEMM_CLASS_CASES, GEMM_CLASS_IDS, Case
from specialization import compiled_variants, unspecialised
from tf32 import TF32Matmuls, matmul_precision

from dbrx_fast import reference
from dbrx_fast.kernels import moe_input_grads as input_grads
from dbrx_fast.kernels import moe_tiles
from dbrx_fast.kernels import moe_weight_grads as weight_grads
from dbrx_fast.kernels.autotune import forced_config
from dbrx_fast.kernels.launch import launch
from dbrx_fast.kernels.moe_input_grads import moe_down_bwd, moe_up_dgrad
from dbrx_fast.kernels.moe_tiles import config
from dbrx_fast.kernels.moe_weight_grads import moe_down_wgrad, moe_up_wgrad

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@dataclass
class Problem:
    x: torch.Tensor
    w1: torch.Tensor
    v1: torch.Tensor
    w2: torch.Tensor
    weights: torch.Tensor
    expert_ids: torch.Tensor
    sorted_slots: torch.Tensor
    expert_offsets: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    dout: torch.Tensor
    top_k: int
    num_experts: int


def _logits(case: Case, device) -> torch.Tensor:
    logits = torch.randn(case.tokens, case.experts, device=device)
    if case.routing == "skewed":
        logits[:, case.experts // 2 :] -= 30.0
    elif case.routing == "one":
        # The same top_k experts for every token (expert 1 first), in random order of preference.
        logits[:, 1 : 1 + case.top_k] += 30.0
    return logits


def _up_chain(x, w1, v1, sorted_slots, expert_offsets, top_k):
    """(gate, up) [T*k, F] in sorted order, differentiable: gate[p] = x[t] @ w1_e.T, up[p] = x[t] @ v1_e.T."""
    ffn = w1.shape[0] // (expert_offsets.numel() - 1)
    xs = x[sorted_slots.long() // top_k]
    offsets = expert_offsets.tolist()
    gate, up = [], []
    for e, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        gate.append(xs[a:b] @ w1[e * ffn : (e + 1) * ffn].T)
        up.append(xs[a:b] @ v1[e * ffn : (e + 1) * ffn].T)
    return torch.cat(gate), torch.cat(up)


def _down_chain(gate, up, w2, weights, sorted_slots, expert_offsets, top_k):
    """out [T, H], differentiable: out[t] = sum_j weights[t, j] * (silu(gate[p]) * up[p]) @ w2_e, p the sorted row of
    slot t*k + j."""
    ffn = gate.shape[1]
    h = F.silu(gate) * up
    offsets = expert_offsets.tolist()
    bounds = zip(offsets[:-1], offsets[1:], strict=True)
    y = torch.cat([h[a:b] @ w2[e * ffn : (e + 1) * ffn] for e, (a, b) in enumerate(bounds)])
    slots = sorted_slots.long()
    inverse = torch.empty_like(slots)
    inverse[slots] = torch.arange(slots.numel(), device=slots.device)
    y = y[inverse] * weights.reshape(-1, 1)
    return y.view(weights.shape[0], top_k, -1).sum(1)


def _problem(case: Case, dtype: torch.dtype, device) -> Problem:
    weights, ids = reference.route(_logits(case, device), case.top_k, normalize_p=1.0)
    sorted_slots, expert_offsets = reference.dispatch(ids, case.experts)
    rows, h, f = case.experts * case.ffn, case.hidden, case.ffn
    x = torch.randn(case.tokens, h, device=device)
    w1 = torch.randn(rows, h, device=device) * h**-0.5
    v1 = torch.randn(rows, h, device=device) * h**-0.5
    w2 = torch.randn(rows, h, device=device) * f**-0.5
    x, w1, v1, w2 = (t.to(dtype) for t in (x, w1, v1, w2))
    # The forward's saved pre-activations: exact products rounded once to the dtype, as its kernel stores them.
    preact = _up_chain(x.double(), w1.double(), v1.double(), sorted_slots, expert_offsets, case.top_k)
    gate, up = (t.to(dtype) for t in preact)
    dout = torch.randn(case.tokens, h, device=device).to(dtype)
    return Problem(x, w1, v1, w2, weights, ids, sorted_slots, expert_offsets, gate, up, dout, case.top_k, case.experts)


def _down_grads(p: Problem, dtype: torch.dtype):
    """(dgate, dup, dw2, dweights) by autograd of the down chain with p's tensors cast to `dtype` (the routing
    weights too: stock computes them in the activations' dtype)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (p.gate, p.up, p.w2, p.weights)]
    out = _down_chain(*leaves, p.sorted_slots, p.expert_offsets, p.top_k)
    return torch.autograd.grad(out, leaves, p.dout.to(dtype))


def _hw(p: Problem, dtype: torch.dtype) -> torch.Tensor:
    """hw [T*k, F] in sorted order, computed in `dtype`: weights.flat[s] * silu(gate[p]) * up[p]."""
    gate, up = p.gate.to(dtype), p.up.to(dtype)
    return F.silu(gate) * up * p.weights.to(dtype).reshape(-1)[p.sorted_slots.long()][:, None]


def _up_grads(p: Problem, dgate: torch.Tensor, dup: torch.Tensor, dtype: torch.dtype):
    """(dx, dw1, dv1) by autograd of the up chain, in `dtype`, for the given dgate and dup."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (p.x, p.w1, p.v1)]
    gate, up = _up_chain(*leaves, p.sorted_slots, p.expert_offsets, p.top_k)
    return torch.autograd.grad((gate, up), leaves, (dgate.to(dtype), dup.to(dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_down_bwd(case, dtype, device):
    p = _problem(case, dtype, device)
    dgate, dup, dweights, hw = moe_down_bwd(
        p.dout, p.gate, p.up, p.w2, p.weights, p.sorted_slots, p.expert_offsets, p.top_k
    )
    ref = _down_grads(p, torch.float64)
    base = _down_grads(p, dtype)
    assert dgate.dtype == dup.dtype == hw.dtype == dtype and dweights.dtype == torch.float32
    assert_accurate(dgate, ref[0], base[0])
    assert_accurate(dup, ref[1], base[1])
    assert_accurate(dweights, ref[3], base[3])
    assert_accurate(hw, _hw(p, torch.float64), _hw(p, dtype))


def test_down_bwd_without_h(device):
    """store_h=False writes no hw (an empty [0, F]) and the same dgate, dup and dweights bit for bit."""
    p = _problem(BY_NAME["T37_E4_k2"], torch.bfloat16, device)
    args = (p.dout, p.gate, p.up, p.w2, p.weights, p.sorted_slots, p.expert_offsets, p.top_k)
    *without, hw = moe_down_bwd(*args, store_h=False)
    *with_h, _ = moe_down_bwd(*args)
    assert hw.shape == (0, p.gate.shape[1])
    for a, b in zip(without, with_h, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_down_wgrad(case, dtype, device):
    p = _problem(case, dtype, device)
    # hw as moe_down_bwd stores it: computed in fp32, rounded once to the dtype.
    hw = _hw(p, torch.float32).to(dtype)
    dw2 = moe_down_wgrad(hw, p.dout, p.sorted_slots, p.expert_offsets, p.top_k, p.num_experts)
    ref = _down_grads(p, torch.float64)
    assert dw2.dtype == dtype
    assert_accurate(dw2, ref[2], _down_grads(p, dtype)[2])
    _assert_empty_experts_zero(dw2, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_up_dgrad(case, dtype, device):
    p = _problem(case, dtype, device)
    dgate, dup = (torch.randn_like(p.gate) for _ in range(2))
    dx = moe_up_dgrad(dgate, dup, p.w1, p.v1, p.sorted_slots, p.expert_offsets, p.top_k, case.tokens)
    assert dx.dtype == dtype
    assert_accurate(dx, _up_grads(p, dgate, dup, torch.float64)[0], _up_grads(p, dgate, dup, dtype)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_up_wgrad(case, dtype, device):
    p = _problem(case, dtype, device)
    dgate, dup = (torch.randn_like(p.gate) for _ in range(2))
    dw1, dv1 = moe_up_wgrad(dgate, dup, p.x, p.sorted_slots, p.expert_offsets, p.top_k, p.num_experts)
    ref = _up_grads(p, dgate, dup, torch.float64)
    base = _up_grads(p, dgate, dup, dtype)
    assert dw1.dtype == dv1.dtype == dtype
    assert_accurate(dw1, ref[1], base[1])
    assert_accurate(dv1, ref[2], base[2])
    _assert_empty_experts_zero(dw1, p)
    _assert_empty_experts_zero(dv1, p)


def test_wgrad_grid_covers_every_tile(device):
    """Tiles small enough for 5 F-tiles by 4 H-tiles per expert, so that GROUP_H = 3 leaves a partial last group:
    every output tile is computed once, in place (a tile written twice or never fails). The pinned tiles cover
    GROUP_H past the H-tiles."""
    p = _problem(Case("grid", 24, 2, 1, hidden=112, ffn=144), torch.bfloat16, device)
    cfg = config(4, 2, BLOCK_F=32, BLOCK_H=32, BLOCK_M=16, GROUP_H=3)
    dgate, dup = (torch.randn_like(p.gate) for _ in range(2))
    hw = _hw(p, torch.float32).to(torch.bfloat16)
    with forced_config(weight_grads._DOWN_WGRAD["16bit"], cfg), forced_config(weight_grads._UP_WGRAD["16bit"], cfg):
        dw2 = moe_down_wgrad(hw, p.dout, p.sorted_slots, p.expert_offsets, p.top_k, p.num_experts)
        dw1, dv1 = moe_up_wgrad(dgate, dup, p.x, p.sorted_slots, p.expert_offsets, p.top_k, p.num_experts)
    assert_accurate(dw2, _down_grads(p, torch.float64)[2], _down_grads(p, torch.bfloat16)[2])
    ref, base = _up_grads(p, dgate, dup, torch.float64), _up_grads(p, dgate, dup, torch.bfloat16)
    assert_accurate(dw1, ref[1], base[1])
    assert_accurate(dv1, ref[2], base[2])


def _assert_empty_experts_zero(dw: torch.Tensor, p: Problem):
    counts = p.expert_offsets.diff().tolist()
    ffn = dw.shape[0] // p.num_experts
    for e, count in enumerate(counts):
        if count == 0:
            assert (dw[e * ffn : (e + 1) * ffn] == 0).all(), f"expert {e} has no rows but a non-zero gradient"


def _backward(p: Problem):
    """All four launchers chained: the expert layer's backward given the forward's saved gate and up."""
    dgate, dup, dweights, hw = moe_down_bwd(
        p.dout, p.gate, p.up, p.w2, p.weights, p.sorted_slots, p.expert_offsets, p.top_k
    )
    dw2 = moe_down_wgrad(hw, p.dout, p.sorted_slots, p.expert_offsets, p.top_k, p.num_experts)
    dx = moe_up_dgrad(dgate, dup, p.w1, p.v1, p.sorted_slots, p.expert_offsets, p.top_k, p.x.shape[0])
    dw1, dv1 = moe_up_wgrad(dgate, dup, p.x, p.sorted_slots, p.expert_offsets, p.top_k, p.num_experts)
    return dx, dw1, dv1, dw2, dweights


def _reference_grads(p: Problem, dtype: torch.dtype):
    """(dx, dw1, dv1, dw2, dweights) by autograd of reference.moe_experts_by_ids with every input cast to `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (p.x, p.w1, p.v1, p.w2, p.weights)]
    out = reference.moe_experts_by_ids(*leaves[:4], leaves[4], p.expert_ids, p.num_experts)
    return torch.autograd.grad(out, leaves, p.dout.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [BY_NAME["T37_E16_k4"], BY_NAME["empty_experts"]], ids=["T37_E16_k4", "empty_experts"])
def test_backward_matches_reference_autograd(case, dtype, device):
    """The four launchers chained give the gradients of `reference.moe_experts_by_ids` (which also checks this file's
    sorted-order chains against the oracle). Stock's error here is autograd of its own bf16 layer."""
    p = _problem(case, dtype, device)
    got = _backward(p)
    ref = _reference_grads(p, torch.float64)
    leaves = [t.detach().requires_grad_() for t in (p.x, p.w1, p.v1, p.w2, p.weights.to(dtype))]
    stock = _up_chain(*leaves[:3], p.sorted_slots, p.expert_offsets, p.top_k)
    out = _down_chain(*stock, leaves[3], leaves[4], p.sorted_slots, p.expert_offsets, p.top_k)
    base = torch.autograd.grad(out, leaves, p.dout)
    # The kernels take gate and up rounded to the dtype, as the forward saves them; the oracle rounds nothing, and
    # stock's error includes the same roundings.
    for name, g, r, b in zip(("dx", "dw1", "dv1", "dw2", "dweights"), got, ref, base, strict=True):
        assert g.shape == r.shape, name
        assert_accurate(g, r, b)


def test_strided_inputs(device):
    """Weights as strided views of wider buffers, x a column slice, dout transposed, gate/up views of one buffer:
    the results are those of contiguous copies (bit for bit under the interpreter; on a GPU the strided launch is
    another specialization of the kernels, so a few ulps of bf16 are allowed)."""
    p = _problem(BY_NAME["T37_E4_k2"], torch.bfloat16, device)
    pad = 16

    def widened(t):
        wide = torch.randn(t.shape[0], t.shape[1] + pad, device=device).to(t.dtype)
        wide[:, pad:] = t
        return wide[:, pad:]

    preact = torch.stack((p.gate, p.up), dim=1)  # [T*k, 2, F]: gate and up interleaved by row
    strided = Problem(
        x=widened(p.x),
        w1=widened(p.w1),
        v1=widened(p.v1),
        w2=widened(p.w2),
        weights=p.weights.t().contiguous().t(),
        expert_ids=p.expert_ids,
        sorted_slots=p.sorted_slots,
        expert_offsets=p.expert_offsets,
        gate=preact[:, 0],
        up=preact[:, 1],
        dout=p.dout.t().contiguous().t(),
        top_k=p.top_k,
        num_experts=p.num_experts,
    )
    assert not strided.w2.is_contiguous() and not strided.dout.is_contiguous() and not strided.gate.is_contiguous()
    for got, want in zip(_backward(strided), _backward(p), strict=True):
        assert rel_err(got, want) <= (0 if os.environ.get("TRITON_INTERPRET") == "1" else 4 * EPS[torch.bfloat16])


def test_deterministic(device):
    """Two runs of every launcher agree bit for bit (no atomics; every sum in a fixed order)."""
    p = _problem(BY_NAME["T37_E16_k4"], torch.bfloat16, device)
    first, second = _backward(p), _backward(p)
    for a, b in zip(first, second, strict=True):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


def test_no_tokens(device):
    """T = 0: empty activations' gradients, zero weight gradients."""
    p = _problem(Case("none", 1, 4, 2), torch.float32, device)
    p.x, p.dout, p.weights = p.x[:0], p.dout[:0], p.weights[:0]
    p.gate, p.up, p.sorted_slots = p.gate[:0], p.up[:0], p.sorted_slots[:0]
    p.expert_offsets = torch.zeros_like(p.expert_offsets)
    dx, dw1, dv1, dw2, dweights = _backward(p)
    assert dx.shape == (0, 80) and dweights.shape == (0, 2)
    for dw in (dw1, dv1, dw2):
        assert dw.shape == p.w1.shape and (dw == 0).all()


@pytest.mark.races_allowed("corrupt offsets give rows to two experts: which store lands last is undefined")
def test_corrupt_routing_stays_in_bounds(device):
    """Slots outside [0, T*k) and offsets that are unsorted, negative or past T*k give undefined gradients, but every
    launch finishes and no store leaves its buffer (the guard bands of the allocation fixture)."""
    p = _problem(BY_NAME["T37_E4_k2"], torch.float32, device)
    rows = p.sorted_slots.numel()
    p.sorted_slots[::5] = rows + 3
    p.sorted_slots[1::7] = -2
    p.expert_offsets = torch.tensor([-7, rows + 40, 3, rows - 1, rows + 9], dtype=torch.int32, device=device)
    for grad in _backward(p):
        assert grad.shape in {p.x.shape, p.w1.shape, p.weights.shape}


def test_bad_input(device):
    p = _problem(BY_NAME["T37_E4_k2"], torch.float32, device)
    args = (p.dout, p.gate, p.up, p.w2, p.weights, p.sorted_slots, p.expert_offsets, p.top_k)

    def down_bwd(**changes):
        names = ("dout", "gate", "up", "w2", "weights", "sorted_slots", "expert_offsets", "top_k")
        kwargs = dict(zip(names, args, strict=True)) | changes
        return moe_down_bwd(*(kwargs[n] for n in names))

    with pytest.raises(TypeError, match="float64"):
        down_bwd(gate=p.gate.double(), up=p.up.double())
    with pytest.raises(TypeError, match="dout"):
        down_bwd(dout=p.dout.half())
    with pytest.raises(TypeError, match="w2"):
        down_bwd(w2=p.w2.bfloat16())
    with pytest.raises(TypeError, match="weights must be float32"):
        down_bwd(weights=p.weights.half())
    with pytest.raises(TypeError, match="sorted_slots must be int32"):
        down_bwd(sorted_slots=p.sorted_slots.long())
    with pytest.raises(ValueError, match="top_k"):
        down_bwd(top_k=0)
    with pytest.raises(ValueError, match="w2"):
        down_bwd(w2=p.w2[:, :-1])
    with pytest.raises(ValueError, match="up"):
        down_bwd(up=p.up[:-1])
    with pytest.raises(ValueError, match="gate"):
        down_bwd(gate=p.gate[:-2], up=p.up[:-2])
    with pytest.raises(ValueError, match="weights"):
        down_bwd(weights=p.weights[:, :1])
    with pytest.raises(ValueError, match="sorted_slots"):
        down_bwd(sorted_slots=p.sorted_slots[:-1])
    with pytest.raises(TypeError, match="meta"):
        down_bwd(w2=p.w2.to("meta"))

    dgate, dup = p.gate, p.up
    with pytest.raises(ValueError, match="num_experts"):
        moe_down_wgrad(p.gate, p.dout, p.sorted_slots, p.expert_offsets, p.top_k, 3)
    with pytest.raises(ValueError, match="hw"):
        moe_down_wgrad(p.gate[:-1], p.dout, p.sorted_slots, p.expert_offsets, p.top_k, 4)
    with pytest.raises(TypeError, match="dout"):
        moe_down_wgrad(p.gate, p.dout.half(), p.sorted_slots, p.expert_offsets, p.top_k, 4)
    with pytest.raises(TypeError, match="float64"):
        moe_down_wgrad(p.gate.double(), p.dout.double(), p.sorted_slots, p.expert_offsets, p.top_k, 4)
    with pytest.raises(ValueError, match="num_experts"):
        moe_up_wgrad(dgate, dup, p.x, p.sorted_slots, p.expert_offsets, p.top_k, 5)
    with pytest.raises(TypeError, match="x"):
        moe_up_wgrad(dgate, dup, p.x.half(), p.sorted_slots, p.expert_offsets, p.top_k, 4)
    with pytest.raises(ValueError, match="dgate"):
        moe_up_wgrad(dgate, dup, p.x[:-1], p.sorted_slots, p.expert_offsets, p.top_k, 4)
    with pytest.raises(ValueError, match="dgate"):
        moe_up_dgrad(dgate, dup, p.w1, p.v1, p.sorted_slots, p.expert_offsets, p.top_k, 36)
    with pytest.raises(ValueError, match="v1"):
        moe_up_dgrad(dgate, dup, p.w1, p.v1[:-1], p.sorted_slots, p.expert_offsets, p.top_k, 37)
    with pytest.raises(ValueError, match="w1"):
        moe_up_dgrad(dgate[:, :-1], dup[:, :-1], p.w1, p.v1, p.sorted_slots, p.expert_offsets, p.top_k, 37)
    with pytest.raises(TypeError, match="dup"):
        moe_up_dgrad(dgate, dup.bfloat16(), p.w1, p.v1, p.sorted_slots, p.expert_offsets, p.top_k, 37)
    with pytest.raises(ValueError, match="expert_offsets"):
        moe_up_dgrad(dgate, dup, p.w1, p.v1, p.sorted_slots, p.expert_offsets[:1], p.top_k, 37)


@pytest.mark.parametrize("dtype, precision, gemm_class, fp32_dot", GEMM_CLASS_CASES, ids=GEMM_CLASS_IDS)
def test_gemm_class_of_each_launch(dtype, precision, gemm_class, fp32_dot, device, monkeypatch):
    """Every GEMM launch takes its dtype's class and FP32_DOT as on a GPU, under the interpreter too: 16 bits on the
    tensor-core path (no fp32 upcast), fp32 in full fp32 only when torch's matmul precision is "highest"."""
    seen = []

    def spy(kernel, grid, *args, **meta):
        seen.append((kernel, meta["FP32_DOT"]))
        launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(moe_tiles, "launch", spy)  # every GEMM launch goes through moe_tiles.launch_gemm
    p = _problem(BY_NAME["T37_E4_k2"], dtype, device)
    with matmul_precision(precision):
        _backward(p)
    tuners = (input_grads._DOWN_BWD, weight_grads._DOWN_WGRAD, input_grads._UP_DGRAD, weight_grads._UP_WGRAD)
    assert seen == [(tuner[gemm_class], fp32_dot) for tuner in tuners]


@pytest.mark.parametrize("case", [BY_NAME["T37_E4_k2"], BY_NAME["multi_tile"]], ids=["T37_E4_k2", "multi_tile"])
def test_backward_tf32(case, device):
    """fp32 with TF32 allowed: each launcher against float64 autograd, judged against stock fp32 autograd with every
    matmul operand, forward and backward, truncated to TF32 as the tensor cores read it (tests/tf32.py). The error
    must be TF32's, not fp32's: were the dots full fp32, the mode would be untested."""
    p = _problem(case, torch.float32, device)
    dgate_in, dup_in = (torch.randn_like(p.gate) for _ in range(2))
    with matmul_precision("high"):
        dgate, dup, dweights, hw = moe_down_bwd(
            p.dout, p.gate, p.up, p.w2, p.weights, p.sorted_slots, p.expert_offsets, p.top_k
        )
        dw2 = moe_down_wgrad(hw, p.dout, p.sorted_slots, p.expert_offsets, p.top_k, case.experts)
        dx = moe_up_dgrad(dgate_in, dup_in, p.w1, p.v1, p.sorted_slots, p.expert_offsets, p.top_k, case.tokens)
        dw1, dv1 = moe_up_wgrad(dgate_in, dup_in, p.x, p.sorted_slots, p.expert_offsets, p.top_k, case.experts)
    down_ref, up_ref = _down_grads(p, torch.float64), _up_grads(p, dgate_in, dup_in, torch.float64)
    with TF32Matmuls():
        down_base, up_base = _down_grads(p, torch.float32), _up_grads(p, dgate_in, dup_in, torch.float32)
    got = {
        "dgate": (dgate, down_ref[0], down_base[0]),
        "dup": (dup, down_ref[1], down_base[1]),
        "dw2": (dw2, down_ref[2], down_base[2]),
        "dweights": (dweights, down_ref[3], down_base[3]),
        "dx": (dx, up_ref[0], up_base[0]),
        "dw1": (dw1, up_ref[1], up_base[1]),
        "dv1": (dv1, up_ref[2], up_base[2]),
    }
    for name, (grad, ref, base) in got.items():
        assert_accurate(grad, ref, base, what=name)
        assert rel_err(grad, ref) > 2**-16, f"{name}: TF32 mode multiplied in full fp32"


def test_row_counts_are_not_specialised():
    """The row count and its bucket only bound masks, loops and the autotune key: not specialised on, so that a new
    T (1 in decode) compiles nothing."""
    kernels = [getattr(input_grads, f"_moe_{name}_kernel") for name in ("down_bwd", "up_dgrad", "sum_partials")]
    kernels += [getattr(weight_grads, f"_moe_{name}_kernel") for name in ("down_wgrad", "up_wgrad")]
    for kernel in kernels:
        # The row count, and its bucket where the kernel takes one (an autotune key).
        sizes = {"num_rows", "rows_bucket"} & set(inspect.signature(kernel.fn).parameters)
        assert "num_rows" in sizes and unspecialised(kernel) == sizes, kernel.fn.__name__


@pytest.mark.gpu
def test_new_row_counts_compile_nothing(device):
    """Backward launches for any T share each kernel's one compiled variant per config."""
    tuners = [t["16bit"] for t in (input_grads._DOWN_BWD, weight_grads._DOWN_WGRAD)]
    tuners += [t["16bit"] for t in (input_grads._UP_DGRAD, weight_grads._UP_WGRAD)]
    counts = []
    with contextlib.ExitStack() as stack:
        for tuner in tuners:
            stack.enter_context(forced_config(tuner, tuner.all_configs[0]))
        for tokens in (1, 7, 300, 1000):
            _backward(_problem(Case("rows", tokens, 16, 4), torch.bfloat16, device))
            counts.append([compiled_variants(k) for k in (*tuners, input_grads._moe_sum_partials_kernel)])
    assert counts == counts[:1] * 4
