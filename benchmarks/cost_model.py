"""Cost model of the MoE kernels: FLOPs, special-function work, bytes, and a lower bound on time per launch.

    python -m benchmarks.cost_model                       # DBRX widths, bf16, T = 1 16 4096 16384, on an H100 SXM
    python -m benchmarks.cost_model --gpu h200 --tokens 16384

For each launch of the dbrx_fast MoE layer at (T, H, F, E, k, dtype), with balanced routing (the T*k rows spread over
the experts as evenly as they go, so min(E, T*k) experts are used):
- `flops`: 2*M*N*K of each GEMM; element-wise work is left out (benchmarks/README.md's convention).
- `sfu`: exp and divide operations (one each per sigmoid), the GLU's and its recomputations'; the MUFU unit runs them.
- `compulsory`: every operand read once and every output written once: x and dout once per token, the weights of the
  used experts once, the [T*k, ...] intermediates once.
- `moved`: DRAM bytes given the launch's grid order and its tiles, under this L2 model:
  * Tiles are the pinned config of the launch's GEMM class (`tuner.all_configs[0]` of the kernel's autotuner), so the
    model follows the code. Programs run in launch order (grid x fastest, then y, z; the grouped GEMMs map their 1-D
    id through `grouped_tile`), in waves of SMs x blocks-per-SM programs that start and progress together.
  * Blocks per SM: the most that fit the SM's shared memory (num_stages buffers of each per-K-step operand tile) and
    its registers (the fp32 accumulators spread over the block's threads, plus 32 a thread for addresses and loop
    state), at most 2048 threads: an estimate, used where the compile-check table (benchmarks/results/compile-check,
    what the compiled sm_90 code holds) has no row for the tiles.
  * The programs of one wave share an operand tile through L2 (they walk K in step, so a wave's live slices fit).
    A later wave finds a K-chunk of it in L2 when the bytes touched in between fit the L2 (`Gpu.l2_bytes`, an LRU
    of 50 MB on an H100 or H200): the other tiles and the outputs of the waves between the two reads, which for one
    chunk depends on how far along K it lies (`_l2_traffic`). An M-tile of gathered x or dout rows is its own tile:
    a token's rows for its k experts lie in different M-tiles. The L2 is two partitions of 25 MB; if lines that
    every SM reads take room in both, the effective capacity is lower: `--l2-mb` shows how much that changes.
  * The weight gradients also get `best order`: the fewest bytes an order of their tiles moves under this model
    (one side's group of slabs kept in L2 while the other side streams past, or no reuse across waves; a bound for
    the tile size and L2, see `_best_order`), as moved / compulsory.
  * Programs past the last real M-tile, and those of an expert with no rows, exit at once: they take no wave slot.
  * Decode (T <= 16) uses the pinned tiles too; a GPU's autotuner may pick a decode tile, which changes no weight
    byte (each chosen expert has one M-tile either way).
  * Outputs and the epilogue's own reads (one element, one program) move their compulsory bytes.
- `bound_s`: max(flops / peak FLOP/s, moved / DRAM bandwidth, sfu / peak MUFU rate): a lower bound, as if the three
  overlapped perfectly at peak. Launches run one after another, so a layer's bound is the sum of its launches'.
The dense reference: a matmul of equal FLOPs, [T*k, H] x [H, F] repeated, each repeat reading its operands once.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import triton

from dbrx_fast.kernels import moe_experts, moe_input_grads, moe_weight_grads
from dbrx_fast.kernels.dtypes import TRITON_DTYPES
from dbrx_fast.kernels.moe_tiles import gemm_class, num_m_tiles_upper_bound


@dataclasses.dataclass(frozen=True)
class Gpu:
    """Peak rates of one GPU. flops: dense 16-bit tensor-core FLOP/s; bandwidth: DRAM bytes/s; sfu: MUFU ops/s."""

    name: str
    flops: float
    bandwidth: float
    sfu: float
    sms: int
    smem_per_sm: int = 228 * 1024
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    l2_bytes: float = 50e6


# NVIDIA H100 / H200 datasheets: H100 SXM 989 TFLOP/s dense BF16 (1979 with sparsity), 3.35 TB/s HBM3; H200 the same
# SMs and clocks, 4.8 TB/s HBM3e. Both 132 SMs at a 1.98 GHz boost clock. MUFU (exp2, rcp): 16 results per clock per SM
# on compute capability 9.0 (CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table). 228 KB shared
# memory and 64K 32-bit registers per SM (Hopper tuning guide). L2: 50 MB on both (the H200 is the same GH100 die).
H100_SXM = Gpu("H100 SXM", flops=989.4e12, bandwidth=3.35e12, sfu=132 * 16 * 1.98e9, sms=132)
H200 = dataclasses.replace(H100_SXM, name="H200", bandwidth=4.8e12)
GPUS = {"h100": H100_SXM, "h200": H200}

DBRX = {"hidden": 6144, "ffn": 10752, "experts": 16, "top_k": 4}
_COMPILE_CHECK = Path(__file__).resolve().parent / "results" / "compile-check"


def gpu_for(device_name: str) -> Gpu:
    """The preset for a device name (torch.cuda.get_device_name); an H100 SXM for anything else."""
    return H200 if "h200" in device_name.lower() else H100_SXM


@dataclasses.dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def counts(self) -> list[int]:
        """Rows per expert under balanced routing."""
        q, r = divmod(self.rows, self.experts)
        return [q + (e < r) for e in range(self.experts)]


@dataclasses.dataclass
class KernelCost:
    """One launch. operands: name -> (compulsory bytes, moved bytes); tiles: the config the model used."""

    name: str
    flops: float
    sfu: float
    operands: dict[str, tuple[float, float]]
    tiles: str = ""
    in_flight: int = 0
    best_moved: float = 0.0  # the weight gradients: bytes moved by the best order of their tiles (`_best_order`)

    @property
    def compulsory(self) -> float:
        return sum(c for c, _ in self.operands.values())

    @property
    def moved(self) -> float:
        return sum(m for _, m in self.operands.values())

    @property
    def reread(self) -> float:
        return self.moved / self.compulsory if self.compulsory else 1.0

    @property
    def best_reread(self) -> float:
        return self.best_moved / self.compulsory if self.best_moved else 0.0

    def worst_operand(self) -> tuple[str, float]:
        """The operand read again most often, and its moved / compulsory."""
        return max(((n, m / c) for n, (c, m) in self.operands.items() if c), key=lambda item: item[1])

    def times(self, gpu: Gpu) -> dict[str, float]:
        return {"flops": self.flops / gpu.flops, "bytes": self.moved / gpu.bandwidth, "sfu": self.sfu / gpu.sfu}

    def bound_s(self, gpu: Gpu) -> float:
        return max(self.times(gpu).values())

    def bound_by(self, gpu: Gpu) -> str:
        times = self.times(gpu)
        return max(times, key=times.get)


def _pinned(tuners: dict, dtype: torch.dtype, kernel: str, blocks_per_sm: int | None):
    """The pinned config of the launch's GEMM class, and its blocks per SM: blocks_per_sm if given, else the compiled
    code's (`_compiled_blocks_per_sm`), else None (the model's estimate)."""
    cfg = tuners[gemm_class(dtype)[0]].all_configs[0]
    return cfg, blocks_per_sm or _compiled_blocks_per_sm(kernel, dtype, cfg)


def _describe(cfg) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" w{cfg.num_warps} s{cfg.num_stages}"


def _compiled_blocks_per_sm(kernel: str, dtype: torch.dtype, cfg) -> int | None:
    """Blocks per SM of this launch on sm_90 as the compile-check table of the installed Triton (else the newest one)
    reads them from the compiled code, or None where no row has its tiles (GROUP_* set the order, not the resources;
    of rows that differ in other flags, the fewest blocks)."""
    tables = sorted(_COMPILE_CHECK.glob("triton-*.txt"))
    installed = _COMPILE_CHECK / f"triton-{triton.__version__}.txt"
    if not tables:
        return None
    want = {f"{k}={v}" for k, v in cfg.kwargs.items() if not k.startswith("GROUP_")}
    want |= {f"warps={cfg.num_warps}", f"stages={cfg.num_stages}"}
    found = []
    for line in (installed if installed in tables else tables[-1]).read_text().splitlines():
        words = line.split()
        if len(words) > 4 and words[:2] == [kernel, TRITON_DTYPES[dtype]] and "sm_90" in words and want <= set(words):
            found.append(int(words[-3]))
    return min(found, default=None)


def _blocks_per_sm(gpu: Gpu, cfg, acc_elems: int, stage_bytes: int) -> int:
    """Shared-memory, register and thread limits on resident blocks (see the module docstring)."""
    threads = 32 * cfg.num_warps
    regs = acc_elems // threads + 32
    by_smem = gpu.smem_per_sm // max(cfg.num_stages * stage_bytes, 1)
    return max(1, min(by_smem, gpu.regs_per_sm // (regs * threads), gpu.threads_per_sm // threads))


def _l2_traffic(waves, operands, out_bytes, l2_bytes: float) -> list[float]:
    """DRAM bytes read of each operand, under an LRU L2 of l2_bytes, when program i runs in wave waves[i] and reads
    the tile operands[j][0][i] of operand j, whose size is operands[j][1][tile]; out_bytes[i]: what program i writes.

    A wave's programs walk K in step, so a tile's K-chunk at fraction phi of the walk, read by wave u and again by
    wave w, has seen in between the chunks beyond phi of the tiles of waves u..w-1, those before phi of waves u+1..w
    and the outputs of waves u..w-1: its reuse distance runs linearly from lo (phi = 0) to hi (phi = 1). The chunks
    whose distance is at most l2_bytes hit; the others, and a tile's first read, come from DRAM."""
    num_waves = int(waves.max()) + 1
    sizes = torch.cat([size for _, size in operands]).to(torch.float64)
    starts = torch.tensor([0] + [size.numel() for _, size in operands]).cumsum(0)
    keys = torch.cat([tiles + start for (tiles, _), start in zip(operands, starts.tolist(), strict=False)])
    pairs = torch.unique(keys * num_waves + waves.repeat(len(operands)))  # by tile, then wave
    key, wave = pairs // num_waves, pairs % num_waves
    size = sizes[key]
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    prev = torch.where(first, -1, wave.roll(1))
    # fresh[a, v]: bytes of the tiles wave v reads that no wave a..v-1 read; summed over v, a window's distinct tiles.
    fresh = torch.zeros(num_waves + 1, num_waves + 1, dtype=torch.float64)
    fresh.index_put_((prev + 1, wave + 1), size, accumulate=True)
    fresh = fresh.cumsum(0).cumsum(1)

    def distinct(a, b):  # bytes of the distinct tiles waves a..b read
        return fresh[a, b + 1] - fresh[a, a]

    written = torch.zeros(num_waves + 1, dtype=torch.float64)
    written[1:] = torch.bincount(waves, out_bytes.to(torch.float64), num_waves).cumsum(0)
    again = ~first
    u, w, s = prev[again], wave[again], size[again]
    between = written[w] - written[u] - s
    lo, hi = distinct(u, w - 1) + between, distinct(u + 1, w) + between
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    hit = torch.where(hi > lo, (l2_bytes - lo) / (hi - lo).clamp(min=1.0), (lo <= l2_bytes).double()).clamp(0, 1)
    moved = size.clone()
    moved[again] = s * (1 - hit)
    operand = torch.bucketize(key, starts[1:], right=True)
    return torch.zeros(len(operands), dtype=torch.float64).index_add_(0, operand, moved).tolist()


