"""One command for a lent GPU: the GPU test tier, then the MoE benchmark, with logs, results and report in one folder.

    python3 benchmarks/gpu_check.py --out DIR [--commit SHA]    # or: make gpu-check OUT=DIR
    python3 benchmarks/gpu_check.py --out DIR --dry-run         # the same plumbing on a CPU, in seconds

Made for a machine with no network and a bare, preinstalled torch/Triton/transformers (python3 here is the one that
holds them), and for one call of at most 10 minutes. Stages, each run even when an earlier one failed:

1. dbrx_fast made importable from this checkout without downloading anything: already importable from here, else
   `pip install --no-index --no-build-isolation --no-deps -e .`, else an overlay folder whose dbrx_fast/ links this
   checkout's package files and kernels/ (the wheel's layout) and is put first on sys.path.
2. tests: `pytest -m "gpu or interpreter"` (xdist workers when pytest-xdist is there: the tier is bound by Triton's
   compiler, one core a compile), capped at --tests-timeout seconds -> tests.log (JUnit XML kept aside: the summary
   has its counts and failures).
3. bench: benchmarks/bench_moe.py at DBRX's widths (H 6144, F 10752, E 16, k 4), bf16, T = 1 ... 16384, forward and
   full, stock / torch_grouped / dbrx_fast, capped at --bench-timeout seconds -> bench.log, results/<device>/moe.jsonl
   (rows are appended as each T finishes, so a run stopped at the cap keeps what it measured); then the benchmarks
   of MORE_BENCHES, each its own stage with its own cap (bench_attention, bench_qkv,
   bench_decode) -> results/<device>/<subject>.jsonl.
4. summary.txt: machine, versions, each stage's outcome, test counts and failures, then the report
   (benchmarks/report.py over those results); the report and then the summary are printed last. Files: env.txt,
   tests.log, bench.log, summary.txt and one results file a benchmark, 8 in all, the most a device call brings back.

The bench's time, estimated for one H100/H200 from ~600 TFLOP/s bf16 and ~3.5 TB/s: its steps are short (the largest,
T = 16384 full, is 78 TFLOP: ~0.15 s; decode steps read the 6.3 GB of expert weights: ~2 ms), so the do_bench calls of
6 sizes x 2 modes x 3 providers take ~1 min; most of the rest is dbrx_fast's first calls: compiling ~30 GEMM configs
(bf16: 7 + 7 forward, ~16 backward; ~2-3 s each, once, as the row count is not specialized on) and
autotuning each of 6 row-count buckets (~30 configs x ~0.2-0.5 s each). Estimate 3-5 minutes in all: the cap can
cut the last rows (each T's rows are appended as it finishes). Then the benchmarks of MORE_BENCHES, each its own stage
with its own cap, into the same bench.log and results/<device>/<name>.jsonl. The stages' caps (tests 150, MoE 220,
attention 75, qkv 35, decode 50 s) and the set-up (~30 s) keep the whole run under 10 minutes.

Exits 0 only when every stage passed.
"""

