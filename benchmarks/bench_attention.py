"""Benchmark of DBRX's attention core: causal GQA attention at 48 query heads, 8 KV heads, head_dim 128.

    python -m benchmarks.bench_attention                 # N = 512 ... 16384, bf16, forward and backward
    python -m benchmarks.bench_attention --lengths 4096 --modes forward --providers dbrx_fast sdpa_flash
    python -m benchmarks.bench_attention --smoke         # tiny heads on the CPU, in seconds (the smoke test)

Every provider computes the same causal attention from the same q [B, Hq, N, D] and k, v [B, Hkv, N, D]; the batch
is 16384 // N (at least 1; --tokens), so every length holds about as many tokens (FlashAttention's convention):
- dbrx_fast: `dbrx_fast.ops.attention.attention` (the Triton kernels; backward rows once kernels/attention_bwd.py
  exists, else an "unavailable" row);
- sdpa_flash, sdpa_cudnn, sdpa_efficient: `F.scaled_dot_product_attention(is_causal=True)` pinned to one backend
  with `torch.nn.attention.sdpa_kernel`, native GQA (`enable_gqa`) where the backend takes it, else K and V repeated
  before the timing (the backend's best case); a backend that cannot run here gets an "unavailable" row;
- stock: transformers' DBRX `eager_attention_forward` (repeat_kv, fp32 softmax, two matmuls) with its additive mask;
- flash_attn: `flash_attn.flash_attn_func(causal=True)` when the package is importable.
FLOPs: 4 * B * Hq * N^2 * D for a forward, halved when causal; a backward 2.5x that, full (forward + backward) 3.5x.
`vs_baseline` is the speed-up over the fastest SDPA backend in the same run (named in each row's `baseline`).
"""

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python benchmarks/bench_attention.py): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Case, ProviderUnavailable, Step, make_step, print_rows
from dbrx_fast.attention_mask import AttentionMask

SUBJECT = "attention"
DBRX_HEADS = {"heads": 48, "kv_heads": 8, "head_dim": 128}
SMOKE_HEADS = {"heads": 4, "kv_heads": 2, "head_dim": 32}
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
SMOKE_LENGTHS = (16, 33)
TOKENS = 16384  # per length: batch = TOKENS // N
SMOKE_TOKENS = 40
SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
}
PROVIDERS = ("dbrx_fast", *SDPA_BACKENDS, "stock", "flash_attn")
MODE_WORK = {"forward": 1.0, "backward": 2.5, "full": 3.5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Inputs:
    """q, k, v of one length, shared by every provider; leaves that collect gradients."""

    def __init__(self, batch, length, heads, kv_heads, head_dim, device, dtype):
        def leaf(h):
            return torch.randn(batch, h, length, head_dim, device=device, dtype=dtype, requires_grad=True)

        self.q, self.k, self.v = leaf(heads), leaf(kv_heads), leaf(kv_heads)
        self.scale = head_dim**-0.5
        self.group = heads // kv_heads

    def leaves(self):
        return [self.q, self.k, self.v]


def dbrx_fast_setup(x: Inputs, mode: str):
    try:
        from dbrx_fast.ops.attention import attention
    except ImportError as e:
        raise ProviderUnavailable(f"dbrx_fast.ops.attention not importable ({e})") from None
    if mode != "forward":
        try:
            import dbrx_fast.kernels.attention_bwd  # noqa: F401
        except ImportError:
            raise ProviderUnavailable("not available: dbrx_fast.kernels.attention_bwd is not written yet") from None
    if x.q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ProviderUnavailable("Triton kernels on the CPU need TRITON_INTERPRET=1 before they are imported")
    mask = AttentionMask.bottom_right(x.q.shape[0], x.q.shape[2], x.k.shape[2], x.q.device)
    return (lambda: attention(x.q, x.k, x.v, mask, x.scale)), x.leaves()


def sdpa_setup(backend_name: str):
    def setup(x: Inputs, mode: str):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[backend_name])

        def run(k, v, **gqa):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(x.q, k, v, is_causal=True, scale=x.scale, **gqa)

        try:
            with torch.no_grad():
                run(x.k, x.v, enable_gqa=True)
            return (lambda: run(x.k, x.v, enable_gqa=True)), x.leaves()
        except RuntimeError:
            pass
        k, v = (t.detach().repeat_interleave(x.group, dim=1).requires_grad_() for t in (x.k, x.v))
        try:
            with torch.no_grad():
                run(k, v)
        except RuntimeError as e:
            raise ProviderUnavailable(f"{backend_name} cannot run here: {str(e).splitlines()[0][:160]}") from None
        return (lambda: run(k, v)), [x.q, k, v]

    return setup


