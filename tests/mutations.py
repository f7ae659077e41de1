"""Break each kernel on purpose and check that a test fails: `python tests/mutations.py [NAME ...]`.

Each mutation replaces one exact piece of a kernel file (it must occur once) in a scratch copy of the committed tree
(`git archive HEAD`, so the working tree is never touched), runs the tests that own that kernel with -x, and reports
caught (the first failing test, or the crash) or MISSED. A missed mutation is a finding: add the test that catches it.
The copy imports as dbrx_fast through PYTHONPATH (ahead of the editable install, whose finder comes last).
Not collected by pytest (no test_ prefix). Takes a while: every caught mutation stops at its first failure, every
missed one runs its whole test selection.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The tests run as CI's main run does: programs shuffled and race-checked (tests/program_order.py).
CI_MODE = {"DBRX_FAST_PROGRAM_ORDER": "shuffled", "DBRX_FAST_RACE_CHECK": "1"}
MOE_FWD = ("tests/test_moe_experts.py",)
MOE_BWD = ("tests/test_moe_experts_backward.py",)
QKV = ("tests/test_qkv_rope.py",)
ATTENTION_FWD = ("tests/test_attention.py",)
ATTENTION_BWD = ("tests/test_attention_backward.py",)


@dataclass
class Mutation:
    name: str
    file: str  # under kernels/
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    # Forward expert GEMMs.
    Mutation(
        "glu_up: K mask off by one",
        "moe_experts.py",
        "k_mask = ks < hidden - k0",
        "k_mask = ks <= hidden - k0",
        MOE_FWD,
    ),
    Mutation(
        "glu_up: gathers the wrong token row",
        "moe_experts.py",
        "tokens = (slots // top_k).to(tl.int64)\n    x_ptrs",
        "tokens = ((slots + 1) // top_k).to(tl.int64)\n    x_ptrs",
        MOE_FWD,
    ),
    Mutation(
        "glu_up: silu of the wrong half",
        "moe_experts.py",
        "h = gate * tl.sigmoid(gate) * up",
        "h = gate * tl.sigmoid(up) * up",
        MOE_FWD,
    ),
    Mutation(
        "glu_up: saves up as gate",
        "moe_experts.py",
        "tl.store(gate_ptr + out_offs, gate.to(",
        "tl.store(gate_ptr + out_offs, up.to(",
        MOE_FWD,
    ),
    Mutation(
        "glu_up: drops the ragged last N-tile",
        "moe_experts.py",
        'meta["BLOCK_M"]) * triton.cdiv(ffn, meta["BLOCK_N"] // 2)',
        'meta["BLOCK_M"]) * max(ffn // (meta["BLOCK_N"] // 2), 1)',
        MOE_FWD,
    ),
    Mutation(
        "down: wrong stride along K of w2",
        "moe_experts.py",
        "w2_ptrs += BLOCK_K * stride_w2_r",
        "w2_ptrs += BLOCK_K * stride_w2_h",
        MOE_FWD,
    ),
    Mutation(
        "down: no routing weight", "moe_experts.py", "y = acc * weight.to(tl.float32)[:, None]", "y = acc", MOE_FWD
    ),
    Mutation(
        "combine: drops the last choice",
        "moe_experts.py",
        "for j in range(top_k):",
        "for j in range(top_k - 1):",
        MOE_FWD,
    ),
    # Tile mapping shared by the grouped GEMMs.
    Mutation(
        "tiles: one M-tile fewer in the grid",
        "moe_tiles.py",
        "return min(triton.cdiv(num_rows, block_m) + num_experts - 1, num_rows)",
        "return min(triton.cdiv(num_rows, block_m) + num_experts - 2, num_rows)",
        MOE_FWD + MOE_BWD,
    ),
    Mutation(
        "tiles: a tile's rows run one into the next expert",
        "moe_tiles.py",
        "row_mask = (rows >= 0) & (rows < row_end) & (rows < num_rows)",
        "row_mask = (rows >= 0) & (rows <= row_end) & (rows < num_rows)",
        MOE_FWD + MOE_BWD,
    ),
    Mutation(
        "tiles: negative expert counts not clamped",
        "moe_tiles.py",
        "tl.cdiv(tl.maximum(end - start, 0), BLOCK_M)",
        "tl.cdiv(end - start, BLOCK_M)",
        MOE_FWD + MOE_BWD,
    ),
    # Input-gradient GEMMs.
    Mutation(
        "down_bwd: wrong stride along K of w2",
        "moe_input_grads.py",
        "w2_ptrs += BLOCK_K * stride_w2_h",
        "w2_ptrs += BLOCK_K * stride_w2_r",
        MOE_BWD,
    ),
    Mutation(
        "down_bwd: partial sums of the wrong N-tile",
        "moe_input_grads.py",
        "tl.store(partial_ptr + pid_n.to(tl.int64) * num_rows + slots",
        "tl.store(partial_ptr + 0 * pid_n.to(tl.int64) * num_rows + slots",
        MOE_BWD,
    ),
    Mutation(
        "sum_partials: drops the last partial",
        "moe_input_grads.py",
        "for _ in range(num_partials):",
        "for _ in range(num_partials - 1):",
        MOE_BWD,
    ),
    Mutation(
        "up_dgrad: K mask off by one",
        "moe_input_grads.py",
        "k_mask = ks < ffn - k0\n        a_tile",
        "k_mask = ks <= ffn - k0\n        a_tile",
        MOE_BWD,
    ),
    Mutation(
        "up_dgrad: drops the v1 term",
        "moe_input_grads.py",
        "acc = _accumulate_rows_times_expert(\n        acc, dup_ptr,",
        "acc = acc + 0 * _accumulate_rows_times_expert(\n        acc, dup_ptr,",
        MOE_BWD,
    ),
    # Weight-gradient GEMMs.
    Mutation(
        "down_wgrad: drops the first row chunk",
        "moe_weight_grads.py",
        "for p0 in range(row_start, row_end, BLOCK_M):\n        dout = _gathered(",
        "for p0 in range(row_start + BLOCK_M, row_end, BLOCK_M):\n        dout = _gathered(",
        MOE_BWD,
    ),
    Mutation(
        "down_bwd: hw (dw2's operand) without the routing weight",
        "moe_input_grads.py",
        "(silu * up * weight).to(hw_ptr.dtype.element_ty)",
        "(silu * up).to(hw_ptr.dtype.element_ty)",
        MOE_BWD,
    ),
    Mutation(
        "up_wgrad: stores past the hidden size",
        "moe_weight_grads.py",
        "out_mask = f_mask[:, None] & h_mask[None, :]",
        "out_mask = f_mask[:, None] & (hs < hidden + 1)[None, :]",
        MOE_BWD,
    ),
    # LayerNorm.
    Mutation(
        "layernorm fwd: mask off by one",
        "layernorm.py",
        "        mask = cols < n_cols\n",
        "        mask = cols <= n_cols\n",
        ("tests/test_layernorm.py",),
    ),
    Mutation(
        "layernorm bwd: dweight without xhat",
        "layernorm.py",
        "dw += dy * xhat",
        "dw += dy",
        ("tests/test_layernorm.py",),
    ),
    Mutation(
        "layernorm bwd: dweight drops a program's last row",
        "layernorm.py",
        "            dw += dy * xhat",
        "            dw += dy * xhat * (i < own_rows - 1)",
        ("tests/test_layernorm.py",),
    ),
    # RoPE.
    Mutation(
        "rope: mask off by one",
        "rope.py",
        "mask = (offs_s < seq_len)[:, None]",
        "mask = (offs_s <= seq_len)[:, None]",
        ("tests/test_rope.py",),
    ),
    Mutation("rope: sign of sin", "rope.py", "(x1 * cos - x2 * sin)", "(x1 * cos + x2 * sin)", ("tests/test_rope.py",)),
    Mutation(
        "rope: drops a program's last head",
        "rope.py",
        "for i in range(HEADS_PER_PROGRAM):",
        "for i in range(HEADS_PER_PROGRAM - 1):",
        ("tests/test_rope.py",),
    ),
    # QKV post-processing.
    Mutation(
        "qkv_rope: clamp gradient excludes the bound",
        "qkv_rope.py",
        "(x2 >= clip_lo) & (x2 <= clip_hi)",
        "(x2 >= clip_lo) & (x2 < clip_hi)",
        QKV,
    ),
    Mutation("qkv_rope: v rotated", "qkv_rope.py", "HALF, False, CLAMP, BACKWARD", "HALF, True, CLAMP, BACKWARD", QKV),
    Mutation("qkv_rope: backward rotates forward", "qkv_rope.py", "sin = -sin", "sin = sin", QKV),
    Mutation(
        "qkv_rope: cache rows ignore the bound",
        "qkv_rope.py",
        "mask & (rows >= 0) & (rows < cache_len)",
        "mask & (rows >= 0) & (rows <= cache_len)",
        QKV,
    ),
    # Routing.
    Mutation(
        "routing: L2 norm without the root",
        "moe_routing.py",
        "norm = tl.sqrt(tl.sum(w * w, axis=1))",
        "norm = tl.sum(w * w, axis=1)",
        ("tests/test_routing.py",),
    ),
    Mutation(
        "routing scan: no carry across blocks",
        "moe_routing.py",
        "        running += tl.sum(hist, axis=0)\n",
        "",
        ("tests/test_routing.py",),
    ),
    Mutation(
        "routing scatter: drops the block base",
        "moe_routing.py",
        "tl.store(sorted_slots_ptr + start + base + rank",
        "tl.store(sorted_slots_ptr + start + rank",
        ("tests/test_routing.py",),
    ),
    # Attention forward.
    Mutation(
        "attention_fwd: the causal diagonal tile unmasked",
        "attention_fwd.py",
        "mid_hi = tl.maximum((tl.maximum(all_hi, 0) // BLOCK_N) * BLOCK_N, lo)",
        "mid_hi = tl.maximum((tl.maximum(all_hi, 0) // BLOCK_N + 1) * BLOCK_N, lo)",
        ATTENTION_FWD,
    ),
    Mutation(
        "attention_fwd: query head reads the wrong KV head",
        "attention_fwd.py",
        "kv_head = head // group",
        "kv_head = head % (num_q_heads // group)",
        ATTENTION_FWD,
    ),
    Mutation(
        "attention_fwd: skips the packed sequence's first tiles",
        "attention_fwd.py",
        "lo = (lo // BLOCK_N) * BLOCK_N",
        "lo = tl.cdiv(lo, BLOCK_N) * BLOCK_N",
        ATTENTION_FWD,
    ),
    Mutation(
        "attention_fwd: no rescale of the accumulator (deferred p @ v)",
        "attention_fwd.py",
        "return dot(p.to(v.dtype), v, acc * alpha[:, None], FP32_DOT)",
        "return dot(p.to(v.dtype), v, acc, FP32_DOT)",
        ATTENTION_FWD,
    ),
    Mutation(
        "attention_fwd: no rescale of the accumulator (sm_80's order)",
        "attention_fwd.py",
        "acc = dot(p.to(v.dtype), v, acc * alpha[:, None], FP32_DOT)",
        "acc = dot(p.to(v.dtype), v, acc, FP32_DOT)",
        ATTENTION_FWD,
    ),
    Mutation(
        "attention_fwd: the deferred p @ v reads its own iteration's value tile",
        "attention_fwd.py",
        "v_offs, stride_v_n, n0 - BLOCK_N, first,",
        "v_offs, stride_v_n, n0, first,",
        ATTENTION_FWD,
    ),
    Mutation(
        "attention_fwd: the last tile's deferred p @ v dropped",
        "attention_fwd.py",
        "    if DEFER_DOT:  # the last tile's p @ v",
        "    if False:  # the last tile's p @ v",
        ATTENTION_FWD,
    ),
    # Attention backward (dQ).
    Mutation(
        "attention_bwd: the deferred ds @ k reads this block's keys",
        "attention_bwd.py",
        "prev = offs_n - BLOCK_N",
        "prev = offs_n",
        ATTENTION_BWD,
    ),
    Mutation(
        "attention_bwd: the last block's deferred ds @ k dropped",
        "attention_bwd.py",
        "    if DEFER_DOT:  # the last block's ds @ k",
        "    if False:  # the last block's ds @ k",
        ATTENTION_BWD,
    ),
    Mutation(
        "attention_bwd: the deferred dV and dK dots read the next block's rows",
        "attention_bwd.py",
        "q_prev, dout_prev, m_prev = q_head, dout_head, m0\n",
        "q_prev, dout_prev, m_prev = q_head, dout_head, m0 + BLOCK_M\n",
        ATTENTION_BWD,
    ),
    Mutation(
        "attention_bwd: the last deferred dV and dK dots dropped",
        "attention_bwd.py",
        "# The last step's dots.\n        dk, dv = _deferred_dkdv_dots(dk, dv, p_t, ds_t, q_prev, dout_prev, m_prev,",
        "# The last step's dots.\n        dk, dv = _deferred_dkdv_dots(dk, dv, p_t, ds_t, q_prev, dout_prev, -BLOCK_M,",
        ATTENTION_BWD,
    ),
    Mutation(
        "attention_bwd: dQ's ds without delta",
        "attention_bwd.py",
        "ds = p * (dp - delta[:, None])",
        "ds = p * dp",
        ATTENTION_BWD,
    ),
    Mutation(
        "attention_fwd: lse in base 2",
        "attention_fwd.py",
        "* 0.6931471805599453",
        "* 1.0",
        ATTENTION_FWD,
    ),
]


def scratch_copy(root: Path) -> None:
    """The committed tree under root, importable as dbrx_fast (kernels/ linked in as dbrx_fast/kernels)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    (root / "dbrx_fast" / "kernels").symlink_to(root / "kernels")


