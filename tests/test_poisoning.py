"""The poisoning fixture (tests/conftest.py) itself: it covers every allocator of the launchers, poisons what they
allocate, and its guard bands catch a store out of bounds when the launch returns."""

import os
import re
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from conftest import ALLOCATORS, FLOAT_SENTINEL, GUARD, INT_POISON

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"


@triton.jit
def _fill_kernel(out_ptr, n, EXTRA: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = i for i < n + EXTRA: EXTRA = 1 stores one element past the end, EXTRA = -1 leaves the last unwritten."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, offs.to(tl.float32), mask=offs < n + EXTRA)


def _fill(n: int, extra: int) -> torch.Tensor:
    out = torch.empty(n)  # poisoned: this module is added to poisoned.modules below
    _fill_kernel[(triton.cdiv(n, 16),)](out, n, EXTRA=extra, BLOCK=16)
    return out


def test_every_allocator_of_the_launchers_is_poisoned():
    """A launcher that starts allocating with another uninitialised allocator must be added to ALLOCATORS."""
    used = set()
    for path in KERNELS_DIR.glob("*.py"):
        used |= set(re.findall(r"\b((?:new_)?empty\w*)\(", path.read_text()))
    assert used and used <= set(ALLOCATORS), f"unpoisoned allocators in kernels/: {sorted(used - set(ALLOCATORS))}"


def test_only_dbrx_fast_allocations_are_poisoned(poisoned):
    torch.empty(4)
    assert not poisoned.buffers, "a test's own allocations are left alone"
    poisoned.modules += (__name__,)
    x = torch.empty(3, 5).t()
    for out in (torch.empty(2, 3), torch.empty_like(x), x.new_empty((2,)), torch.empty_strided((2, 2), (1, 2))):
        assert out.isnan().all()
    assert torch.empty_like(x).stride() == x.stride()
    assert (torch.empty(3, dtype=torch.int32) == INT_POISON).all()
    assert (torch.empty(3, dtype=torch.int64) == INT_POISON).all()
    assert len(poisoned.buffers) == 8
    poisoned.check()


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="launches are checked under the interpreter")
def test_store_past_the_end_fails_at_the_launch(poisoned):
    poisoned.modules += (__name__,)
    assert torch.equal(_fill(37, 0), torch.arange(37.0))
    assert _fill(37, -1)[-1].isnan(), "an unwritten element stays NaN"
    with pytest.raises(AssertionError, match=r"test_poisoning.py:\d+ after _fill_kernel"):
        _fill(37, 1)
    base = poisoned.buffers[-1][0]
    assert base[GUARD + 37] != FLOAT_SENTINEL
    poisoned.buffers.pop()  # its guard band is broken on purpose: keep the teardown check to the others
