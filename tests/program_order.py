"""Program-order checking for Triton's interpreter, which runs a launch's programs one after another in grid order.

A GPU runs them concurrently, in no order, so a kernel whose program reads what another program of the same launch
writes passes on the CPU and races on the GPU. Two test modes, read from the environment by `install_from_env`:

- DBRX_FAST_PROGRAM_ORDER=reversed|shuffled runs every launch's programs in reversed grid order, or in an order
  shuffled per launch (seeded from the test's name, so a failure reproduces). An order-dependent result then differs
  from the reference.
- DBRX_FAST_RACE_CHECK=1 records, per program, the addresses its loads, stores and atomics touch (masked-off lanes
  excluded) and fails the launch with `ProgramOrderRace` if an address written by one program is read or written by
  another, or one updated atomically is also read by another (atomics among themselves are allowed). Accesses are
  compared in units of the smallest element size the launch touched, so partial overlaps count too. A test whose
  contract allows overlapping programs (corrupt routing metadata, say) is marked `races_allowed(reason)`.

How: `InterpreterBuilder.set_grid_dim` starts a launch and `set_grid_idx` maps the i-th program of the grid loop to
the i-th of the chosen order, so the interpreter's own loop (the same in Triton 3.6 and 3.9) runs the programs in that
order; the builder's masked load / store and atomics are wrapped to record addresses; `GridExecutor.__call__` is
wrapped to judge the launch when it returns and to run `AFTER_LAUNCH` (the poisoning fixture's guard-band check).
"""

import os
import random
from collections import Counter

import numpy as np
from triton.runtime import interpreter

ORDERS = ("sequential", "reversed", "shuffled")
READ, WRITE, ATOMIC = 0, 1, 2
AFTER_LAUNCH: list = []  # callables(kernel name), run after every interpreted launch


class ProgramOrderRace(AssertionError):
    """Programs of one launch touched the same address, one of them writing it."""


