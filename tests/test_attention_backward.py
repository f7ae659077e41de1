"""kernels/attention_bwd.py against float64 autograd through reference.gqa_attention.

The forward's out and lse come from the reference too (lse in fp32, out rounded to the case's dtype, as the forward
kernel saves them), so these tests do not depend on the forward kernel. The tolerance (tests/accuracy.py) is twice the
error of torch SDPA's gradients in the same dtype, on the dense mask with K and V repeated over each group; in TF32
mode the baseline is the reference in fp32 with every matmul truncated as TF32 dots read it (tests/tf32.py).

Cases are a covering set, not a cross product: every dtype, lengths 1, 17, 128, 129 (one above the largest block)
and 300, GQA ratios 1, 2, 6 and MQA, head_dim 64 and 128, causal offsets, left padding, packing, a query that sees
no key, strided (transformers-style) inputs.
"""

import contextlib
import inspect
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import triton.language as tl
from accuracy import assert_accurate, rel_err
from specialization import unspecialised
from tf32 import TF32Matmuls, matmul_precision

from dbrx_fast import reference
from dbrx_fast.attention_mask import AttentionMask
from dbrx_fast.kernels import attention_bwd as bwd_module
from dbrx_fast.kernels.attention_bwd import attention_bwd
from dbrx_fast.kernels.moe_tiles import GEMM_CLASS_DTYPES

pytestmark = pytest.mark.interpreter

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    batch: int
    heads: int
    kv_heads: int
    queries: int
    keys: int
    head_dim: int = 64
    padding: int = 0  # left-padded keys of batch row 0
    packed: bool = False  # batch row 0 holds two sequences, the second starting at key `queries // 2 + q_offset`

    @property
    def q_offset(self) -> int:
        return self.keys - self.queries


CASES = [
    Case("fp32_17_gqa1_d128", FP32, 1, 2, 2, 17, 17, head_dim=128),
    Case("bf16_decode_mqa_d128", BF16, 1, 3, 1, 1, 300, head_dim=128),
    Case("fp16_129_gqa2_offset_padded", FP16, 2, 2, 1, 129, 150, padding=9),
    Case("bf16_128_gqa6_packed", BF16, 1, 6, 1, 128, 128, packed=True),
    Case("fp16_300_padded_d128", FP16, 1, 1, 1, 300, 300, head_dim=128, padding=40),
    Case("fp16_17_gqa2_packed_padded", FP16, 2, 4, 2, 17, 20, padding=12, packed=True),
    Case("fp32_40_gqa2_packed_padded_d128", FP32, 1, 4, 2, 40, 45, head_dim=128, padding=4, packed=True),
]


def make_mask(case: Case, device) -> AttentionMask:
    """Causal at q_offset; batch row 0 left-padded by `padding` keys (with q_offset 0, its first queries see no key)
    and, when packed, cut into two sequences."""
    q_offset = torch.full((case.batch,), case.q_offset, dtype=torch.int32, device=device)
    key_mask = key_start = None
    if case.padding:
        key_mask = torch.ones(case.batch, case.keys, dtype=torch.bool, device=device)
        key_mask[0, : case.padding] = False
    if case.packed:
        key_start = torch.zeros(case.batch, case.queries, dtype=torch.int32, device=device)
        key_start[0, case.queries // 2 :] = case.queries // 2 + case.q_offset
    return AttentionMask(q_offset, key_mask, key_start)


@dataclass
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    dout: torch.Tensor
    mask: AttentionMask
    scale: float


def make_problem(case: Case, device, tf32: bool = False) -> Problem:
    """Inputs as transformers passes them: q, k, v [B, H, N, D] views of one [B, N, H + 2 Hkv, D] projection. The
    forward in TF32 mode (tf32) multiplies as TF32 dots do, so that lse fits the scores the kernel recomputes."""
    b, hq, hk, d = case.batch, case.heads, case.kv_heads, case.head_dim
    qkv = torch.randn(b, max(case.queries, case.keys), hq + 2 * hk, d, device=device).to(case.dtype)
    q = qkv[:, : case.queries, :hq].transpose(1, 2)
    k = qkv[:, : case.keys, hq : hq + hk].transpose(1, 2)
    v = qkv[:, : case.keys, hq + hk :].transpose(1, 2)
    mask = make_mask(case, device)
    scale = d**-0.5
    with TF32Matmuls() if tf32 else contextlib.nullcontext():
        out, lse = reference.gqa_attention(q.float(), k.float(), v.float(), mask, scale)
    dout = torch.randn(b, case.queries, hq, d, device=device).to(case.dtype)
    return Problem(q, k, v, out.to(case.dtype), lse, dout, mask, scale)


def run_kernel(p: Problem):
    m = p.mask
    key_mask = None if m.key_mask is None else m.key_mask.view(torch.uint8)
    return attention_bwd(p.dout, p.q, p.k, p.v, p.out, p.lse, m.q_offset, key_mask, m.key_start, p.scale)


def reference_grads(p: Problem, dtype: torch.dtype, tf32: bool = False):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (p.q, p.k, p.v))
    with TF32Matmuls() if tf32 else contextlib.nullcontext():
        out, _ = reference.gqa_attention(q, k, v, p.mask, p.scale)
        return torch.autograd.grad(out, (q, k, v), p.dout.to(dtype))


