"""Benchmark of attention decode: one query token per sequence against a KV cache, at DBRX's head shape.

    python -m benchmarks.bench_decode                   # 48/8 heads, D 128, bf16, context 1k ... 32k, batch 1, 8, 64
    python -m benchmarks.bench_decode --contexts 8192 --batches 1 --providers sdpa_gqa dbrx_fast
    python -m benchmarks.bench_decode --smoke           # tiny heads on the CPU, in seconds (the smoke test)

Every provider computes the same thing from the same q [B, Hq, 1, D] and cache k, v [B, Hkv, N, D] (N = context):
- sdpa_repeat_kv: transformers' sdpa path with a mask: K and V repeated Hq / Hkv times (`repeat_kv`, timed: stock
  does it every step), then F.scaled_dot_product_attention;
- sdpa_gqa: F.scaled_dot_product_attention(..., enable_gqa=True), no copy;
- flash_attn: flash-attn's `flash_attn_with_kvcache` (its split-KV decode) when flash-attn is installed, on the cache
  in its [B, N, Hkv, D] layout;
- dbrx_fast: `dbrx_fast.kernels.attention_decode.attention_decode` on the same cache;
- dbrx_fast_static: the same kernel on a StaticCache-shaped cache of 2N slots of which N are valid: it should read
  only those (the same bytes, the same time).
Bytes: the KV cache read, 2 * B * Hkv * N * D * element size (q and the output are ~1/N of it). FLOPs 4*B*Hq*N*D.
Rows carry GB/s and the ratio to the device copy bandwidth measured in the same run (target: >= 0.7 at batch 1 from
8k on). See benchmarks/README.md.
"""

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python benchmarks/bench_decode.py): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Case, ProviderUnavailable, Step, make_step, print_rows

SUBJECT = "decode"
DBRX_HEADS = {"heads": 48, "kv_heads": 8, "head_dim": 128}
SMOKE_HEADS = {"heads": 4, "kv_heads": 2, "head_dim": 64}
DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_BATCHES = (1, 8, 64)
SMOKE_CONTEXTS = (17, 300)
SMOKE_BATCHES = (1, 2)
PROVIDERS = ("sdpa_repeat_kv", "sdpa_gqa", "flash_attn", "dbrx_fast", "dbrx_fast_static")
SMOKE_PROVIDERS = ("sdpa_repeat_kv", "sdpa_gqa", "dbrx_fast", "dbrx_fast_static")
BASELINE = "sdpa_gqa"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class DecodeInputs:
    """q and a cache in [B, N, Hkv, D] storage (flash-attn's layout; k, v are its [B, Hkv, N, D] views, as a cache's
    tensors may be), and the cached length before the query."""

    def __init__(self, batch, context, heads, kv_heads, head_dim, device, dtype, slots=None):
        slots = slots or context
        self.q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
        self.k_cache = torch.randn(batch, slots, kv_heads, head_dim, device=device, dtype=dtype)
        self.v_cache = torch.randn(batch, slots, kv_heads, head_dim, device=device, dtype=dtype)
        self.k, self.v = self.k_cache.transpose(1, 2), self.v_cache.transpose(1, 2)
        self.context = context
        self.q_offset = torch.full((batch,), context - 1, dtype=torch.int32, device=device)
        self.scale = head_dim**-0.5


def sdpa_repeat_kv_setup(x: DecodeInputs):
    group = x.q.shape[1] // x.k.shape[1]

    def forward():
        k, v = (t.repeat_interleave(group, dim=1) for t in (x.k, x.v))
        return F.scaled_dot_product_attention(x.q, k, v, scale=x.scale)

    return forward


def sdpa_gqa_setup(x: DecodeInputs):
    return lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, scale=x.scale, enable_gqa=True)


def flash_attn_setup(x: DecodeInputs):
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as e:
        raise ProviderUnavailable(f"flash-attn is not importable ({e})") from None
    if x.q.device.type != "cuda":
        raise ProviderUnavailable("flash-attn needs a CUDA device")
    q = x.q.transpose(1, 2)  # [B, 1, Hq, D]
    lengths = torch.full((q.shape[0],), x.context, dtype=torch.int32, device=q.device)
    return lambda: flash_attn_with_kvcache(q, x.k_cache, x.v_cache, cache_seqlens=lengths, softmax_scale=x.scale)