def stock_setup(x: Inputs, mode: str):
    from transformers.models.dbrx.modeling_dbrx import eager_attention_forward

    module = torch.nn.Module().train(False)
    module.num_key_value_groups = x.group
    n = x.q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=x.q.device).tril()
    additive = torch.zeros(n, n, dtype=x.q.dtype, device=x.q.device).masked_fill(~causal, torch.finfo(x.q.dtype).min)
    return (lambda: eager_attention_forward(module, x.q, x.k, x.v, additive[None, None], x.scale)[0]), x.leaves()


def flash_attn_setup(x: Inputs, mode: str):
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise ProviderUnavailable("flash_attn is not installed") from None
    q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in x.leaves())
    return (lambda: flash_attn_func(q, k, v, softmax_scale=x.scale, causal=True)), [q, k, v]


SETUPS = {
    "dbrx_fast": dbrx_fast_setup,
    **{name: sdpa_setup(name) for name in SDPA_BACKENDS},
    "stock": stock_setup,
    "flash_attn": flash_attn_setup,
}


def attention_case(batch, length, heads, kv_heads, head_dim, mode) -> Case:
    """Shape and FLOPs (causal: half of 4 * B * Hq * N^2 * D per forward). The dense matmul of equal FLOPs:
    M = B * N, N = Hq * D, K = N / 2, repeated 2 (forward), 5 (backward) or 7 (full) times."""
    forward_flops = 4.0 * batch * heads * length**2 * head_dim / 2
    shape = {"B": batch, "N": length, "Hq": heads, "Hkv": kv_heads, "D": head_dim, "causal": True}
    repeats = int(2 * MODE_WORK[mode])
    return Case(
        shape,
        mode,
        forward_flops * MODE_WORK[mode],
        dense_mnk=(batch * length, heads * head_dim, max(length // 2, 1), repeats),
        extra={"sweep": "N"},
    )


def parse_args(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--lengths", nargs="+", help="sequence lengths N (space or comma separated); default 512 ... 16384")
    p.add_argument("--modes", nargs="+", default=["forward", "backward"], choices=list(MODE_WORK))
    p.add_argument("--heads", type=int, help="query heads (default 48; 4 with --smoke)")
    p.add_argument("--kv-heads", type=int, help="KV heads (default 8; 2 with --smoke)")
    p.add_argument("--head-dim", type=int, help="head_dim (default 128; 32 with --smoke)")
    p.add_argument("--tokens", type=int, help="tokens per length, batch = tokens // N (default 16384; 40 with --smoke)")
    harness.add_common_arguments(
        p, PROVIDERS, DTYPES, "tiny heads on the CPU, one repetition: checks the plumbing", list(PROVIDERS)
    )
    args = harness.finish_common_args(
        p.parse_args(argv), {**DBRX_HEADS, "tokens": TOKENS}, {**SMOKE_HEADS, "tokens": SMOKE_TOKENS}
    )
    args.lengths = harness.sizes(p, args.lengths, SMOKE_LENGTHS if args.smoke else DEFAULT_LENGTHS, "--lengths")
    return args


def main(argv=None) -> int:
    return harness.run_main(_run, parse_args(argv))


def _run(args) -> int:
    bench = harness.harness_from_args(SUBJECT, args, DTYPES[args.dtype])
    baselines = tuple(name for name in SDPA_BACKENDS if name in args.providers)
    for length in args.lengths:
        batch = max(args.tokens // length, 1)
        x = Inputs(batch, length, args.heads, args.kv_heads, args.head_dim, args.device, DTYPES[args.dtype])
        for mode in args.modes:
            case = attention_case(batch, length, args.heads, args.kv_heads, args.head_dim, mode)
            providers = {name: _provider(SETUPS[name], x, mode) for name in args.providers}
            print_rows(bench.run_case(case, providers, baselines))
        del x
    return harness.exit_status(bench)


def _provider(setup, x: Inputs, mode: str):
    def build(case: Case) -> Step:
        forward, leaves = setup(x, mode)
        return make_step(forward, mode, grad_to_none=leaves)

    return build


if __name__ == "__main__":
    sys.exit(main())
