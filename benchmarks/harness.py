"""The one benchmark harness: timing, memory, same-run references, and the JSON-lines result rows.

A subject (bench_moe.py, ...) describes each case - its shape, mode, FLOP and byte counts, the dense matmul of
equal FLOPs - and gives, per provider, a zero-argument step to time. The harness:
- times the step: `triton.testing.do_bench` (median of CUDA-event timings after warm-up) on a GPU, a plain
  `time.perf_counter` loop (median) on the CPU;
- measures peak memory with `torch.cuda.max_memory_allocated`, reset before every provider, and (full mode) the
  activation memory a forward keeps alive for its backward;
- measures, in the same run, a dense matmul of equal FLOPs (per shape) and a device-to-device copy (GB/s, once),
  and reports each row's ratio to them and to the baseline provider;
- appends rows as JSON lines to `<out>/<device-slug>/<subject>.jsonl`, stamped with device, dtype, versions and
  git commit.
"""

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU only through the interpreter, which must be chosen before the first kernel module
    # is imported: every subject imports this module before dbrx_fast.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
MODES = ("forward", "backward", "full")


class ProviderUnavailable(Exception):
    """Raised by a provider's setup when it cannot run here (a module not written yet, no GPU): the row records why."""


@dataclasses.dataclass
class Step:
    """What to time for one provider and mode.

    fn: runs one step (a forward, a backward or both). grad_to_none: tensors whose .grad is cleared before every
    timed call, so gradient accumulation is not timed. forward: (full mode) runs the forward alone and returns its
    output, to measure the activation memory it keeps for the backward.
    """

    fn: Callable[[], object]
    grad_to_none: list[torch.Tensor] = dataclasses.field(default_factory=list)
    forward: Callable[[], object] | None = None


