"""The GQA flash attention forward (kernels/attention_fwd.py) and its op (dbrx_fast/ops/attention.py) against the
float64 reference, judged against torch's SDPA in the same dtype (GQA native, the dense bool mask of the
AttentionMask); the log-sum-exp against the reference's; bad input; specialization, autotune keys, and the sm_90
main-loop readings of the large-tile config.

The 16-bit TMA path (K and V tiles through descriptors; sm_90's, DBRX_FAST_TMA=1 runs it under the interpreter of
Triton 3.6 and 3.9 alike, zero fill included) against the pointer path and float64, with NaN past every head's keys;
which launches keep the pointer path; the TMA-only tile's two blocks per SM on sm_90.

The cases cover, without a full cross product: fp32 / fp16 / bf16; lengths 1, 17, 128, 300 and 129 (one above the
largest block); GQA ratios 1, 2, 6 and MQA; head_dim 64 and 128; causal offsets (Nq < Nk, and a negative one);
left and right padding; packed sequences; queries that see no key; transformers' strided q/k/v views.
"""

import inspect
import os

import pytest
import torch
import torch.nn.functional as F
import triton.language as tl
from accuracy import EPS, assert_accurate
from specialization import compiled_variants, unspecialised
from tf32 import TF32Matmuls, matmul_precision

from dbrx_fast import reference
from dbrx_fast.attention_mask import AttentionMask
from dbrx_fast.kernels import attention_fwd as fwd_module
from dbrx_fast.kernels import moe_tiles
from dbrx_fast.kernels.attention_fwd import attention_fwd
from dbrx_fast.kernels.autotune import forced_config
from dbrx_fast.kernels.launch import launch
from dbrx_fast.ops.attention import attention

pytestmark = pytest.mark.interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


