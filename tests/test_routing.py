"""Fused MoE routing (kernels/moe_routing.py, ops/routing.py) against reference.route and reference.dispatch in
float64.

Experts are ranked by logit with equal logits to the lower index (reference.route's rule): torch.topk leaves its tie
order unspecified (on the CPU topk([1, 2, 2, 1, 2, 0, 2, 1], 2) gives [1, 6]), and ranking rounded probabilities
would tie every expert whose probability underflows to 0.
"""

import pytest
import torch
from accuracy import assert_accurate
from specialization import compiled_variants, unspecialised

from dbrx_fast import reference
from dbrx_fast.kernels import moe_routing
from dbrx_fast.kernels.autotune import forced_config
from dbrx_fast.kernels.moe_routing import Routing, route_bwd
from dbrx_fast.ops.routing import route

pytestmark = pytest.mark.interpreter

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# Weights go through exp, a division and the norm in fp32; on a GPU exp and division are approximate to ~2 ulp.
WEIGHT_ULPS = 8


def _check_routing(r: Routing, logits: torch.Tensor, top_k: int, normalize_p: float | None) -> None:
    """ids, sorted_slots and expert_offsets exactly the float64 oracle's; weights accurate; shapes and dtypes."""
    num_tokens, num_experts = logits.shape
    ref_w, ref_ids = reference.route(logits.double(), top_k, normalize_p)
    base_w, _ = reference.route(logits, top_k, normalize_p)
    ref_slots, ref_offsets = reference.dispatch(ref_ids, num_experts)
    assert r.weights.dtype == torch.float32 and r.weights.shape == (num_tokens, top_k)
    assert r.expert_ids.dtype == torch.int32 and r.expert_ids.shape == (num_tokens, top_k)
    assert r.sorted_slots.dtype == torch.int32 and r.sorted_slots.shape == (num_tokens * top_k,)
    assert r.expert_offsets.dtype == torch.int32 and r.expert_offsets.shape == (num_experts + 1,)
    assert torch.equal(r.expert_ids.long().cpu(), ref_ids.cpu())
    assert torch.equal(r.sorted_slots.cpu(), ref_slots.cpu())
    assert torch.equal(r.expert_offsets.cpu(), ref_offsets.cpu())
    assert_accurate(r.weights, ref_w, base_w, ulps=WEIGHT_ULPS)


def _check_grad(logits: torch.Tensor, top_k: int, normalize_p: float | None) -> None:
    """d(sum(weights * g))/d logits through ops.route against float64 autograd through the oracle."""
    g = torch.randn(logits.shape[0], top_k, device=logits.device)
    leaf = logits.detach().clone().requires_grad_()
    r = route(leaf, top_k, normalize_p)
    assert not any(t.requires_grad for t in (r.expert_ids, r.sorted_slots, r.expert_offsets))
    (r.weights * g).sum().backward()
    ref = logits.detach().double().requires_grad_()
    (reference.route(ref, top_k, normalize_p)[0] * g.double()).sum().backward()
    base = logits.detach().clone().requires_grad_()
    (reference.route(base, top_k, normalize_p)[0] * g).sum().backward()
    assert leaf.grad.dtype == logits.dtype
    assert_accurate(leaf.grad, ref.grad, base.grad)


CASES = [
    # (T, E, k, p, dtype)
    (1, 16, 4, 1.0, BF16),  # DBRX decode
    (37, 16, 4, 1.0, FP32),
    (37, 16, 4, None, FP16),
    (1000, 16, 4, 1.0, BF16),  # DBRX prefill: 8 blocks of tokens
    (37, 4, 1, 2.0, FP32),
    (37, 4, 4, 3.5, BF16),  # k = E
    (37, 12, 2, 1.0, FP16),  # E not a power of two
    (37, 12, 12, None, FP32),
    (1000, 64, 2, 2.0, FP16),
    (37, 64, 64, 1.0, BF16),
    (1000, 256, 4, 3.5, BF16),  # 125 blocks: several scan steps and scan programs
    (3, 256, 256, 2.0, FP32),
    (5, 1, 1, 2.0, FP32),  # a single expert
    (7, 2, 2, 3.5, BF16),
]