def make_step(forward: Callable[[], torch.Tensor], mode: str, grad_to_none: list[torch.Tensor]) -> Step:
    """A Step for `mode` from a closure that runs the forward and returns its output.

    forward: the forward under torch.no_grad (inference). backward: the backward alone, through a graph built once
    and retained. full: forward and backward. The output gradient is a fixed random tensor.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "forward":

        def run_forward():
            with torch.no_grad():
                return forward()

        return Step(run_forward)
    if mode == "backward":
        out = forward()
        grad_out = torch.randn_like(out)
        return Step(lambda: out.backward(grad_out, retain_graph=True), grad_to_none)
    grad_out = torch.randn_like(forward().detach())  # only the output's shape is needed: its graph is dropped at once
    return Step(lambda: forward().backward(grad_out), grad_to_none, forward=forward)


@dataclasses.dataclass
class Case:
    """One measured configuration: a shape in one mode, with its work counts.

    flops: floating-point operations of one step (TFLOP/s = flops / time). bytes: bytes one step must move at least
    (GB/s reported only when set, e.g. decode rows counting the weights read). dense_mnk: (M, N, K, repeats) of the
    dense matmul with the same FLOPs, timed in the same run as the reference for TFLOP/s. provider_extra: fields of
    one provider's rows only; a `bound_ms` among them (a cost model's lower bound) gets `vs_bound` = ms / bound_ms.
    """

    shape: dict
    mode: str
    flops: float
    bytes: float | None = None
    dense_mnk: tuple[int, int, int, int] | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    provider_extra: dict[str, dict] = dataclasses.field(default_factory=dict)


class Harness:
    """Runs cases on one device and dtype; owns the same-run references and the results file."""

    def __init__(
        self,
        subject: str,
        device: torch.device,
        dtype: torch.dtype,
        out_dir: Path | None = None,
        *,
        warmup_ms: float = 25,
        rep_ms: float = 100,
        cpu_warmup: int = 1,
        cpu_reps: int = 5,
        copy_bytes: int | None = None,
    ):
        self.subject = subject
        self.device = torch.device(device)
        self.dtype = dtype
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.cpu_warmup, self.cpu_reps = cpu_warmup, cpu_reps
        self.device_name = device_name(self.device)
        self.results_path = Path(out_dir or DEFAULT_OUT) / slug(self.device_name) / f"{subject}.jsonl"
        self.stamp = {
            "versions": versions(),
            "git_commit": git_commit(),
            "device": self.device_name,
            "dtype": str(dtype).removeprefix("torch."),
        }
        default_copy = 1 << 30 if self.device.type == "cuda" else 1 << 26
        self.copy_gbps = self._copy_gbps(copy_bytes or default_copy)
        self._dense_cache: dict[tuple, float] = {}
        self.failures: list[str] = []

    # ---- timing and memory -------------------------------------------------------------------------------------

    def time_ms(self, step: Step) -> float:
        """Median milliseconds of one step."""
        if self.device.type == "cuda":
            import triton.testing

            return triton.testing.do_bench(
                step.fn,
                warmup=self.warmup_ms,
                rep=self.rep_ms,
                grad_to_none=step.grad_to_none or None,
                return_mode="median",
            )
        for _ in range(self.cpu_warmup):  # first-call allocations and lazy initialisation are not timed
            step.fn()
        times = []
        for _ in range(self.cpu_reps):
            for t in step.grad_to_none:
                t.grad = None
            start = time.perf_counter()
            step.fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def peak_mb(self, step: Step) -> float | None:
        """Peak allocated memory (MiB, everything live: inputs, weights, workspace) during one step; None on CPU."""
        if self.device.type != "cuda":
            return None
        for t in step.grad_to_none:
            t.grad = None
        _release(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        step.fn()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def activation_mb(self, step: Step) -> float | None:
        """Memory (MiB) a forward leaves allocated for its backward: saved tensors plus the output; None on CPU."""
        if self.device.type != "cuda" or step.forward is None:
            return None
        _release(self.device)
        before = torch.cuda.memory_allocated(self.device)
        out = step.forward()
        torch.cuda.synchronize(self.device)
        retained = torch.cuda.memory_allocated(self.device) - before
        del out
        return retained / 2**20

    # ---- same-run references ----------------------------------------------------------------------------------

    def _copy_gbps(self, nbytes: int) -> float:
        """Device copy bandwidth, GB/s counting the bytes read and written."""
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device).random_(0, 255)
        dst = torch.empty_like(src)
        ms = self.time_ms(Step(lambda: dst.copy_(src)))
        return 2 * nbytes / (ms * 1e-3) / 1e9

    def dense_tflops(self, m: int, n: int, k: int, repeats: int = 1) -> float:
        """TFLOP/s of `repeats` dense [m, k] @ [k, n] matmuls in this dtype (into a preallocated output)."""
        key = (m, n, k, repeats)
        if key not in self._dense_cache:
            a = torch.randn(m, k, device=self.device, dtype=self.dtype)
            b = torch.randn(k, n, device=self.device, dtype=self.dtype)
            c = torch.empty(m, n, device=self.device, dtype=self.dtype)

            def run():
                for _ in range(repeats):
                    torch.mm(a, b, out=c)

            ms = self.time_ms(Step(run))
            self._dense_cache[key] = 2.0 * m * n * k * repeats / (ms * 1e-3) / 1e12
        return self._dense_cache[key]

    # ---- running cases ----------------------------------------------------------------------------------------

    def run_case(
        self, case: Case, providers: dict[str, Callable[[Case], Step]], baseline: str | tuple[str, ...] | None
    ) -> list[dict]:
        """Measure every provider on `case`, append the rows to the results file, and return them. `vs_baseline`
        compares with the baseline provider, or with the fastest of several (SDPA's backends, say), which each row
        names as `baseline`.

        A provider whose setup raises ProviderUnavailable gets a row with status "unavailable: <why>"; running out
        of GPU memory gives "oom"; any other exception gives "error: ..." with the traceback printed, is remembered
        in self.failures (the script exits non-zero) and does not stop the other providers.
        """
        dense = self.dense_tflops(*case.dense_mnk) if case.dense_mnk else None
        rows = []
        for name, setup in providers.items():
            row = self._row(case, name, dense)
            try:
                step = setup(case)
                row["ms"] = self.time_ms(step)
                row["peak_mb"] = self.peak_mb(step)
                if case.mode == "full":
                    row["activation_mb"] = self.activation_mb(step)
                row["status"] = "ok"
            except ProviderUnavailable as e:
                row["status"] = f"unavailable: {e}"
            except torch.cuda.OutOfMemoryError:
                row["status"] = "oom"
            except Exception as e:  # recorded in the row and in self.failures, which makes the script exit non-zero
                traceback.print_exc()
                row["status"] = f"error: {type(e).__name__}: {e}"
                self.failures.append(f"{name} {case.mode} {case.shape}: {row['status']}")
            finally:
                step = None
                _release(self.device)
            _fill_rates(row, case, dense, self.copy_gbps)
            rows.append(row)
        candidates = (baseline,) if isinstance(baseline, str) else baseline or ()
        base = min((r for r in rows if r["provider"] in candidates and r["ms"]), key=lambda r: r["ms"], default=None)
        for r in rows:
            r["vs_baseline"] = base["ms"] / r["ms"] if base and r["ms"] else None
            r["baseline"] = base["provider"] if base else None
        self._append(rows)
        return rows

    def _row(self, case: Case, provider: str, dense: float | None) -> dict:
        return {
            "subject": self.subject,
            **self.stamp,
            "shape": case.shape,
            "mode": case.mode,
            "provider": provider,
            "status": None,
            "ms": None,
            "flops": case.flops,
            "bytes": case.bytes,
            "tflops": None,
            "gbps": None,
            "dense_tflops": dense,
            "copy_gbps": self.copy_gbps,
            "vs_dense": None,
            "vs_copy": None,
            "vs_baseline": None,
            "peak_mb": None,
            "activation_mb": None,
            **case.extra,
            **case.provider_extra.get(provider, {}),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def _append(self, rows: list[dict]) -> None:
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        with self.results_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row, allow_nan=False) + "\n")


def _fill_rates(row: dict, case: Case, dense: float | None, copy_gbps: float) -> None:
    ms = row["ms"]
    if not ms:
        return
    row["tflops"] = case.flops / (ms * 1e-3) / 1e12
    if dense:
        row["vs_dense"] = row["tflops"] / dense
    if case.bytes:
        row["gbps"] = case.bytes / (ms * 1e-3) / 1e9
        row["vs_copy"] = row["gbps"] / copy_gbps
    if row.get("bound_ms"):
        row["vs_bound"] = ms / row["bound_ms"]


def _release(device: torch.device) -> None:
    """Free what the previous provider left, so its cached blocks do not count against the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---- stamps -------------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()}"


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the results directory of a device."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("triton", "transformers"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            found[module] = None
    if torch.version.cuda:
        found["cuda"] = torch.version.cuda
    return found


