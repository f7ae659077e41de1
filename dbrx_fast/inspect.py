"""Compile every kernel launch for real GPUs, without one: `python -m dbrx_fast.inspect`.

For each `CompileSpec` (kernels/compile_spec.py) of every registered kernel module and each target architecture,
`triton.compile` builds the PTX and cubin a launch on that GPU would build. The Triton wheel's own ptxas (`ptxas -v`)
then reports registers and spill bytes, the compiled metadata gives the dynamic shared memory, and the PTX tells
whether tensor-core matmuls use Hopper's `wgmma`. A spec fails if it does not compile, spills, needs more shared
memory than the architecture has, or is a tl.dot kernel (`matrix=True`) whose sm_90 PTX has no `wgmma`.

The same PTX also gives a static performance reading (`read_ptx_performance`, no extra compilation): the wgmma N
widths, whether the main loop waits for all its loads or drains the MMA pipeline, exp/divide instructions per MMA in
the main loop, the TMA loads issued there, and, with ptxas' registers and the shared memory, the blocks that fit on
one SM. These are reported, not failed here: tests/test_compile_gpu_targets.py enforces them for the large-T MoE
configs.

    python -m dbrx_fast.inspect                          # table of every spec; exit status 1 if anything fails
    python -m dbrx_fast.inspect --arch 90 --filter rope  # one architecture, specs whose name contains "rope"

Pointer arguments are compiled as 16-byte aligned, as the JIT specializes them for any fresh torch allocation.

The result depends on the Triton release, whose ptxas allocates the registers: Triton 3.6 builds both architectures
with its ptxas 12.8, Triton 3.9 sm_80 with ptxas 12.9 and sm_90 with ptxas 13 ("ptxas-blackwell"), each with
--regAllocOptLevel=2. A tile that fits with one can spill with another, so the supported range is checked at both
ends (benchmarks/results/compile-check/triton-<version>.txt: `python -m dbrx_fast.inspect > FILE`).

The Triton interpreter (TRITON_INTERPRET=1) is not a problem for `triton.compile` itself, but `@triton.jit` returns
an InterpretedFunction, which `triton.compile` cannot take, when a kernel module is imported under it. So when the
variable is set, or the kernels were imported under it, the compilation runs in a fresh Python process with the
variable removed, and its records come back as JSON.
"""

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# Largest dynamic shared memory one block may opt into (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
# Occupancy inputs (CUDA programming guide, compute capabilities table; CUDA occupancy calculator): shared memory per
# SM, of which the driver reserves 1 KiB per resident block and allocates in 128-byte units; 65536 registers per SM,
# allocated per warp in units of 256 (registers per thread rounded up to a multiple of 8); at most 32 blocks and 64
# warps per SM on both.
SHARED_MEMORY_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SHARED_MEMORY_RESERVED_PER_BLOCK = 1024
SHARED_MEMORY_UNIT = 128
REGISTERS_PER_SM = 65536
REGISTER_UNIT_PER_WARP = 256
MAX_BLOCKS_PER_SM = 32
MAX_WARPS_PER_SM = 64
DEFAULT_ARCHS = (80, 90)
REGISTRY = "dbrx_fast.kernels.registry:all_compile_specs"