@pytest.mark.parametrize("num_tokens, num_experts, top_k, normalize_p, dtype", CASES)
def test_route_matches_reference(device, num_tokens, num_experts, top_k, normalize_p, dtype):
    """Stock transformers takes the softmax in the logits' dtype, so with bf16 logits it can choose other experts
    than fp32 routing does; the kernels take it in fp32, and are compared with an oracle making the same choices
    (reference.route, float64 maths, from the same logits)."""
    logits = torch.randn(num_tokens, num_experts, device=device).to(dtype)
    _check_routing(moe_routing.route_fwd(logits, top_k, normalize_p), logits, top_k, normalize_p)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
def test_ties_go_to_the_lower_expert(device, dtype):
    """Repeated logits: equal probabilities are taken lowest expert first, also across the top-k boundary, and a row
    of equal logits takes experts 0..k-1."""
    logits = (torch.randint(-2, 3, (200, 16), device=device) * 0.5).to(dtype)
    logits[0] = 1.0
    r = moe_routing.route_fwd(logits, 4, 1.0)
    _check_routing(r, logits, 4, 1.0)
    assert r.expert_ids[0].tolist() == [0, 1, 2, 3]
    _check_grad(logits, 4, 1.0)


@pytest.mark.parametrize(
    "dtype, scale",
    [(FP32, 1e4), (FP32, 1e38), (FP16, 2e4), (BF16, 1e38)],
    ids=["fp32-1e4", "fp32-1e38", "fp16-6e4", "bf16-1e38"],
)
def test_huge_logits(device, dtype, scale):
    """Logits up to +-3e38 (+-6e4 in fp16): the max-subtracted softmax gives no NaN, and experts whose probability
    underflows to 0 are still taken in logit order."""
    logits = (torch.randn(100, 16, device=device).clamp(-3, 3) * scale).to(dtype)
    logits[:4, :4] = logits.max()  # equal huge maxima share the weight
    r = moe_routing.route_fwd(logits, 4, 2.0)
    assert not r.weights.isnan().any()
    _check_routing(r, logits, 4, 2.0)
    _check_grad(logits, 4, 2.0)


@pytest.mark.parametrize("top_k", [1, 4])
def test_every_token_on_one_expert(device, top_k):
    """Expert 5 wins every token; with k = 1 every other expert is empty."""
    logits = torch.randn(300, 16, device=device)
    logits[:, 5] += 30.0
    r = moe_routing.route_fwd(logits, top_k, 1.0)
    _check_routing(r, logits, top_k, 1.0)
    counts = (r.expert_offsets[1:] - r.expert_offsets[:-1]).tolist()
    assert counts[5] == 300
    if top_k == 1:
        assert sum(counts) == 300 and r.sorted_slots.tolist() == list(range(300))


def test_experts_with_no_token(device):
    """3 tokens, 2 choices each, over 64 experts: at least 58 experts are empty, including the first and the last."""
    logits = torch.randn(3, 64, device=device)
    logits[:, 0] = logits[:, -1] = -10.0
    r = moe_routing.route_fwd(logits, 2, None)
    _check_routing(r, logits, 2, None)
    counts = r.expert_offsets[1:] - r.expert_offsets[:-1]
    assert (counts == 0).sum() >= 58 and counts[0] == 0 and counts[-1] == 0


@pytest.mark.slow
def test_long_prefill(device):
    """T = 65536 (512 token blocks at E = 16): forward and gradient."""
    logits = torch.randn(65536, 16, device=device).to(BF16)
    _check_routing(moe_routing.route_fwd(logits, 4, 1.0), logits, 4, 1.0)
    _check_grad(logits, 4, 1.0)


