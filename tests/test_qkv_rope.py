"""The fused QKV post-processing (clamp, split, RoPE) against the float64 oracle, with stock's ops as the baseline."""

import os

import program_order
import pytest
import torch
from accuracy import assert_accurate
from program_order import STATE
from specialization import compiled_variants, unspecialised
from transformers.cache_utils import StaticLayer
from transformers.models.dbrx.modeling_dbrx import apply_rotary_pos_emb

from dbrx_fast import reference
from dbrx_fast.kernels import qkv_rope as qkv_rope_module
from dbrx_fast.kernels.autotune import forced_config
from dbrx_fast.ops.qkv import qkv_rope

pytestmark = pytest.mark.interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
THETA = 500000.0
CLIP = 0.75  # exact in every dtype, so the float64 oracle clamps at the same bound as the kernel and stock


def make_qkv(batch, seq_len, n_heads_q, n_heads_kv, head_dim, dtype, device, *, clip=None, strided=False):
    """A fresh fused projection output [B, S, (Hq + 2*Hkv) * D]; with `clip`, a tenth of it exactly on +-clip (where
    the clamp's gradient still passes); `strided`: a column slice of a wider tensor, as a view."""
    width = (n_heads_q + 2 * n_heads_kv) * head_dim
    pad = 3 * head_dim if strided else 0
    qkv = torch.randn(batch, seq_len, width + pad, dtype=dtype, device=device)[..., pad // 3 : pad // 3 + width]
    if clip is not None:
        on_bound = torch.rand(qkv.shape, device=device) < 0.1
        qkv[on_bound] = (clip * torch.sign(qkv[on_bound])).to(dtype)
    return qkv


def cos_sin(batch, seq_len, head_dim, device, *, first_position=0, per_batch=True):
    """float64 cos/sin [B or 1, S, D] at theta 500000; each batch row starts at its own position (as with padding)."""
    inv_freq = 1.0 / THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    rows = batch if per_batch else 1
    starts = first_position + torch.randint(0, 50, (rows, 1), device=device) * per_batch
    return reference.rope_cos_sin(starts + torch.arange(seq_len, device=device), inv_freq)


def split_heads(qkv, n_heads_q, n_heads_kv, clip):
    """Stock's clamp, split and transposes: strided views [B, H, S, D]."""
    batch, seq_len, width = qkv.shape
    head_dim = width // (n_heads_q + 2 * n_heads_kv)
    if clip is not None:
        qkv = qkv.clamp(min=-clip, max=clip)
    parts = qkv.split([n_heads_q * head_dim, n_heads_kv * head_dim, n_heads_kv * head_dim], dim=-1)
    return [t.view(batch, seq_len, -1, head_dim).transpose(1, 2) for t in parts]


def oracle(qkv, cos, sin, clip, n_heads_q, n_heads_kv):
    """float64: clamp, split, reference.rope."""
    q, k, v = split_heads(qkv.double(), n_heads_q, n_heads_kv, clip)
    return (*reference.rope(q, k, cos.double(), sin.double()), v)


def stock(qkv, cos, sin, clip, n_heads_q, n_heads_kv):
    """What stock DBRX runs, in qkv's dtype, with cos/sin cast to it as stock does."""
    q, k, v = split_heads(qkv, n_heads_q, n_heads_kv, clip)
    return (*apply_rotary_pos_emb(q, k, cos.to(qkv.dtype), sin.to(qkv.dtype)), v)


def grads_of(fn, qkv, grads, *args):
    leaf = qkv.detach().requires_grad_()
    torch.autograd.backward(fn(leaf, *args), [g.to(qkv.dtype) for g in grads])
    return leaf.grad


# (B, S, Hq, Hkv, D) and clip_qkv: MQA with GQA ratio 6, GQA 2, MHA; one token; ragged S; with and without a clamp.
CASES = [((2, 17, 6, 1, 64), CLIP), ((1, 33, 4, 2, 128), None), ((3, 5, 2, 2, 64), CLIP), ((1, 1, 6, 1, 128), None)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, clip", CASES, ids=str)
def test_forward_and_backward_match_oracle(device, dtype, shape, clip):
    batch, seq_len, n_heads_q, n_heads_kv, head_dim = shape
    # Every other case: a strided view of qkv, positions from 1000 on, one cos/sin shared by the batch.
    odd = ([c[0] for c in CASES].index(shape) + DTYPES.index(dtype)) % 2 == 1
    qkv = make_qkv(batch, seq_len, n_heads_q, n_heads_kv, head_dim, dtype, device, clip=clip, strided=odd)
    cos64, sin64 = cos_sin(batch, seq_len, head_dim, device, first_position=1000 * odd, per_batch=not odd)
    cos, sin = cos64.float(), sin64.float()
    heads = (n_heads_q, n_heads_kv)

    leaf = qkv.detach().requires_grad_()
    outs = qkv_rope(leaf, cos, sin, clip, *heads)
    refs = oracle(qkv, cos64, sin64, clip, *heads)
    baselines = stock(qkv, cos, sin, clip, *heads)
    for name, out, ref, base in zip("qkv", outs, refs, baselines, strict=True):
        assert out.dtype == dtype and out.is_contiguous(), name
        assert_accurate(out, ref, base, what=name)

    grads = [torch.randn(t.shape, dtype=dtype, device=device) for t in outs]
    torch.autograd.backward(outs, grads)
    grad_ref = grads_of(oracle, qkv.double(), [g.double() for g in grads], cos64, sin64, clip, *heads)
    grad_stock = grads_of(stock, qkv, grads, cos, sin, clip, *heads)
    assert leaf.grad.dtype == dtype
    assert_accurate(leaf.grad, grad_ref, grad_stock, what="dqkv")
    if clip is not None:  # the clamp did clamp, and its gradient is zero exactly where stock's is
        assert (qkv.abs() > clip).float().mean() > 0.2
        assert (leaf.grad[qkv.abs() > clip] == 0).all() and (leaf.grad[qkv.abs() == clip] != 0).float().mean() > 0.9


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clamp_matches_torch_exactly(device, dtype):
    """A bound not representable in the dtype (0.3): torch.clamp compares with it rounded to the dtype, the kernel
    too, so v (not rotated) and its gradient equal stock's bit for bit, values on the rounded bound, just beyond it,
    and NaN included (kept by the clamp, no gradient)."""
    clip, n_heads_q, n_heads_kv, head_dim = 0.3, 2, 1, 16
    qkv = make_qkv(2, 7, n_heads_q, n_heads_kv, head_dim, dtype, device)
    bound = torch.tensor(clip, dtype=dtype)
    beyond = torch.nextafter(bound, torch.tensor(1.0, dtype=dtype)) if dtype != torch.bfloat16 else 0.3046875
    v_cols = qkv[..., (n_heads_q + n_heads_kv) * head_dim :]
    v_cols[0, :, :3] = torch.tensor([bound.item(), -bound.item(), float(beyond)], dtype=dtype)
    v_cols[1, 2, 5] = float("nan")
    cos64, sin64 = cos_sin(2, 7, head_dim, device)

    leaf = qkv.detach().requires_grad_()
    _, _, v = qkv_rope(leaf, cos64.float(), sin64.float(), clip, n_heads_q, n_heads_kv)
    grad_v = torch.randn(v.shape, dtype=dtype, device=device)
    v.backward(grad_v)
    stock_leaf = qkv.detach().requires_grad_()
    _, _, v_stock = stock(stock_leaf, cos64, sin64, clip, n_heads_q, n_heads_kv)
    v_stock.backward(grad_v)

    assert torch.equal(v.isnan(), v_stock.isnan()) and v.isnan().sum() == 1
    assert torch.equal(v.nan_to_num(), v_stock.nan_to_num())
    assert torch.equal(leaf.grad, stock_leaf.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seq_len, start", [(1, 9), (5, 3)], ids=["decode", "chunk"])
def test_cache_write(device, dtype, seq_len, start):
    """k and v go straight into a transformers StaticLayer's storage (here strided views) at cache_position, as its
    update would put them; the rest of the storage (garbage) stays untouched, a row past the cache is dropped, and q
    is the same as without a cache."""
    batch, n_heads_q, n_heads_kv, head_dim, cache_len = 2, 6, 1, 64, 12
    heads = (n_heads_q, n_heads_kv)
    qkv = make_qkv(batch, seq_len, *heads, head_dim, dtype, device, clip=CLIP)
    cos64, sin64 = cos_sin(batch, seq_len, head_dim, device, first_position=start)
    cos, sin = cos64.float(), sin64.float()
    q_ref, k_ref, v_ref = qkv_rope(qkv, cos, sin, CLIP, *heads)

    layer, expected = StaticLayer(cache_len), StaticLayer(cache_len)
    for cache in (layer, expected):
        cache.lazy_initialization(k_ref, v_ref)
    # The kernel's storage: garbage, and views of one row more per head, whose extra row must stay untouched too.
    guarded = [torch.randn(batch, n_heads_kv, cache_len + 1, head_dim, dtype=dtype, device=device) for _ in "kv"]
    layer.keys, layer.values = (t[:, :, :cache_len] for t in guarded)
    expected.keys, expected.values = (t.clone() for t in guarded)
    guards = [t[:, :, cache_len].clone() for t in guarded]
    expected.keys, expected.values = (t[:, :, :cache_len] for t in (expected.keys, expected.values))
    expected.cumulative_length.fill_(start)  # as if `start` tokens were cached already
    expected.update(k_ref, v_ref)
    # The last row of a chunk aimed one past the cache: dropped, nothing written out of bounds.
    positions = torch.arange(start, start + seq_len, device=device, dtype=torch.int32)
    if seq_len > 1:
        positions[-1] = cache_len
        expected.keys[:, :, start + seq_len - 1] = layer.keys[:, :, start + seq_len - 1]
        expected.values[:, :, start + seq_len - 1] = layer.values[:, :, start + seq_len - 1]
    with torch.no_grad():
        q, k, v = qkv_rope(
            qkv, cos, sin, CLIP, *heads, k_cache=layer.keys, v_cache=layer.values, cache_position=positions
        )
    assert k is layer.keys and v is layer.values
    assert torch.equal(q, q_ref)
    assert torch.equal(layer.keys, expected.keys) and torch.equal(layer.values, expected.values)
    assert all(torch.equal(t[:, :, cache_len], guard) for t, guard in zip(guarded, guards, strict=True))


def test_cache_write_refuses_autograd(device):
    qkv = make_qkv(1, 2, 2, 1, 16, torch.float32, device).requires_grad_()
    cos64, sin64 = cos_sin(1, 2, 16, device)
    cache = torch.zeros(1, 1, 4, 16, device=device)
    with pytest.raises(ValueError, match="inference"):
        qkv_rope(qkv, cos64.float(), sin64.float(), None, 2, 1, k_cache=cache, v_cache=cache.clone(),
                 cache_position=torch.arange(2, device=device))  # fmt: skip
    with pytest.raises(ValueError, match="together"):
        qkv_rope(qkv, cos64.float(), sin64.float(), None, 2, 1, k_cache=cache)


def _bad_inputs(device):
    return make_qkv(2, 5, 2, 1, 16, torch.float32, device), torch.randn(2, 5, 16, device=device)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("float64", TypeError, "float64"),
        ("int", TypeError, "float16, bfloat16 or float32"),
        ("width", ValueError, r"\(Hq \+ 2\*Hkv\) \* D"),
        ("D not a power of two", ValueError, "power of two"),
        ("2-d qkv", ValueError, r"\[B, S, \(Hq"),
        ("strided last dim", ValueError, "unit stride"),
        ("cos other S", ValueError, "cos must be"),
        ("negative clip", ValueError, "clip_qkv"),
        ("cache dtype", TypeError, "k_cache"),
        ("cache heads", ValueError, "k_cache must be"),
        ("cache_position float", ValueError, "cache_position"),
    ],
)
def test_bad_input_raises(device, case, error, match):
    qkv, cos = _bad_inputs(device)
    heads, clip, cache = (2, 1), None, {}
    if case == "float64":
        qkv = qkv.double()
    elif case == "int":
        qkv = qkv.int()
    elif case == "width":
        qkv = qkv[..., :-1]
    elif case == "D not a power of two":
        qkv, cos = torch.randn(2, 5, 4 * 12, device=device), cos[..., :12]
    elif case == "2-d qkv":
        qkv = qkv[0]
    elif case == "strided last dim":
        qkv = torch.randn(2, 5, 128, device=device)[..., ::2]
    elif case == "cos other S":
        cos = cos[:, :4]
    elif case == "negative clip":
        clip = -1.0
    elif case.startswith("cache"):
        k_cache = torch.zeros(2, 1, 8, 16, device=device)
        positions = torch.arange(5, device=device)
        if case == "cache dtype":
            k_cache = k_cache.half()
        elif case == "cache heads":
            k_cache = torch.zeros(2, 2, 8, 16, device=device)
        else:
            positions = positions.float()
        cache = {"k_cache": k_cache, "v_cache": torch.zeros(2, 1, 8, 16, device=device), "cache_position": positions}
    with pytest.raises(error, match=match), torch.no_grad():
        qkv_rope(qkv, cos, cos.clone(), clip, *heads, **cache)


@pytest.mark.skipif(not INTERPRETED, reason="the program-order check patches Triton's interpreter")
def test_program_order_and_determinism(device, monkeypatch):
    """Forward, cache write and backward give the same bits with programs shuffled, and no program touches what
    another writes (race check); the gradient is bitwise the same on every run."""
    heads, head_dim = (6, 1), 16
    qkv = make_qkv(2, 19, *heads, head_dim, torch.bfloat16, device, clip=CLIP, strided=True)
    cos64, sin64 = cos_sin(2, 19, head_dim, device)
    cos, sin = cos64.float(), sin64.float()
    grads = [torch.randn(2, h, 19, head_dim, dtype=torch.bfloat16, device=device) for h in (6, 1, 1)]

    def run():
        leaf = qkv.detach().requires_grad_()
        outs = qkv_rope(leaf, cos, sin, CLIP, *heads)
        torch.autograd.backward(outs, grads)
        k_cache, v_cache = torch.zeros(2, 2, 1, 50, head_dim, dtype=torch.bfloat16, device=device)
        with torch.no_grad():
            qkv_rope(qkv, cos, sin, CLIP, *heads, k_cache=k_cache, v_cache=v_cache,
                     cache_position=torch.arange(10, 29, device=device))  # fmt: skip
        return [*outs, leaf.grad, k_cache, v_cache]

    program_order.install(STATE.order, STATE.race_check)
    monkeypatch.setattr(STATE, "order", "sequential")
    monkeypatch.setattr(STATE, "race_check", False)
    first = run()
    monkeypatch.setattr(STATE, "order", "shuffled")
    monkeypatch.setattr(STATE, "race_check", True)
    for got, want in zip(run(), first, strict=True):
        assert torch.equal(got, want)


def test_seq_len_is_not_specialised():
    """seq_len changes at every generation step and only bounds a mask: not specialised on."""
    assert unspecialised(qkv_rope_module._qkv_rope_kernel) == {"seq_len"}


@pytest.mark.gpu
def test_custom_ops_pass_opcheck(device):
    """Schema, fake-tensor and AOT-dispatch checks for torch.compile (GPU only, as for the rope op)."""
    qkv = make_qkv(2, 33, 6, 1, 128, torch.bfloat16, device)
    cos64, sin64 = cos_sin(2, 33, 128, device, per_batch=False)
    cos, sin = cos64.float(), sin64.float()
    torch.library.opcheck(torch.ops.dbrx_fast.qkv_rope_fwd.default, (qkv, cos, sin, CLIP, 6, 1))
    q, k, v = qkv_rope_module.qkv_rope_fwd(qkv, cos, sin, CLIP, 6, 1)
    torch.library.opcheck(torch.ops.dbrx_fast.qkv_rope_bwd.default, (q, k, v, qkv, cos, sin, CLIP))
    caches = [torch.zeros(2, 1, 40, 128, dtype=torch.bfloat16, device=device) for _ in range(2)]
    positions = torch.arange(3, 36, device=device)
    torch.library.opcheck(
        torch.ops.dbrx_fast.qkv_rope_fwd_into_cache.default, (qkv, cos, sin, CLIP, 6, 1, *caches, positions)
    )


@pytest.mark.gpu
def test_new_lengths_compile_nothing(device):
    """A decode step (S = 1) and prompts of any length share one compiled kernel (per autotune config)."""
    tuner = qkv_rope_module._qkv_rope_kernel
    counts = []
    with forced_config(tuner, tuner.all_configs[0]):
        for seq_len in (1, 7, 33, 100):
            qkv = make_qkv(2, seq_len, 6, 1, 128, torch.bfloat16, device)
            cos64, sin64 = cos_sin(2, seq_len, 128, device)
            qkv_rope(qkv, cos64.float(), sin64.float(), CLIP, 6, 1)
            counts.append(compiled_variants(tuner))
    assert counts == counts[:1] * 4
