"""`dbrx-fast demo` (or `python -m dbrx_fast demo`): build a DBRX-shaped model, patch it, check it against stock,
and time both.

Presets: `small` (default; a few seconds of work on a CPU) and `dbrx-layers` (DBRX's real widths with a few layers,
for a GPU). `--model PATH` loads a local checkpoint instead. Exits non-zero when the patched model disagrees with
stock.
"""

import argparse
import statistics
import sys
import time

import torch

import dbrx_fast
from dbrx_fast.backend import interpreter_enabled, resolve

PRESETS = {
    "small": dict(d_model=512, n_heads=8, kv_n_heads=2, n_layers=2, ffn_hidden_size=512, vocab_size=1024),
    "dbrx-layers": dict(d_model=6144, n_heads=48, kv_n_heads=8, n_layers=2, ffn_hidden_size=10752, vocab_size=100352),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import DbrxConfig, DbrxForCausalLM

    if args.model:
        return DbrxForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    shape = dict(PRESETS[args.preset])
    if args.layers:
        shape["n_layers"] = args.layers
    config = DbrxConfig(
        d_model=shape["d_model"],
        n_heads=shape["n_heads"],
        n_layers=shape["n_layers"],
        vocab_size=shape["vocab_size"],
        max_seq_len=4096,
        attn_config={"kv_n_heads": shape["kv_n_heads"], "clip_qkv": 8.0, "rope_theta": 500000.0},
        ffn_config={"ffn_hidden_size": shape["ffn_hidden_size"], "moe_num_experts": 16, "moe_top_k": 4},
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype, on the device: no full-precision copy on the side
    try:
        with torch.device(device):
            model = DbrxForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def median_ms(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up caches and compiles kernels
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def measure(model, ids, new_tokens: int, repeats: int, device: torch.device) -> dict:
    """Logits, greedy tokens and timings of one model on one batch."""
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = model(ids).logits.float()
        tokens = model.generate(ids, **gen)
        prefill = median_ms(lambda: model(ids), repeats, device)
        generate = median_ms(lambda: model.generate(ids, **gen), repeats, device)
    return dict(logits=logits, tokens=tokens, prefill=prefill, generate=generate)


def demo(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        # Too late to set it here: transformers has imported triton, which reads the variable once.
        print(
            "dbrx-fast demo: --backend triton on the CPU runs the kernels through Triton's interpreter; run it as "
            "`TRITON_INTERPRET=1 dbrx-fast demo --backend triton ...`",
            file=sys.stderr,
        )
        return 2

    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    torch.manual_seed(args.seed)
    model = build_model(args, device, dtype)
    config = model.config
    ids = torch.randint(1, config.vocab_size, (args.batch, args.seq), device=device)
    what = args.model or f"preset {args.preset}"
    print(
        f"dbrx-fast demo: {what} (d_model {config.d_model}, {config.n_layers} layers, "
        f"{config.ffn_config.moe_num_experts} experts top-{config.ffn_config.moe_top_k}), {dtype} on {device}, "
        f"backend {args.backend} -> {resolve(args.backend, device)}"
    )

    stock = measure(model, ids, args.new_tokens, args.repeats, device)
    dbrx_fast.patch(model, backend=args.backend)
    fast = measure(model, ids, args.new_tokens, args.repeats, device)
    dbrx_fast.unpatch(model)

    diff = (fast["logits"] - stock["logits"]).abs().max().item()
    relative = diff / stock["logits"].abs().max().item()
    same = torch.equal(fast["tokens"], stock["tokens"])
    print(
        f"check vs stock: max |logit diff| {diff:.3g} (relative {relative:.3g}); "
        f"greedy tokens ({args.new_tokens} per sequence) equal: {'yes' if same else 'NO'}"
    )

    rows = [
        (f"prefill {args.batch}x{args.seq} tokens", stock["prefill"], fast["prefill"]),
        (f"generate {args.new_tokens} tokens x {args.batch}", stock["generate"], fast["generate"]),
    ]
    print(f"{'timing (median of ' + str(args.repeats) + ')':<34}{'stock':>12}{'dbrx-fast':>12}{'speed-up':>10}")
    for label, slow, quick in rows:
        print(f"  {label:<32}{slow:>9.1f} ms{quick:>9.1f} ms{slow / quick:>9.2f}x")

    # bf16 routing may pick other experts than stock's bf16 softmax, so only fp32 demands identical tokens.
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    ok = relative <= tolerance and (same or dtype != torch.float32)
    print("result: OK" if ok else f"result: MISMATCH (relative logit difference above {tolerance})")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dbrx-fast", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="build, patch, check against stock and time a DBRX-shaped model")
    run.add_argument("--preset", choices=sorted(PRESETS), default="small")
    run.add_argument("--model", help="path of a local DBRX checkpoint (instead of a random preset)")
    run.add_argument("--layers", type=int, help="number of layers of the preset")
    run.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    run.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    run.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on the CPU")
    run.add_argument("--batch", type=int, default=2)
    run.add_argument("--seq", type=int, default=64)
    run.add_argument("--new-tokens", type=int, default=8)
    run.add_argument("--repeats", type=int, default=3)
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
