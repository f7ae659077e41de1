"""Every autotune config of every kernel runs on ragged cases against the float64 reference, in each dtype it serves.

The interpreter (and DBRX_FAST_AUTOTUNE=0) pins each autotuner to one config, so without this test the others would
only ever be compiled (test_compile_gpu_targets.py), never run. The autotuners are found by scanning every module of
kernels/ (`autotune` keeps each one's full list as `all_configs`); each belongs to a group below, whose case runs its
differentiable op forward and backward with one config forced (`forced_config`) on every tuner of each kernel. A
group's kernels take their configs side by side (the i-th of each, the shorter lists repeating), so a case checks
several kernels at once, and its sizes are one tile of the largest block forced plus a ragged remainder.

GEMM-class tuners (the MoE kernels') serve the dtypes of their class; the others serve all three. Under the
interpreter num_warps and num_stages change nothing, so configs that differ only there run once; the layernorm
configs are first pruned by block size as its autotuner would.
"""

import importlib
import os
import pkgutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import triton
from accuracy import EPS, rel_err
from triton.runtime.autotuner import Autotuner

import dbrx_fast.kernels
from dbrx_fast import reference
from dbrx_fast.attention_mask import AttentionMask
from dbrx_fast.kernels import attention_fwd as attention_fwd_module
from dbrx_fast.kernels.attention_bwd import attention_bwd
from dbrx_fast.kernels.attention_decode import attention_decode
from dbrx_fast.kernels.attention_fwd import attention_fwd
from dbrx_fast.kernels.autotune import forced_config
from dbrx_fast.kernels.moe_routing import Routing
from dbrx_fast.kernels.moe_tiles import gemm_class
from dbrx_fast.ops.layernorm import layer_norm
from dbrx_fast.ops.moe import moe_experts_by_routing
from dbrx_fast.ops.qkv import qkv_rope
from dbrx_fast.ops.rope import rope
from dbrx_fast.ops.routing import route

pytestmark = pytest.mark.interpreter

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = (FP32, FP16, BF16)
CLASS_DTYPES = {"16bit": (FP16, BF16), "tf32": (FP32,), "fp32_dot": (FP32,)}
# Error bound in units of the dtype's round-off (accuracy.EPS): several roundings of intermediates, sums over at most
# a few hundred terms.
ULPS = {FP32: 64, FP16: 8, BF16: 8}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def discover() -> dict[str, dict[str, Autotuner]]:
    """kernel name -> {GEMM class or "": autotuner} over every module of kernels/."""
    found = {}
    for info in pkgutil.iter_modules(dbrx_fast.kernels.__path__):
        module = importlib.import_module(f"dbrx_fast.kernels.{info.name}")
        for value in vars(module).values():
            tuners = value.items() if isinstance(value, dict) else [("", value)]
            for cls, tuner in tuners:
                if isinstance(tuner, Autotuner):
                    found.setdefault(tuner.fn.__name__, {})[cls] = tuner
    return found


TUNERS = discover()


def configs_for(kernel: str, dtype: torch.dtype, prune: Callable | None = None) -> list[triton.Config]:
    """The configs of `kernel`'s tuners that serve `dtype`, pruned as its autotuner would, without configs the
    interpreter cannot tell apart."""
    configs = []
    for cls, tuner in TUNERS[kernel].items():
        if dtype in CLASS_DTYPES.get(cls, DTYPES):
            kept = tuner.all_configs if prune is None else prune(tuner)
            configs += kept
    if INTERPRETED:
        configs = list({tuple(sorted(c.kwargs.items())): c for c in configs}.values())
    return configs


def _check(got: torch.Tensor, want: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """Within ULPS round-offs of the case's dtype, whatever the output's (routing weights are float32 always)."""
    err, bound = rel_err(got, want), ULPS[dtype] * EPS[dtype]
    assert got.shape == want.shape and err <= bound, f"{what}: relative error {err:.3g} exceeds {bound:.3g} ({dtype})"


def _leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors], [t.detach().double().requires_grad_() for t in tensors]


def _check_grads(out, ref, leaves, ref_leaves, names, dtype):
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    _check(out, ref, "out", dtype)
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        _check(g, r, f"d{name}", dtype)