def git_commit() -> str:
    """HEAD of the repository, with '-dirty' when the working tree has changes; 'unknown' outside git.

    DBRX_FAST_GIT_COMMIT, when set, is taken instead: a lent GPU machine gets a copy of the tree without .git.
    """
    if os.environ.get("DBRX_FAST_GIT_COMMIT"):
        return os.environ["DBRX_FAST_GIT_COMMIT"]

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        # Result files appended by earlier runs do not make the measured code dirty.
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def print_rows(rows: list[dict], file=sys.stdout) -> None:
    """One readable line per row, as the run goes."""
    for r in rows:
        parts = [f"{r['mode']:<8}", f"{_shape_str(r['shape']):<32}", f"{r['provider']:<14}"]
        if r["status"] != "ok":
            parts.append(str(r["status"]))
        else:
            parts.append(f"{r['ms']:10.4f} ms  {r['tflops']:8.2f} TFLOP/s")
            if r["vs_dense"] is not None:
                parts.append(f"{r['vs_dense']:6.2f}x dense")
            if r["gbps"] is not None:
                parts.append(f"{r['gbps']:8.1f} GB/s {r['vs_copy']:5.2f}x copy")
            if r.get("vs_bound") is not None:
                parts.append(f"{r['vs_bound']:6.2f}x bound")
            if r["vs_baseline"] is not None:
                parts.append(f"{r['vs_baseline']:6.2f}x baseline")
            if r["peak_mb"] is not None:
                parts.append(f"peak {r['peak_mb']:.0f} MiB")
            if r["activation_mb"] is not None:
                parts.append(f"act {r['activation_mb']:.0f} MiB")
        print("  ".join(parts), file=file, flush=True)


