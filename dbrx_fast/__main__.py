"""`dbrx-fast demo` (or `python -m dbrx_fast demo`): build a DBRX-shaped model, patch it, check it against stock,
and time both.

Presets: `small` (default; a few seconds of work on a CPU), `tiny` (the default when the kernels run through Triton's
interpreter on a CPU, which takes seconds per kernel launch) and `dbrx-layers` (DBRX's real widths with a few layers,
for a GPU). `--model PATH` loads a local checkpoint instead. Exits 1 when the patched model disagrees with stock, 2
on bad arguments (a one-line message, no traceback).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import dbrx_fast
from dbrx_fast.backend import interpreter_enabled, resolve

PRESETS = {
    "tiny": dict(d_model=256, n_heads=4, kv_n_heads=2, n_layers=1, ffn_hidden_size=256, vocab_size=512),
    "small": dict(d_model=512, n_heads=8, kv_n_heads=2, n_layers=2, ffn_hidden_size=512, vocab_size=1024),
    "dbrx-layers": dict(d_model=6144, n_heads=48, kv_n_heads=8, n_layers=2, ffn_hidden_size=10752, vocab_size=100352),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Defaults for a normal run, and for a run whose kernels go through Triton's interpreter: every program of every
# launch is executed one after another in Python, so a tiny model, few tokens and no timing loop (it would time the
# interpreter) keep it to about a minute on 2 cores (the small preset at seq 16, timed, took 14 minutes).
DEFAULTS = dict(preset="small", batch=2, seq=64, new_tokens=8, repeats=3)
INTERPRETER_DEFAULTS = dict(preset="tiny", batch=1, seq=16, new_tokens=4, repeats=0)


class UsageError(Exception):
    """A bad argument: `main` prints the message on one line and exits 2."""


class Progress:
    """A line on stderr per step, with the seconds since the start: an interpreted run takes minutes."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, what: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {what}", file=sys.stderr, flush=True)