class _Launch:
    """The programs of one launch and, under the race check, what each of them touched."""

    def __init__(self, kernel: str, arg_names: list[str], args: tuple, kwargs: dict):
        self.kernel = kernel
        self.program = 0
        self.records = []  # (program, kind, element addresses, element size in bytes)
        named = {**dict(zip(arg_names, args, strict=False)), **kwargs}
        self.buffers = [
            (name, t.data_ptr(), t.element_size()) for name, t in named.items() if hasattr(t, "data_ptr") and t.numel()
        ]

    def record(self, kind: int, ptrs, mask) -> None:
        addrs = ptrs.data if mask is None else ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
        if addrs.size:
            self.records.append((self.program, kind, addrs.ravel(), ptrs.get_element_ty().primitive_bitwidth // 8))

    def races(self) -> list[str]:
        """One line per conflicting address (at most a few), empty when the programs are independent."""
        if not self.records:
            return []
        unit = min(size for *_, size in self.records)
        granules, programs, kinds = [], [], []
        for program, kind, addrs, size in self.records:
            g = (addrs.astype(np.int64) // unit)[:, None] + np.arange(size // unit)
            granules.append(g.ravel())
            programs.append(np.full(g.size, program, np.int64))
            kinds.append(np.full(g.size, kind, np.int8))
        g, p, k = np.concatenate(granules), np.concatenate(programs), np.concatenate(kinds)
        modified = np.isin(g, np.unique(g[k != READ]))  # only what some program modifies can conflict
        g, p, k = g[modified], p[modified], k[modified]
        if not g.size:
            return []
        ug, inv = np.unique(g, return_inverse=True)
        has = np.zeros((ug.size, 3), bool)
        has[inv, k] = True
        pairs = np.unique(inv * (p.max() + 1) + p)
        num_programs = np.bincount(pairs // (p.max() + 1), minlength=ug.size)
        racy = np.flatnonzero((num_programs >= 2) & (has[:, WRITE] | (has[:, ATOMIC] & has[:, READ])))
        lines = []
        for i in racy[:3]:
            touched = sorted({(int(pp), "rwa"[int(kk)]) for pp, kk in zip(p[inv == i], k[inv == i], strict=True)})
            who = ", ".join(f"program {pp} {kind}" for pp, kind in touched[:6])
            lines.append(f"{self._where(int(ug[i]) * unit)}: {who}")
        if racy.size > 3:
            lines.append(f"... {racy.size} conflicting {unit}-byte units in all")
        return lines

    def _where(self, address: int) -> str:
        """`name[element]` of the argument that holds `address` (the nearest one starting below it)."""
        below = [(start, name, size) for name, start, size in self.buffers if start <= address]
        if not below:
            return hex(address)
        start, name, size = max(below)
        return f"{name}[{(address - start) // size}]"


class _State:
    installed = False
    order = "sequential"
    race_check = False
    races_allowed = False
    rng = random.Random(0)
    launch: _Launch | None = None
    perm: list | None = None
    launches: Counter = Counter()  # kernel -> launches run while installed
    racy: Counter = Counter()  # kernel -> launches with a race


STATE = _State()


def begin_test(seed: int, races_allowed: bool) -> None:
    """Per test: the shuffle's seed and whether the test allows overlapping programs."""
    STATE.rng = random.Random(seed)
    STATE.races_allowed = races_allowed


def install_from_env() -> None:
    order = os.environ.get("DBRX_FAST_PROGRAM_ORDER", "sequential")
    race_check = os.environ.get("DBRX_FAST_RACE_CHECK", "0") == "1"
    if order not in ORDERS:
        raise ValueError(f"DBRX_FAST_PROGRAM_ORDER must be one of {', '.join(ORDERS)}, got {order!r}")
    if os.environ.get("TRITON_INTERPRET") != "1":
        if order != "sequential" or race_check:
            raise RuntimeError("DBRX_FAST_PROGRAM_ORDER and DBRX_FAST_RACE_CHECK need TRITON_INTERPRET=1")
        return
    install(order, race_check)


def install(order: str = "sequential", race_check: bool = False) -> None:
    """Patches the interpreter (once) and sets the mode; `install()` alone only runs AFTER_LAUNCH after each launch."""
    STATE.order, STATE.race_check = order, race_check
    if STATE.installed:
        return
    STATE.installed = True
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx

    def ordered_grid_dim(self, nx, ny, nz):
        n = nx * ny * nz
        if STATE.order == "reversed":
            STATE.perm = list(range(n - 1, -1, -1))
        elif STATE.order == "shuffled":
            STATE.perm = STATE.rng.sample(range(n), n)
        else:
            STATE.perm = None
        set_grid_dim(self, nx, ny, nz)

    def ordered_grid_idx(self, x, y, z):
        _, ny, nz = self.grid_dim
        program = (x * ny + y) * nz + z
        if STATE.perm is not None:
            program = STATE.perm[program]
            x, y, z = program // (ny * nz), program // nz % ny, program % nz
        if STATE.launch is not None:
            STATE.launch.program = program
        set_grid_idx(self, x, y, z)

    builder.set_grid_dim, builder.set_grid_idx = ordered_grid_dim, ordered_grid_idx

    def recorded(name, kind, ptr_at, mask_at):
        real = getattr(builder, name)

        def wrapper(self, *args, **kwargs):  # keywords: the interpreter's descriptor loads pass cache_policy so
            if STATE.launch is not None:
                STATE.launch.record(kind, args[ptr_at], None if mask_at is None else args[mask_at])
            return real(self, *args, **kwargs)

        setattr(builder, name, wrapper)

    recorded("create_masked_load", READ, 0, 1)  # (ptrs, mask, other, ...); create_load comes through here too
    recorded("create_masked_store", WRITE, 0, 2)  # (ptrs, value, mask, ...)
    recorded("create_atomic_cas", ATOMIC, 0, None)  # (ptr, cmp, val, sem, scope)
    recorded("create_atomic_rmw", ATOMIC, 1, 3)  # (rmw_op, ptr, val, mask, sem, scope)

    call = executor.__call__

    def judged_call(self, *args, **kwargs):
        kernel = self.fn.__name__
        launch = STATE.launch = _Launch(kernel, self.arg_names, args, kwargs) if STATE.race_check else None
        try:
            call(self, *args, **kwargs)
        finally:
            STATE.launch = None
        STATE.launches[kernel] += 1
        if launch is not None and not STATE.races_allowed:
            races = launch.races()
            if races:
                STATE.racy[kernel] += 1
                raise ProgramOrderRace(f"{kernel}: programs of one launch share addresses:\n  " + "\n  ".join(races))
        for hook in AFTER_LAUNCH:
            hook(kernel)

    executor.__call__ = judged_call


def summary() -> str:
    """Which kernels ran under the mode, how often, and which raced."""
    if not STATE.launches or (STATE.order == "sequential" and not STATE.race_check):
        return ""
    mode = f"program order {STATE.order}, race check {'on' if STATE.race_check else 'off'}"
    rows = [f"  {k}: {n} launches, {STATE.racy[k] or 'none'} racy" for k, n in sorted(STATE.launches.items())]
    return "\n".join([mode, *rows])