def test_no_tokens(device):
    """T = 0: empty outputs, offsets all zero, and an empty gradient."""
    logits = torch.randn(0, 16, device=device, requires_grad=True)
    r = route(logits, 4, 1.0)
    assert r.weights.shape == (0, 4) and r.expert_ids.shape == (0, 4) and r.sorted_slots.shape == (0,)
    assert r.expert_offsets.tolist() == [0] * 17
    r.weights.sum().backward()
    assert logits.grad.shape == (0, 16)


@pytest.mark.parametrize("normalize_p", [None, 1.0, 2.0, 3.5, 0.5])
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
def test_gradient(device, dtype, normalize_p):
    logits = torch.randn(37, 16, device=device).to(dtype)
    _check_grad(logits, 4, normalize_p)


@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(100, 64, 8), (5, 12, 12), (20, 256, 3)])
def test_gradient_shapes(device, num_tokens, num_experts, top_k):
    logits = torch.randn(num_tokens, num_experts, device=device)
    _check_grad(logits, top_k, 1.0)


def test_strided_inputs(device):
    """Logits with both strides other than 1 (a transposed view with a step) and a transposed grad_weights."""
    logits = torch.randn(2 * 16, 50, device=device).t()[:, ::2]
    assert logits.stride() == (1, 100)
    r = moe_routing.route_fwd(logits, 4, 1.0)
    _check_routing(r, logits, 4, 1.0)
    g = torch.randn(4, 50, device=device).t()
    ref = logits.double().requires_grad_()
    (reference.route(ref, 4, 1.0)[0] * g.double()).sum().backward()
    base = logits.clone().requires_grad_()
    (reference.route(base, 4, 1.0)[0] * g).sum().backward()
    assert_accurate(route_bwd(g, logits, r.expert_ids, r.weights, 1.0), ref.grad, base.grad)


def test_bitwise_deterministic(device):
    logits = torch.randn(1000, 16, device=device).to(BF16)
    g = torch.randn(1000, 4, device=device)
    runs = []
    for _ in range(2):
        r = moe_routing.route_fwd(logits, 4, 1.0)
        runs.append((*r, route_bwd(g, logits, r.expert_ids, r.weights, 1.0)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_integer_p_is_a_float_p(device):
    logits = torch.randn(37, 16, device=device)
    a, b = moe_routing.route_fwd(logits, 4, 1), moe_routing.route_fwd(logits, 4, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _bwd_args(device, **overrides):
    logits = torch.randn(8, 16, device=device)
    r = moe_routing.route_fwd(logits, 4, 1.0)
    args = {
        "grad_weights": torch.randn(8, 4, device=device),
        "router_logits": logits,
        "expert_ids": r.expert_ids,
        "weights": r.weights,
        "normalize_p": 1.0,
    }
    return {**args, **overrides}


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda d: (torch.randn(16, device=d), 4, 1.0), ValueError, r"must be \[T, E\]"),
        (lambda d: (torch.randn(2, 8, 16, device=d), 4, 1.0), ValueError, r"must be \[T, E\]"),
        (lambda d: (torch.randn(8, 16, device=d), 17, 1.0), ValueError, "top_k must be in 1..E"),
        (lambda d: (torch.randn(8, 16, device=d), 0, 1.0), ValueError, "top_k must be in 1..E"),
        (lambda d: (torch.randn(8, 16, device=d), 4, 0.0), ValueError, "finite p > 0"),
        (lambda d: (torch.randn(8, 16, device=d), 4, -2.0), ValueError, "finite p > 0"),
        (lambda d: (torch.randn(8, 16, device=d), 4, float("inf")), ValueError, "finite p > 0"),
        (lambda d: (torch.randint(0, 9, (8, 16), device=d), 4, 1.0), TypeError, "float16, bfloat16 or float32"),
        (lambda d: (torch.randn(8, 16, device=d, dtype=torch.float64), 4, 1.0), TypeError, "float64"),
        (lambda d: (torch.randn(8, 300, device=d), 4, 1.0), ValueError, "1 to 256 experts"),
    ],
    ids=["1d", "3d", "k>E", "k<1", "p=0", "p<0", "p=inf", "int", "float64", "E>256"],
)
def test_bad_input(device, make_args, error, match):
    with pytest.raises(error, match=match):
        route(*make_args(device))


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (lambda d: {"grad_weights": torch.randn(8, 4, device=d, dtype=torch.float16)}, TypeError, "grad_weights"),
        (lambda d: {"grad_weights": torch.randn(8, 3, device=d)}, ValueError, "grad_weights must be"),
        (lambda d: {"expert_ids": torch.zeros(8, 4, device=d, dtype=torch.int64)}, TypeError, "expert_ids"),
        (lambda d: {"weights": torch.randn(7, 4, device=d)}, ValueError, "weights must be"),
        (lambda d: {"router_logits": torch.randn(9, 16, device=d)}, ValueError, r"\[T, k\] = \[9, k\]"),
        (lambda d: {"normalize_p": -1.0}, ValueError, "finite p > 0"),
    ],
    ids=["grad-fp16", "grad-shape", "ids-int64", "weights-shape", "logits-rows", "p<0"],
)
def test_bad_input_backward(device, overrides, error, match):
    with pytest.raises(error, match=match):
        route_bwd(**_bwd_args(device, **overrides(device)))


