"""The decode benchmark's plumbing on the CPU (as tests/test_benchmarks_smoke.py does for bench_moe): bench_decode
--smoke writes complete, finite rows whose bytes are the KV cache read. The numbers themselves mean nothing here."""

import json
import math
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.interpreter
def test_decode_smoke_writes_complete_rows(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_decode, report

    assert bench_decode.main(["--smoke", "--contexts", "17", "--batches", "2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*/decode.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["provider"] for r in rows] == list(bench_decode.SMOKE_PROVIDERS)
    heads, kv_heads, head_dim = (bench_decode.SMOKE_HEADS[k] for k in ("heads", "kv_heads", "head_dim"))
    for r in rows:
        assert r["shape"] == {"B": 2, "N": 17, "Hq": heads, "Hkv": kv_heads, "D": head_dim}
        assert r["bytes"] == 2 * 2 * kv_heads * 17 * head_dim * 2  # K and V in bf16
        assert r["flops"] == 4 * 2 * heads * 17 * head_dim
        if r["provider"].startswith("dbrx_fast") and os.environ.get("TRITON_INTERPRET") != "1":
            assert r["status"].startswith("unavailable:")
            continue
        assert r["status"] == "ok", f"{r['provider']}: {r['status']}"
        for field in ("ms", "gbps", "vs_copy", "copy_gbps", "vs_baseline"):
            assert isinstance(r[field], float) and math.isfinite(r[field]) and r[field] > 0, (r["provider"], field)
    assert rows[[r["provider"] for r in rows].index(bench_decode.BASELINE)]["vs_baseline"] == 1.0
    assert "### decode / forward / bfloat16" in report.tables(report.load(tmp_path))
