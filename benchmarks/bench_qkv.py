"""Benchmark of DBRX's QKV post-processing: clamp, split into heads, RoPE on q and k, from the fused projection.

    python -m benchmarks.bench_qkv                      # DBRX heads (48 q, 8 kv, D 128), T = 512 ... 16384, bf16
    python -m benchmarks.bench_qkv --tokens 4096 --modes forward --providers stock dbrx_fast
    python -m benchmarks.bench_qkv --smoke              # tiny heads on the CPU, in seconds (the smoke test)

Every provider starts from the same qkv [1, T, (Hq + 2*Hkv) * D] (the Wqkv output; the projection itself is not
timed) and float32 cos/sin [1, T, D] at positions 0 ... T-1, theta 500000, and returns q, k, v [1, H, T, D]:
- stock: what transformers' DbrxAttention runs: clamp, split, view + transpose, apply_rotary_pos_emb with cos/sin cast
  to the activations' dtype (its q and k are new tensors, v stays a strided view of the clamped qkv);
- rope_kernel: the same clamp and split, then dbrx_fast's separate RoPE kernel (dbrx_fast.ops.rope), as the patched
  attention did before the fused kernel;
- dbrx_fast: dbrx_fast.ops.qkv.qkv_rope, one kernel for all of it.
GB/s counts the bytes the fused kernel must move at least: forward, qkv read once and q, k, v written once (plus the
first halves of cos and sin); full (forward + backward), that plus dq, dk, dv and qkv (for the clamp's gradient) read
and dqkv written. Memory-bound, so the row's ratio to the copy bandwidth measured in the same run is the figure of
merit (target: at least 0.8). FLOPs are counted as 0 (the TFLOP/s column means nothing here).
"""

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python benchmarks/bench_qkv.py): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import harness
from benchmarks.harness import Case, ProviderUnavailable, Step, print_rows
from dbrx_fast import reference

SUBJECT = "qkv"
DBRX_HEADS = {"heads": 48, "kv_heads": 8, "head_dim": 128}
SMOKE_HEADS = {"heads": 6, "kv_heads": 1, "head_dim": 16}
DEFAULT_TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
SMOKE_TOKENS = (1, 33)
PROVIDERS = ("stock", "rope_kernel", "dbrx_fast")
BASELINE = "stock"
CLIP_QKV = 8.0  # DBRX's clip_qkv
THETA = 500000.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def split_heads(qkv, heads, kv_heads, head_dim):
    """Stock's clamp, split and transposes: strided [1, H, T, D] views of the clamped qkv."""
    batch, tokens, _ = qkv.shape
    parts = qkv.clamp(min=-CLIP_QKV, max=CLIP_QKV).split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1
    )
    return [t.view(batch, tokens, -1, head_dim).transpose(1, 2) for t in parts]


def stock_setup(qkv, cos, sin, heads, kv_heads, head_dim):
    from transformers.models.dbrx.modeling_dbrx import apply_rotary_pos_emb

    cos16, sin16 = cos.to(qkv.dtype), sin.to(qkv.dtype)  # stock's rotary embedding returns them in this dtype

    def forward():
        q, k, v = split_heads(qkv, heads, kv_heads, head_dim)
        return (*apply_rotary_pos_emb(q, k, cos16, sin16), v)

    return forward


def _triton_ready(module: str, device: torch.device) -> None:
    try:
        __import__(module)
    except ImportError as e:
        raise ProviderUnavailable(f"{module} not importable ({e})") from None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ProviderUnavailable("Triton kernels on the CPU need TRITON_INTERPRET=1 before they are imported")


def rope_kernel_setup(qkv, cos, sin, heads, kv_heads, head_dim):
    _triton_ready("dbrx_fast.ops.rope", qkv.device)
    from dbrx_fast.ops.rope import rope

    def forward():
        q, k, v = split_heads(qkv, heads, kv_heads, head_dim)
        return (*rope(q, k, cos, sin), v)

    return forward


