"""Benchmark of DBRX's MoE experts layer: routing from the router logits, the k GLU experts per token, the sum.

    python -m benchmarks.bench_moe                      # DBRX widths, T = 1 ... 32768, bf16, forward and full
    python -m benchmarks.bench_moe --tokens 1 16 4096 --modes forward --providers torch_grouped dbrx_fast
    python -m benchmarks.bench_moe --smoke              # tiny widths on the CPU, in seconds (the smoke test)

Every provider computes the same thing from the same x [T, H] and weights: router logits x @ Wr.T (one F.linear,
the same for all), top-k routing with DBRX's p = 1 normalisation, then the experts:
- stock: transformers' `DbrxFFN` (its routing and the `DbrxExperts` loop over experts), holding the same weights;
- torch_grouped: `reference.route` + `dbrx_fast.moe_torch.moe_experts_grouped_by_ids` (torch._grouped_mm on sm_90);
- dbrx_fast: `dbrx_fast.ops.routing.route` + `dbrx_fast.ops.moe.moe_experts_by_routing` (the Triton kernels).
FLOPs: 3 * 2 * T*k*H*F per forward (the router's 2*T*H*E and the GLU are left out), 2x that for a backward, 3x for
full (fwd+bwd).
Decode rows (T <= 16) also report GB/s counting the bytes of the chosen experts' weights. dbrx_fast rows also carry the
cost model's lower bound (benchmarks/cost_model.py, the device's preset, an H100 SXM off an H200) and measured / bound.
See benchmarks/README.md.
"""

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python benchmarks/bench_moe.py): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Case, ProviderUnavailable, Step, make_step, print_rows
from dbrx_fast import reference
from dbrx_fast.moe_torch import moe_experts_grouped_by_ids

SUBJECT = "moe"
DBRX_WIDTHS = {"hidden": 6144, "ffn": 10752, "experts": 16, "top_k": 4}
SMOKE_WIDTHS = {"hidden": 64, "ffn": 96, "experts": 4, "top_k": 2}
DEFAULT_TOKENS = (1, 16, 128, 1024, 4096, 16384, 32768)
SMOKE_TOKENS = (1, 33)
PROVIDERS = ("stock", "torch_grouped", "dbrx_fast")
BASELINE = "stock"
DECODE_MAX_TOKENS = 16
NORMALIZE_P = 1.0  # DBRX's moe_normalize_expert_weights
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class MoeWeights:
    """The layer's parameters, allocated once per run and shared by every provider and token count."""

    def __init__(self, hidden, ffn, experts, top_k, device, dtype):
        self.hidden, self.ffn, self.experts, self.top_k = hidden, ffn, experts, top_k

        def param(rows, cols, std):
            return torch.nn.Parameter(torch.randn(rows, cols, device=device, dtype=dtype).mul_(std))

        # Unit-variance x gives unit-variance logits and projections: no overflow in bf16, a spread-out routing.
        self.router = param(experts, hidden, hidden**-0.5)
        self.w1 = param(experts * ffn, hidden, hidden**-0.5)
        self.v1 = param(experts * ffn, hidden, hidden**-0.5)
        self.w2 = param(experts * ffn, hidden, ffn**-0.5)

    def params(self):
        return [self.router, self.w1, self.v1, self.w2]


def stock_setup(weights: MoeWeights, x: torch.Tensor):
    """transformers' DbrxFFN, built on the meta device and then given our parameters (no copy of the weights)."""
    from transformers import DbrxConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    config = DbrxConfig(
        d_model=weights.hidden,
        n_heads=1,
        n_layers=1,
        ffn_config={
            "ffn_hidden_size": weights.ffn,
            "moe_num_experts": weights.experts,
            "moe_top_k": weights.top_k,
            "moe_jitter_eps": None,
            "moe_normalize_expert_weights": NORMALIZE_P,
        },
    )
    with torch.device("meta"):
        ffn = DbrxFFN(config).eval()
    ffn.router.layer.weight = weights.router
    ffn.experts.mlp.w1, ffn.experts.mlp.v1, ffn.experts.mlp.w2 = weights.w1, weights.v1, weights.w2
    return lambda: ffn(x[None]).view(x.shape)


def torch_grouped_setup(weights: MoeWeights, x: torch.Tensor):
    w = weights

    def forward():
        routing_weights, expert_ids = reference.route(F.linear(x, w.router), w.top_k, NORMALIZE_P)
        return moe_experts_grouped_by_ids(x, w.w1, w.v1, w.w2, routing_weights, expert_ids, w.experts)

    return forward