def _max_block(configs, rows: bool) -> int:
    """The largest BLOCK_M (rows) or other BLOCK_ (hidden, ffn) meta-parameter of the configs."""
    return max(v for c in configs for k, v in c.kwargs.items() if k.startswith("BLOCK_") and (k == "BLOCK_M") == rows)


def run_layernorm(configs, dtype):
    rows, cols = 37, 200  # not a power of two: a masked chunk tail; 37 rows over the backward's row blocks
    x = torch.randn(rows, cols).to(dtype)
    w = (1 + 0.1 * torch.randn(cols)).to(dtype)
    (xl, wl), (xr, wr) = _leaves(x, w)
    _check_grads(layer_norm(xl, wl, 1e-5), reference.layer_norm(xr, wr, 1e-5), [xl, wl], [xr, wr], ("x", "w"), dtype)


def prune_layernorm(tuner):
    """The configs layernorm's pruner keeps for run_layernorm's width (its BLOCK_C is the next power of two)."""
    return tuner.early_config_prune(tuner.all_configs, {"BLOCK_C": triton.next_power_of_2(200)})


def run_rope(configs, dtype):
    block_s = max(c.kwargs["BLOCK_S"] for c in configs)
    heads = max(c.kwargs["HEADS_PER_PROGRAM"] for c in configs)
    batch, seq, dim = 2, block_s + 5, 64
    q = torch.randn(batch, heads + 3, seq, dim).to(dtype)
    k = torch.randn(batch, 3, seq, dim).to(dtype)  # GQA: fewer k heads than one program's share
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    cos, sin = reference.rope_cos_sin(torch.arange(seq)[None].expand(batch, -1) + 1000, inv_freq)
    (ql, kl), (qr, kr) = _leaves(q, k)
    out = torch.cat([t.flatten() for t in rope(ql, kl, cos.float(), sin.float())])
    ref = torch.cat([t.flatten() for t in reference.rope(qr, kr, cos, sin)])
    _check_grads(out, ref, [ql, kl], [qr, kr], ("q", "k"), dtype)


def run_qkv_rope(configs, dtype):
    """MQA with a program's share of heads straddling q, k and v; positions one tile plus a remainder; clamped."""
    block_s = max(c.kwargs["BLOCK_S"] for c in configs)
    n_heads_q, batch, seq, dim, clip = max(c.kwargs["HEADS_PER_PROGRAM"] for c in configs) + 3, 2, block_s + 5, 16, 1.0
    qkv = torch.randn(batch, seq, (n_heads_q + 2) * dim).to(dtype)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    cos, sin = reference.rope_cos_sin(torch.arange(seq)[None].expand(batch, -1) + 1000, inv_freq)
    (leaf,), (ref_leaf,) = _leaves(qkv)
    out = torch.cat([t.flatten() for t in qkv_rope(leaf, cos.float(), sin.float(), clip, n_heads_q, 1)])
    q, k, v = ref_leaf.clamp(-clip, clip).split([n_heads_q * dim, dim, dim], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, dim)).transpose(1, 2) for t in (q, k, v))
    ref = torch.cat([t.flatten() for t in (*reference.rope(q, k, cos, sin), v)])
    _check_grads(out, ref, [leaf], [ref_leaf], ("qkv",), dtype)


def run_routing(configs, dtype):
    tokens, experts, top_k = 150, 16, 4
    logits = torch.randn(tokens, experts).to(dtype)
    (ll,), (lr,) = _leaves(logits)
    r = route(ll, top_k, 1.0)
    weights, ids = reference.route(lr, top_k, 1.0)
    assert torch.equal(r.expert_ids.long(), ids), "the kernels choose the reference's experts"
    slots, offsets = reference.dispatch(ids, experts)
    assert torch.equal(r.sorted_slots, slots) and torch.equal(r.expert_offsets, offsets)
    _check_grads(r.weights, weights, [ll], [lr], ("logits",), dtype)