def _shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


# ---- the command line every subject shares ------------------------------------------------------------------------


def parser(doc: str) -> argparse.ArgumentParser:
    """A subject's parser, described by the first paragraph of its docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)


def add_common_arguments(
    p: argparse.ArgumentParser,
    providers: tuple,
    dtypes: dict,
    smoke_help: str,
    default_providers: list | None,
    providers_help: str | None = None,
) -> None:
    """--providers, --dtype, --device, --smoke, --out, --warmup-ms, --rep-ms, --seed."""
    p.add_argument("--providers", nargs="+", default=default_providers, choices=providers, help=providers_help)
    p.add_argument("--dtype", default="bf16", choices=list(dtypes))
    p.add_argument("--device", help="default: cuda when available, else cpu (always cpu with --smoke)")
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--out", type=Path, help="results directory (default benchmarks/results; --smoke: a temporary one)")
    p.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up on a GPU")
    p.add_argument("--rep-ms", type=float, default=100, help="do_bench measuring time on a GPU")
    p.add_argument("--seed", type=int, default=0)


def finish_common_args(args: argparse.Namespace, defaults: dict, smoke_defaults: dict) -> argparse.Namespace:
    """Fills the widths left unset (smoke_defaults with --smoke, else defaults), the smoke run's temporary --out and
    the device."""
    for name, default in (smoke_defaults if args.smoke else defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.smoke and args.out is None:  # smoke rows mean nothing: keep them out of the tracked results
        args.out = Path(tempfile.mkdtemp(prefix="dbrx-fast-bench-smoke-"))
    args.device = torch.device("cpu" if args.smoke else args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def sizes(p: argparse.ArgumentParser, given: list[str] | None, default: tuple, flag: str) -> list[int]:
    """The sweep's sizes: default when not given, else the given ones (space or comma separated), all positive."""
    values = list(default) if given is None else [int(v) for item in given for v in item.split(",") if v]
    if any(v < 1 for v in values):
        p.error(f"{flag} must be positive")
    return values


def run_main(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """run(args) seeded with --seed, on one intra-op thread with --smoke (restored after)."""
    threads = torch.get_num_threads()
    if args.smoke:  # tiny ops on a small shared CPU: intra-op threads only add contention (10-100x slower)
        torch.set_num_threads(1)
    try:
        torch.manual_seed(args.seed)
        return run(args)
    finally:
        torch.set_num_threads(threads)


def harness_from_args(subject: str, args: argparse.Namespace, dtype: torch.dtype) -> Harness:
    """The subject's Harness for the parsed common arguments; prints the run's header line."""
    # --smoke checks the plumbing, not the speed: one timed call and no warm-up keep Triton's CPU interpreter (the
    # dbrx_fast provider on a machine without a GPU) within seconds.
    cpu_runs = {"cpu_warmup": 0, "cpu_reps": 1} if args.smoke else {}
    harness = Harness(
        subject,
        args.device,
        dtype,
        args.out,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        copy_bytes=1 << 22 if args.device.type == "cpu" else None,
        **cpu_runs,
    )
    print(
        f"# {subject} on {harness.device_name}, {args.dtype}; copy {harness.copy_gbps:.1f} GB/s; "
        f"versions {harness.stamp['versions']}; commit {harness.stamp['git_commit']}",
        flush=True,
    )
    return harness


def exit_status(harness: Harness) -> int:
    """Says where the rows went and lists the failures; 1 if any, else 0."""
    print(f"# rows appended to {harness.results_path}")
    if harness.failures:
        print("# failures:\n#   " + "\n#   ".join(harness.failures), file=sys.stderr)
        return 1
    return 0
