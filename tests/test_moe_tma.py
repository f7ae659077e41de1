"""The MoE GEMMs' TMA paths (kernels/moe_tiles.py `use_tma`, `tile_descriptor`, `load_tile`) against their pointer
paths and float64: moe_glu_up (w1, v1), moe_down (h, w2), moe_down_bwd (w2), moe_up_dgrad (dgate, dup, w1, v1),
moe_down_wgrad (hw) and moe_up_wgrad (dgate, dup).

The interpreter of Triton 3.6 and 3.9 runs in-kernel tensor descriptors (zero fill outside the descriptor's shape
included), so DBRX_FAST_TMA=1 runs the TMA path on the CPU; on a GPU it is the sm_90 path. Its PTX (one
cp.async.bulk.tensor per operand in the main loop) is checked by tests/test_compile_gpu_targets.py. The sizes are
the shared cases': F = 48 and H = 80 are multiples of no block, so a weight block that crossed into the next expert's
rows, or an h block past the last row, would show. Each operand has a test with NaN in the rows no tile of the
launch may read (the other experts' weights, the next expert's sorted rows) that fails when a descriptor reaches them.
"""

import pytest
import torch
from accuracy import assert_accurate
from moe_cases import BY_NAME, Case
from test_moe_experts import _problem
from test_moe_experts_backward import _down_grads, _hw
from test_moe_experts_backward import _problem as _bwd_problem
from triton.runtime import _allocation

from dbrx_fast.kernels import moe_experts as fwd_kernels
from dbrx_fast.kernels import moe_input_grads as input_grad_kernels
from dbrx_fast.kernels import moe_tiles
from dbrx_fast.kernels import moe_weight_grads as weight_grad_kernels
from dbrx_fast.kernels.autotune import forced_config
from dbrx_fast.kernels.launch import launch
from dbrx_fast.kernels.moe_experts import moe_down, moe_glu_up
from dbrx_fast.kernels.moe_input_grads import moe_down_bwd, moe_up_dgrad
from dbrx_fast.kernels.moe_tiles import tma_workspace, use_tma
from dbrx_fast.kernels.moe_weight_grads import moe_down_wgrad, moe_up_wgrad

pytestmark = pytest.mark.interpreter

# One expert with every token: two M-tiles of 64 rows or one of 128, and N (H) and K (F) tiles of 64 and 128, all
# ragged; smaller than moe_cases' multi_tile, so every config runs in seconds.
RAGGED = Case("ragged_tiles", 70, 2, 1, hidden=136, ffn=72, routing="one")
CASES = {**BY_NAME, RAGGED.name: RAGGED}


def _expert_rows(routing, ffn, device):
    """[T*k, F] indices of the weight rows each sorted row multiplies: expert(p) * F + f."""
    experts = routing.expert_ids.reshape(-1).long()[routing.sorted_slots.long()]
    return experts[:, None] * ffn + torch.arange(ffn, device=device)


def _inputs(case, dtype, device):
    """(h from moe_glu_up, w2, routing, float64 y) of the case."""
    x, w1, v1, w2, routing = _problem(case, dtype, device)
    h, _, _ = moe_glu_up(x, w1, v1, routing.sorted_slots, routing.expert_offsets, case.top_k, False)
    slots = routing.sorted_slots.long()
    rows = _expert_rows(routing, case.ffn, device)
    y64 = torch.empty(x.shape[0] * case.top_k, case.hidden, dtype=torch.float64, device=device)
    y64[slots] = torch.einsum("pf,pfh->ph", h.double(), w2.double()[rows])
    y64 *= routing.weights.double().reshape(-1, 1)
    return h, w2, routing, y64


def _spied(op, args, monkeypatch, tma: str):
    """(op(*args), the USE_TMA of each GEMM launch (all go through moe_tiles.launch_gemm)) with DBRX_FAST_TMA=tma."""
    seen = []

    def spy(kernel, grid, *launch_args, **meta):
        seen.append(meta["USE_TMA"])
        launch(kernel, grid, *launch_args, **meta)

    with monkeypatch.context() as patch:
        patch.setattr(moe_tiles, "launch", spy)
        patch.setenv("DBRX_FAST_TMA", tma)
        out = op(*args)
    return out, seen