import argparse
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_TIER = "gpu or interpreter"
BENCH_TOKENS = (1, 16, 128, 1024, 4096, 16384)
BENCH_MODES = ("forward", "full")
# --dry-run: collect (not run) the GPU tier, and bench_moe's tiny CPU widths with the Triton provider interpreted.
DRY_TESTS = ("--collect-only",)
DRY_BENCH = ("--smoke", "--tokens", "3", "--modes", "forward", "--providers", "torch_grouped", "dbrx_fast")
# The benchmarks after bench_moe, each its own stage into bench.log: (stage, module, arguments, dry-run arguments, cap
# in seconds). bench_attention: DBRX's heads, causal, forward and backward, three lengths (about a minute on an
# H100/H200, most of it the Triton kernels' first compile and autotune). bench_qkv: 6 sizes x 2 modes x 3 providers of
# sub-millisecond steps, plus compiling and autotuning the fused kernel's 5 configs forward and backward: ~20 s.
MORE_BENCHES = (
    (
        "bench_attention",
        "benchmarks.bench_attention",
        ("--lengths", "1024", "4096", "16384"),
        ("--smoke", "--lengths", "20", "--modes", "forward", "--providers", "sdpa_flash", "dbrx_fast"),
        75,
    ),
    ("bench_qkv", "benchmarks.bench_qkv", (), ("--smoke", "--tokens", "3", "--modes", "forward"), 35),
    (
        "bench_decode",
        "benchmarks.bench_decode",
        (
            "--contexts",
            "1024",
            "8192",
            "32768",
            "--providers",
            "sdpa_gqa",
            "flash_attn",
            "dbrx_fast",
            "dbrx_fast_static",
        ),
        ("--smoke", "--contexts", "17", "--batches", "1", "--providers", "sdpa_gqa", "dbrx_fast"),
        50,
    ),
)
PACKAGES = ("torch", "triton", "transformers", "accelerate", "numpy", "pytest", "pytest-xdist", "setuptools")
# Run in the child that probes the environment: where dbrx_fast comes from, and the device.
PROBE = """
import json, torch, dbrx_fast, dbrx_fast.kernels
cuda = torch.cuda.is_available()
print(json.dumps({"dbrx_fast": dbrx_fast.__file__, "kernels": dbrx_fast.kernels.__file__, "cuda": cuda,
    "device": torch.cuda.get_device_name() if cuda else None, "torch_cuda": torch.version.cuda,
    "devices": torch.cuda.device_count()}))
"""


class Check:
    """The run's output folder, its stage outcomes, and how children are started (python, cwd, environment)."""

    def __init__(self, out: Path, commit: str | None):
        self.out = out
        self.stages: list[tuple[str, bool, str, float]] = []  # (name, passed, what happened, seconds)
        # Children run with cwd = a scratch folder, which `python -m` puts first on sys.path: it holds a link to
        # benchmarks/ (and, when dbrx_fast is not installed, the overlay package), so the checkout's root, whose
        # top-level `kernels` folder would shadow Hugging Face's `kernels` package, is never on sys.path.
        self.cwd = Path(tempfile.mkdtemp(prefix="dbrx-fast-gpu-check-"))
        (self.cwd / "benchmarks").symlink_to(ROOT / "benchmarks")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if commit:
            self.env["DBRX_FAST_GIT_COMMIT"] = commit  # the device's copy of the tree may have no .git

    def run(self, name: str, cmd: list[str], log: Path, timeout: float | None = None) -> bool:
        """Run one stage's command with stdout and stderr into `log`; record and return whether it passed."""
        start = time.monotonic()
        with log.open("a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            # Its own process group, so that a stage past its cap is stopped with every worker it started.
            child = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env, start_new_session=True
            )
            try:
                code = child.wait(timeout=timeout)
                passed, what = code == 0, f"exit {code}"
            except subprocess.TimeoutExpired:
                _stop(child)
                passed, what = False, f"stopped at its {timeout:.0f} s cap"
        return self.record(name, passed, what, time.monotonic() - start)

    def record(self, name: str, passed: bool, what: str, seconds: float) -> bool:
        self.stages.append((name, passed, what, seconds))
        print(f"gpu-check: {name}: {'ok' if passed else 'FAILED'}, {what} ({seconds:.0f} s)", flush=True)
        return passed

    def failed(self) -> list[str]:
        return [name for name, passed, _, _ in self.stages if not passed]