def sdpa_grads(p: Problem):
    """Stock's gradients in the case's dtype: SDPA on the dense mask, K and V repeated. SDPA makes NaN of a query
    that sees no key; such a query gets one key and no upstream gradient instead, which leaves every exact gradient
    as it is (it is the baseline's error that matters here, not its values on that row)."""
    group = p.q.shape[1] // p.k.shape[1]
    dense = p.mask.dense(p.q.shape[2], p.k.shape[2])
    blind = ~dense.any(-1)  # [B, Nq]
    dense[..., 0] |= blind
    dout = p.dout.masked_fill(blind[..., None, None], 0)
    q, k, v = (t.detach().clone().requires_grad_() for t in (p.q, p.k, p.v))
    out = F.scaled_dot_product_attention(
        q,
        k.repeat_interleave(group, 1),
        v.repeat_interleave(group, 1),
        attn_mask=dense[:, None],
        scale=p.scale,
    )
    return torch.autograd.grad(out.transpose(1, 2), (q, k, v), dout)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradients(case, device):
    p = make_problem(case, device)
    got = run_kernel(p)
    want = reference_grads(p, torch.float64)
    base = sdpa_grads(p)
    for name, g, r, s in zip(("dq", "dk", "dv"), got, want, base, strict=True):
        assert g.dtype == case.dtype and g.is_contiguous(), name
        assert_accurate(g, r, s, what=f"{case.name} {name}")
    blind = ~p.mask.dense(case.queries, case.keys).any(-1)  # [B, Nq]
    if blind.any():  # exactly zero, not only small
        assert (got[0].transpose(1, 2)[blind] == 0).all(), "dq of a query that sees no key"
    if case.padding:
        assert (got[1][0, :, : case.padding] == 0).all() and (got[2][0, :, : case.padding] == 0).all()


def test_tf32(device):
    """fp32 with TF32 allowed: TF32's error, judged against the reference with TF32-truncated matmuls. At head_dim
    128, padded and packed: the launch per gradient, which alone does not skip the query blocks packing hides."""
    case = Case("fp32_tf32_70_d128", FP32, 1, 2, 1, 70, 80, head_dim=128, padding=5, packed=True)
    p = make_problem(case, device, tf32=True)
    with matmul_precision("high"):
        got = run_kernel(p)
    want = reference_grads(p, torch.float64)
    base = reference_grads(p, torch.float32, tf32=True)
    for name, g, r, s in zip(("dq", "dk", "dv"), got, want, base, strict=True):
        assert_accurate(g, r, s, what=name)
        assert rel_err(g, r) > 2**-16, f"{name}: TF32 mode multiplied in full fp32"


@pytest.mark.parametrize(
    "case",
    [Case("bf16_gqa6", BF16, 1, 6, 1, 40, 70, padding=3), Case("fp32_gqa2_d128", FP32, 1, 2, 1, 20, 40, 128, 3)],
    ids=["one_launch", "launch_per_gradient"],
)
def test_deterministic(device, case):
    """Bitwise equal gradients from two runs (no atomics; the group's heads are summed in one program's order), with
    dK and dV from one launch (16-bit) or from one launch each (fp32 at head_dim 128)."""
    p = make_problem(case, device)
    first, second = run_kernel(p), run_kernel(p)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", [c for c in CASES if c.dtype != FP32], ids=lambda c: c.name)
def test_sm80_order_gives_the_deferred_gradients_bitwise(device, monkeypatch, case):
    """The 16-bit backward issues each block's last dots one step late on sm_90 and here (DEFER_DOT: dQ's ds @ k,
    and dK/dV's at head_dim 128 unpacked), in their own step on sm_80: the same products in the same order, so the
    same bits."""
    p = make_problem(case, device)
    assert bwd_module.defer_dot(p.q.device, "16bit")
    deferred = run_kernel(p)
    monkeypatch.setattr(bwd_module, "defer_dot", lambda device, cls: False)
    in_order = run_kernel(p)
    for name, a, b in zip(("dq", "dk", "dv"), deferred, in_order, strict=True):
        assert torch.equal(a, b), name