class TokenProgress:
    """A `generate` streamer (put() gets the prompt, then each step's tokens) that reports each generated token."""

    def __init__(self, progress: Progress, label: str, total: int):
        self.progress, self.label, self.total, self.calls = progress, label, total, 0

    def put(self, value) -> None:
        if self.calls:
            self.progress(f"{self.label}: token {self.calls}/{self.total} generated")
        self.calls += 1

    def end(self) -> None:
        pass


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name (cuda, cuda:N or cpu)") from None
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {name}: the demo runs on cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UsageError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, {built})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def build_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import DbrxConfig, DbrxForCausalLM

    if args.model:
        try:
            model = DbrxForCausalLM.from_pretrained(args.model, dtype=dtype)
        except (OSError, ValueError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--model {args.model}: not a loadable DBRX checkpoint: {first_line}") from None
        return model.to(device).eval()
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


def measure(model, ids, args, device: torch.device, progress: Progress, label: str, per_token: bool) -> dict:
    """Logits, greedy tokens and (repeats > 0) timings of one model on one batch; per_token: a line per token."""
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    result = {}
    with torch.no_grad():
        progress(f"{label}: forward of {ids.shape[0]}x{ids.shape[1]} tokens")
        result["logits"] = model(ids).logits.float()
        progress(f"{label}: generate {args.new_tokens} tokens")
        streamer = TokenProgress(progress, label, args.new_tokens) if per_token else None
        result["tokens"] = model.generate(ids, **gen, streamer=streamer)
        if args.repeats:
            progress(f"{label}: timing prefill and generate ({args.repeats} + 1 warm-up runs each)")
            result["prefill"] = median_ms(lambda: model(ids), args.repeats, device)
            result["generate"] = median_ms(lambda: model.generate(ids, **gen), args.repeats, device)
    return result


def print_timings(stock: dict, fast: dict, args, device: torch.device) -> None:
    rows = [
        (f"prefill {args.batch}x{args.seq} tokens", stock["prefill"], fast["prefill"]),
        (f"generate {args.new_tokens} tokens x {args.batch}", stock["generate"], fast["generate"]),
    ]
    title = f"timing (median of {args.repeats})" + (" on a CPU: noise" if device.type == "cpu" else "")
    print(f"{title:<34}{'stock':>12}{'dbrx-fast':>12}{'speed-up':>10}")
    for label, slow, quick in rows:
        print(f"  {label:<32}{slow:>9.1f} ms{quick:>9.1f} ms{slow / quick:>9.2f}x")
    if device.type == "cpu":
        print(
            "  (CPU timings are noise for dbrx-fast: the kernels are written and tuned for GPUs, and the torch "
            "backend is the fp32 reference path; run on a GPU for speed)"
        )


def demo(args) -> int:
    device = pick_device(args.device)
    interpreted = args.backend == "triton" and device.type != "cuda"
    if interpreted and not interpreter_enabled():
        # Too late to set it here: transformers has imported triton, which reads the variable once.
        raise UsageError(
            "--backend triton on the CPU runs the kernels through Triton's interpreter; run it as "
            "`TRITON_INTERPRET=1 dbrx-fast demo --backend triton ...`"
        )
    if args.model and not Path(args.model).exists():
        raise UsageError(f"--model {args.model}: no such file or directory (give a local checkpoint directory)")
    for name, value in (INTERPRETER_DEFAULTS if interpreted else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    progress = Progress()
    torch.manual_seed(args.seed)
    progress(f"loading {args.model}" if args.model else f"building the {args.preset} model")
    model = build_model(args, device, dtype)
    config = model.config
    ids = torch.randint(1, config.vocab_size, (args.batch, args.seq), device=device)
    what = args.model or f"preset {args.preset}"
    print(
        f"dbrx-fast demo: {what} (d_model {config.d_model}, {config.n_layers} layers, "
        f"{config.ffn_config.moe_num_experts} experts top-{config.ffn_config.moe_top_k}), {dtype} on {device}, "
        f"backend {args.backend} -> {resolve(args.backend, device)}",
        flush=True,
    )
    if interpreted:
        print(
            "Triton's interpreter runs every kernel program in Python: about a minute for the tiny preset, progress "
            "on stderr; no timing (it would time the interpreter)",
            flush=True,
        )

    stock = measure(model, ids, args, device, progress, "stock", per_token=False)
    dbrx_fast.patch(model, backend=args.backend)
    fast = measure(model, ids, args, device, progress, "dbrx-fast", per_token=interpreted)
    dbrx_fast.unpatch(model)
    progress("done")

    diff = (fast["logits"] - stock["logits"]).abs().max().item()
    relative = diff / stock["logits"].abs().max().item()
    same = torch.equal(fast["tokens"], stock["tokens"])
    print(
        f"check vs stock: max |logit diff| {diff:.3g} (relative {relative:.3g}); "
        f"greedy tokens ({args.new_tokens} per sequence) equal: {'yes' if same else 'NO'}"
    )
    if args.repeats:
        print_timings(stock, fast, args, device)

    # bf16 routing may pick other experts than stock's bf16 softmax, so only fp32 demands identical tokens.
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    ok = relative <= tolerance and (same or dtype != torch.float32)
    print("result: OK" if ok else f"result: MISMATCH (relative logit difference above {tolerance})")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dbrx-fast", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="build, patch, check against stock and time a DBRX-shaped model")

    def defaults(name: str) -> str:
        return f"default {DEFAULTS[name]}; under Triton's interpreter on a CPU: {INTERPRETER_DEFAULTS[name]}"

    run.add_argument("--preset", choices=sorted(PRESETS), help=defaults("preset"))
    run.add_argument("--model", help="path of a local DBRX checkpoint (instead of a random preset)")
    run.add_argument("--layers", type=int, help="number of layers of the preset")
    run.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    run.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    run.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on the CPU")
    run.add_argument("--batch", type=int, help=defaults("batch"))
    run.add_argument("--seq", type=int, help=defaults("seq"))
    run.add_argument("--new-tokens", type=int, help=defaults("new_tokens"))
    run.add_argument("--repeats", type=int, help="timed runs per measurement, 0 for none; " + defaults("repeats"))
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        return demo(args)
    except UsageError as e:
        print(f"dbrx-fast demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
