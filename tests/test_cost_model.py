"""benchmarks/cost_model.py: its counts against independent ones, bytes moved never below the compulsory bytes, the
bound monotone in T, the issue's re-read factors at DBRX widths, and tiles taken from the kernels' configs."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DBRX = {"hidden": 6144, "ffn": 10752, "experts": 16, "top_k": 4}


@pytest.fixture
def cm(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import cost_model

    return cost_model


def _by_name(costs):
    return {c.name: c for c in costs}


@pytest.mark.parametrize("tokens, hidden, ffn, experts, top_k", [(1, 6144, 10752, 16, 4), (37, 200, 144, 4, 2)])
def test_flops_equal_the_gemm_count(cm, tokens, hidden, ffn, experts, top_k):
    shape = cm.Shape(tokens, hidden, ffn, experts, top_k)
    forward = 3 * 2 * tokens * top_k * hidden * ffn
    for mode, factor in (("forward", 1), ("backward", 2), ("full", 3)):
        assert sum(c.flops for c in cm.layer(shape, mode)) == forward * factor, mode


@pytest.mark.parametrize(
    "tokens, hidden, ffn, experts, top_k",
    [(16, 6144, 10752, 16, 4), (37, 200, 144, 4, 2), (5, 64, 96, 4, 4), (300, 256, 384, 3, 1)],
)
@pytest.mark.parametrize("blocks_per_sm", [None, 1, 4])
def test_moved_never_below_compulsory(cm, tokens, hidden, ffn, experts, top_k, blocks_per_sm):
    shape = cm.Shape(tokens, hidden, ffn, experts, top_k)
    for c in cm.layer(shape, "full", blocks_per_sm=blocks_per_sm):
        for operand, (compulsory, moved) in c.operands.items():
            assert compulsory > 0 and moved >= compulsory, (c.name, operand, compulsory, moved)


def test_compulsory_bytes_by_hand(cm):
    """Two tokens, one expert each: one M-tile per expert, one N-tile, so one wave reads everything once."""
    shape = cm.Shape(tokens=2, hidden=128, ffn=64, experts=2, top_k=1)
    costs = _by_name(cm.layer(shape, "forward"))
    routing = 2 * 4 + 3 * 4  # sorted_slots and expert_offsets, int32
    up = costs["moe_glu_up"]
    assert up.operands["x"] == (2 * 128 * 2,) * 2
    assert up.operands["w1, v1"] == (2 * 2 * 64 * 128 * 2,) * 2
    assert up.compulsory == up.moved == 2 * 128 * 2 + 2 * 2 * 64 * 128 * 2 + routing + 2 * 64 * 2
    down = costs["moe_down"]
    assert down.compulsory == 2 * 64 * 2 + 2 * 64 * 128 * 2 + 2 * 4 + routing + 2 * 128 * 4
    assert costs["moe_combine"].compulsory == 2 * 128 * 4 + 2 * 128 * 2


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_bound_is_monotone_in_tokens(cm, mode):
    bounds = [cm.layer_bound_s(cm.Shape(t, **DBRX), mode) for t in (1, 2, 3, 4, 8, 16, 33, 128, 1000, 4096)]
    assert all(b <= c for b, c in zip(bounds, bounds[1:], strict=False)), bounds


def test_dbrx_weight_gradients_reproduce_the_issue(cm):
    """The issue's reading at T = 16384: dW2 streams gate/up about 15x, dW1/dV1 dgate/dup about 31x, and dW2
    recomputes silu(gate) * up for each of the 48 H-tiles, about 7e10 exp/divide."""
    shape = cm.Shape(16384, **DBRX)
    costs = _by_name(cm.backward(shape))
    assert costs["moe_down_wgrad"].worst_operand()[0] == "gate, up"
    assert 14 < costs["moe_down_wgrad"].worst_operand()[1] < 17
    assert costs["moe_up_wgrad"].worst_operand()[0] == "dgate, dup"
    assert 30 < costs["moe_up_wgrad"].worst_operand()[1] < 32
    assert costs["moe_down_wgrad"].sfu == 2 * shape.rows * shape.ffn * 48
    assert costs["moe_down_wgrad"].bound_by(cm.H100_SXM) == "sfu"
    for c in cm.forward(shape):
        assert c.bound_by(cm.H100_SXM) == ("flops" if c.flops else "bytes"), c.name


def test_tiles_follow_the_kernels_configs(cm, monkeypatch):
    from dbrx_fast.kernels import moe_experts, moe_weight_grads
    from dbrx_fast.kernels.moe_tiles import config

    shape = cm.Shape(4096, **DBRX)
    before = _by_name(cm.layer(shape, "full"))
    tuner = moe_weight_grads._DOWN_WGRAD["16bit"]
    monkeypatch.setattr(tuner, "all_configs", [config(8, 4, BLOCK_F=128, BLOCK_H=64, BLOCK_M=32), *tuner.all_configs])
    tuner = moe_experts._GLU_UP["16bit"]
    monkeypatch.setattr(
        tuner, "all_configs", [config(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=1), *tuner.all_configs]
    )
    after = _by_name(cm.layer(shape, "full"))
    assert after["moe_down_wgrad"].sfu == 2 * before["moe_down_wgrad"].sfu  # twice the H-tiles to recompute h for
    assert "BLOCK_H=64" in after["moe_down_wgrad"].tiles and "BLOCK_N=128" in after["moe_glu_up"].tiles
    assert after["moe_glu_up"].moved != before["moe_glu_up"].moved
    assert after["moe_glu_up"].flops == before["moe_glu_up"].flops


def test_fp32_takes_its_own_class(cm, monkeypatch):
    """fp32 launches take the tf32 or fp32_dot tiles as torch's matmul precision chooses, 4-byte elements."""
    shape = cm.Shape(64, 256, 384, 4, 2, torch.float32)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    up = _by_name(cm.forward(shape))["moe_glu_up"]
    assert "BLOCK_K=16" in up.tiles and up.operands["x"][0] == 64 * 256 * 4


def test_cli_prints_a_table_per_kernel(cm, capsys):
    assert cm.main(["--tokens", "16", "--modes", "forward", "backward", "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    for name in ("moe_glu_up", "moe_down", "moe_down_bwd", "moe_up_dgrad", "moe_up_wgrad", "moe_down_wgrad"):
        assert f"| {name} |" in out
    assert out.count("| **layer** |") == 2 and "H200" in out and "dense matmul, equal FLOPs" in out