def make_mask(kind: str, batch: int, num_queries: int, num_keys: int, device) -> AttentionMask:
    """causal: bottom-right; left / right: padding of a few keys per batch row (row 0 padded more, so that its first
    queries see no key under left padding); packed: three sequences per row, restarting at different places;
    offset: q_offset below Nk - Nq (a static cache's prefill), negative in row 1 (its first queries see nothing)."""
    offsets = torch.full((batch,), num_keys - num_queries, dtype=torch.int32)
    key_mask = key_start = None
    if kind in ("left", "right"):
        pads = torch.tensor([num_keys // 3 + 2, 3][:batch] + [0] * max(0, batch - 2))
        j = torch.arange(num_keys)[None]
        key_mask = j >= pads[:, None] if kind == "left" else j < (num_keys - pads)[:, None]
    elif kind == "packed":
        # Queries are the last Nq positions of the keys; three sequences per row, starting off any tile boundary, so
        # that some query block lies inside a sequence whose first key is mid-tile.
        key_start = torch.zeros(batch, num_queries, dtype=torch.int32)
        positions = torch.arange(num_queries) + num_keys - num_queries
        for b in range(batch):
            for cut in (num_keys // (8 - 3 * b) + 1, num_keys // 2 + 1 + 2 * b):
                key_start[b] = torch.where(positions >= cut, cut, key_start[b])
    elif kind == "offset":
        offsets = torch.tensor([num_keys // 2, -3][:batch], dtype=torch.int32)
    elif kind != "causal":
        raise ValueError(kind)
    cast = lambda t: None if t is None else t.to(device)  # noqa: E731
    return AttentionMask(offsets.to(device), cast(key_mask), cast(key_start))


def make_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, dtype, device, strided):
    """q [B, Hq, Nq, D], k, v [B, Hkv, Nk, D]; `strided`: as transformers passes them, transposed views of
    [B, N, H, D]."""

    def tensor(h, n):
        if strided:
            return torch.randn(batch, n, h, head_dim, device=device).to(dtype).transpose(1, 2)
        return torch.randn(batch, h, n, head_dim, device=device).to(dtype)

    return tensor(heads, num_queries), tensor(kv_heads, num_keys), tensor(kv_heads, num_keys)


def sdpa(q, k, v, mask: AttentionMask, scale):
    """Stock's baseline in q's dtype: SDPA with native GQA and the dense mask; a query without keys gives 0."""
    allowed = mask.dense(q.shape[2], k.shape[2])[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
    return out.nan_to_num(0.0).transpose(1, 2)


def check_against_reference(q, k, v, mask, scale, out, lse, baseline):
    ref_out, ref_lse = reference.gqa_attention(q.double(), k.double(), v.double(), mask, scale)
    assert out.shape == ref_out.shape and out.is_contiguous() and out.dtype == q.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert_accurate(out, ref_out, baseline, what="out")
    none_seen = ref_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), none_seen), "lse is -inf exactly for the queries that see no key"
    assert (out.transpose(1, 2)[none_seen] == 0).all(), "a query that sees no key gives 0"
    # lse in fp32 from fp32 scores: fp32 round-off, a few per dot product term, relative to its largest value.
    assert_accurate(lse[~none_seen], ref_lse[~none_seen], ulps=64 if q.dtype != FP32 else 16, what="lse")


# (B, Hq, Hkv, Nq, Nk, D, mask kind, strided views, dtypes)
CASES = [
    pytest.param(2, 6, 1, 1, 160, 128, "left", False, (BF16,), id="decode-ratio6-left-D128"),
    pytest.param(1, 2, 2, 17, 17, 64, "causal", True, (FP32, FP16, BF16), id="len17-ratio1-causal-D64"),
    pytest.param(2, 4, 2, 128, 128, 128, "right", True, (FP16,), id="len128-ratio2-right-D128"),
    pytest.param(1, 3, 1, 300, 300, 64, "packed", False, (BF16,), id="len300-mqa-packed-D64"),
    pytest.param(2, 2, 1, 129, 160, 64, "offset", False, (FP32,), id="len129-mqa-offset-D64"),
    pytest.param(1, 4, 2, 70, 150, 128, "packed", True, (FP16,), id="len70-ratio2-packed-causal-offset-D128"),
]


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "nq", "nk", "head_dim", "kind", "strided", "dtypes"), CASES)
def test_forward_matches_reference(device, batch, heads, kv_heads, nq, nk, head_dim, kind, strided, dtypes):
    mask = make_mask(kind, batch, nq, nk, device)
    scale = head_dim**-0.5
    for dtype in dtypes:
        q, k, v = make_qkv(batch, heads, kv_heads, nq, nk, head_dim, dtype, device, strided)
        out, lse = attention_fwd(q, k, v, mask.q_offset, mask.key_mask, mask.key_start, scale)
        check_against_reference(q, k, v, mask, scale, out, lse, sdpa(q, k, v, mask, scale))


def test_forward_tf32(device):
    """fp32 with TF32 allowed: the tf32 dots against float64, judged against the reference in fp32 with every
    matmul operand truncated to TF32 (tests/tf32.py); an fp32-accurate bound would fail it, a wrong answer too."""
    mask = make_mask("causal", 1, 40, 90, device)
    q, k, v = make_qkv(1, 4, 2, 40, 90, 64, FP32, device, strided=False)
    with matmul_precision("high"):
        out, lse = attention_fwd(q, k, v, mask.q_offset, None, None, 0.125)
    with TF32Matmuls():
        baseline, _ = reference.gqa_attention(q, k, v, mask, 0.125)
    ref_out, ref_lse = reference.gqa_attention(q.double(), k.double(), v.double(), mask, 0.125)
    assert_accurate(out, ref_out, baseline, what="out")
    assert rel_lse(lse, ref_lse) < 64 * EPS[torch.bfloat16]  # TF32 keeps 10 mantissa bits, like fp16


def rel_lse(lse, ref):
    return ((lse.double() - ref).abs().max() / ref.abs().max()).item()


def test_op_forward_and_saved_tensors(device):
    """The autograd op returns the kernel's output and keeps what the backward reads."""
    mask = make_mask("left", 2, 33, 33, device)
    q, k, v = make_qkv(2, 2, 1, 33, 33, 64, BF16, device, strided=True)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, mask, 0.125)
    want, _ = attention_fwd(q, k, v, mask.q_offset, mask.key_mask, mask.key_start, 0.125)
    assert torch.equal(out, want) and out.requires_grad
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 8 and torch.equal(saved[3], want)  # q, k, v, out, lse, q_offset, key_mask, key_start
    with torch.no_grad():
        assert torch.equal(attention(q, k, v, mask, 0.125), want)


