"""Test set-up: Triton kernels run through the interpreter on the CPU when no CUDA device exists.

TRITON_INTERPRET must be set before any kernel module is imported, so it is decided here, before collection.

Every test also runs with poisoned allocations (`poisoned`, autouse) and, when DBRX_FAST_PROGRAM_ORDER or
DBRX_FAST_RACE_CHECK is set, with the interpreter's program order changed and cross-program accesses checked
(tests/program_order.py).
"""

import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

import program_order  # noqa: E402  (after TRITON_INTERPRET: it imports triton)

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "races_allowed(reason): programs of one launch may share addresses here (the reason says why)"
    )
    program_order.install_from_env()


def pytest_terminal_summary(terminalreporter):
    if summary := program_order.summary():
        terminalreporter.write_line(summary)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU under the Triton interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test draws its own inputs: a seed from its name (crc32, stable across processes, unlike hash()), so a
    failure reproduces but tests differ."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    program_order.begin_test(seed, request.node.get_closest_marker("races_allowed") is not None)


# Uninitialised allocators, patched below. new_zeros / torch.zeros are left alone: their values are meant.
ALLOCATORS = {"empty": torch, "empty_like": torch, "empty_strided": torch, "new_empty": torch.Tensor}
GUARD = 1024  # elements of sentinel on each side of every poisoned buffer
FLOAT_POISON, FLOAT_SENTINEL = float("nan"), -4096.0  # the sentinel is exact in every float dtype
INT_POISON, INT_SENTINEL = -(2**30), 0x5EED5EED  # a poisoned index or count points far outside any buffer
INT_DTYPES = (torch.int32, torch.int64)


class Poisoned:
    """Allocations made by dbrx_fast's own code (kernels/ launchers and the torch path), poisoned: floating buffers
    start as NaN and int32/int64 buffers as -2**30, so an element a kernel forgets to write fails the test (fresh CPU
    pages are zeros, which would hide it), and each buffer sits between two guard bands of a sentinel, so a store out
    of bounds is caught.

    The guard bands are checked after every interpreted launch (`program_order.AFTER_LAUNCH`, naming the kernel), at
    teardown (on a GPU, where launches are not intercepted) and whenever a test calls `check()`."""

    def __init__(self):
        self.modules = ("dbrx_fast",)  # callers whose allocations are poisoned; a test may add its own module
        self.buffers = []  # (base buffer, sentinel, where it was allocated)

    def wrap(self, real, make_base):
        def allocate(*args, **kwargs):
            t = real(*args, **kwargs)
            caller = sys._getframe(1)
            if not caller.f_globals.get("__name__", "").startswith(self.modules) or not self._poisonable(t, kwargs):
                return t
            floating = t.is_floating_point()
            span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
            base = make_base(span + 2 * GUARD, t).fill_(FLOAT_SENTINEL if floating else INT_SENTINEL)
            out = base.as_strided(t.shape, t.stride(), GUARD).fill_(FLOAT_POISON if floating else INT_POISON)
            where = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"
            self.buffers.append((base, FLOAT_SENTINEL if floating else INT_SENTINEL, where))
            return out

        return allocate

    @staticmethod
    def _poisonable(t, kwargs) -> bool:
        """Plain dense tensors that hold floats or indices; not FakeTensors (torch.compile tracing) or `out=`."""
        return (
            type(t) is torch.Tensor
            and t.layout == torch.strided
            and (t.is_floating_point() or t.dtype in INT_DTYPES)
            and "out" not in kwargs
            and not t.requires_grad
        )

    def check(self, kernel: str = "") -> None:
        after = f" after {kernel}" if kernel else ""
        for base, sentinel, where in self.buffers:
            if not ((base[:GUARD] == sentinel).all() and (base[-GUARD:] == sentinel).all()):
                raise AssertionError(f"a store left the buffer allocated at {where}{after}: its guard band changed")


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Poisons every buffer dbrx_fast allocates uninitialised during the test; see `Poisoned`."""
    p = Poisoned()
    real_empty = torch.empty

    def base_like(n, t):
        return real_empty(n, dtype=t.dtype, device=t.device)

    for name, owner in ALLOCATORS.items():
        monkeypatch.setattr(owner, name, p.wrap(getattr(owner, name), base_like))
    monkeypatch.setattr(program_order, "AFTER_LAUNCH", [*program_order.AFTER_LAUNCH, p.check])
    yield p
    p.check()