def dbrx_fast_setup(qkv, cos, sin, heads, kv_heads, head_dim):
    _triton_ready("dbrx_fast.ops.qkv", qkv.device)
    from dbrx_fast.ops.qkv import qkv_rope

    return lambda: qkv_rope(qkv, cos, sin, CLIP_QKV, heads, kv_heads)


SETUPS = {"stock": stock_setup, "rope_kernel": rope_kernel_setup, "dbrx_fast": dbrx_fast_setup}


def qkv_case(tokens: int, heads: int, kv_heads: int, head_dim: int, mode: str, dtype: torch.dtype) -> Case:
    elements = tokens * (heads + 2 * kv_heads) * head_dim
    tables = 2 * tokens * (head_dim // 2) * 4  # float32 cos and sin, first halves
    size = torch.tensor([], dtype=dtype).element_size()
    # forward: qkv in, q/k/v out; backward: dq/dk/dv and qkv in, dqkv out.
    nbytes = {"forward": 2 * elements * size, "full": 5 * elements * size}[mode] + tables * (1 + (mode == "full"))
    shape = {"T": tokens, "Hq": heads, "Hkv": kv_heads, "D": head_dim}
    return Case(shape, mode, flops=0.0, bytes=nbytes, extra={"sweep": "T", "clip_qkv": CLIP_QKV})


def make_qkv_step(forward, mode: str, qkv: torch.Tensor) -> Step:
    """forward: under no_grad. full: forward and backward with fixed random gradients of q, k and v."""
    if mode == "forward":

        def run_forward():
            with torch.no_grad():
                return forward()

        return Step(run_forward)
    grads = [torch.randn_like(t) for t in forward()]

    def run_full():
        torch.autograd.backward(forward(), grads)

    return Step(run_full, [qkv], forward=forward)


def parse_args(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--tokens", nargs="+", help="token counts T (space or comma separated); default 512 ... 16384")
    p.add_argument("--modes", nargs="+", default=["forward", "full"], choices=["forward", "full"])
    p.add_argument("--heads", type=int, help="Hq (default 48; 6 with --smoke)")
    p.add_argument("--kv-heads", type=int, help="Hkv (default 8; 1 with --smoke)")
    p.add_argument("--head-dim", type=int, help="D (default 128; 16 with --smoke)")
    harness.add_common_arguments(
        p, PROVIDERS, DTYPES, "tiny heads on the CPU, one repetition: checks the plumbing", list(PROVIDERS)
    )
    args = harness.finish_common_args(p.parse_args(argv), DBRX_HEADS, SMOKE_HEADS)
    args.tokens = harness.sizes(p, args.tokens, SMOKE_TOKENS if args.smoke else DEFAULT_TOKENS, "--tokens")
    return args


def main(argv=None) -> int:
    return harness.run_main(_run, parse_args(argv))


def _run(args) -> int:
    dtype = DTYPES[args.dtype]
    bench = harness.harness_from_args(SUBJECT, args, dtype)
    heads = (args.heads, args.kv_heads, args.head_dim)
    inv_freq = 1.0 / THETA ** (
        torch.arange(0, args.head_dim, 2, dtype=torch.float32, device=args.device) / args.head_dim
    )
    for tokens in args.tokens:
        width = (args.heads + 2 * args.kv_heads) * args.head_dim
        # Unit variance: about one value in 10**15 beyond DBRX's clip of 8, as in a trained model's projection.
        qkv = torch.randn(1, tokens, width, device=args.device, dtype=dtype, requires_grad=True)
        cos, sin = reference.rope_cos_sin(torch.arange(tokens, device=args.device)[None], inv_freq)
        for mode in args.modes:
            case = qkv_case(tokens, *heads, mode, dtype)
            providers = {name: _provider(SETUPS[name], qkv, cos, sin, heads, mode) for name in args.providers}
            print_rows(bench.run_case(case, providers, BASELINE))
        del qkv
    return harness.exit_status(bench)


def _provider(setup, qkv, cos, sin, heads, mode: str):
    def build(case: Case) -> Step:
        return make_qkv_step(setup(qkv, cos, sin, *heads), mode, qkv)

    return build


if __name__ == "__main__":
    sys.exit(main())