def _down(h, w2, routing, top_k, monkeypatch, tma: str):
    """(y, the USE_TMA of each launch) of moe_down with DBRX_FAST_TMA=tma."""
    args = (h, w2, routing.weights, routing.sorted_slots, routing.expert_offsets, top_k)
    return _spied(moe_down, args, monkeypatch, tma)


def _up_inputs(case, dtype, device):
    """(x, w1, v1, routing, float64 (h, gate, up)) of the case, in sorted order."""
    x, w1, v1, _, routing = _problem(case, dtype, device)
    rows = _expert_rows(routing, case.ffn, device)
    x_rows = x.double()[routing.sorted_slots.long() // case.top_k]
    gate = torch.einsum("ph,pfh->pf", x_rows, w1.double()[rows])
    up = torch.einsum("ph,pfh->pf", x_rows, v1.double()[rows])
    return x, w1, v1, routing, (torch.nn.functional.silu(gate) * up, gate, up)


def _glu_up(x, w1, v1, routing, top_k, monkeypatch, tma: str):
    args = (x, w1, v1, routing.sorted_slots, routing.expert_offsets, top_k, True)
    return _spied(moe_glu_up, args, monkeypatch, tma)


@pytest.mark.parametrize(
    ("case", "dtype"),
    [("T37_E4_k2", torch.bfloat16), ("empty_experts", torch.float16), ("ragged_tiles", torch.bfloat16)],
    ids=["T37_E4_k2-bf16", "empty_experts-fp16", "ragged_tiles-bf16"],
)
def test_down_tma_matches_pointer_path(case, dtype, device, monkeypatch):
    """Within round-off of float64, and bitwise the pointer path's result: the same products in the same order (only
    rows that the store masks differ)."""
    case = CASES[case]
    h, w2, routing, y64 = _inputs(case, dtype, device)
    y_tma, seen_tma = _down(h, w2, routing, case.top_k, monkeypatch, "1")
    y_ptr, seen_ptr = _down(h, w2, routing, case.top_k, monkeypatch, "0")
    assert (seen_tma, seen_ptr) == ([True], [False])
    assert_accurate(y_tma, y64)
    assert torch.equal(y_tma, y_ptr)


@pytest.mark.parametrize("tma", ["1", "0"], ids=["tma", "pointer"])
def test_down_reads_no_other_experts_weights(tma, device, monkeypatch):
    """The experts without a token get NaN weights: no tile of the others may reach them, not even in the K tail
    past F, where the other operand is zero (NaN * 0 is NaN). The TMA path owes that to w2's [E, F, H] view."""
    case = BY_NAME["empty_experts"]  # the upper half of the experts gets no token
    h, w2, routing, y64 = _inputs(case, torch.bfloat16, device)
    w2 = w2.clone()
    w2[case.experts // 2 * case.ffn :] = float("nan")
    y, seen = _down(h, w2, routing, case.top_k, monkeypatch, tma)
    assert seen == [tma == "1"]
    assert_accurate(y, y64)


def test_down_tma_every_config(device, monkeypatch):
    """Every 16-bit config of the down kernel on the TMA path (tests/test_every_config.py runs them on the pointer
    path)."""
    case = RAGGED
    h, w2, routing, y64 = _inputs(case, torch.bfloat16, device)
    tuner = fwd_kernels._DOWN["16bit"]
    for cfg in tuner.all_configs:
        with forced_config(tuner, cfg):
            y, seen = _down(h, w2, routing, case.top_k, monkeypatch, "1")
        assert seen == [True], cfg
        assert_accurate(y, y64, what=str(cfg))


def test_fp32_keeps_the_pointer_path(device, monkeypatch):
    case = BY_NAME["T37_E4_k2"]
    h, w2, routing, _ = _inputs(case, torch.float32, device)
    assert _down(h, w2, routing, case.top_k, monkeypatch, "1")[1] == [False]


def test_use_tma_wants_an_aligned_layout(monkeypatch):
    cpu = torch.device("cpu")
    h = torch.randn(8, 48).to(torch.bfloat16)
    monkeypatch.delenv("DBRX_FAST_TMA", raising=False)
    assert not use_tma(cpu, h)  # unset: CUDA sm_90+ only
    monkeypatch.setenv("DBRX_FAST_TMA", "0")
    assert not use_tma(cpu, h)
    monkeypatch.setenv("DBRX_FAST_TMA", "1")
    assert use_tma(cpu, h, h[2:])  # a row of 96 bytes keeps every row start 16-byte aligned
    assert not use_tma(cpu, h[:, 1:])  # start 2 bytes past an aligned one
    assert not use_tma(cpu, torch.randn(8, 44).to(torch.bfloat16))  # rows of 88 bytes
    assert not use_tma(cpu, h.t())  # innermost stride 48


def test_tma_workspace_is_set_for_the_block_only():
    before = _allocation._allocator.get()
    with tma_workspace(torch.device("cuda"), True):  # no CUDA call until Triton allocates
        assert _allocation._allocator.get() is not before
    assert _allocation._allocator.get() is before
    with tma_workspace(torch.device("cuda"), False):
        assert _allocation._allocator.get() is before


@pytest.mark.parametrize(("case", "dtype"), [("ragged_tiles", torch.float16)], ids=["ragged_tiles-fp16"])
def test_glu_up_tma_matches_pointer_path(case, dtype, device, monkeypatch):
    """h, gate and up within round-off of float64, as the pointer path's. Not bitwise: the TMA path's two dots of half
    the width sum each column in an order of their own (measured under the interpreter: a last-bit difference in
    gate)."""
    case = CASES[case]
    x, w1, v1, routing, refs = _up_inputs(case, dtype, device)
    out_tma, seen_tma = _glu_up(x, w1, v1, routing, case.top_k, monkeypatch, "1")
    out_ptr, seen_ptr = _glu_up(x, w1, v1, routing, case.top_k, monkeypatch, "0")
    assert (seen_tma, seen_ptr) == ([True], [False])
    for got, want, pointer, name in zip(out_tma, refs, out_ptr, ("h", "gate", "up"), strict=True):
        assert_accurate(got, want, pointer, what=name)


def test_glu_up_reads_no_other_experts_weights(device, monkeypatch):
    """NaN weights in the experts without a token: a w1 or v1 block of 128 rows from an expert of F = 48 rows covers
    the next experts' rows (zero fill of the [E, F, H] views); such columns are past F and masked at the store, so
    this fails only if a NaN reaches a stored column (a wrong expert, row or K offset)."""
    case = BY_NAME["empty_experts"]
    x, w1, v1, routing, refs = _up_inputs(case, torch.bfloat16, device)
    w1, v1 = w1.clone(), v1.clone()
    w1[case.experts // 2 * case.ffn :] = float("nan")
    v1[case.experts // 2 * case.ffn :] = float("nan")
    out, seen = _glu_up(x, w1, v1, routing, case.top_k, monkeypatch, "1")
    assert seen == [True]
    for got, want, name in zip(out, refs, ("h", "gate", "up"), strict=True):
        assert_accurate(got, want, what=name)


def test_glu_up_tma_every_config(device, monkeypatch):
    """Every 16-bit config of the up kernel on the TMA path (tests/test_every_config.py runs them on the pointer
    path)."""
    x, w1, v1, routing, refs = _up_inputs(RAGGED, torch.bfloat16, device)
    tuner = fwd_kernels._GLU_UP["16bit"]
    for cfg in tuner.all_configs:
        with forced_config(tuner, cfg):
            out, seen = _glu_up(x, w1, v1, routing, RAGGED.top_k, monkeypatch, "1")
        assert seen == [True], cfg
        for got, want, name in zip(out, refs, ("h", "gate", "up"), strict=True):
            assert_accurate(got, want, what=f"{name} {cfg}")


def _dgrad_inputs(case, dtype, device):
    """(dgate, dup in sorted order, w1, v1, routing, float64 dx) of the case."""
    _, w1, v1, _, routing = _problem(case, dtype, device)
    num_rows = case.tokens * case.top_k
    dgate = torch.randn(num_rows, case.ffn, device=device).to(dtype)
    dup = torch.randn(num_rows, case.ffn, device=device).to(dtype)
    rows = _expert_rows(routing, case.ffn, device)
    dx_slot = torch.empty(num_rows, case.hidden, dtype=torch.float64, device=device)
    dx_slot[routing.sorted_slots.long()] = torch.einsum("pf,pfh->ph", dgate.double(), w1.double()[rows]) + torch.einsum(
        "pf,pfh->ph", dup.double(), v1.double()[rows]
    )
    return dgate, dup, w1, v1, routing, dx_slot.reshape(case.tokens, case.top_k, -1).sum(1)


def _up_dgrad(dgate, dup, w1, v1, routing, case, monkeypatch, tma: str):
    args = (dgate, dup, w1, v1, routing.sorted_slots, routing.expert_offsets, case.top_k, case.tokens)
    return _spied(moe_up_dgrad, args, monkeypatch, tma)


@pytest.mark.parametrize(("case", "dtype"), [("ragged_tiles", torch.float16)], ids=["ragged_tiles-fp16"])
def test_up_dgrad_tma_matches_pointer_path(case, dtype, device, monkeypatch):
    """Within round-off of float64, and bitwise the pointer path's (the same tiles in the same order)."""
    case = CASES[case]
    dgate, dup, w1, v1, routing, dx64 = _dgrad_inputs(case, dtype, device)
    dx_tma, seen_tma = _up_dgrad(dgate, dup, w1, v1, routing, case, monkeypatch, "1")
    dx_ptr, seen_ptr = _up_dgrad(dgate, dup, w1, v1, routing, case, monkeypatch, "0")
    assert (seen_tma, seen_ptr) == ([True], [False])
    assert_accurate(dx_tma, dx64)
    assert torch.equal(dx_tma, dx_ptr)


@pytest.mark.parametrize("tma", ["1", "0"], ids=["tma", "pointer"])
def test_up_dgrad_reads_no_other_experts_weights(tma, device, monkeypatch):
    """NaN weights in the experts without a token: K runs over F = 48, so the last K block of 64 rows of w1_e or
    v1_e would cover the next expert's rows but for the [E, F, H] views' zero fill (NaN * 0 is NaN)."""
    case = BY_NAME["empty_experts"]
    dgate, dup, w1, v1, routing, dx64 = _dgrad_inputs(case, torch.bfloat16, device)
    w1, v1 = w1.clone(), v1.clone()
    w1[case.experts // 2 * case.ffn :] = float("nan")
    v1[case.experts // 2 * case.ffn :] = float("nan")
    dx, seen = _up_dgrad(dgate, dup, w1, v1, routing, case, monkeypatch, tma)
    assert seen == [tma == "1"]
    assert_accurate(dx, dx64)


def test_up_dgrad_tma_every_config(device, monkeypatch):
    """Every 16-bit config of the input-gradient kernel on the TMA path."""
    dgate, dup, w1, v1, routing, dx64 = _dgrad_inputs(RAGGED, torch.bfloat16, device)
    tuner = input_grad_kernels._UP_DGRAD["16bit"]
    for cfg in tuner.all_configs:
        with forced_config(tuner, cfg):
            dx, seen = _up_dgrad(dgate, dup, w1, v1, routing, RAGGED, monkeypatch, "1")
        assert seen == [True], cfg
        assert_accurate(dx, dx64, what=str(cfg))


def _down_bwd(p, monkeypatch, tma: str):
    """((dgate, dup, dweights, hw), the USE_TMA of each GEMM launch) of moe_down_bwd with DBRX_FAST_TMA=tma."""
    args = (p.dout, p.gate, p.up, p.w2, p.weights, p.sorted_slots, p.expert_offsets, p.top_k)
    return _spied(moe_down_bwd, args, monkeypatch, tma)


def _assert_down_bwd_accurate(out, p, what=""):
    ref = _down_grads(p, torch.float64)
    wants = (ref[0], ref[1], ref[3], _hw(p, torch.float64))
    for got, want, name in zip(out, wants, ("dgate", "dup", "dweights", "hw"), strict=True):
        assert_accurate(got, want, what=f"{name} {what}")


@pytest.mark.parametrize(("case", "dtype"), [("ragged_tiles", torch.float16)], ids=["ragged_tiles-fp16"])
def test_down_bwd_tma_matches_pointer_path(case, dtype, device, monkeypatch):
    """dgate, dup, dweights and hw within round-off of float64, and bitwise the pointer path's."""
    p = _bwd_problem(CASES[case], dtype, device)
    out_tma, seen_tma = _down_bwd(p, monkeypatch, "1")
    out_ptr, seen_ptr = _down_bwd(p, monkeypatch, "0")
    assert (seen_tma, seen_ptr) == ([True], [False])
    _assert_down_bwd_accurate(out_tma, p)
    for got, pointer, name in zip(out_tma, out_ptr, ("dgate", "dup", "dweights", "hw"), strict=True):
        assert torch.equal(got, pointer), name


@pytest.mark.parametrize("tma", ["1", "0"], ids=["tma", "pointer"])
def test_down_bwd_reads_no_other_experts_weights(tma, device, monkeypatch):
    """NaN weights in the experts without a token: the w2 block of BLOCK_N = 128 rows from an expert of F = 48 rows
    would cover the next experts' rows but for the [E, F, H] view's zero fill, and their NaN columns of dh' would
    reach dweights through the F-tile's row sum (the masked gate and up there are zeros; NaN * 0 is NaN)."""
    case = BY_NAME["empty_experts"]
    p = _bwd_problem(case, torch.bfloat16, device)
    p.w2 = p.w2.clone()
    p.w2[case.experts // 2 * case.ffn :] = float("nan")
    out, seen = _down_bwd(p, monkeypatch, tma)
    assert seen == [tma == "1"]
    p.w2 = torch.nan_to_num(p.w2, nan=0.0)  # the reference reads no expert without rows either
    _assert_down_bwd_accurate(out, p)


def test_down_bwd_tma_every_config(device, monkeypatch):
    """Every 16-bit config of the down projection's backward on the TMA path."""
    p = _bwd_problem(RAGGED, torch.bfloat16, device)
    tuner = input_grad_kernels._DOWN_BWD["16bit"]
    for cfg in tuner.all_configs:
        with forced_config(tuner, cfg):
            out, seen = _down_bwd(p, monkeypatch, "1")
        assert seen == [True], cfg
        _assert_down_bwd_accurate(out, p, str(cfg))


def _wgrad_inputs(case, dtype, device):
    """(hw in sorted order, dout, routing, float64 dw2 as [E, F, H]) of the case."""
    _, _, _, _, routing = _problem(case, dtype, device)
    hw = torch.randn(case.tokens * case.top_k, case.ffn, device=device).to(dtype)
    dout = torch.randn(case.tokens, case.hidden, device=device).to(dtype)
    tokens = routing.sorted_slots.long() // case.top_k
    bounds = routing.expert_offsets.tolist()
    dw2 = torch.stack(
        [hw[a:b].double().T @ dout[tokens[a:b]].double() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    )
    return hw, dout, routing, dw2


def _down_wgrad(hw, dout, routing, case, monkeypatch, tma: str):
    args = (hw, dout, routing.sorted_slots, routing.expert_offsets, case.top_k, case.experts)
    return _spied(moe_down_wgrad, args, monkeypatch, tma)


def test_down_wgrad_tma_matches_pointer_path(device, monkeypatch):
    """Within round-off of float64, and bitwise the pointer path's (the same chunks in the same order)."""
    case = RAGGED
    hw, dout, routing, dw2_64 = _wgrad_inputs(case, torch.float16, device)
    dw2_tma, seen_tma = _down_wgrad(hw, dout, routing, case, monkeypatch, "1")
    dw2_ptr, seen_ptr = _down_wgrad(hw, dout, routing, case, monkeypatch, "0")
    assert (seen_tma, seen_ptr) == ([True], [False])
    assert_accurate(dw2_tma.view_as(dw2_64), dw2_64)
    assert torch.equal(dw2_tma, dw2_ptr)


@pytest.mark.parametrize("tma", ["1", "0"], ids=["tma", "pointer"])
def test_down_wgrad_reads_no_other_experts_rows(tma, device, monkeypatch):
    """NaN hw rows for the odd experts: an even expert's last chunk of rows ends at its own last row (the descriptor's
    shape stops there), so its dw2 stays finite; a chunk reading on into the next expert's rows would meet the NaN
    (against zero dout rows: NaN * 0 is NaN)."""
    case = BY_NAME["T37_E4_k2"]
    hw, dout, routing, dw2_64 = _wgrad_inputs(case, torch.bfloat16, device)
    bounds = routing.expert_offsets.tolist()
    block_m = weight_grad_kernels._DOWN_WGRAD["16bit"].all_configs[0].kwargs["BLOCK_M"]
    assert any((bounds[e + 1] - bounds[e]) % block_m for e in (0, 2)), "no chunk would reach the next expert"
    hw = hw.clone()
    for e in (1, 3):
        hw[bounds[e] : bounds[e + 1]] = float("nan")
    dw2, seen = _down_wgrad(hw, dout, routing, case, monkeypatch, tma)
    assert seen == [tma == "1"]
    assert_accurate(dw2.view_as(dw2_64)[0::2], dw2_64[0::2])


def test_down_wgrad_tma_every_config(device, monkeypatch):
    """Every 16-bit config of the dw2 kernel on the TMA path."""
    hw, dout, routing, dw2_64 = _wgrad_inputs(RAGGED, torch.bfloat16, device)
    tuner = weight_grad_kernels._DOWN_WGRAD["16bit"]
    for cfg in tuner.all_configs:
        with forced_config(tuner, cfg):
            dw2, seen = _down_wgrad(hw, dout, routing, RAGGED, monkeypatch, "1")
        assert seen == [True], cfg
        assert_accurate(dw2.view_as(dw2_64), dw2_64, what=str(cfg))


def _up_wgrad(dgate, dup, x, routing, case, monkeypatch, tma: str):
    """((dw1, dv1) as [E, F, H], the USE_TMA of each launch) of moe_up_wgrad; x plays dout's part of _wgrad_inputs."""
    args = (dgate, dup, x, routing.sorted_slots, routing.expert_offsets, case.top_k, case.experts)
    (dw1, dv1), seen = _spied(moe_up_wgrad, args, monkeypatch, tma)
    return (dw1.view(case.experts, case.ffn, -1), dv1.view(case.experts, case.ffn, -1)), seen


def test_up_wgrad_tma_matches_pointer_path(device, monkeypatch):
    """Within round-off of float64, and bitwise the pointer path's."""
    dgate, x, routing, dw1_64 = _wgrad_inputs(RAGGED, torch.float16, device)
    dup = dgate.flip(0)  # other values, same layout
    out_tma, seen_tma = _up_wgrad(dgate, dup, x, routing, RAGGED, monkeypatch, "1")
    out_ptr, seen_ptr = _up_wgrad(dgate, dup, x, routing, RAGGED, monkeypatch, "0")
    assert (seen_tma, seen_ptr) == ([True], [False])
    assert_accurate(out_tma[0], dw1_64)
    assert torch.equal(out_tma[0], out_ptr[0]) and torch.equal(out_tma[1], out_ptr[1])


@pytest.mark.parametrize("tma", ["1", "0"], ids=["tma", "pointer"])
def test_up_wgrad_reads_no_other_experts_rows(tma, device, monkeypatch):
    """As test_down_wgrad_reads_no_other_experts_rows, for dgate and dup."""
    case = BY_NAME["T37_E4_k2"]
    dgate, x, routing, dw1_64 = _wgrad_inputs(case, torch.bfloat16, device)
    bounds = routing.expert_offsets.tolist()
    dgate, dup = dgate.clone(), dgate.clone()
    for e in (1, 3):
        dgate[bounds[e] : bounds[e + 1]] = float("nan")
        dup[bounds[e] : bounds[e + 1]] = float("nan")
    (dw1, dv1), seen = _up_wgrad(dgate, dup, x, routing, case, monkeypatch, tma)
    assert seen == [tma == "1"]
    assert_accurate(dw1[0::2], dw1_64[0::2], what="dw1")
    assert_accurate(dv1[0::2], dw1_64[0::2], what="dv1")


def test_up_wgrad_tma_every_config(device, monkeypatch):
    """Every 16-bit config of the dw1/dv1 kernel on the TMA path."""
    dgate, x, routing, dw1_64 = _wgrad_inputs(RAGGED, torch.bfloat16, device)
    tuner = weight_grad_kernels._UP_WGRAD["16bit"]
    for cfg in tuner.all_configs:
        with forced_config(tuner, cfg):
            (dw1, dv1), seen = _up_wgrad(dgate, dgate, x, routing, RAGGED, monkeypatch, "1")
        assert seen == [True], cfg
        assert_accurate(dw1, dw1_64, what=f"dw1 {cfg}")
        assert_accurate(dv1, dw1_64, what=f"dv1 {cfg}")
