"""benchmarks/cost_model.py: its counts against independent ones, bytes moved never below the compulsory bytes, the
bound monotone in T, the L2 model by hand and monotone in the L2's size, the weight gradients' re-read factors and
best order at DBRX widths, and tiles taken from the kernels' configs."""

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


def test_dbrx_weight_gradients_are_flop_bound(cm):
    """At T = 16384 the weight gradients compute no exp/divide (hw comes stored from moe_down_bwd), move under 2x the
    compulsory bytes in a 50 MB L2 (3.25x and 3.30x before GROUP_H: the F-tiles grouped, the gathered slabs re-read
    per group), within 1.25x of the best order of their tiles, and are bound by tensor-core FLOPs."""
    shape = cm.Shape(16384, **DBRX)
    costs = _by_name(cm.backward(shape))
    for name in ("moe_down_wgrad", "moe_up_wgrad"):
        c = costs[name]
        assert c.sfu == 0, name
        assert 1 < c.best_reread <= c.reread < min(2, 1.25 * c.best_reread), (name, c.reread, c.best_reread)
        assert c.bound_by(cm.H100_SXM) == "flops", name
    assert costs["moe_down_bwd"].operands["dgate, dup, hw"][0] == 3 * shape.rows * shape.ffn * 2
    small = _by_name(cm.backward(cm.Shape(4096, **DBRX)))
    assert small["moe_down_wgrad"].reread < 1.3 and small["moe_up_wgrad"].reread < 1.3
    for c in cm.forward(shape):
        assert c.bound_by(cm.H100_SXM) == ("flops" if c.flops else "bytes"), c.name


def test_weight_gradient_floor_without_l2_reuse(cm):
    """In a 40 MB L2 no wave's 128x128 programs with their full-K slabs and writes fit (at best 32.5 MB of slabs and
    8.4 MB of dw2 a wave at T = 16384), so nothing is reused across waves: the best order is the square wave's
    2.80x and 2.88x, and the kernels' order stays within 1.15x of it."""
    gpu = cm.dataclasses.replace(cm.H100_SXM, l2_bytes=40e6)
    costs = _by_name(cm.backward(cm.Shape(16384, **DBRX), gpu))
    for name, best in (("moe_down_wgrad", 2.80), ("moe_up_wgrad", 2.88)):
        assert costs[name].best_reread == pytest.approx(best, abs=0.01), name
        assert costs[name].reread < 1.15 * costs[name].best_reread, name


def test_weight_gradient_grid_order(cm, monkeypatch):
    """The model follows GROUP_H: one H-tile a group (every F-tile of one H-tile in flight together, the order of
    old but transposed) streams hw again for every wave, about 15x; 24 H-tiles a group keep the gathered dout in L2
    and read hw once per group, twice."""
    from dbrx_fast.kernels import moe_weight_grads
    from dbrx_fast.kernels.moe_tiles import config

    shape = cm.Shape(16384, **DBRX)
    tuner = moe_weight_grads._DOWN_WGRAD["16bit"]
    factors = {}
    for group in (1, 24):
        cfg = config(8, 4, BLOCK_F=128, BLOCK_H=128, BLOCK_M=32, GROUP_H=group)
        monkeypatch.setattr(tuner, "all_configs", [cfg])
        hw = _by_name(cm.backward(shape))["moe_down_wgrad"].operands["hw"]
        factors[group] = hw[1] / hw[0]
    assert 14 < factors[1] < 17 and 1.9 < factors[24] < 2.3, factors


def test_l2_reuse_by_hand(cm):
    """Tile 0 (10 bytes) read by waves 0 and 1, tiles 1, 2, 3 once each: between its reads the chunks of tile 0
    see tile 1 (wave 0, beyond them) and tiles 2 and 3 (wave 1, before them) in the proportion of their place along
    K, 10 to 20 bytes, and the 4 bytes wave 0 writes: its chunks hit where that fits (14 to 24 bytes)."""
    waves = cm.torch.tensor([0, 0, 1, 1, 1])
    tiles = cm.torch.tensor([0, 1, 0, 2, 3])
    sizes = cm.torch.full((4,), 10)
    written = cm.torch.tensor([4.0, 0, 0, 0, 0])
    for l2, tile0 in ((0, 20), (14, 20), (19, 15), (24, 10), (1e9, 10)):
        (moved,) = cm._l2_traffic(waves, [(tiles, sizes)], written, l2)
        assert moved == pytest.approx(30 + tile0), l2
    # Two operands share the L2: tile 0 of each, read again by wave 1, sees the other's two tiles and its own tile 1
    # in wave 0 (30 bytes), only the other's tile 0 in wave 1 (10): in 20 bytes half of its chunks hit.
    (alone,) = cm._l2_traffic(waves[:3], [(tiles[:3], sizes)], written[:3] * 0, 10)
    both = cm._l2_traffic(waves[:3], [(tiles[:3], sizes), (cm.torch.tensor([1, 0, 0]), sizes)], written[:3] * 0, 20)
    assert alone == 20 and both == [25, 25]