@pytest.mark.parametrize(("kind", "dtype"), [("packed", BF16), ("left", FP32)])
def test_op_gradients_match_float64_autograd(device, kind, dtype):
    """End to end through the autograd op, forward kernel then backward kernels (each tested alone in its own file):
    dq, dk, dv against float64 autograd through the reference, judged against SDPA's gradients in the same dtype."""
    mask = make_mask(kind, 2, 40, 70, device)
    q, k, v = make_qkv(2, 6, 2, 40, 70, 64, dtype, device, strided=True)
    dout = torch.randn(2, 40, 6, 64, device=device).to(dtype)

    def grads(fn, *tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        torch.autograd.backward(fn(*leaves), dout.to(leaves[0].dtype))
        return [t.grad for t in leaves]

    got = grads(lambda *t: attention(*t, mask, 0.125), q, k, v)
    want = grads(lambda *t: reference.gqa_attention(*t, mask, 0.125)[0], q.double(), k.double(), v.double())
    baseline = grads(lambda *t: sdpa(*t, mask, 0.125), q, k, v)
    assert all(torch.isfinite(b).all() for b in baseline), "every query sees a key: a finite baseline"
    for name, g, w, b in zip("qkv", got, want, baseline, strict=True):
        assert_accurate(g, w, b, what=f"d{name}")


def test_forward_is_deterministic(device):
    mask = make_mask("packed", 1, 50, 80, device)
    q, k, v = make_qkv(1, 2, 1, 50, 80, 64, FP16, device, strided=False)
    first = attention_fwd(q, k, v, mask.q_offset, mask.key_mask, mask.key_start, 0.125)
    second = attention_fwd(q, k, v, mask.q_offset, mask.key_mask, mask.key_start, 0.125)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_empty_inputs(device):
    """No queries: empty results; no keys: every query sees nothing."""
    q, k, v = make_qkv(1, 2, 1, 0, 5, 64, FP16, device, strided=False)
    out, lse = attention_fwd(q, k, v, torch.tensor([5], dtype=torch.int32, device=device), None, None, 0.125)
    assert out.shape == (1, 0, 2, 64) and lse.shape == (1, 2, 0)
    q, k, v = make_qkv(1, 2, 1, 3, 0, 64, FP16, device, strided=False)
    out, lse = attention_fwd(q, k, v, torch.zeros(1, dtype=torch.int32, device=device), None, None, 0.125)
    assert (out == 0).all() and (lse == float("-inf")).all()


def bad_calls(device):
    """(description, call, exception, message fragment) for inputs the launcher or op must refuse."""
    q, k, v = make_qkv(2, 4, 2, 8, 8, 64, FP16, device, strided=False)
    offsets = torch.zeros(2, dtype=torch.int32, device=device)
    mask = AttentionMask(offsets)

    def fwd(q=q, k=k, v=v, offsets=offsets, key_mask=None, key_start=None, scale=0.125):
        return lambda: attention_fwd(q, k, v, offsets, key_mask, key_start, scale)

    d96 = make_qkv(2, 4, 2, 8, 8, 96, FP16, device, strided=False)
    return [
        ("head_dim 96", fwd(*d96), ValueError, "head_dim 96"),
        ("mixed dtypes", fwd(k=k.float()), TypeError, "must match q"),
        ("float64", fwd(q.double(), k.double(), v.double()), TypeError, "float64"),
        ("Hq not a multiple of Hkv", fwd(k=k[:, :1].expand(2, 3, 8, 64), v=v[:, :1].expand(2, 3, 8, 64)), ValueError,
         "multiple"),
        ("k and v differ", fwd(v=v[:, :, :5]), ValueError, "[B, Hkv, Nk, D]"),
        ("3-D q", fwd(q=q[0]), ValueError, "4-D"),
        ("another device", fwd(k=k.to("meta"), v=v.to("meta")), TypeError, "must match q"),
        ("q_offset int64", fwd(offsets=offsets.long()), ValueError, "q_offset"),
        ("key_mask too short", fwd(key_mask=torch.ones(2, 7, dtype=torch.bool, device=device)), ValueError,
         "key_mask"),
        ("key_start float", fwd(key_start=torch.zeros(2, 8, device=device)), ValueError, "key_start"),
        ("scale 0", fwd(scale=0.0), ValueError, "scale"),
        ("op: mask of another batch", lambda: attention(q, k, v, AttentionMask(offsets[:1]), 0.125), ValueError,
         "q_offset"),
        ("op: bool mask expected", lambda: attention(
            q, k, v, AttentionMask(offsets, torch.ones(2, 8, dtype=torch.uint8, device=device)), 0.125), ValueError,
         "key_mask"),
        ("op: fine", lambda: attention(q, k, v, mask, 0.125), None, ""),
    ]  # fmt: skip


def test_bad_input_raises_clearly(device):
    for what, call, error, message in bad_calls(device):
        if error is None:
            call()
            continue
        with pytest.raises(error, match=None) as info:
            call()
        assert message in str(info.value), f"{what}: {info.value}"


def test_sizes_are_not_specialized_and_keys_hold_every_code_changing_argument():
    assert unspecialised(fwd_module._attention_fwd_kernel) == {
        "num_queries",
        "num_keys",
        "q_bucket",
        "k_bucket",
        "stride_key_mask_b",
        "stride_key_start_b",
    }
    for cls, tuner in fwd_module._ATTENTION_FWD.items():
        params = inspect.signature(tuner.fn.fn).parameters
        constexprs = {n for n, p in params.items() if p.annotation is tl.constexpr}
        tiles = set().union(*(cfg.kwargs for cfg in tuner.all_configs))
        missing = ((constexprs - tiles) | {"q_bucket", "k_bucket"}) - set(tuner.keys)
        assert not missing, f"{cls}: autotune key {tuner.keys} lacks {sorted(missing)}"


def test_compile_specs_cover_every_config_and_dtype_on_each_path():
    """16 bits: pointers without DEFER_DOT on sm_80, pointers and TMA with it on sm_90 (`defer_dot`); fp32 one
    path on both."""
    specs = fwd_module.compile_specs()
    found = {(s.signature["q_ptr"], s.constexprs["HEAD_DIM"], s.constexprs["FP32_DOT"], s.constexprs["USE_TMA"],
              s.constexprs["DEFER_DOT"], s.archs, s.num_warps, s.num_stages, s.constexprs["BLOCK_M"],
              s.constexprs["BLOCK_N"])
             for s in specs}  # fmt: skip
    paths = {"16bit": ((False, False, (80,)), (False, True, (90,)), (True, True, (90,)))}
    for cls in fwd_module._ATTENTION_FWD:
        for tma, defer, archs in paths.get(cls, ((False, False, (80, 90)),)):
            for dtype in {"16bit": ("*bf16", "*fp16")}.get(cls, ("*fp32",)):
                for head_dim in (64, 128):
                    for cfg in fwd_module.offered(cls, tma):
                        want = (dtype, head_dim, cls == "fp32_dot", tma, defer, archs, cfg.num_warps, cfg.num_stages,
                                *cfg.kwargs.values())  # fmt: skip
                        assert want in found, f"{cls}: no compile spec for {want}"


def test_the_pointer_path_is_not_offered_the_tma_tiles():
    """The 64 x 64 tile spills on the pointer path (sm_90, Triton 3.9); the autotuner's pruner drops it there."""
    tuner = fwd_module._ATTENTION_FWD["16bit"]
    assert fwd_module.offered("16bit", True) == tuner.all_configs
    pointer = fwd_module.offered("16bit", False)
    assert pointer == tuner.all_configs[:1] and tuner.all_configs[0].kwargs == {"BLOCK_M": 128, "BLOCK_N": 64}
    for tma in (False, True):
        assert tuner.early_config_prune(tuner.all_configs, {}, USE_TMA=tma) == fwd_module.offered("16bit", tma)
    for cls in ("tf32", "fp32_dot"):
        assert fwd_module.offered(cls, False) == fwd_module._ATTENTION_FWD[cls].all_configs


@pytest.mark.gpu
def test_new_lengths_compile_nothing(device):
    """Prompts of any length share one compiled kernel (per config and mask mode)."""
    tuner = fwd_module._ATTENTION_FWD["16bit"]
    counts = []
    with forced_config(tuner, tuner.all_configs[0]):
        for n in (1, 7, 33, 100, 1000):
            q, k, v = make_qkv(2, 6, 1, n, n, 128, BF16, device, strided=True)
            mask = make_mask("left", 2, n, n, device)
            attention_fwd(q, k, v, mask.q_offset, mask.key_mask, None, 0.1)
            counts.append(compiled_variants(tuner))
    assert counts == counts[:1] * 5


# ---- the TMA path (16 bits, sm_90; DBRX_FAST_TMA=1 here) -------------------------------------------------------


def fwd_on_path(q, k, v, mask, scale, monkeypatch, tma: str):
    """(out, lse, the USE_TMA of each launch) of attention_fwd with DBRX_FAST_TMA=tma."""
    seen = []

    def spy(kernel, grid, *args, **meta):
        seen.append(meta["USE_TMA"])
        launch(kernel, grid, *args, **meta)

    with monkeypatch.context() as patch:
        patch.setattr(moe_tiles, "launch", spy)  # the forward launches through moe_tiles.launch_gemm
        patch.setenv("DBRX_FAST_TMA", tma)
        out, lse = attention_fwd(q, k, v, mask.q_offset, mask.key_mask, mask.key_start, scale)
    return out, lse, seen


# (B, Hq, Hkv, Nq, Nk, D, mask kind, strided views, dtype): lengths off every tile, D 128 and 64, GQA and MQA.
TMA_CASES = [
    pytest.param(2, 4, 2, 70, 150, 128, "causal", True, BF16, id="len70x150-ratio2-causal-strided-D128-bf16"),
    pytest.param(2, 2, 1, 33, 97, 64, "left", False, FP16, id="len33x97-mqa-left-D64-fp16"),
    pytest.param(1, 3, 1, 100, 130, 64, "packed", True, BF16, id="len100x130-mqa-packed-strided-D64-bf16"),
]


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "nq", "nk", "head_dim", "kind", "strided", "dtype"), TMA_CASES)
def test_tma_path_matches_pointer_path(device, monkeypatch, batch, heads, kv_heads, nq, nk, head_dim, kind, strided,
                                       dtype):  # fmt: skip
    """Within round-off of float64, and bitwise the pointer path's result: the same tiles, products and order."""
    mask = make_mask(kind, batch, nq, nk, device)
    q, k, v = make_qkv(batch, heads, kv_heads, nq, nk, head_dim, dtype, device, strided)
    out, lse, seen = fwd_on_path(q, k, v, mask, head_dim**-0.5, monkeypatch, "1")
    assert seen == [True]
    check_against_reference(q, k, v, mask, head_dim**-0.5, out, lse, sdpa(q, k, v, mask, head_dim**-0.5))
    out_ptr, lse_ptr, seen = fwd_on_path(q, k, v, mask, head_dim**-0.5, monkeypatch, "0")
    assert seen == [False]
    assert torch.equal(out, out_ptr) and torch.equal(lse, lse_ptr)


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "nq", "nk", "head_dim", "kind", "strided", "dtype"),
    [*TMA_CASES, pytest.param(2, 6, 1, 1, 160, 128, "left", False, FP16, id="decode-ratio6-left-D128-fp16")],
)
def test_sm80_order_gives_the_deferred_result_bitwise(device, monkeypatch, batch, heads, kv_heads, nq, nk, head_dim,
                                                      kind, strided, dtype):  # fmt: skip
    """The 16-bit class runs each tile's p @ v one iteration late on sm_90 and here (DEFER_DOT), in its own
    iteration on sm_80: the same products in the same order, so the same bits, and both within round-off."""
    mask = make_mask(kind, batch, nq, nk, device)
    q, k, v = make_qkv(batch, heads, kv_heads, nq, nk, head_dim, dtype, device, strided)
    assert fwd_module.defer_dot(q.device, "16bit") and not fwd_module.defer_dot(q.device, "tf32")
    deferred = attention_fwd(q, k, v, mask.q_offset, mask.key_mask, mask.key_start, head_dim**-0.5)
    monkeypatch.setattr(fwd_module, "defer_dot", lambda device, cls: False)
    in_order = attention_fwd(q, k, v, mask.q_offset, mask.key_mask, mask.key_start, head_dim**-0.5)
    check_against_reference(q, k, v, mask, head_dim**-0.5, *in_order, sdpa(q, k, v, mask, head_dim**-0.5))
    assert all(torch.equal(a, b) for a, b in zip(deferred, in_order, strict=True))