def python(*args: str) -> list[str]:
    """A command line for the Python running this script (on the GPU image, the one that holds torch)."""
    return [sys.executable, *args]


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group, then SIGKILL to whatever of it is left 15 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:  # the whole group is gone
            break
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    child.wait()


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def nvidia_smi() -> str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi: not on PATH\n"
    query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
    parts = []
    for args in (["nvidia-smi"], ["nvidia-smi", f"--query-gpu={query}", "--format=csv"]):
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=60)
            parts.append(f"$ {shlex.join(args)}\n{done.stdout}{done.stderr}")
        except subprocess.TimeoutExpired:
            parts.append(f"$ {shlex.join(args)}\nno answer within 60 s")
    return "\n".join(parts)


def probe(check: Check) -> dict | None:
    """dbrx_fast as the stages will import it; None if it does not import."""
    try:
        done = subprocess.run(
            python("-c", PROBE), cwd=check.cwd, env=check.env, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        done = subprocess.CompletedProcess(PROBE, -1, "", "probe: no answer within 300 s")
    with (check.out / "env.txt").open("a") as f:
        f.write(f"$ probe (cwd {check.cwd})\n{done.stdout}{done.stderr[-4000:]}\n")
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def from_this_checkout(found: dict | None) -> bool:
    """The probe imported this checkout's files (not a stale install elsewhere)."""
    if found is None:
        return False
    package, kernels = (Path(found[name]).resolve().parent for name in ("dbrx_fast", "kernels"))
    return package == ROOT / "dbrx_fast" and kernels == ROOT / "kernels"


def make_overlay(check: Check) -> None:
    """dbrx_fast/ in the children's cwd: links to this checkout's package files, and kernels/ as dbrx_fast.kernels."""
    package = check.cwd / "dbrx_fast"
    package.mkdir()
    for entry in (ROOT / "dbrx_fast").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "kernels").symlink_to(ROOT / "kernels")


def set_up(check: Check, allow_pip: bool, force_overlay: bool) -> dict | None:
    """Make dbrx_fast importable from this checkout; the probe's answer, or None when nothing worked."""
    start = time.monotonic()
    env_log = check.out / "env.txt"
    found = None if force_overlay else probe(check)
    how = "already importable"
    if not from_this_checkout(found) and allow_pip and not force_overlay:
        how = "pip install -e (no index, no build isolation, no dependencies)"
        pip = ["-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-q", "-e", str(ROOT)]
        with env_log.open("a") as f:
            f.write(f"$ {shlex.join(python(*pip))}\n")
            f.flush()
            try:
                subprocess.run(python(*pip), stdout=f, stderr=subprocess.STDOUT, env=check.env, timeout=300)
            except subprocess.TimeoutExpired:
                f.write("pip: stopped after 300 s\n")
        found = probe(check)
    if not from_this_checkout(found):
        how = "overlay of links on sys.path"
        make_overlay(check)
        found = probe(check)
    ok = from_this_checkout(found)
    check.record(
        "setup", ok, how if ok else "dbrx_fast does not import from this checkout (env.txt)", time.monotonic() - start
    )
    return found if ok else None


def junit_summary(path: Path) -> str:
    """'N tests, F failed, E errors, S skipped' and the failing tests' names, from pytest's JUnit XML."""
    if not path.exists():
        return "no junit.xml (stopped before the end?)"
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    failing = []
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in totals:
            totals[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failing.append(f"{case.get('classname')}::{case.get('name')}")
    lines = [
        f"{totals['tests']} tests, {totals['failures']} failed, {totals['errors']} errors, {totals['skipped']} skipped"
    ]
    lines += [f"  FAILED {name}" for name in failing[:40]]
    if len(failing) > 40:
        lines.append(f"  ... and {len(failing) - 40} more (junit.xml)")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for logs, results and the report (created)")
    p.add_argument("--commit", help="git commit to stamp on the result rows (the device's copy may have no .git)")
    p.add_argument("--skip", nargs="+", choices=("tests", "bench"), default=[], help="leave these stages out")
    p.add_argument("--tests-timeout", type=float, default=150, help="cap on the test stage, seconds")
    p.add_argument("--bench-timeout", type=float, default=220, help="cap on the MoE benchmark stage, seconds")
    p.add_argument("--workers", type=int, help="pytest-xdist workers (0: none; default with a GPU: all cores but 2)")
    p.add_argument("--overlay", action="store_true", help="use the overlay even when dbrx_fast is installed")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="rehearse on a CPU in seconds: no pip, collect the GPU tier without running it, bench_moe --smoke",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.commit)
    try:
        return _run(args, check)
    finally:
        shutil.rmtree(check.cwd, ignore_errors=True)


