"""The benchmark plumbing on the CPU: bench_moe --smoke writes complete, finite rows; the harness records provider
failures instead of hiding them; the report reads the rows back. The numbers themselves mean nothing here."""

import importlib.util
import json
import math
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

REQUIRED = {
    "subject",
    "device",
    "dtype",
    "shape",
    "mode",
    "provider",
    "status",
    "ms",
    "flops",
    "tflops",
    "dense_tflops",
    "vs_dense",
    "copy_gbps",
    "vs_baseline",
    "peak_mb",
    "activation_mb",
    "versions",
    "git_commit",
    "timestamp",
    "bytes",
    "gbps",
    "vs_copy",
}


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_moe, harness, report

    return bench_moe, harness, report


def _read_rows(out_dir: Path) -> list[dict]:
    paths = list(out_dir.glob("*/moe.jsonl"))
    assert len(paths) == 1, f"expected one results file, found {paths}"

    def no_nan(name):
        raise AssertionError(f"{name} stored in a result row")

    return [json.loads(line, parse_constant=no_nan) for line in paths[0].read_text().splitlines()]


def _dbrx_fast_runs_on_cpu() -> bool:
    """The kernels are written and, as conftest arranges on a machine without a GPU, interpreted on the CPU."""
    written = all(importlib.util.find_spec(m) is not None for m in ("dbrx_fast.ops.moe", "dbrx_fast.ops.routing"))
    return written and os.environ.get("TRITON_INTERPRET") == "1"


def test_smoke_run_writes_complete_rows(benchmarks, tmp_path):
    bench_moe, _, report = benchmarks
    assert bench_moe.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = _read_rows(tmp_path)
    tokens, modes, providers = bench_moe.SMOKE_TOKENS, ("forward", "full"), bench_moe.PROVIDERS
    assert len(rows) == len(tokens) * len(modes) * len(providers)
    assert {(r["shape"]["T"], r["mode"], r["provider"]) for r in rows} == {
        (t, m, p) for t in tokens for m in modes for p in providers
    }
    for r in rows:
        missing = REQUIRED - r.keys()
        assert not missing, f"row lacks {missing}"
        assert r["subject"] == "moe" and r["dtype"] == "bfloat16" and r["device"].startswith("cpu")
        assert r["versions"]["torch"] == torch.__version__ and r["versions"]["transformers"]
        assert {k: v for k, v in r["shape"].items() if k != "T"} == {"H": 64, "F": 96, "E": 4, "k": 2}
        if r["provider"] == "dbrx_fast" and not _dbrx_fast_runs_on_cpu():
            assert r["status"].startswith("unavailable:") and r["ms"] is None
            continue
        assert r["status"] == "ok", f"{r['provider']} {r['mode']} T={r['shape']['T']}: {r['status']}"
        for field in ("ms", "tflops", "dense_tflops", "vs_dense", "copy_gbps", "vs_baseline", "flops"):
            assert isinstance(r[field], float) and math.isfinite(r[field]) and r[field] > 0, (field, r[field])
        factor = 3 if r["mode"] == "full" else 1
        assert r["flops"] == 6.0 * r["shape"]["T"] * 2 * 64 * 96 * factor
        if r["shape"]["T"] <= bench_moe.DECODE_MAX_TOKENS:
            assert r["experts_used"] >= 2 and r["bytes"] == r["experts_used"] * 3 * 96 * 64 * 2 * factor
            assert r["gbps"] > 0 and r["vs_copy"] > 0
        else:
            assert r["gbps"] is None and r["bytes"] is None
        if r["provider"] == bench_moe.BASELINE:
            assert r["vs_baseline"] == 1.0
        if r["provider"] == "dbrx_fast":  # the cost model's bound beside the measurement
            assert r["bound_ms"] > 0 and r["bound_gpu"] == "H100 SXM" and r["vs_bound"] == r["ms"] / r["bound_ms"]
        else:
            assert "bound_ms" not in r and "vs_bound" not in r
        assert r["peak_mb"] is None and r["activation_mb"] is None  # CUDA counters only

    text = report.tables(report.load(tmp_path))
    assert "### moe / forward / bfloat16" in text and "### moe / full / bfloat16" in text
    assert "| T | provider | ms | TFLOP/s |" in text
    assert text.count("| torch_grouped |") == len(tokens) * len(modes)