def run(m: Mutation, root: Path, timeout: int) -> tuple[str, float]:
    path = root / "kernels" / m.file
    source = path.read_text()
    if source.count(m.old) != 1:
        return f"NOT APPLIED ({source.count(m.old)} matches)", 0.0
    path.write_text(source.replace(m.old, m.new))
    env = {**os.environ, **CI_MODE, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *m.tests]
    start = time.time()
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        verdict = _verdict(out.returncode, out.stdout + out.stderr)
    except subprocess.TimeoutExpired:
        verdict = f"timed out after {timeout} s"
    finally:
        path.write_text(source)
    return verdict, time.time() - start


def _verdict(rc: int, output: str) -> str:
    if rc == 0:
        return "MISSED"
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    if failed:
        return f"caught by {failed.group(1)}"
    return f"caught: pytest exited {rc} (crash)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="substrings of mutation names to run (default: all)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per mutation")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or any(n in m.name for n in args.names)]
    missed = 0
    with tempfile.TemporaryDirectory(prefix="dbrx_fast_mutations_") as tmp:
        root = Path(tmp)
        scratch_copy(root)
        print("| mutation | kernel file | result | seconds |\n| --- | --- | --- | --- |", flush=True)
        for m in chosen:
            verdict, seconds = run(m, root, args.timeout)
            missed += not verdict.startswith("caught")
            print(f"| {m.name} | {m.file} | {verdict} | {seconds:.0f} |", flush=True)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