def _m_tiles(shape: Shape, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert, rows) of each real M-tile, experts in order, as `expert_tile` cuts them."""
    experts, rows = [], []
    for e, count in enumerate(shape.counts()):
        for start in range(0, count, block_m):
            experts.append(e)
            rows.append(min(block_m, count - start))
    return torch.tensor(experts, dtype=torch.int64), torch.tensor(rows, dtype=torch.int64)


def _grouped_tile(pid: torch.Tensor, num_pid_m: int, num_pid_n: int, group_m: int):
    """`grouped_tile` (kernels/moe_tiles.py), vectorized: (pid_m, pid_n) of each program id."""
    in_group = group_m * num_pid_n
    first_m = (pid // in_group) * group_m
    size_m = torch.clamp(num_pid_m - first_m, max=group_m)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


def _grouped_gemm(
    shape, gpu, cfg, n, depth, a_tensors, b_tensors, acc_count, written, blocks_per_sm, block_n=None, k_loops=1
):
    """(a moved, b moved, in_flight, tiles) of a `grouped_tile` launch over the sorted rows: M = rows, N = n,
    K = depth, acc_count fp32 accumulators [BLOCK_M, block_n] (block_n: the output columns a program owns, by
    default BLOCK_N); written: the bytes the launch writes, spread evenly over its programs (they take L2 lines).

    The row operand: a_tensors tensors, one [rows, depth] tile of each per M-tile. The weight operand: b_tensors
    [E*F, H] tensors, one [block_n, depth] tile of each per (expert, N-tile). k_loops: the program walks K that many
    times, one (a, b) tensor pair after the other, so a pipeline stage holds 1 / k_loops of the tiles."""
    bm, bk, group_m = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"], cfg.kwargs["GROUP_M"]
    bn = block_n or cfg.kwargs["BLOCK_N"]
    size = shape.itemsize
    tile_expert, tile_rows = _m_tiles(shape, bm)
    num_pid_m = num_m_tiles_upper_bound(shape.rows, shape.experts, bm)
    num_pid_n = -(-n // bn)
    pid_m, pid_n = _grouped_tile(torch.arange(num_pid_m * num_pid_n, dtype=torch.int64), num_pid_m, num_pid_n, group_m)
    real = pid_m < tile_expert.numel()
    pid_m, pid_n = pid_m[real], pid_n[real]
    stage = (bm * a_tensors + bn * b_tensors) * bk * size // k_loops
    in_flight = gpu.sms * (blocks_per_sm or _blocks_per_sm(gpu, cfg, acc_count * bm * bn, stage))
    waves = torch.arange(pid_m.numel(), dtype=torch.int64) // in_flight
    cols = torch.clamp(n - torch.arange(num_pid_n) * bn, max=bn)
    a_moved, b_moved = _l2_traffic(
        waves,
        [
            (pid_m, tile_rows * depth * size * a_tensors),
            (tile_expert[pid_m] * num_pid_n + pid_n, cols.repeat(shape.experts) * depth * size * b_tensors),
        ],
        torch.full((pid_m.numel(),), written / pid_m.numel()),
        gpu.l2_bytes,
    )
    return a_moved, b_moved, in_flight, f"{_describe(cfg)}, {num_pid_m}x{num_pid_n} tiles"


def _expert_grid(shape, gpu, cfg, a_tensors, acc_count, blocks):
    """(a moved, b moved, in_flight, tiles, the best order's a + b moved) of a weight-gradient launch, ordered as
    `_wgrad_tile` (kernels/moe_weight_grads.py) orders it: experts slowest, then groups of GROUP_H H-tiles sweeping
    the F-tiles. Each program walks its expert's rows, reading an [rows_e, BLOCK_F] tile of each of a_tensors [T*k, F]
    operands and an [rows_e, BLOCK_H] tile of the gathered [T, H] one."""
    bf, bh, bm = cfg.kwargs["BLOCK_F"], cfg.kwargs["BLOCK_H"], cfg.kwargs["BLOCK_M"]
    nf, nh = -(-shape.ffn // bf), -(-shape.hidden // bh)
    pid = torch.arange(nf * nh * shape.experts, dtype=torch.int64)
    h, f = _grouped_tile(pid % (nf * nh), nh, nf, cfg.kwargs["GROUP_H"])
    e = pid // (nf * nh)
    stage_bytes = (a_tensors * bf + bh) * bm * shape.itemsize
    counts = torch.tensor(shape.counts(), dtype=torch.int64)
    live = counts[e] > 0
    f, h, e = f[live], h[live], e[live]
    in_flight = gpu.sms * (blocks or _blocks_per_sm(gpu, cfg, acc_count * bf * bh, stage_bytes))
    waves = torch.arange(f.numel(), dtype=torch.int64) // in_flight
    f_cols = torch.clamp(shape.ffn - torch.arange(nf) * bf, max=bf)
    h_cols = torch.clamp(shape.hidden - torch.arange(nh) * bh, max=bh)
    size = shape.itemsize
    a_moved, b_moved = _l2_traffic(
        waves,
        [
            (e * nf + f, (counts[:, None] * f_cols[None, :]).flatten() * size * a_tensors),
            (e * nh + h, (counts[:, None] * h_cols[None, :]).flatten() * size),
        ],
        f_cols[f] * h_cols[h] * size * acc_count,
        gpu.l2_bytes,
    )
    out_wave = in_flight * bf * bh * size * acc_count
    best = sum(
        _best_order(gpu, in_flight, out_wave, (nf, c * bf * size * a_tensors), (nh, c * bh * size))
        for c in shape.counts()
        if c
    )
    return a_moved, b_moved, in_flight, f"{_describe(cfg)}, {nf}x{nh}x{shape.experts} grid", best


def _best_order(gpu, in_flight, out_wave, f_side, h_side) -> float:
    """The fewest bytes of both operands that an order of one expert's (F-tile, H-tile) programs reads, among the
    orders below, with in_flight programs a wave and out_wave bytes written a wave, under the L2 model.

    f_side, h_side: (tiles, bytes of one [rows_e, BLOCK] tile). Each order reads every tile at least once:
    - no reuse across waves: each wave a rectangle of a x in_flight / a tiles, a chosen to read the fewest bytes;
    - one side resident: groups of g of its tiles sweep the other side's tiles, each wave g by cdiv(in_flight, g);
      the group's tiles stay in L2 from wave to wave when a wave's tiles and writes fit in it, so that side is read
      once and the swept side once per group.
    This is a bound for this tile size and L2 capacity over these orders, not over every order (e.g. K-split)."""
    (nf, rf), (nh, rh) = f_side, h_side
    once = nf * rf + nh * rh
    a = min(max(1.0, (in_flight * rh / rf) ** 0.5), nf)
    b = min(in_flight / a, nh)
    best = max(once, nf * nh / in_flight * (a * rf + b * rh))
    for (nr, rr), (ns, rs) in ((f_side, h_side), (h_side, f_side)):
        for g in range(1, nr + 1):
            swept = -(-in_flight // g)
            if swept <= ns and g * rr + swept * rs + out_wave <= gpu.l2_bytes:
                best = min(best, nr * rr + -(-nr // g) * ns * rs)
    return best


def forward(shape: Shape, gpu: Gpu = H100_SXM, save_preact: bool = False, blocks_per_sm: int | None = None):
    """The forward's launches (routing, `moe_glu_up`, `moe_down`, `moe_combine`); save_preact: also write gate and up
    for the backward (training)."""
    t, h, f, e, r, s = shape.tokens, shape.hidden, shape.ffn, shape.experts, shape.rows, shape.itemsize
    used = min(e, r)
    meta = r * 4 + (e + 1) * 4  # sorted_slots and expert_offsets, int32
    route = KernelCost(
        "route_fwd", 0.0, 2.0 * t * e, {"logits": (t * e * s,) * 2, "weights, ids, slots, offsets": (3 * meta,) * 2}
    )
    cfg, blocks = _pinned(moe_experts._GLU_UP, shape.dtype, "moe_glu_up", blocks_per_sm)
    # BLOCK_N is the [w1|v1] B tile's width: a program owns BLOCK_N // 2 columns of h (one accumulator of
    # BLOCK_N columns, counted here as two of BLOCK_N // 2).
    block_n = cfg.kwargs["BLOCK_N"] // 2
    written = (3 if save_preact else 1) * r * f * s
    x_moved, w_moved, flight, tiles = _grouped_gemm(shape, gpu, cfg, f, h, 1, 2, 2, written, blocks, block_n)
    up = KernelCost(
        "moe_glu_up",
        2 * 2.0 * r * h * f,
        2.0 * r * f,  # silu(gate): one exp and one divide per element
        {
            "x": (t * h * s, x_moved),
            "w1, v1": (2 * used * f * h * s, w_moved),
            "routing": (meta,) * 2,
            "h, gate, up" if save_preact else "h": ((3 if save_preact else 1) * r * f * s,) * 2,
        },
        tiles,
        flight,
    )
    cfg, blocks = _pinned(moe_experts._DOWN, shape.dtype, "moe_down", blocks_per_sm)
    h_moved, w_moved, flight, tiles = _grouped_gemm(shape, gpu, cfg, h, f, 1, 1, 1, r * h * 4.0, blocks)
    down = KernelCost(
        "moe_down",
        2.0 * r * f * h,
        0.0,
        {
            "h": (r * f * s, h_moved),
            "w2": (used * f * h * s, w_moved),
            "routing": (r * 4 + meta,) * 2,
            "y (fp32)": (r * h * 4.0,) * 2,
        },
        tiles,
        flight,
    )
    combine = KernelCost("moe_combine", 0.0, 0.0, {"y (fp32)": (r * h * 4.0,) * 2, "out": (t * h * s,) * 2})
    return [route, up, down, combine]


def backward(shape: Shape, gpu: Gpu = H100_SXM, blocks_per_sm: int | None = None):
    """The backward's launches, as ops/moe.py runs them when every input needs its gradient; the router's matmul,
    torch's, is left out as in the FLOP convention."""
    t, h, f, e, r, s = shape.tokens, shape.hidden, shape.ffn, shape.experts, shape.rows, shape.itemsize
    used = min(e, r)
    meta = r * 4 + (e + 1) * 4
    # CombineFunction's backward casts dout to float32 and the experts' backward casts it back (torch ops).
    casts = KernelCost(
        "dout casts (torch)", 0.0, 0.0, {"dout": (2 * t * h * s,) * 2, "dout (fp32)": (2 * t * h * 4,) * 2}
    )
    cfg, blocks = _pinned(moe_input_grads._DOWN_BWD, shape.dtype, "moe_down_bwd", blocks_per_sm)
    block_n = moe_input_grads._DOWN_BWD_BLOCK_N
    partials = -(-f // block_n) * r * 4
    written = 3 * r * f * s + partials
    dout_moved, w_moved, flight, tiles = _grouped_gemm(shape, gpu, cfg, f, h, 1, 1, 1, written, blocks, block_n)
    down_bwd = KernelCost(
        "moe_down_bwd",
        2.0 * r * h * f,
        2.0 * r * f,  # sigmoid(gate) in the epilogue
        {
            "dout": (t * h * s, dout_moved),
            "w2": (used * f * h * s, w_moved),
            "gate, up": (2 * r * f * s,) * 2,
            "routing": (r * 4 + meta,) * 2,
            "dgate, dup, hw": (3 * r * f * s,) * 2,
            "dweights partials": (partials,) * 2,
        },
        tiles,
        flight,
    )
    sum_partials = KernelCost("moe_sum_partials", 0.0, 0.0, {"partials": (partials,) * 2, "dweights": (r * 4,) * 2})
    cfg, blocks = _pinned(moe_input_grads._UP_DGRAD, shape.dtype, "moe_up_dgrad", blocks_per_sm)
    # Two K loops, dgate @ w1_e then dup @ v1_e.
    written = r * h * 4.0
    d_moved, w_moved, flight, tiles = _grouped_gemm(shape, gpu, cfg, h, f, 2, 2, 1, written, blocks, k_loops=2)
    up_dgrad = KernelCost(
        "moe_up_dgrad",
        2 * 2.0 * r * f * h,
        0.0,
        {
            "dgate, dup": (2 * r * f * s, d_moved),
            "w1, v1": (2 * used * f * h * s, w_moved),
            "routing": (meta,) * 2,
            "dx_slot (fp32)": (r * h * 4.0,) * 2,
        },
        tiles,
        flight,
    )
    combine = KernelCost("moe_combine (dx)", 0.0, 0.0, {"dx_slot (fp32)": (r * h * 4.0,) * 2, "dx": (t * h * s,) * 2})
    cfg, blocks = _pinned(moe_weight_grads._UP_WGRAD, shape.dtype, "moe_up_wgrad", blocks_per_sm)
    d_moved, x_moved, flight, tiles, best = _expert_grid(shape, gpu, cfg, 2, 2, blocks)
    up_wgrad = KernelCost(
        "moe_up_wgrad",
        2 * 2.0 * r * f * h,
        0.0,
        {
            "dgate, dup": (2 * r * f * s, d_moved),
            "x": (t * h * s, x_moved),
            "routing": (meta,) * 2,
            "dw1, dv1": (2 * e * f * h * s,) * 2,
        },
        tiles,
        flight,
    )
    up_wgrad.best_moved = up_wgrad.moved - d_moved - x_moved + best
    cfg, blocks = _pinned(moe_weight_grads._DOWN_WGRAD, shape.dtype, "moe_down_wgrad", blocks_per_sm)
    hw_moved, dout_moved, flight, tiles, best = _expert_grid(shape, gpu, cfg, 1, 1, blocks)
    down_wgrad = KernelCost(
        "moe_down_wgrad",
        2.0 * r * f * h,
        0.0,  # hw comes from moe_down_bwd's epilogue
        {
            "hw": (r * f * s, hw_moved),
            "dout": (t * h * s, dout_moved),
            "routing": (r * 4 + meta,) * 2,
            "dw2": (e * f * h * s,) * 2,
        },
        tiles,
        flight,
    )
    down_wgrad.best_moved = down_wgrad.moved - hw_moved - dout_moved + best
    route = KernelCost(
        "route_bwd",
        0.0,
        2.0 * t * e,  # the softmax recomputed
        {"logits, grad_logits": (2 * t * e * s,) * 2, "weights, ids, grad_weights": (3 * r * 4,) * 2},
    )
    return [casts, down_bwd, sum_partials, up_dgrad, combine, up_wgrad, down_wgrad, route]


def layer(shape: Shape, mode: str, gpu: Gpu = H100_SXM, blocks_per_sm: int | None = None) -> list[KernelCost]:
    """The launches of one step in bench_moe's modes: forward (inference), backward, full (training forward +
    backward)."""
    if mode == "forward":
        return forward(shape, gpu, False, blocks_per_sm)
    if mode == "backward":
        return backward(shape, gpu, blocks_per_sm)
    if mode == "full":
        return forward(shape, gpu, True, blocks_per_sm) + backward(shape, gpu, blocks_per_sm)
    raise ValueError(f"mode must be forward, backward or full, got {mode!r}")


def layer_bound_s(shape: Shape, mode: str, gpu: Gpu = H100_SXM) -> float:
    """The layer's lower bound: its launches' bounds summed (they run one after another)."""
    return sum(c.bound_s(gpu) for c in layer(shape, mode, gpu))


def dense_bound_s(shape: Shape, flops: float, gpu: Gpu = H100_SXM) -> float:
    """Bound of dense [T*k, H] x [H, F] matmuls of `flops` in all, each reading A and B and writing C once."""
    repeats = flops / (2.0 * shape.rows * shape.hidden * shape.ffn)
    nbytes = repeats * (shape.rows * shape.hidden + shape.hidden * shape.ffn + shape.rows * shape.ffn) * shape.itemsize
    return max(flops / gpu.flops, nbytes / gpu.bandwidth)


def table(shape: Shape, mode: str, gpu: Gpu = H100_SXM) -> str:
    """A markdown table of the launches of one step, with the layer total and the dense matmul of equal FLOPs."""
    costs = layer(shape, mode, gpu)
    lines = [
        f"#### {mode}, T={shape.tokens} H={shape.hidden} F={shape.ffn} E={shape.experts} k={shape.top_k} "
        f"{str(shape.dtype).removeprefix('torch.')}, {gpu.name}, L2 {gpu.l2_bytes / 1e6:g} MB",
        "",
        "| kernel | GFLOP | SFU Gop | compulsory GB | moved GB | re-read | best order | worst operand | in flight "
        "| bound us | by |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for c in costs:
        name, factor = c.worst_operand()
        lines.append(
            f"| {c.name} | {c.flops / 1e9:.1f} | {c.sfu / 1e9:.2f} | {c.compulsory / 1e9:.3f} | {c.moved / 1e9:.3f} "
            f"| {c.reread:.2f} | {f'{c.best_reread:.2f}' if c.best_moved else '-'} | {name} {factor:.1f}x "
            f"| {c.in_flight or '-'} | {c.bound_s(gpu) * 1e6:.1f} "
            f"| {c.bound_by(gpu)} |"
        )
    flops = sum(c.flops for c in costs)
    total, dense = sum(c.bound_s(gpu) for c in costs), dense_bound_s(shape, flops, gpu)
    compulsory, moved = sum(c.compulsory for c in costs), sum(c.moved for c in costs)
    lines.append(
        f"| **layer** | {flops / 1e9:.1f} | {sum(c.sfu for c in costs) / 1e9:.2f} | {compulsory / 1e9:.3f} "
        f"| {moved / 1e9:.3f} | {moved / compulsory:.2f} | | | | {total * 1e6:.1f} | |"
    )
    lines.append(f"| dense matmul, equal FLOPs | {flops / 1e9:.1f} | | | | | | | | {dense * 1e6:.1f} | |")
    lines += ["", f"layer bound / dense bound: {total / dense:.2f}x. Tiles (pinned configs):"]
    lines += [f"- {c.name}: {c.tiles}" for c in costs if c.tiles]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 4096, 16384])
    p.add_argument("--modes", nargs="+", default=["forward", "backward"], choices=["forward", "backward", "full"])
    p.add_argument("--gpu", default="h100", choices=list(GPUS))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--l2-mb", type=float, help="the L2 capacity the model assumes (default: the GPU's, 50 MB)")
    args = p.parse_args(argv)
    gpu = GPUS[args.gpu] if args.l2_mb is None else dataclasses.replace(GPUS[args.gpu], l2_bytes=args.l2_mb * 1e6)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    for tokens in args.tokens:
        for mode in args.modes:
            print(table(Shape(tokens, **DBRX, dtype=dtype), mode, gpu) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