def dbrx_fast_setup(weights: MoeWeights, x: torch.Tensor):
    try:
        from dbrx_fast.ops.moe import moe_experts_by_routing
        from dbrx_fast.ops.routing import route
    except ImportError as e:
        raise ProviderUnavailable(f"dbrx_fast.ops.routing / dbrx_fast.ops.moe not importable ({e})") from None
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ProviderUnavailable("Triton kernels on the CPU need TRITON_INTERPRET=1 before they are imported")
    w = weights

    def forward():
        routing = route(F.linear(x, w.router), w.top_k, NORMALIZE_P)
        return moe_experts_by_routing(x, w.w1, w.v1, w.w2, routing, w.experts)

    return forward


SETUPS = {"stock": stock_setup, "torch_grouped": torch_grouped_setup, "dbrx_fast": dbrx_fast_setup}


def moe_case(weights: MoeWeights, x: torch.Tensor, mode: str, device_name: str = "") -> Case:
    """Shape, FLOPs, for decode the weight bytes of the experts this x is routed to (fp32 routing), and the cost
    model's bound of the dbrx_fast kernels on device_name's preset."""
    w = weights
    tokens = x.shape[0]
    rows = tokens * w.top_k
    # The backward does two GEMMs (input and weight gradients) per forward GEMM.
    work = {"forward": 1, "backward": 2, "full": 3}[mode]
    flops = 3 * 2.0 * rows * w.hidden * w.ffn * work
    shape = {"T": tokens, "H": w.hidden, "F": w.ffn, "E": w.experts, "k": w.top_k}
    extra = {"sweep": "T"}
    nbytes = None
    if tokens <= DECODE_MAX_TOKENS:
        with torch.no_grad():
            _, expert_ids = reference.route(F.linear(x, w.router), w.top_k, NORMALIZE_P)
        used = int(torch.unique(expert_ids).numel())
        # The forward reads each chosen expert's w1, v1, w2 once; the backward reads them again for the input
        # gradients and writes their gradients.
        nbytes = used * 3 * w.ffn * w.hidden * x.element_size() * work
        extra["experts_used"] = used
    # Equal FLOPs as a dense matmul: the three [T*k, H] x [H, F] projections of a forward, back to back.
    return Case(
        shape,
        mode,
        flops,
        bytes=nbytes,
        dense_mnk=(rows, w.ffn, w.hidden, 3),
        extra=extra,
        provider_extra={"dbrx_fast": _dbrx_fast_bound(w, tokens, mode, x.dtype, device_name)},
    )


def _dbrx_fast_bound(w: MoeWeights, tokens: int, mode: str, dtype: torch.dtype, device_name: str) -> dict:
    """bound_ms and bound_gpu of the cost model; nothing when the kernels cannot import (the provider is then
    unavailable and says why)."""
    try:
        from benchmarks import cost_model
    except ImportError:
        return {}
    gpu = cost_model.gpu_for(device_name)
    shape = cost_model.Shape(tokens, w.hidden, w.ffn, w.experts, w.top_k, dtype)
    return {"bound_ms": cost_model.layer_bound_s(shape, mode, gpu) * 1e3, "bound_gpu": gpu.name}


def parse_args(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--tokens", nargs="+", help="token counts T (space or comma separated); default DBRX sweep")
    p.add_argument("--modes", nargs="+", default=["forward", "full"], choices=["forward", "backward", "full"])
    p.add_argument("--hidden", type=int, help="H (default 6144; 64 with --smoke)")
    p.add_argument("--ffn", type=int, help="F, the expert width (default 10752; 96 with --smoke)")
    p.add_argument("--experts", type=int, help="E (default 16; 4 with --smoke)")
    p.add_argument("--top-k", type=int, help="k (default 4; 2 with --smoke)")
    harness.add_common_arguments(
        p, PROVIDERS, DTYPES, "tiny widths on the CPU, one repetition: checks the plumbing", list(PROVIDERS)
    )
    args = harness.finish_common_args(p.parse_args(argv), DBRX_WIDTHS, SMOKE_WIDTHS)
    args.tokens = harness.sizes(p, args.tokens, SMOKE_TOKENS if args.smoke else DEFAULT_TOKENS, "--tokens")
    return args


def main(argv=None) -> int:
    return harness.run_main(_run, parse_args(argv))


def _run(args) -> int:
    dtype = DTYPES[args.dtype]
    bench = harness.harness_from_args(SUBJECT, args, dtype)
    weights = MoeWeights(args.hidden, args.ffn, args.experts, args.top_k, args.device, dtype)
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
        for mode in args.modes:
            case = moe_case(weights, x, mode, bench.device_name)
            providers = {name: _provider(SETUPS[name], weights, x, mode) for name in args.providers}
            print_rows(bench.run_case(case, providers, BASELINE))
        del x
    return harness.exit_status(bench)


def _provider(setup, weights: MoeWeights, x: torch.Tensor, mode: str):
    def build(case: Case) -> Step:
        return make_step(setup(weights, x), mode, grad_to_none=[x, *weights.params()])

    return build


if __name__ == "__main__":
    sys.exit(main())
