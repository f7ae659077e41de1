"""The RoPE kernel and RopeFunction against the float64 oracle, with Hugging Face's eager path as the baseline."""

import os

import pytest
import torch
from accuracy import assert_accurate, rel_err
from specialization import compiled_variants, unspecialised
from transformers.models.dbrx.modeling_dbrx import apply_rotary_pos_emb

from dbrx_fast import reference
from dbrx_fast.kernels import rope as rope_module
from dbrx_fast.kernels.autotune import forced_config
from dbrx_fast.kernels.rope import rope as rope_kernel
from dbrx_fast.ops.rope import rope

pytestmark = pytest.mark.interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
THETA = 500000.0


def split_qk(qkv, n_heads_q, n_heads_k, head_dim):
    """q [B, Hq, S, D] and k [B, Hkv, S, D] as DBRX makes them: strided views of the fused qkv [B, S, (Hq+2Hkv)*D]."""
    batch, seq_len, _ = qkv.shape
    q, k, _ = qkv.split([n_heads_q * head_dim, n_heads_k * head_dim, n_heads_k * head_dim], dim=-1)
    q = q.view(batch, seq_len, n_heads_q, head_dim).transpose(1, 2)
    k = k.view(batch, seq_len, n_heads_k, head_dim).transpose(1, 2)
    return q, k


def fused_qk(batch, n_heads_q, n_heads_k, seq_len, head_dim, dtype, device, requires_grad=False):
    """A fresh fused qkv projection output and its q and k views."""
    qkv = torch.randn(batch, seq_len, (n_heads_q + 2 * n_heads_k) * head_dim, dtype=dtype, device=device)
    qkv.requires_grad_(requires_grad)
    return (qkv, *split_qk(qkv, n_heads_q, n_heads_k, head_dim))


def cos_sin(batch, seq_len, head_dim, device, *, first_position=0, per_batch=True):
    """float64 cos/sin [B or 1, S, D] at theta 500000; per batch entry, each row starts at its own position (as
    with left padding)."""
    inv_freq = 1.0 / THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    rows = batch if per_batch else 1
    starts = first_position + torch.randint(0, 50, (rows, 1), device=device) * per_batch
    positions = starts + torch.arange(seq_len, device=device)
    return reference.rope_cos_sin(positions, inv_freq)


