"""benchmarks/bench_attention.py --smoke on the CPU: complete rows, FLOPs by the convention, the speed-up over the
fastest SDPA backend, and "unavailable" rows (not errors) for what cannot run here. The numbers mean nothing."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_attention

    return bench_attention


def test_smoke_run_writes_complete_rows(bench, tmp_path):
    providers = ["dbrx_fast", "sdpa_flash", "sdpa_cudnn", "stock"]
    argv = ["--smoke", "--out", str(tmp_path), "--lengths", "20", "--providers", *providers]
    assert bench.main(argv) == 0
    (path,) = tmp_path.glob("*/attention.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {(r["mode"], r["provider"]) for r in rows} == {(m, p) for m in ("forward", "backward") for p in providers}
    backward_written = importlib.util.find_spec("dbrx_fast.kernels.attention_bwd") is not None
    for r in rows:
        assert r["subject"] == "attention" and r["dtype"] == "bfloat16" and r["device"].startswith("cpu")
        assert r["shape"] == {"B": 2, "N": 20, "Hq": 4, "Hkv": 2, "D": 32, "causal": True}
        assert r["flops"] == 4.0 * 2 * 4 * 20**2 * 32 / 2 * {"forward": 1, "backward": 2.5}[r["mode"]]
        if r["provider"] == "sdpa_cudnn":  # no cuDNN attention on a CPU
            assert r["status"].startswith("unavailable: sdpa_cudnn cannot run here"), r["status"]
            continue
        if r["provider"] == "dbrx_fast" and r["mode"] == "backward" and not backward_written:
            assert r["status"] == "unavailable: not available: dbrx_fast.kernels.attention_bwd is not written yet"
            continue
        if r["provider"] == "dbrx_fast" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        assert r["status"] == "ok", (r["provider"], r["mode"], r["status"])
        for field in ("ms", "tflops", "dense_tflops", "vs_dense", "vs_baseline"):
            assert isinstance(r[field], float) and math.isfinite(r[field]) and r[field] > 0, (field, r[field])
        assert r["baseline"] == "sdpa_flash"  # the only SDPA backend a CPU runs
        if r["provider"] == "sdpa_flash":
            assert r["vs_baseline"] == 1.0