@dataclasses.dataclass
class CompileRecord:
    """What compiling one spec for one architecture produced; `None` where compilation failed before that stage."""

    name: str
    arch: int
    matrix: bool
    regs: int | None = None  # ptxas: registers per thread
    spill_stores: int | None = None  # ptxas: bytes
    spill_loads: int | None = None  # ptxas: bytes
    driver_spills: int | None = None  # CompiledKernel.n_spills, known only where a GPU of this arch loaded the cubin
    smem: int | None = None  # dynamic shared memory per block, bytes
    instrs: int | None = None  # PTX instruction lines
    wgmma: bool | None = None  # the PTX issues wgmma (Hopper's asynchronous tensor-core matmul)
    warps: int | None = None  # num_warps of the launch: with regs, the register footprint of one block
    wgmma_n: list[int] | None = None  # N widths of the wgmma instructions (m64nNk...), ascending; [] without wgmma
    loop_waits_all: bool | None = None  # a main loop waits for all its loads (see read_ptx_performance)
    loop_drains_mma: bool | None = None  # a main loop drains the wgmma pipeline
    loop_sfu_under_mma: bool | None = None  # every exp/divide of the main loops issues while a wgmma is in flight
    loop_sfu_per_mma: float | None = None  # exp/divide instructions per MMA instruction in the main loops
    loop_tma: int | None = None  # TMA loads (cp.async.bulk.tensor global -> shared) in the main loops
    error: str | None = None  # why compilation or ptxas failed

    @property
    def spills(self) -> int | None:
        if self.spill_stores is None:
            return None
        return self.spill_stores + self.spill_loads

    @property
    def blocks_by_regs(self) -> int | None:
        """Blocks per SM that the register file holds (0 if one block does not fit)."""
        if self.regs is None or self.warps is None:
            return None
        per_warp = -(-self.regs * 32 // REGISTER_UNIT_PER_WARP) * REGISTER_UNIT_PER_WARP
        return REGISTERS_PER_SM // (per_warp * self.warps)

    @property
    def blocks_by_smem(self) -> int | None:
        """Blocks per SM that shared memory holds (0 if one block does not fit)."""
        if self.smem is None:
            return None
        per_block = -(-self.smem // SHARED_MEMORY_UNIT) * SHARED_MEMORY_UNIT + SHARED_MEMORY_RESERVED_PER_BLOCK
        return SHARED_MEMORY_PER_SM[self.arch] // per_block

    @property
    def blocks_per_sm(self) -> int | None:
        """Resident blocks per SM: the least of registers, shared memory and the hardware's block and warp limits."""
        if self.blocks_by_regs is None or self.blocks_by_smem is None:
            return None
        return min(self.blocks_by_regs, self.blocks_by_smem, MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // self.warps)

    @property
    def problems(self) -> list[str]:
        """Every reason this spec cannot ship for this architecture; empty when it can."""
        if self.error is not None:
            return [f"does not compile: {self.error}"]
        found = []
        if self.spills:
            found.append(f"spills {self.spill_stores} bytes of stores and {self.spill_loads} bytes of loads (ptxas)")
        if self.driver_spills:
            found.append(f"uses local memory: CompiledKernel.n_spills = {self.driver_spills} (CUDA driver)")
        limit = SHARED_MEMORY_LIMIT[self.arch]
        if self.smem > limit:
            found.append(f"needs {self.smem} bytes of shared memory, over sm_{self.arch}'s {limit}")
        if self.matrix and self.arch >= 90 and not self.wgmma:
            found.append(
                "a matrix kernel without wgmma in its sm_90 PTX (num_warps must be a multiple of 4, M-tile >= 64)"
            )
        return found


def load_specs(source: str | None = None) -> list:
    """The CompileSpecs that `source` returns: "package.module:function" or "path/to/file.py:function" (a file is
    imported under a private name); the registry's `all_compile_specs` by default."""
    target, sep, func = (source or REGISTRY).rpartition(":")
    if not sep or not target or not func:
        raise ValueError(f"spec source {source!r} is not MODULE:FUNCTION or FILE.py:FUNCTION")
    if target.endswith(".py"):
        path = Path(target).resolve()
        module_name = f"_dbrx_fast_inspect_{path.stem}"
        file_spec = importlib.util.spec_from_file_location(module_name, path)
        if file_spec is None:
            raise ValueError(f"cannot import {path} as a Python file")
        module = importlib.util.module_from_spec(file_spec)
        # Registered before it runs, as a normal import would be: dataclasses and pickling look modules up by name.
        sys.modules[module_name] = module
        file_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return list(getattr(module, func)())


def select_specs(specs: list, name_filter: str | None = None) -> list:
    """The specs whose name contains `name_filter` (all without one); spec names must be unique."""
    duplicates = sorted(name for name, count in Counter(s.name for s in specs).items() if count > 1)
    if duplicates:
        raise ValueError(f"spec names must be unique, these repeat: {duplicates}")
    return [s for s in specs if name_filter is None or name_filter in s.name]


def count_ptx_instructions(ptx: str) -> int:
    """Lines of PTX that are instructions: ending in ';' once comments are cut, and not a directive ('.reg', '.loc',
    '.b8' debug data...). Labels, braces and parameter lists do not end in ';'."""
    count = 0
    for line in ptx.splitlines():
        line = line.split("//", 1)[0].strip()
        if line.endswith(";") and not line.startswith("."):
            count += 1
    return count


_LABEL = re.compile(r"^(\$\w+):")
_BRANCH = re.compile(r"^bra(?:\.uni)?\s+(\$\w+)\s*;")
_WGMMA_SHAPE = re.compile(r"^wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k\d+")
# A TMA load: destination shared memory (shared::cluster up to PTX 8.5, shared::cta since), source global. A TMA store
# reads `.global.shared::cta` the other way round; a prefetch is `cp.async.bulk.prefetch.tensor`.
_TMA_LOAD = re.compile(r"^cp\.async\.bulk\.tensor\.\d+d\.shared::\w+\.global")


def _ptx_instructions(ptx: str) -> list[str]:
    """Labels and instructions, one per entry, comments and guard predicates (`@%p1 `) cut."""
    lines = []
    for line in ptx.splitlines():
        line = re.sub(r"^@!?%\w+\s+", "", line.split("//", 1)[0].strip())
        if line and not line.startswith("."):
            lines.append(line)
    return lines


def _is_mma(line: str) -> bool:
    return line.startswith(("wgmma.mma_async", "mma.sync"))


def _is_sfu(line: str) -> bool:
    # Float divisions only: `div.s32` / `div.u64` are index arithmetic, not the sigmoid's division.
    return line.startswith(("ex2.", "rcp.")) or bool(re.match(r"div\.[\w.]*f(32|64)\s", line))


def _waits_for(line: str, op: str) -> int | None:
    match = re.match(rf"{re.escape(op)}\s+(\d+)\s*;", line)
    return None if match is None else int(match.group(1))


def main_loop_bodies(lines: list[str]) -> list[tuple[int, int]]:
    """The main loops of a kernel, as (first, last) indices into `_ptx_instructions`: innermost loops that hold an
    MMA instruction. A loop is a label and a later branch back to it (LLVM lays a loop out as its header, its body,
    then the latch that branches back, and Triton's loops have one latch), so its body is the lines in between.
    Limits: a loop whose blocks LLVM placed outside that range (rotated loops with a cold block moved past the
    latch), or irreducible control flow, is not seen; a forward branch out of the range (an early exit) is not
    followed. Innermost: a persistent kernel's outer tile loop, whose epilogue legitimately drains, is not one."""
    labels, loops = {}, []
    for index, line in enumerate(lines):
        if (label := _LABEL.match(line)) is not None:
            labels[label.group(1)] = index
        elif (branch := _BRANCH.match(line)) is not None and branch.group(1) in labels:
            loops.append((labels[branch.group(1)], index))
    with_mma = [(a, b) for a, b in loops if any(_is_mma(line) for line in lines[a:b])]
    return [
        (a, b)
        for a, b in with_mma
        if not any((a, b) != (c, d) and a <= c and d <= b for c, d in with_mma)  # holds no other MMA loop
    ]


def _all_known(values: list) -> bool | None:
    """all() of the values that are not None; None if every one is."""
    known = [v for v in values if v is not None]
    return all(known) if known else None


def sfu_under_mma(body: list[str]) -> bool | None:
    """Whether every exp/divide instruction of a loop body issues while a wgmma group is in flight (committed, not
    yet waited for), in the loop's steady state: the body is walked twice, since a group committed late in one
    iteration is in flight early in the next. None where the body commits no wgmma or has no exp/divide."""
    in_flight, seen = 0, []
    for steady in (False, True):
        for line in body:
            if line.startswith("wgmma.commit_group"):
                in_flight += 1
            elif (pending := _waits_for(line, "wgmma.wait_group.sync.aligned")) is not None:
                in_flight = min(in_flight, pending)
            elif steady and _is_sfu(line):
                seen.append(in_flight > 0)
    return all(seen) if seen and any(line.startswith("wgmma.commit_group") for line in body) else None


def read_ptx_performance(ptx: str) -> dict:
    """The static performance reading of one kernel's PTX, as CompileRecord fields:
    - wgmma_n: the N of every `wgmma.mma_async...m64nNk...` in the kernel (Hopper's MMA is 64 rows high and reads
      its A tile anew per instruction, so a narrow N costs more shared-memory traffic per FLOP);
    - loop_waits_all: a main loop holds `cp.async.wait_group 0` (or `cp.async.wait_all`): each iteration waits for
      every load in flight, so loads do not overlap the MMA (a one-buffer loop);
    - loop_drains_mma: a main loop holds `wgmma.wait_group.sync.aligned 0`: the tensor cores idle until every MMA
      issued so far is done, within the iteration (an unpipelined loop, or two dots into one accumulator);
    - loop_sfu_under_mma: every exp/divide of the main loops issues while a wgmma is in flight (`sfu_under_mma`),
      so that SFU work (an attention softmax) overlaps the tensor cores, even in a loop that also drains; None
      without wgmma or exp/divide in the main loops;
    - loop_sfu_per_mma: exp (`ex2`), reciprocal (`rcp`) and float divide (`div.*.f32`) instructions per MMA
      instruction in the main loops, both counted per thread as written (statically: unrolled code counts as
      written, a branch taken or not counts the same). The main loop rather than the whole kernel: the epilogue runs
      once per tile, the loop once per K step, so only the loop's ratio says whether SFU work competes with the
      MMA. None without a main loop;
    - loop_tma: TMA loads (`cp.async.bulk.tensor.Nd.shared::*.global`) in the main loops as written, normally one per
      operand tile that a K step loads through a tensor descriptor; 0 where every load is cp.async or ld.global
      (sm_80 has no TMA); None without a main loop.
    sm_80's mma.sync is synchronous: there only wait-all and the SFU ratio say something (drain is always False).
    """
    lines = _ptx_instructions(ptx)
    loops = [lines[a : b + 1] for a, b in main_loop_bodies(lines)]
    body = [line for loop in loops for line in loop]
    mma = sum(1 for line in body if _is_mma(line))
    return dict(
        wgmma_n=sorted({int(m.group(1)) for line in lines if (m := _WGMMA_SHAPE.match(line)) is not None}),
        loop_waits_all=bool(loops)
        and any(_waits_for(line, "cp.async.wait_group") == 0 or line.startswith("cp.async.wait_all") for line in body),
        loop_drains_mma=bool(loops) and any(_waits_for(line, "wgmma.wait_group.sync.aligned") == 0 for line in body),
        loop_sfu_under_mma=_all_known([sfu_under_mma(loop) for loop in loops]),
        loop_sfu_per_mma=sum(1 for line in body if _is_sfu(line)) / mma if mma else None,
        loop_tma=sum(1 for line in body if _TMA_LOAD.match(line)) if loops else None,
    )


def ptxas_path(arch: int) -> str:
    """The ptxas that the installed Triton builds `arch` with: get_ptxas(arch) -> NvidiaTool from 3.6 (the oldest
    supported) to 3.9, which pick different binaries for sm_90 (see the module docstring)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def gpu_name(arch: int) -> str:
    # sm_90a, not sm_90: Triton targets the arch-specific variant, the only one with wgmma.
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def triton_ptxas_options(arch: int, options: dict) -> list[str]:
    """The code-shaping ptxas options the installed Triton passes when it builds the cubin for `options`, so that
    `ptxas -v` here allocates registers as Triton's build did. Triton 3.9 adds --regAllocOptLevel=2 (a ptxas 13
    workaround) that can turn 0 spills into a few bytes; no API exposes it, so it is read from Triton's source."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    parsed = backend.parse_options(options)
    flags = [] if parsed.enable_fp_fusion else ["--fmad=false"]
    flags += parsed.ptx_options.split() if parsed.ptx_options else []
    flags += dict.fromkeys(re.findall(r"--regAllocOptLevel=\d+", inspect.getsource(type(backend).make_cubin)))
    return flags


def run_ptxas(ptx: str, arch: int, flags: list[str] = ()) -> tuple[int, int, int]:
    """(registers, spill-store bytes, spill-load bytes) from `ptxas -v` on `ptx`; raises RuntimeError when ptxas
    fails or its report cannot be read."""
    with tempfile.TemporaryDirectory(prefix="dbrx_fast_ptxas_") as tmp:
        src, out = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        src.write_text(ptx)
        cmd = [ptxas_path(arch), "-v", *flags, f"--gpu-name={gpu_name(arch)}", str(src), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    report = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{report}")
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if regs is None or spills is None:
        raise RuntimeError(f"cannot read registers and spills from ptxas -v:\n{report}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _driver_spills(compiled, arch: int) -> int | None:
    """CompiledKernel.n_spills, which the CUDA driver reports only once it loads the cubin: so only when this
    machine's current GPU is `arch` (a cubin for another major architecture does not load)."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    if major * 10 + minor != arch:
        return None
    compiled._init_handles()  # loads the module: the only way to the driver's counts, and no launch
    return compiled.n_spills


def _full_signature(spec) -> tuple[dict[str, str], dict[str, object]]:
    """Signature and constexprs over every kernel argument, in order; a constexpr left out of the spec takes the
    kernel's default value."""
    params = inspect.signature(spec.kernel.fn).parameters
    unknown = sorted((set(spec.signature) | set(spec.constexprs)) - set(params))
    if unknown:
        raise ValueError(f"{spec.name}: the spec names arguments the kernel does not have: {unknown}")
    signature, constexprs = {}, dict(spec.constexprs)
    for name, param in params.items():
        if name in spec.signature:
            signature[name] = spec.signature[name]
        elif name in spec.constexprs:
            signature[name] = "constexpr"
        elif param.default is not inspect.Parameter.empty:
            signature[name] = "constexpr"
            constexprs[name] = param.default
        else:
            raise ValueError(f"{spec.name}: argument {name!r} has neither a type in `signature` nor a constexpr value")
    return signature, constexprs


def compile_spec(spec, arch: int) -> CompileRecord:
    """Compile `spec` for sm_`arch` and measure it. Failures land in `record.error`; they do not raise."""
    record = CompileRecord(name=spec.name, arch=arch, matrix=spec.matrix)
    if not isinstance(spec.kernel, JITFunction):
        record.error = (
            f"the kernel is a {type(spec.kernel).__name__}, not a @triton.jit function"
            + (" (imported under TRITON_INTERPRET=1)" if isinstance(spec.kernel, InterpretedFunction) else "")
            + (" (give the autotuner's .fn)" if hasattr(spec.kernel, "configs") else "")
        )
        return record
    try:
        signature, constexprs = _full_signature(spec)
        aligned = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(signature.values()) if ty.startswith("*")}
        source = ASTSource(fn=spec.kernel, signature=signature, constexprs=constexprs, attrs=aligned)
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        # A failing ptxas run prints the whole PTX to stdout before raising; the exception carries what matters.
        with contextlib.redirect_stdout(io.StringIO()):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        record.regs, record.spill_stores, record.spill_loads = run_ptxas(ptx, arch, triton_ptxas_options(arch, options))
        record.smem = compiled.metadata.shared
        record.instrs = count_ptx_instructions(ptx)
        record.wgmma = "wgmma" in ptx
        record.warps = spec.num_warps
        for field, value in read_ptx_performance(ptx).items():
            setattr(record, field, value)
        if record.smem <= SHARED_MEMORY_LIMIT[arch]:  # else loading it fails, and the table says why already
            record.driver_spills = _driver_spills(compiled, arch)
    except Exception as exc:  # every failure is a finding for the table, not a crash of the tool
        record.error = f"{type(exc).__name__}: {exc}".strip()
    return record


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


_worker_specs: list = []  # a pool worker's copy of the parent's specs, set by _init_worker


def _init_worker(specs: list) -> None:
    global _worker_specs
    _worker_specs = specs


def _compile_in_worker(index: int, arch: int) -> CompileRecord:
    return compile_spec(_worker_specs[index], arch)


def _compile_all(specs: list, archs, jobs: int) -> list[CompileRecord]:
    tasks = [(index, arch) for index in range(len(specs)) for arch in archs if arch in specs[index].archs]
    # Forked workers inherit the specs (initargs are not pickled under fork; JIT functions do not pickle). Forking is
    # unsafe once this process has touched CUDA, so that case stays serial.
    import torch

    if (
        jobs <= 1
        or len(tasks) <= 1
        or torch.cuda.is_initialized()
        or "fork" not in multiprocessing.get_all_start_methods()
    ):
        return [compile_spec(specs[index], arch) for index, arch in tasks]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(specs,)) as pool:
        return list(pool.map(_compile_in_worker, *zip(*tasks, strict=True)))


def _compile_in_subprocess(archs, name_filter: str | None, source: str | None, jobs: int) -> list[CompileRecord]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The child must find what this process found (a test's spec module, an editable checkout).
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="dbrx_fast_inspect_") as tmp:
        out = Path(tmp) / "records.json"
        cmd = [sys.executable, "-m", "dbrx_fast.inspect", "--json", str(out), "--jobs", str(jobs)]
        cmd += ["--arch", ",".join(str(a) for a in archs)]
        if name_filter is not None:
            cmd += ["--filter", name_filter]
        if source is not None:
            cmd += ["--specs", source]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(f"the compile subprocess failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return [CompileRecord(**fields) for fields in json.loads(out.read_text())]


def default_jobs() -> int:
    """Two worker processes at most. Compiling is CPU-bound: on an idle 2-core machine two workers compile a cold
    Triton cache about 1.5x faster (24 toy launches: 7.7 s serial, 5.2 s); on a loaded one it is a wash."""
    return max(1, min(2, os.cpu_count() or 1))


def inspect_specs(
    archs=DEFAULT_ARCHS, name_filter: str | None = None, source: str | None = None, jobs: int | None = None
) -> list[CompileRecord]:
    """Compile the specs from `source` (default: the registry) whose name contains `name_filter`, for each of
    `archs` that the spec's own `archs` holds: one record per (spec, arch), in spec order. Runs in a subprocess when
    the interpreter is on."""
    archs = tuple(int(a) for a in archs)
    bad = [a for a in archs if a not in SHARED_MEMORY_LIMIT]
    if bad:
        raise ValueError(f"unsupported architectures {bad}: choose from {sorted(SHARED_MEMORY_LIMIT)}")
    jobs = default_jobs() if jobs is None else jobs
    if _interpreting():
        return _compile_in_subprocess(archs, name_filter, source, jobs)
    specs = select_specs(load_specs(source), name_filter)
    if any(isinstance(s.kernel, InterpretedFunction) for s in specs):
        # The kernel modules were imported while TRITON_INTERPRET was set, and it has been unset since.
        return _compile_in_subprocess(archs, name_filter, source, jobs)
    return _compile_all(specs, archs, jobs)


def _loop_cell(r: CompileRecord) -> str:
    if r.loop_sfu_per_mma is None:  # no main loop read (no MMA in a loop, or no record)
        return "-"
    flags = [name for name, on in (("waitall", r.loop_waits_all), ("drain", r.loop_drains_mma)) if on]
    return ("+".join(flags) or "pipelined") + ("+sfu||mma" if r.loop_sfu_under_mma else "")


def format_table(records: list[CompileRecord]) -> str:
    """A text table, one row per record, then each failure's reasons in full. The performance columns (see
    read_ptx_performance): wgmma N widths, the main loop's waits (and "sfu||mma" where its exp/divide work issues
    under a wgmma in flight), exp/divide per MMA there, its TMA loads, and blocks per SM as "resident (by registers,
    by shared memory)"."""
    headers = ("kernel / config", "arch", "regs", "spills", "smem", "instrs", "wgmma")
    headers += ("mma_n", "main loop", "sfu/mma", "tma", "blocks/SM", "status")

    def cell(value) -> str:
        return "-" if value is None else str(value)

    rows = [
        (
            r.name,
            f"sm_{r.arch}",
            cell(r.regs),
            cell(r.spills),
            cell(r.smem),
            cell(r.instrs),
            ("yes" if r.wgmma else "no") if r.arch >= 90 and r.wgmma is not None else "-",
            ",".join(map(str, r.wgmma_n)) if r.wgmma_n else "-",
            _loop_cell(r),
            "-" if r.loop_sfu_per_mma is None else f"{r.loop_sfu_per_mma:.1f}",
            cell(r.loop_tma),
            "-" if r.blocks_per_sm is None else f"{r.blocks_per_sm} ({r.blocks_by_regs},{r.blocks_by_smem})",
            "ok" if not r.problems else "FAIL",
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
        for row in [headers, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in records:
        for problem in r.problems:
            # Compiler errors can run to pages of IR; the head says what and where.
            head = "\n      ".join(problem.splitlines()[:20])
            lines.append(f"FAIL {r.name} sm_{r.arch}: {head}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dbrx_fast.inspect",
        description="Compile every kernel launch for sm_80 / sm_90 without a GPU; report registers, spills, shared "
        "memory, PTX instructions and wgmma, and read the PTX for performance: wgmma N, main-loop waits, exp/divide "
        "per MMA, TMA loads in the main loop, blocks per SM. Exit status 1 if any spec fails to compile, spills, "
        "overflows shared memory, or is a matrix kernel without wgmma on sm_90.",
    )
    parser.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)), help="comma-separated: 80,90")
    parser.add_argument("--filter", dest="name_filter", metavar="SUBSTRING", help="only specs whose name contains it")
    parser.add_argument(
        "--specs",
        metavar="MODULE:FUNC",
        help="where the specs come from (MODULE:FUNC or FILE.py:FUNC returning CompileSpecs); default: " + REGISTRY,
    )
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: up to 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the records as JSON to PATH")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
        records = inspect_specs(archs, args.name_filter, args.specs, args.jobs)
    except Exception as exc:  # a bad option or an unloadable spec module: say which, exit 2
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in records], indent=1))
    if not records:
        print(f"no spec matches {args.name_filter!r}" if args.name_filter else "no specs registered")
        return 1
    print(format_table(records))
    failed = sum(1 for r in records if r.problems)
    print(f"\n{failed} of {len(records)} (spec, arch) compiles failed" if failed else f"\nall {len(records)} ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
