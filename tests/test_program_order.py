"""The program-order check (tests/program_order.py) on toy kernels: a racy one is caught, clean ones pass, and the
reversed and shuffled orders really run the programs in another order."""

import os

import program_order
import pytest
import torch
import triton
import triton.language as tl
from program_order import STATE, ProgramOrderRace

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the check patches Triton's interpreter"),
]

BLOCK = 16


@triton.jit
def _shift_kernel(x_ptr, n, BLOCK: tl.constexpr):
    """Racy: program i reads the block program i-1 writes (x[i*B + j] = x[(i-1)*B + j] + 1)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = (offs < n) & (offs >= BLOCK)
    prev = tl.load(x_ptr + offs - BLOCK, mask=mask)
    tl.store(x_ptr + offs, prev + 1, mask=mask)


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """Clean: each program reads and writes its own block only (masked-off lanes past n touch nothing)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=mask), mask=mask)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


@triton.jit
def _order_kernel(order_ptr, counter_ptr):
    """Program i stores the count of programs that ran before it (an atomic counter, allowed by the check)."""
    tl.store(order_ptr + tl.program_id(0), tl.atomic_add(counter_ptr, 1))


@triton.jit
def _peek_kernel(seen_ptr, counter_ptr):
    """Racy: each program bumps a counter atomically, then reads it plainly (its value depends on the order)."""
    tl.atomic_add(counter_ptr, 1)
    tl.store(seen_ptr + tl.program_id(0), tl.load(counter_ptr))


@triton.jit
def _grid_2d_kernel(order_ptr, counter_ptr):
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(order_ptr + pid, tl.atomic_add(counter_ptr, 1))


@triton.jit
def _overlap_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """Racy through a partial overlap: program i stores int16 halves, program i+1 loads them as one int32."""
    pid = tl.program_id(0)
    tl.store(x_ptr + 2 * pid + 1 + tl.arange(0, 2), tl.full([2], 1, tl.int16))
    tl.store(y_ptr + pid, tl.load(x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + pid))


@pytest.fixture
def mode(monkeypatch):
    """Sets the program order and race check for one test (restored after it)."""

    def set_mode(order="sequential", race_check=False):
        monkeypatch.setattr(STATE, "order", order)
        monkeypatch.setattr(STATE, "race_check", race_check)

    program_order.install(STATE.order, STATE.race_check)
    return set_mode


def test_racy_kernel_is_caught(mode):
    mode(race_check=True)
    x = torch.arange(4 * BLOCK, dtype=torch.float32)
    with pytest.raises(ProgramOrderRace, match=r"_shift_kernel.*\n  x_ptr\[16\]: program 1 w, program 2 r"):
        _shift_kernel[(4,)](x, x.numel(), BLOCK=BLOCK)


def test_partial_overlap_is_caught(mode):
    mode(race_check=True)
    x, y = torch.zeros(16, dtype=torch.int16), torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ProgramOrderRace, match="_overlap_kernel"):
        _overlap_kernel[(4,)](x, y, BLOCK=2)


@pytest.mark.parametrize("order", ["sequential", "reversed", "shuffled"])
def test_clean_kernel_passes(mode, order):
    mode(order, race_check=True)
    n = 3 * BLOCK + 5  # a ragged last block: its masked-off lanes would overlap nothing anyway
    x = torch.randn(n)
    want = x.clone()
    y = torch.empty(n)
    _scale_kernel[(triton.cdiv(n, BLOCK),)](x, y, n, BLOCK=BLOCK)
    assert torch.equal(y, 2 * want) and torch.equal(x, want + 1)


def test_atomics_among_programs_are_allowed_but_not_with_reads(mode):
    mode(race_check=True)
    order, counter = torch.empty(8, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    _order_kernel[(8,)](order, counter)
    assert counter.item() == 8
    with pytest.raises(ProgramOrderRace, match=r"counter_ptr\[0\]: program 0 a, program 0 r, program 1 a"):
        _peek_kernel[(8,)](order, counter)


@pytest.mark.parametrize("order", ["sequential", "reversed", "shuffled"])
def test_order_changes_what_programs_see(mode, order):
    """Each program records when it ran: grid order, its reverse, or a permutation that is neither."""
    mode(order)
    n = 64
    ran_at = torch.empty(n, dtype=torch.int32)
    _order_kernel[(n,)](ran_at, torch.zeros(1, dtype=torch.int32))
    assert sorted(ran_at.tolist()) == list(range(n)), "every program runs once"
    expected = {"sequential": list(range(n)), "reversed": list(range(n - 1, -1, -1))}
    if order in expected:
        assert ran_at.tolist() == expected[order]
    else:
        assert ran_at.tolist() not in expected.values()


def test_multi_dimensional_grids_are_permuted_as_a_whole(mode):
    mode("reversed")
    ran_at = torch.empty(2 * 3, dtype=torch.int32)
    _grid_2d_kernel[(2, 3)](ran_at, torch.zeros(1, dtype=torch.int32))
    assert ran_at.tolist() == list(range(5, -1, -1))


def test_shifted_kernel_gives_another_answer_in_reverse(mode):
    """Without the race check, the reversed order alone exposes the racy kernel: its answer changes."""
    x = torch.zeros(4 * BLOCK)
    mode("sequential")
    _shift_kernel[(4,)](x, x.numel(), BLOCK=BLOCK)
    forward = x.clone()
    x.zero_()
    mode("reversed")
    _shift_kernel[(4,)](x, x.numel(), BLOCK=BLOCK)
    assert not torch.equal(x, forward)