def _attention_decode():
    try:
        from dbrx_fast.kernels.attention_decode import attention_decode
    except ImportError as e:
        raise ProviderUnavailable(f"dbrx_fast.kernels.attention_decode not importable ({e})") from None
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ProviderUnavailable("Triton kernels on the CPU need TRITON_INTERPRET=1 before they are imported")
    return attention_decode


def dbrx_fast_setup(x: DecodeInputs):
    attention_decode = _attention_decode()
    return lambda: attention_decode(x.q, x.k, x.v, x.q_offset, None, x.scale)


SETUPS = {
    "sdpa_repeat_kv": sdpa_repeat_kv_setup,
    "sdpa_gqa": sdpa_gqa_setup,
    "flash_attn": flash_attn_setup,
    "dbrx_fast": dbrx_fast_setup,
    "dbrx_fast_static": dbrx_fast_setup,  # on its own inputs: a cache of 2N slots (see _provider)
}


def decode_case(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> Case:
    size = torch.empty((), dtype=dtype).element_size()
    shape = {"B": batch, "N": context, "Hq": heads, "Hkv": kv_heads, "D": head_dim}
    return Case(
        shape,
        "forward",
        flops=4.0 * batch * heads * context * head_dim,
        bytes=2.0 * batch * kv_heads * context * head_dim * size,
        extra={"sweep": "N"},
    )


def parse_args(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--contexts", nargs="+", help="cached lengths N (space or comma separated); default 1k ... 32k")
    p.add_argument("--batches", nargs="+", help="batch sizes B; default 1 8 64")
    p.add_argument("--heads", type=int, help="Hq (default 48; 4 with --smoke)")
    p.add_argument("--kv-heads", type=int, help="Hkv (default 8; 2 with --smoke)")
    p.add_argument("--head-dim", type=int, help="D (default 128; 64 with --smoke)")
    harness.add_common_arguments(
        p,
        PROVIDERS,
        DTYPES,
        "tiny heads on the CPU, one repetition: checks the plumbing",
        None,
        "default: all (--smoke: all but flash_attn)",
    )
    args = harness.finish_common_args(
        p.parse_args(argv),
        {**DBRX_HEADS, "providers": list(PROVIDERS)},
        {**SMOKE_HEADS, "providers": list(SMOKE_PROVIDERS)},
    )
    args.contexts = harness.sizes(p, args.contexts, SMOKE_CONTEXTS if args.smoke else DEFAULT_CONTEXTS, "--contexts")
    args.batches = harness.sizes(p, args.batches, SMOKE_BATCHES if args.smoke else DEFAULT_BATCHES, "--batches")
    return args


def main(argv=None) -> int:
    return harness.run_main(_run, parse_args(argv))


def _run(args) -> int:
    dtype = DTYPES[args.dtype]
    bench = harness.harness_from_args(SUBJECT, args, dtype)
    heads = (args.heads, args.kv_heads, args.head_dim)
    for batch in args.batches:
        for context in args.contexts:
            case = decode_case(batch, context, *heads, dtype)
            providers = {name: _provider(name, batch, context, heads, args.device, dtype) for name in args.providers}
            print_rows(bench.run_case(case, providers, BASELINE))
    return harness.exit_status(bench)


def _provider(name: str, batch: int, context: int, heads: tuple, device, dtype):
    """Inputs are made when the provider runs (and freed after it): at B = 64, N = 32k a cache is 8.6 GB."""

    def build(case: Case) -> Step:
        slots = 2 * context if name == "dbrx_fast_static" else context
        inputs = DecodeInputs(batch, context, *heads, device, dtype, slots=slots)
        return make_step(SETUPS[name](inputs), "forward", grad_to_none=[])

    return build


if __name__ == "__main__":
    sys.exit(main())