@pytest.mark.parametrize("tma", ["1", "0"], ids=["tma", "pointer"])
def test_no_tile_reads_past_its_heads_keys(device, monkeypatch, tma):
    """K and V are views into NaN: rows past Nk of every (batch, KV head), a KV head and a batch row beyond the last.
    A V tile that read any of them would put NaN in the output (NaN * 0 is NaN); the last key tile is ragged (Nk = 83
    is 64 + 19), so each (batch, head)'s descriptor must end at its own Nk. A K tile past Nk is masked to -inf
    anyway; its head's start is checked by the accuracy bound."""
    batch, kv_heads, nq, nk, pad, head_dim = 2, 2, 40, 83, 13, 64
    mask = make_mask("causal", batch, nq, nk, device)
    q = torch.randn(batch, 4, nq, head_dim, device=device).to(BF16)
    k, v = (torch.full((batch + 1, kv_heads + 1, nk + pad, head_dim), float("nan"), dtype=BF16, device=device)
            [:batch, :kv_heads, :nk] for _ in range(2))  # fmt: skip
    for t in (k, v):
        t.copy_(torch.randn(t.shape, device=device))
    out, lse, seen = fwd_on_path(q, k, v, mask, 0.125, monkeypatch, tma)
    assert seen == [tma == "1"]
    check_against_reference(q, k, v, mask, 0.125, out, lse, sdpa(q, k, v, mask, 0.125))