# (B, Hq, Hkv, S, D): GQA ratios 6, 1 and 2; one token, ragged S; D = 16, 64, 128.
SHAPES = [(1, 6, 1, 7, 64), (3, 2, 2, 33, 16), (2, 4, 2, 1, 128), (1, 2, 1, 33, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_batch", [True, False], ids=["cos_per_batch", "cos_shared"])
def test_forward_matches_oracle(device, dtype, shape, per_batch):
    batch, n_heads_q, n_heads_k, seq_len, head_dim = shape
    _, q, k = fused_qk(batch, n_heads_q, n_heads_k, seq_len, head_dim, dtype, device)
    cos64, sin64 = cos_sin(batch, seq_len, head_dim, device, per_batch=per_batch)
    cos, sin = cos64.float(), sin64.float()

    q_rot, k_rot = rope_kernel(q, k, cos, sin)

    q_ref, k_ref = reference.rope(q.double(), k.double(), cos.double(), sin.double())
    q_stock, k_stock = apply_rotary_pos_emb(q, k, cos.to(dtype), sin.to(dtype))
    for out, ref, stock in ((q_rot, q_ref, q_stock), (k_rot, k_ref, k_stock)):
        assert out.dtype == dtype and out.is_contiguous()
        assert_accurate(out, ref, stock)


def test_any_float_table_dtype(device):
    """cos/sin are read in their own dtype and upcast: a float64 table gives the same answer as its fp32 rounding
    up to fp32 round-off."""
    _, q, k = fused_qk(2, 4, 2, 7, 64, torch.float32, device)
    cos64, sin64 = cos_sin(2, 7, 64, device)
    q_rot, k_rot = rope_kernel(q, k, cos64, sin64)
    q_ref, k_ref = reference.rope(q.double(), k.double(), cos64, sin64)
    assert_accurate(q_rot, q_ref)
    assert_accurate(k_rot, k_ref)


def test_contiguous_inputs_and_inverse(device):
    """Contiguous q/k (not from a fused projection) work too, and backward=True undoes the forward rotation."""
    q = torch.randn(2, 4, 9, 32, device=device)
    k = torch.randn(2, 2, 9, 32, device=device)
    cos64, sin64 = cos_sin(2, 9, 32, device)
    cos, sin = cos64.float(), sin64.float()
    q_rot, k_rot = rope_kernel(q, k, cos, sin)
    q_back, k_back = rope_kernel(q_rot, k_rot, cos, sin, backward=True)
    assert_accurate(q_back, q.double())
    assert_accurate(k_back, k.double())
    # The forward did rotate: the round trip is not the identity by accident.
    assert rel_err(q_rot, q) > 0.1


def mean_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """mean |out - ref| / mean |ref|: steadier than the max where every element carries one rounding."""
    return ((out.double() - ref).abs().mean() / ref.abs().mean()).item()


def test_long_positions_beat_bf16_tables(device):
    """At theta 500000 and positions near 32k, float32 tables and float32 maths beat the stock path with bf16 tables.

    The kernel's maths is measured on the same bf16 values with float32 outputs (nothing rounds after it); the bf16
    outputs add one rounding, which the interpreter makes a truncation, as costly on its own as stock's roundings.
    """
    batch, n_heads_q, n_heads_k, seq_len, head_dim = 1, 2, 1, 16, 128
    _, q, k = fused_qk(batch, n_heads_q, n_heads_k, seq_len, head_dim, torch.bfloat16, device)
    cos64, sin64 = cos_sin(batch, seq_len, head_dim, device, first_position=32768 - 64)
    q_ref, k_ref = reference.rope(q.double(), k.double(), cos64, sin64)
    q_stock, k_stock = apply_rotary_pos_emb(q, k, cos64.to(torch.bfloat16), sin64.to(torch.bfloat16))

    q32, k32 = rope_kernel(q.float(), k.float(), cos64.float(), sin64.float())
    q16, k16 = rope_kernel(q, k, cos64.float(), sin64.float())
    rounding_allowance = 1.5 if INTERPRETED else 0.75
    for ref, stock, out32, out16 in ((q_ref, q_stock, q32, q16), (k_ref, k_stock, k32, k16)):
        stock_err = mean_rel_err(stock, ref)
        assert mean_rel_err(out32, ref) < 1e-3 * stock_err, (mean_rel_err(out32, ref), stock_err)
        assert mean_rel_err(out16, ref) < rounding_allowance * stock_err, (mean_rel_err(out16, ref), stock_err)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 6, 1, 7, 64), (3, 2, 2, 33, 16)], ids=str)
def test_backward_matches_oracle(device, dtype, shape):
    batch, n_heads_q, n_heads_k, seq_len, head_dim = shape
    qkv, q, k = fused_qk(batch, n_heads_q, n_heads_k, seq_len, head_dim, dtype, device, requires_grad=True)
    cos64, sin64 = cos_sin(batch, seq_len, head_dim, device, per_batch=batch > 1)
    cos, sin = cos64.float(), sin64.float()
    grad_q = torch.randn(q.shape, dtype=dtype, device=device)
    grad_k = torch.randn(k.shape, dtype=dtype, device=device)

    q_rot, k_rot = rope(q, k, cos, sin)
    torch.autograd.backward((q_rot, k_rot), (grad_q, grad_k))

    def grad_of(fn, dt):
        leaf = qkv.detach().to(dt).requires_grad_()
        out_q, out_k = fn(*split_qk(leaf, n_heads_q, n_heads_k, head_dim), cos.to(dt), sin.to(dt))
        torch.autograd.backward((out_q, out_k), (grad_q.to(dt), grad_k.to(dt)))
        return leaf.grad

    grad_ref = grad_of(reference.rope, torch.float64)
    grad_stock = grad_of(apply_rotary_pos_emb, dtype)
    assert qkv.grad.dtype == dtype
    assert_accurate(qkv.grad, grad_ref, grad_stock)


def test_backward_with_expanded_gradient(device):
    """A gradient from .sum() arrives as an expanded view with zero strides; the Function copies it once."""
    qkv, q, k = fused_qk(2, 2, 1, 5, 32, torch.float32, device, requires_grad=True)
    cos64, sin64 = cos_sin(2, 5, 32, device)
    q_rot, k_rot = rope(q, k, cos64.float(), sin64.float())
    (q_rot.sum() + k_rot.sum()).backward()

    qkv64 = qkv.detach().double().requires_grad_()
    q_ref, k_ref = reference.rope(*split_qk(qkv64, 2, 1, 32), cos64, sin64)
    (q_ref.sum() + k_ref.sum()).backward()
    assert_accurate(qkv.grad, qkv64.grad)