@pytest.mark.gpu
def test_opcheck(device):
    """The custom ops' fake (meta) implementations, schemas and autograd registration agree with the real ones.
    (GPU only: under the interpreter a fake tensor cannot reach the kernel launch.)"""
    logits = torch.randn(37, 16, device=device, dtype=BF16)
    torch.library.opcheck(moe_routing._route_fwd, (logits, 4, 1.0))
    r = moe_routing.route_fwd(logits, 4, 1.0)
    g = torch.randn(37, 4, device=device)
    torch.library.opcheck(moe_routing.route_bwd, (g, logits, r.expert_ids, r.weights, 1.0))


@pytest.mark.gpu
def test_cuda_graph_capture(device):
    """No host synchronisation: the routing of a decode step replays from a CUDA graph on new logits."""
    logits = torch.randn(8, 16, device=device, dtype=BF16)
    moe_routing.route_fwd(logits, 4, 1.0)  # autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        r = moe_routing.route_fwd(logits, 4, 1.0)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    _check_routing(r, logits, 4, 1.0)


def test_token_counts_are_not_specialised():
    """The sizes that change with T only bound masks and loops: not specialised on, so that a new T (1 in decode)
    compiles nothing."""
    assert unspecialised(moe_routing._route_fwd_kernel) == {"num_tokens"}
    assert unspecialised(moe_routing._route_scan_kernel) == {"num_blocks"}
    assert unspecialised(moe_routing._route_scatter_kernel) == {"num_slots"}
    assert unspecialised(moe_routing._route_bwd_kernel) == {"num_tokens"}


@pytest.mark.gpu
def test_new_token_counts_compile_nothing(device):
    """Decode (T = 1) and prefills of any length share each kernel's one compiled variant (per autotune config)."""
    tuned = (moe_routing._route_fwd_kernel, moe_routing._route_bwd_kernel)
    kernels = (*tuned, moe_routing._route_scan_kernel, moe_routing._route_scatter_kernel)
    counts = []
    with forced_config(tuned[0], tuned[0].all_configs[0]), forced_config(tuned[1], tuned[1].all_configs[0]):
        for num_tokens in (1, 7, 300, 1000):
            logits = torch.randn(num_tokens, 16, device=device, dtype=BF16)
            r = moe_routing.route_fwd(logits, 4, 1.0)
            route_bwd(torch.randn(num_tokens, 4, device=device), logits, r.expert_ids, r.weights, 1.0)
            counts.append([compiled_variants(k) for k in kernels])
    assert counts == counts[:1] * 4