@pytest.mark.parametrize("tokens", [16, 4096])
def test_more_l2_never_moves_more(cm, tokens):
    """Bytes moved fall as the L2 grows, down to every tile read once."""
    shape = cm.Shape(tokens, **DBRX)
    moved = [
        [c.moved for c in cm.layer(shape, "full", cm.dataclasses.replace(cm.H100_SXM, l2_bytes=l2))]
        for l2 in (0, 8e6, 50e6, 1e12)
    ]
    for less, more in zip(moved, moved[1:], strict=False):
        assert all(m <= n * (1 + 1e-12) for m, n in zip(more, less, strict=True)), (less, more)
    # An unbounded L2 reads each tile once: the compulsory bytes, but for the gathered x and dout rows, which the
    # model reads once per expert (a token's k rows lie in k experts' tiles, whose reads the weights between them
    # flush from a real L2 at DBRX widths).
    for c in cm.layer(shape, "full", cm.dataclasses.replace(cm.H100_SXM, l2_bytes=1e12)):
        for operand, (compulsory, moved) in c.operands.items():
            expected = (compulsory, 4 * compulsory) if operand in ("x", "dout") else (compulsory, compulsory)
            assert expected[0] <= moved <= expected[1] * (1 + 1e-12), (c.name, operand, compulsory, moved)


def test_in_flight_follows_the_compiled_code(cm):
    """Each GEMM's wave is 132 SMs times the blocks per SM that the compile-check table reads from the compiled sm_90
    code of its pinned tiles; moe_down_bwd's epilogue registers leave it one block, which the estimate put at two."""
    costs = _by_name(cm.layer(cm.Shape(4096, **DBRX), "full"))
    tuners = {
        "moe_glu_up": "moe_experts._GLU_UP",
        "moe_down": "moe_experts._DOWN",
        "moe_down_bwd": "moe_input_grads._DOWN_BWD",
        "moe_up_dgrad": "moe_input_grads._UP_DGRAD",
        "moe_up_wgrad": "moe_weight_grads._UP_WGRAD",
        "moe_down_wgrad": "moe_weight_grads._DOWN_WGRAD",
    }
    for name, path in tuners.items():
        module, tuner = path.split(".")
        cfg = getattr(getattr(cm, module), tuner)["16bit"].all_configs[0]
        blocks = cm._compiled_blocks_per_sm(name, torch.bfloat16, cfg)
        assert blocks is not None and costs[name].in_flight == 132 * blocks, (name, blocks, costs[name].in_flight)
    assert costs["moe_down_bwd"].in_flight == 132


def test_tiles_follow_the_kernels_configs(cm, monkeypatch):
    from dbrx_fast.kernels import moe_experts, moe_weight_grads
    from dbrx_fast.kernels.moe_tiles import config

    shape = cm.Shape(4096, **DBRX)
    before = _by_name(cm.layer(shape, "full"))
    tuner = moe_weight_grads._DOWN_WGRAD["16bit"]
    cfg = config(8, 4, BLOCK_F=128, BLOCK_H=64, BLOCK_M=32, GROUP_H=48)
    monkeypatch.setattr(tuner, "all_configs", [cfg, *tuner.all_configs])
    tuner = moe_experts._GLU_UP["16bit"]
    monkeypatch.setattr(
        tuner, "all_configs", [config(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=1), *tuner.all_configs]
    )
    after = _by_name(cm.layer(shape, "full"))
    assert "84x96x16 grid" in after["moe_down_wgrad"].tiles  # twice the H-tiles
    assert after["moe_down_wgrad"].in_flight == 2 * before["moe_down_wgrad"].in_flight  # half the accumulator
    assert after["moe_down_wgrad"].flops == before["moe_down_wgrad"].flops
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