def test_fp32_and_unaligned_rows_keep_the_pointer_path(device, monkeypatch):
    mask = make_mask("causal", 1, 9, 20, device)
    q, k, v = make_qkv(1, 2, 1, 9, 20, 64, FP32, device, strided=False)
    assert fwd_on_path(q, k, v, mask, 0.125, monkeypatch, "1")[2] == [False]  # the 16-bit class only
    q, k, v = (t.to(BF16) for t in (q, k, v))
    shifted = torch.randn(1, 1, 20 * 64 + 1, device=device).to(BF16)[..., 1:].view(1, 1, 20, 64)  # 2 bytes off
    out, lse, seen = fwd_on_path(q, shifted, v, mask, 0.125, monkeypatch, "1")
    assert seen == [False]
    check_against_reference(q, shifted, v, mask, 0.125, out, lse, sdpa(q, shifted, v, mask, 0.125))


@pytest.fixture(scope="module")
def tma_d128_records():
    from dbrx_fast.inspect import inspect_specs

    records = inspect_specs((90,), name_filter="16bit D=128 USE_TMA=True DEFER_DOT=True BLOCK_M=")
    return [r for r in records if r.name.startswith("attention_fwd ")]


def test_tma_configs_offer_two_blocks_per_sm_on_sm90(tma_d128_records):
    """At head_dim 128 (DBRX's) the 16-bit TMA path offers a tile with two blocks per SM on sm_90, so that one CTA's
    MMAs run during the other's softmax (the pinned 128 x 64 tile keeps one per SM, see the module docstring)."""
    by_dtype = {}
    for r in tma_d128_records:
        assert r.error is None and not r.problems, (r.name, r.problems)
        by_dtype.setdefault(r.name.split()[1], []).append(r.blocks_per_sm)
    assert by_dtype.keys() == {"bf16", "fp16"} and all(
        len(b) == len(fwd_module.offered("16bit", True)) for b in by_dtype.values()
    ), tma_d128_records
    assert all(max(blocks) >= 2 for blocks in by_dtype.values()), f"blocks per SM per config: {by_dtype}"


