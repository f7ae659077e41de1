"""benchmarks/bench_qkv.py on the CPU: --smoke writes complete, finite rows with the bytes the fused kernel moves.
The numbers themselves mean nothing here."""

import json
import math

import pytest
from test_benchmarks_smoke import REQUIRED, ROOT


@pytest.fixture
def bench_qkv(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_qkv

    return bench_qkv


def test_smoke_run_writes_complete_rows(bench_qkv, tmp_path):
    assert bench_qkv.main(["--smoke", "--tokens", "5", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*/qkv.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {(r["mode"], r["provider"]) for r in rows} == {
        (m, p) for m in ("forward", "full") for p in bench_qkv.PROVIDERS
    }
    assert len(rows) == 6
    elements = 5 * (6 + 2 * 1) * 16  # T * (Hq + 2*Hkv) * D at the smoke heads
    tables = 2 * 5 * 8 * 4  # float32 cos and sin, first halves
    for r in rows:
        assert not REQUIRED - r.keys(), f"row lacks {REQUIRED - r.keys()}"
        assert r["status"] == "ok", (r["provider"], r["mode"], r["status"])
        assert r["shape"] == {"T": 5, "Hq": 6, "Hkv": 1, "D": 16} and r["dtype"] == "bfloat16"
        want = 2 * elements * 2 + tables if r["mode"] == "forward" else 5 * elements * 2 + 2 * tables
        assert r["bytes"] == want
        for field in ("ms", "gbps", "vs_copy", "copy_gbps", "vs_baseline"):
            assert isinstance(r[field], float) and math.isfinite(r[field]) and r[field] > 0, (field, r[field])
        if r["provider"] == bench_qkv.BASELINE:
            assert r["vs_baseline"] == 1.0