def _run(args, check: Check) -> int:
    out = check.out
    started = time.monotonic()
    report = ""  # benchmarks/report.py's tables, at the end of summary.txt
    found_versions = versions()
    with (out / "env.txt").open("w") as f:
        f.write(f"gpu-check of {ROOT}, commit {args.commit or 'not given'}\n{json.dumps(found_versions)}\n\n")
        f.write(nvidia_smi() + "\n")
    found = set_up(check, allow_pip=not args.dry_run, force_overlay=args.overlay)
    if found and not found["cuda"] and not args.dry_run:
        check.record("gpu", False, "torch sees no CUDA device (--dry-run rehearses on a CPU)", 0)
        found = None
    if found:
        if "tests" not in args.skip:
            workers = args.workers
            if workers is None:
                has_xdist = found_versions["pytest-xdist"] != "absent"
                workers = max(1, (os.cpu_count() or 1) - 2) if found["cuda"] and has_xdist else 0
            tests = ["-m", "pytest", str(ROOT / "tests"), "-m", GPU_TIER, "-v", "-rfEs", "--durations=20"]
            tests += [f"--junitxml={check.cwd / 'junit.xml'}", *(["-n", str(workers)] if workers else [])]
            tests += DRY_TESTS if args.dry_run else []
            check.run("tests", python(*tests), out / "tests.log", args.tests_timeout)
        if "bench" not in args.skip:
            bench = ["-m", "benchmarks.bench_moe", "--out", str(out / "results")]
            if args.dry_run:
                bench += DRY_BENCH
            else:
                bench += ["--tokens", *map(str, BENCH_TOKENS), "--modes", *BENCH_MODES]
            check.run("bench", python(*bench), out / "bench.log", args.bench_timeout)
            for stage, module, full, dry, cap in MORE_BENCHES:
                more = ["-m", module, "--out", str(out / "results"), *(dry if args.dry_run else full)]
                check.run(stage, python(*more), out / "bench.log", cap)
            report_cmd = python("-m", "benchmarks.report", str(out / "results"), "--no-plots")
            done = subprocess.run(report_cmd, capture_output=True, text=True, cwd=check.cwd, env=check.env)
            report = done.stdout + done.stderr
            check.record("report", done.returncode == 0, f"exit {done.returncode}", 0)

    failed = check.failed()
    lines = [f"gpu-check: {'OK' if not failed else 'FAILED: ' + ', '.join(failed)}"]
    if found:
        lines.append(f"device: {found['device'] or 'cpu (dry run)'} x{found['devices']}; CUDA {found['torch_cuda']}")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in found_versions.items()))
    lines.append(f"commit: {args.commit or 'not given (rows carry what git says, or unknown)'}")
    lines += [f"stage {name}: {'ok' if ok else 'FAILED'}, {what} ({s:.0f} s)" for name, ok, what, s in check.stages]
    if (out / "tests.log").exists():
        lines.append("tests: " + junit_summary(check.cwd / "junit.xml"))
    lines.append(f"total {time.monotonic() - started:.0f} s; files in {out}:")
    lines += [f"  {p.relative_to(out)}" for p in sorted(out.rglob("*")) if p.is_file() and p.name != "summary.txt"]
    summary = "\n".join(lines) + "\n  summary.txt\n"
    (out / "summary.txt").write_text(summary + "\n" + report)
    print(report)
    print(summary, end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