def _bad_inputs(device):
    q = torch.randn(2, 4, 5, 16, device=device)
    k = torch.randn(2, 2, 5, 16, device=device)
    cos = torch.randn(2, 5, 16, device=device)
    return q, k, cos, cos.clone()


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("float64", TypeError, "float64"),
        ("int", TypeError, "float16, bfloat16 or float32"),
        ("mixed dtypes", TypeError, "share a dtype"),
        ("int cos", TypeError, "floating"),
        ("odd D", ValueError, "power of two"),
        ("non power of two D", ValueError, "power of two"),
        ("D too large", ValueError, "power of two"),
        ("3-d q", ValueError, r"\[B, H, S, D\]"),
        ("k other S", ValueError, "share B, S and D"),
        ("k other B", ValueError, "share B, S and D"),
        ("cos other S", ValueError, "cos must be"),
        ("cos other batch", ValueError, "cos must be"),
        ("sin other D", ValueError, "sin must be"),
        ("strided last dim", ValueError, "unit stride"),
    ],
)
def test_bad_input_raises(device, case, error, match):
    q, k, cos, sin = _bad_inputs(device)
    if case == "float64":
        q, k = q.double(), k.double()
    elif case == "int":
        q, k = q.int(), k.int()
    elif case == "mixed dtypes":
        k = k.half()
    elif case == "int cos":
        cos = cos.int()
    elif case == "odd D":
        q, k, cos, sin = q[..., :7], k[..., :7], cos[..., :7], sin[..., :7]
    elif case == "non power of two D":
        q, k, cos, sin = (torch.randn(*t.shape[:-1], 12, device=device) for t in (q, k, cos, sin))
    elif case == "D too large":
        q, k, cos, sin = (torch.randn(*t.shape[:-1], 512, device=device) for t in (q, k, cos, sin))
    elif case == "3-d q":
        q = q[0]
    elif case == "k other S":
        k = k[:, :, :4]
    elif case == "k other B":
        k = k[:1]
    elif case == "cos other S":
        cos = cos[:, :4]
    elif case == "cos other batch":
        cos = torch.cat((cos, cos[:1]))
    elif case == "sin other D":
        sin = sin[..., :8]
    elif case == "strided last dim":
        q = torch.randn(2, 4, 5, 32, device=device)[..., ::2]
    with pytest.raises(error, match=match):
        rope_kernel(q, k, cos, sin)


@pytest.mark.gpu
def test_custom_op_passes_opcheck(device):
    """Schema, fake-tensor and AOT-dispatch checks for torch.compile. GPU only: under the interpreter wrap_triton
    hands back the raw kernel, which cannot run on fake tensors."""
    _, q, k = fused_qk(2, 6, 1, 33, 128, torch.bfloat16, device)
    cos64, sin64 = cos_sin(2, 33, 128, device, per_batch=False)
    for backward in (False, True):
        torch.library.opcheck(
            torch.ops.dbrx_fast.rope.default, (q, k, cos64.float(), sin64.float()), {"backward": backward}
        )


def test_seq_len_is_not_specialised():
    """seq_len changes at every generation step and only bounds a mask: not specialised on (the strides are, and
    keep their divisibility by 16 at any length)."""
    assert unspecialised(rope_module._rope_kernel) == {"seq_len"}


@pytest.mark.gpu
def test_new_lengths_compile_nothing(device):
    """A decode step (S = 1) and prompts of any length share one compiled kernel (per autotune config)."""
    tuner = rope_module._rope_kernel
    counts = []
    with forced_config(tuner, tuner.all_configs[0]):
        for seq_len in (1, 7, 33, 100):
            _, q, k = fused_qk(2, 6, 1, seq_len, 128, torch.bfloat16, device)
            cos64, sin64 = cos_sin(2, seq_len, 128, device)
            rope_kernel(q, k, cos64.float(), sin64.float())
            counts.append(compiled_variants(tuner))
    assert counts == counts[:1] * 4
