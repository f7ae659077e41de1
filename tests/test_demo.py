"""`dbrx-fast demo`: bad arguments give one line on stderr and exit 2 (no traceback); a run reports each step with
its elapsed time on stderr, and labels CPU timings as noise."""

import os
import re

import pytest
import torch

from dbrx_fast import __main__ as demo_module
from dbrx_fast.__main__ import main

PROGRESS = re.compile(r"^\[\s*\d+\.\d s\] (.+)$")


def _one_line_error(capsys, argv, *needles):
    assert main(["demo", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("dbrx-fast demo: error: ") and all(n in err for n in needles), err


def test_missing_model_path(capsys, tmp_path):
    _one_line_error(capsys, ["--model", str(tmp_path / "nowhere")], "--model", "no such file or directory")


def test_model_path_that_is_no_checkpoint(capsys, tmp_path):
    assert main(["demo", "--model", str(tmp_path), "--device", "cpu"]) == 2
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"dbrx-fast demo: error: --model {tmp_path}: not a loadable"), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_requested_without_cuda(capsys):
    _one_line_error(capsys, ["--device", "cuda"], "--device cuda", "CUDA is not available")


def test_unknown_device(capsys):
    _one_line_error(capsys, ["--device", "gpu0"], "--device gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is needed only off CUDA")
def test_triton_on_cpu_without_interpreter(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _one_line_error(capsys, ["--backend", "triton", "--device", "cpu"], "TRITON_INTERPRET=1")


def test_torch_backend_run_reports_progress_and_labels_cpu_timing_as_noise(capsys):
    argv = ["--backend", "torch", "--device", "cpu", "--preset", "tiny", "--seq", "4", "--new-tokens", "2"]
    assert main(["demo", *argv, "--repeats", "1"]) == 0
    out, err = capsys.readouterr()
    steps = [PROGRESS.match(line).group(1) for line in err.strip().splitlines()]  # every stderr line is progress
    assert steps == [
        "building the tiny model",
        "stock: forward of 2x4 tokens",
        "stock: generate 2 tokens",
        "stock: timing prefill and generate (1 + 1 warm-up runs each)",
        "dbrx-fast: forward of 2x4 tokens",
        "dbrx-fast: generate 2 tokens",
        "dbrx-fast: timing prefill and generate (1 + 1 warm-up runs each)",
        "done",
    ], err
    assert "timing (median of 1) on a CPU: noise" in out and "CPU timings are noise" in out, out
    assert "result: OK" in out


def test_no_timing_table_without_repeats(capsys):
    argv = ["--backend", "torch", "--device", "cpu", "--preset", "tiny", "--seq", "3", "--new-tokens", "1"]
    assert main(["demo", *argv, "--repeats", "0"]) == 0
    out, err = capsys.readouterr()
    assert "timing" not in out and "timing" not in err and "result: OK" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreted run is the CPU's")
def test_interpreted_run_takes_the_small_defaults(capsys, monkeypatch):
    """--backend triton on the CPU (the interpreter: seconds per launch) builds the tiny preset, a 1x16 batch, and
    times nothing, unless told otherwise; the run itself is measured in the README."""
    assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py, on a machine without CUDA
    seen = []

    class Stop(Exception):
        pass

    def first_measure(model, ids, args, device, progress, label, per_token):
        seen.append((model.config.d_model, model.config.n_layers, tuple(ids.shape), args.new_tokens, args.repeats))
        raise Stop

    monkeypatch.setattr(demo_module, "measure", first_measure)
    with pytest.raises(Stop):
        main(["demo", "--backend", "triton", "--device", "cpu"])
    assert seen == [(256, 1, (1, 16), 4, 0)]
    assert "no timing" in capsys.readouterr().out
    with pytest.raises(Stop):
        main(["demo", "--backend", "triton", "--device", "cpu", "--seq", "8", "--repeats", "2"])
    assert seen[1] == (256, 1, (1, 8), 4, 2)