def test_empty(device):
    p = make_problem(Case("empty", FP16, 1, 2, 1, 0, 5), device)
    dq, dk, dv = run_kernel(p)
    assert dq.shape == p.q.shape and (dk == 0).all() and (dv == 0).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(lse=a["lse"].double()), "lse"),
        (lambda a: a.update(q_offset=a["q_offset"].long()), "q_offset"),
        (lambda a: a.update(out=a["out"].float()), "out is torch.float32"),
        (lambda a: a.update({n: a[n][..., :48] for n in ("q", "k", "v", "dout", "out")}), "head_dim"),
        (lambda a: a.update({n: a[n][:, :1].expand(-1, 3, -1, -1) for n in ("k", "v")}), "must be a multiple"),
    ],
    ids=["lse_dtype", "q_offset_dtype", "mixed_dtype", "head_dim", "group"],
)
def test_bad_input(change, message, device):
    p = make_problem(Case("bad", FP16, 1, 4, 2, 5, 5), device)
    args = dict(dout=p.dout, q=p.q, k=p.k, v=p.v, out=p.out, lse=p.lse, q_offset=p.mask.q_offset)
    change(args)
    with pytest.raises((ValueError, TypeError), match=message):
        attention_bwd(**args, key_mask=None, key_start=None, scale=p.scale)


def test_sizes_are_not_specialised():
    """The sequence lengths only bound masks and loops: a new length (1 in decode) compiles nothing new."""
    for kernel in (bwd_module._attention_bwd_dkdv_kernel, bwd_module._attention_bwd_dq_kernel):
        assert unspecialised(kernel) == {"num_queries", "num_keys"}, kernel.fn.__name__
    assert unspecialised(bwd_module._attention_bwd_delta_kernel) == {"num_queries"}


def test_autotune_keys_hold_every_code_changing_argument():
    for tuners in (bwd_module._DKDV, bwd_module._DQ):
        for cls, tuner in tuners.items():
            constexprs = {
                n for n, p in inspect.signature(tuner.fn.fn).parameters.items() if p.annotation is tl.constexpr
            }
            tiles = set().union(*(cfg.kwargs for cfg in tuner.all_configs))
            assert constexprs - tiles <= set(tuner.keys), f"{tuner.fn.fn.__name__}[{cls}]: key {tuner.keys}"


def test_compile_specs_cover_every_config():
    """compile_specs() holds the configs of `tile_configs` in every dtype of the tuner's class, head dim, mask variant
    and (dK/dV) launch of `dkdv_passes`."""
    specs = bwd_module.compile_specs()
    for tuners in (bwd_module._DKDV, bwd_module._DQ):
        for cls, tuner in tuners.items():
            found = {
                (
                    s.signature["q_ptr"],
                    s.constexprs["HEAD_DIM"],
                    s.constexprs["HAS_KEY_MASK"],
                    s.num_warps,
                    s.num_stages,
                )
                + tuple(s.constexprs.get(k) for k in ("BLOCK_M", "BLOCK_N", "DK", "DV"))
                for s in specs
                if s.kernel is tuner.fn and s.constexprs["FP32_DOT"] == (cls == "fp32_dot")
            }
            for dtype in GEMM_CLASS_DTYPES[cls]:
                for head_dim in (64, 128):
                    dkdv = tuners is bwd_module._DKDV
                    passes = bwd_module.dkdv_passes(cls, head_dim) if dkdv else [(None, None)]
                    for masks in (False, True):
                        for cfg in bwd_module.tile_configs("dkdv" if dkdv else "dq", cls, head_dim):
                            for grads in passes:
                                want = (f"*{dtype}", head_dim, masks, cfg.num_warps, cfg.num_stages)
                                want += (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], *grads)
                                assert want in found, f"{tuner.fn.fn.__name__}[{cls}]: no compile spec for {want}"


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_tuners_keep_their_head_dims_tiles(head_dim):
    """Each autotuner keeps `tile_configs` at the launch's head dim (the tiles the compile check holds), and each of
    its configs serves some head dim."""
    for kernel, tuners in (("dkdv", bwd_module._DKDV), ("dq", bwd_module._DQ)):
        for cls, tuner in tuners.items():
            kept = tuner.early_config_prune(tuner.all_configs, {}, HEAD_DIM=head_dim)
            assert kept == bwd_module.tile_configs(kernel, cls, head_dim), (kernel, cls)
            served = [c for d in (64, 128) for c in bwd_module.tile_configs(kernel, cls, d)]
            assert all(c in served for c in tuner.all_configs), (kernel, cls)