def test_harness_records_unavailable_and_failing_providers(benchmarks, tmp_path):
    _, harness, _ = benchmarks
    h = harness.Harness("probe", torch.device("cpu"), torch.float32, tmp_path, cpu_reps=2, copy_bytes=1 << 16)
    x = torch.randn(8, 8, requires_grad=True)

    def working(case):
        return harness.make_step(lambda: (x @ x).sum(1), case.mode, [x])

    def missing(case):
        raise harness.ProviderUnavailable("not written yet")

    def broken(case):
        def forward():
            raise RuntimeError("kernel exploded")

        return harness.make_step(forward, case.mode, [x])

    case = harness.Case({"n": 8}, "full", flops=2.0 * 8**3, dense_mnk=(8, 8, 8, 1))
    rows = h.run_case(case, {"ok": working, "missing": missing, "broken": broken}, baseline="ok")
    status = {r["provider"]: r["status"] for r in rows}
    assert status["ok"] == "ok"
    assert status["missing"] == "unavailable: not written yet"
    assert status["broken"] == "error: RuntimeError: kernel exploded"
    assert h.failures and "broken" in h.failures[0]
    assert [r["ms"] for r in rows if r["provider"] != "ok"] == [None, None]
    stored = [json.loads(line) for line in h.results_path.read_text().splitlines()]
    assert [r["provider"] for r in stored] == ["ok", "missing", "broken"]
    assert h.results_path == tmp_path / harness.slug(h.device_name) / "probe.jsonl"


def test_make_step_modes_and_grad_reset(benchmarks):
    _, harness, _ = benchmarks
    w = torch.randn(4, 4, requires_grad=True)

    def forward():
        return w.sin() * 2

    for mode in ("forward", "backward", "full"):
        step = harness.make_step(forward, mode, [w])
        w.grad = None
        step.fn()
        assert (w.grad is None) == (mode == "forward"), mode
        if mode != "forward":
            assert step.grad_to_none == [w]
    with pytest.raises(ValueError, match="mode must be one of"):
        harness.make_step(forward, "sideways", [w])


def test_slug(benchmarks):
    _, harness, _ = benchmarks
    assert harness.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.slug("cpu x86_64") == "cpu-x86-64"


def test_script_entry_point_and_report(benchmarks, tmp_path, capsys, monkeypatch):
    """`python benchmarks/bench_moe.py` (a script, not -m) finds its package; the report prints its rows.

    Run in this process with runpy (a subprocess would spend most of the time importing torch again), with the
    repository root off sys.path and the benchmarks modules forgotten, so the script's own path set-up is exercised.
    """
    _, _, report = benchmarks
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != ROOT])
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.chdir(tmp_path)
    argv = [
        "bench_moe.py",
        "--smoke",
        "--tokens",
        "3",
        "--modes",
        "forward",
        "--providers",
        "torch_grouped",
        "--out",
        str(tmp_path),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "benchmarks" / "bench_moe.py"), run_name="__main__")
    assert exit_info.value.code == 0
    rows = _read_rows(tmp_path)
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["provider"] == "torch_grouped"
    capsys.readouterr()
    assert report.main([str(tmp_path), "--no-plots"]) == 0
    assert "| 3 | torch_grouped |" in capsys.readouterr().out


def test_smoke_writes_outside_the_tracked_results_unless_asked(benchmarks, tmp_path):
    bench_moe, harness, _ = benchmarks
    default = bench_moe.parse_args(["--smoke"]).out
    assert default is not None and harness.DEFAULT_OUT.resolve() not in (default.resolve(), *default.resolve().parents)
    assert bench_moe.parse_args(["--smoke", "--out", str(tmp_path)]).out == tmp_path
    assert bench_moe.parse_args(["--tokens", "1"]).out is None  # a real run: benchmarks/results


def test_git_commit_stamp_can_be_given(benchmarks, monkeypatch):
    _, harness, _ = benchmarks
    monkeypatch.setenv("DBRX_FAST_GIT_COMMIT", "0123456789ab")
    assert harness.git_commit() == "0123456789ab"