# ---- what the compiler makes of the large-tile config on sm_90 (the pinned 16-bit one, DBRX's head_dim) ----------

_PERF_CHECKS = {
    "wgmma_n64": lambda r: r.wgmma and min(r.wgmma_n) >= 64,
    "loads_overlapped": lambda r: r.loop_waits_all is False,
    "mma_in_flight": lambda r: r.loop_drains_mma is False,
    "softmax_under_mma": lambda r: r.loop_sfu_under_mma is True,
}
_PERF_KNOWN = {
    "mma_in_flight": "the softmax reads each tile's Q @ K^T, and Triton 3.6-3.9's WGMMA pipeliner waits for a wgmma "
    "whose result feeds anything but another wgmma's accumulator with wait_group 0; the deferred P @ V of the tile "
    "before, issued after that wait, runs under the softmax instead (softmax_under_mma, kernels/attention_fwd.py)",
}


@pytest.fixture(scope="module")
def large_config_records():
    from dbrx_fast.inspect import inspect_specs

    cfg = fwd_module._ATTENTION_FWD["16bit"].all_configs[0]
    name = f"16bit D=128 DEFER_DOT=True {fwd_module.describe(cfg)}"
    return [r for r in inspect_specs((90,), name_filter=name) if r.name.startswith("attention_fwd ")]


@pytest.mark.parametrize(
    "check",
    [pytest.param(c, marks=[pytest.mark.xfail(strict=True, reason=_PERF_KNOWN[c])] if c in _PERF_KNOWN else [])
     for c in _PERF_CHECKS],
)  # fmt: skip
def test_large_config_main_loop_on_sm90(large_config_records, check):
    assert {r.name.split()[1] for r in large_config_records} == {"bf16", "fp16"}, large_config_records
    assert all(r.error is None and r.loop_sfu_per_mma is not None for r in large_config_records)  # a loop was read
    failing = [r.name for r in large_config_records if not _PERF_CHECKS[check](r)]
    assert not failing, f"{check} fails on sm_90 for {failing}"