def run_moe(configs, dtype):
    """Four experts: one with every token (one M-tile plus a remainder), one with three quarters, one with the rest,
    one empty; hidden and ffn one tile of the largest block plus a remainder."""
    block = _max_block(configs, rows=False)
    tokens, experts, hidden, ffn = _max_block(configs, rows=True) + 22, 4, block + 24, block + 8
    ids = torch.zeros(tokens, 2, dtype=torch.long)
    ids[:, 1] = torch.where(torch.arange(tokens) < 3 * tokens // 4, 1, 2)
    weights = torch.rand(tokens, 2) + 0.1
    x = torch.randn(tokens, hidden).to(dtype)
    w1, v1 = ((torch.randn(experts * ffn, hidden) * hidden**-0.5).to(dtype) for _ in range(2))
    w2 = (torch.randn(experts * ffn, hidden) * ffn**-0.5).to(dtype)
    slots, offsets = reference.dispatch(ids, experts)
    leaves, ref_leaves = _leaves(x, w1, v1, w2, weights)
    routing = Routing(leaves[4], ids.to(torch.int32), slots, offsets)
    out = moe_experts_by_routing(*leaves[:4], routing, experts)
    ref = reference.moe_experts_by_ids(*ref_leaves, ids, experts)
    _check_grads(out, ref, leaves, ref_leaves, ("x", "w1", "v1", "w2", "weights"), dtype)


def run_attention(configs, dtype):
    """Forward only (the backward's group is its own): one query block of the largest BLOCK_M plus a remainder, keys
    past the queries (a causal offset) by one key tile plus a remainder, two packed sequences, so that the masked,
    unmasked and boundary tile runs all execute. 16 bits: on each path that offers the config, pointers and TMA
    (DBRX_FAST_TMA; some tiles are the TMA path's only)."""
    cls = gemm_class(dtype)[0]
    for tma in ("0", "1") if cls == "16bit" else ("0",):
        if configs[0] in attention_fwd_module.offered(cls, tma == "1"):
            with mock.patch.dict(os.environ, {"DBRX_FAST_TMA": tma}):
                _run_attention_once(configs, dtype)


def _run_attention_once(configs, dtype):
    num_queries = max(c.kwargs["BLOCK_M"] for c in configs) + 5
    num_keys = num_queries + max(c.kwargs["BLOCK_N"] for c in configs) + 3
    q = torch.randn(1, 2, num_queries, 64).to(dtype)
    k, v = (torch.randn(1, 1, num_keys, 64).to(dtype) for _ in range(2))
    positions = torch.arange(num_queries) + num_keys - num_queries
    key_start = torch.where(positions >= num_keys // 2, num_keys // 2, 0).to(torch.int32)[None]
    mask = AttentionMask(torch.tensor([num_keys - num_queries], dtype=torch.int32), None, key_start)
    out, lse = attention_fwd(q, k, v, mask.q_offset, None, key_start, 0.125)
    ref_out, ref_lse = reference.gqa_attention(q.double(), k.double(), v.double(), mask, 0.125)
    _check(out, ref_out, "out", dtype)
    _check(lse, ref_lse, "lse", dtype)


def run_decode(configs, dtype):
    """Decode (inference only): 3 tokens of two KV heads' groups of 3 query heads, over one tile of the largest
    BLOCK_N plus a remainder, in two splits; one batch row left-padded."""
    block = max(c.kwargs["BLOCK_N"] for c in configs)
    batch, kv_heads, group, tokens, keys, dim = 2, 2, 3, 3, block + 5, 64
    q = torch.randn(batch, kv_heads * group, tokens, dim).to(dtype)
    k, v = (torch.randn(batch, kv_heads, keys, dim).to(dtype) for _ in range(2))
    key_mask = torch.ones(batch, keys, dtype=torch.bool)
    key_mask[1, :7] = False
    mask = AttentionMask(torch.full((batch,), keys - tokens, dtype=torch.int32), key_mask)
    out = attention_decode(q, k, v, mask.q_offset, key_mask, dim**-0.5)
    ref, _ = reference.gqa_attention(q.double(), k.double(), v.double(), mask, dim**-0.5)
    _check(out, ref, "out", dtype)


def run_attention_bwd(configs, dtype):
    """Causal GQA at a key offset, queries and keys one tile of the largest block plus a remainder, a small head_dim
    (the interpreter's time goes with the tiles); out and lse from the reference, gradients against float64."""
    queries = _max_block(configs, rows=True) + 5
    keys = max(c.kwargs["BLOCK_N"] for c in configs) + 12
    q = torch.randn(1, 2, queries, 16).to(dtype)
    k, v = (torch.randn(1, 1, keys, 16).to(dtype) for _ in range(2))
    mask = AttentionMask(torch.tensor([keys - queries], dtype=torch.int32))
    out, lse = reference.gqa_attention(q.float(), k.float(), v.float(), mask, 0.25)
    dout = torch.randn(out.shape).to(dtype)
    grads = attention_bwd(dout, q, k, v, out.to(dtype), lse, mask.q_offset, None, None, 0.25)
    (qr, kr, vr) = (t.double().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(reference.gqa_attention(qr, kr, vr, mask, 0.25)[0], (qr, kr, vr), dout.double())
    for name, g, r in zip(("q", "k", "v"), grads, ref_grads, strict=True):
        _check(g, r, f"d{name}", dtype)


@dataclass
class Group:
    kernels: tuple[str, ...]
    run: Callable
    prune: Callable | None = None


GROUPS = {
    "layernorm": Group(("_layernorm_fwd_kernel", "_layernorm_bwd_kernel"), run_layernorm, prune_layernorm),
    "rope": Group(("_rope_kernel",), run_rope),
    "qkv_rope": Group(("_qkv_rope_kernel",), run_qkv_rope),
    "routing": Group(("_route_fwd_kernel", "_route_bwd_kernel"), run_routing),
    "attention_fwd": Group(("_attention_fwd_kernel",), run_attention),
    "moe": Group(
        (
            "_moe_glu_up_fwd_kernel",
            "_moe_down_fwd_kernel",
            "_moe_down_bwd_kernel",
            "_moe_up_dgrad_kernel",
            "_moe_down_wgrad_kernel",
            "_moe_up_wgrad_kernel",
        ),
        run_moe,
    ),
    "decode": Group(("_attention_decode_split_kernel",), run_decode),
    "attention_bwd": Group(("_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"), run_attention_bwd),
}


def runs() -> list:
    """(group, dtype, i) for every i below the longest config list of the group's kernels in that dtype."""
    params = []
    for name, group in GROUPS.items():
        for dtype in DTYPES:
            lengths = [len(configs_for(k, dtype, group.prune)) for k in group.kernels if k in TUNERS]
            for i in range(max(lengths, default=0)):
                params.append(pytest.param(name, dtype, i, id=f"{name}-{str(dtype)[6:]}-{i}"))
    return params


def test_every_tuner_has_a_case():
    """A new autotuned kernel must join a group here, and every tuner must keep its configs (kernels/autotune.py)."""
    grouped = {k for g in GROUPS.values() for k in g.kernels}
    assert set(TUNERS) <= grouped, f"autotuned kernels without a case: {sorted(set(TUNERS) - grouped)}"
    assert grouped <= set(TUNERS), f"cases for kernels that are not autotuned: {sorted(grouped - set(TUNERS))}"
    for kernel, tuners in TUNERS.items():
        for cls, tuner in tuners.items():
            assert hasattr(tuner, "all_configs"), f"{kernel} {cls}: made by triton.autotune, not kernels.autotune"
            assert cls in ("", *CLASS_DTYPES), f"{kernel}: GEMM class {cls!r} has no dtypes here"


@pytest.mark.parametrize(("group", "dtype", "index"), runs())
def test_config(group, dtype, index):
    g = GROUPS[group]
    chosen = {}
    with ExitStack() as stack:
        for kernel in g.kernels:
            configs = configs_for(kernel, dtype, g.prune)
            chosen[kernel] = configs[index % len(configs)]
            for tuner in TUNERS[kernel].values():
                stack.enter_context(forced_config(tuner, chosen[kernel]))
        try:
            g.run(list(chosen.values()), dtype)
        except AssertionError as e:
            forced = "; ".join(f"{k}: {c}" for k, c in chosen.items())
            raise AssertionError(f"{e}\nwith configs {forced}") from e