# ---- benchmarks/gpu_check.py: the one command for a lent GPU --------------------------------------------------------


def _bare_python(tmp_path: Path) -> Path:
    """A Python that sees this environment's packages (torch, triton, transformers) but not its dbrx_fast install,
    as the GPU image's python3 does: a fresh venv whose one .pth names this site-packages as a plain path (so the
    editable install's own .pth, which maps dbrx_fast here, is never run)."""
    import sysconfig
    import venv

    venv.create(tmp_path / "bare", with_pip=False, symlinks=True)
    python = tmp_path / "bare" / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_gpu_check_dry_run_without_install(tmp_path):
    """The whole gpu-check on the CPU (--dry-run: collect the GPU tier, bench_moe --smoke with the Triton provider
    interpreted) from a Python where dbrx_fast is not installed and pip is not used: the overlay must serve every
    stage, and what comes back fits the device tool (at most 8 files, at most 2 folders down)."""
    python = _bare_python(tmp_path)
    lacks = subprocess.run([str(python), "-c", "import dbrx_fast.kernels"], cwd=tmp_path, capture_output=True)
    assert lacks.returncode != 0, "the bare Python should not see the dbrx_fast install"
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    done = subprocess.run(
        [str(python), str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out), "--dry-run", "--commit", "abc"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("gpu-check: OK") and "setup: ok, overlay" in summary, summary
    assert done.stdout.rstrip().endswith("summary.txt"), "the summary is printed last"
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(len(p.parts) <= 3 for p in files), files
    assert {"env.txt", "tests.log", "bench.log", "summary.txt"} <= {str(p) for p in files}
    assert "tests collected" in (out / "tests.log").read_text()
    rows = _read_rows(out / "results")
    assert {r["provider"]: r["status"] for r in rows} == {"torch_grouped": "ok", "dbrx_fast": "ok"}
    assert {r["git_commit"] for r in rows} == {"abc"}
    assert "| 3 | dbrx_fast |" in summary


def test_gpu_check_goes_on_after_a_failure_and_exits_nonzero(tmp_path, monkeypatch, capsys):
    """Failing tests do not stop the benchmark; a stage past its cap is stopped with the processes it started; any
    failure makes the exit status non-zero. (The stages' commands are stand-ins here: this is the orchestration.)"""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import gpu_check

    grandchild = tmp_path / "grandchild.pid"
    stand_ins = {
        "pytest": "import sys; print('1 failed'); sys.exit(3)",
        "benchmarks.bench_moe": (
            "import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(grandchild)!r}, 'w').write(str(p.pid)); time.sleep(120)"
        ),
        "benchmarks.bench_qkv": "print('qkv')",
        "benchmarks.bench_attention": "print('attention')",
        "benchmarks.bench_decode": "print('decode')",
        "benchmarks.report": "print('report')",
    }
    ran = []

    def python(*args):
        ran.append(args[1])
        return [sys.executable, "-c", stand_ins[args[1]]]

    found = {"dbrx_fast": "", "kernels": "", "cuda": True, "device": "NVIDIA Fake", "torch_cuda": "13.0", "devices": 1}
    monkeypatch.setattr(gpu_check, "python", python)
    monkeypatch.setattr(gpu_check, "set_up", lambda check, **kw: check.record("setup", True, "stand-in", 0) and found)
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--bench-timeout", "5", "--workers", "0"]) == 1
    assert ran == [
        "pytest",
        "benchmarks.bench_moe",
        "benchmarks.bench_attention",
        "benchmarks.bench_qkv",
        "benchmarks.bench_decode",
        "benchmarks.report",
    ]
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("gpu-check: FAILED: tests, bench\n"), summary
    assert "stage tests: FAILED, exit 3" in summary and "stage bench: FAILED, stopped at its 5 s cap" in summary
    assert "1 failed" in (out / "tests.log").read_text()
    pid = int(grandchild.read_text())
    for _ in range(50):  # the killed group's orphan is reaped by init shortly after
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {pid}, started by the stopped stage, still runs")
    assert capsys.readouterr().out.rstrip().endswith("summary.txt")
