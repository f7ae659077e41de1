"""The bias-free LayerNorm kernels and LayerNormFunction against the float64 oracle, with torch's as the baseline."""

import os

import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate
from specialization import compiled_variants, unspecialised

from dbrx_fast import reference
from dbrx_fast.kernels import layernorm as kernels
from dbrx_fast.kernels.autotune import forced_config
from dbrx_fast.kernels.layernorm import layernorm_bwd, layernorm_fwd
from dbrx_fast.ops.layernorm import layer_norm

pytestmark = pytest.mark.interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5
# Wider than one 8192-column chunk: the looping path of both kernels.
CHUNKED = kernels.MAX_BLOCK_C + 100


def make_inputs(shape, dtype, device, *, offset=0.0, row_pad=3, requires_grad=False):
    """x whose rows are strided views (a slice of rows row_pad wider, so not 16-element aligned unless row_pad is 0
    and C a multiple of 16), a weight around 1, and an output gradient."""
    n_cols = shape[-1]
    x = (torch.randn(*shape[:-1], n_cols + row_pad, device=device) + offset)[..., :n_cols].to(dtype)
    weight = (1.0 + 0.5 * torch.randn(n_cols, device=device)).to(dtype)
    grad_y = torch.randn(shape, device=device).to(dtype)
    return x.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), grad_y


def oracle_and_stock(x, weight, grad_y):
    """(y, dx, dweight) from float64 autograd of the oracle, and from torch's layer_norm in x's dtype."""
    results = []
    for dt in (torch.float64, x.dtype):
        x_, w_ = (t.detach().to(dt).requires_grad_() for t in (x, weight))
        y = reference.layer_norm(x_, w_, EPS) if dt == torch.float64 else F.layer_norm(x_, x_.shape[-1:], w_, None, EPS)
        y.backward(grad_y.to(dt))
        results.append((y.detach(), x_.grad, w_.grad))
    return results


# (leading shape..., C): C = 64, 100, 6144 and one past a chunk; 1, 3, 10 and 257 rows (several per backward
# program, in uneven blocks); 3-d activations. The rows are strided and unaligned: at C = 6144 the backward loops
# over chunks.
SHAPES = [(1, 64), (3, 100), (257, 64), (1, 3, 6144), (2, 5, CHUNKED)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_oracle(device, dtype, shape):
    x, weight, grad_y = make_inputs(shape, dtype, device, requires_grad=True)

    y = layer_norm(x, weight, EPS)
    y.backward(grad_y)

    (y64, dx64, dw64), (y_stock, dx_stock, dw_stock) = oracle_and_stock(x, weight, grad_y)
    assert y.dtype == x.grad.dtype == weight.grad.dtype == dtype
    assert_accurate(y, y64, y_stock)
    assert_accurate(x.grad, dx64, dx_stock)
    assert_accurate(weight.grad, dw64, dw_stock)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_aligned_rows(device, dtype):
    """Contiguous rows of DBRX's C = 6144: the backward keeps the whole row in registers (the strided rows of the
    test above take its chunk loop)."""
    x, weight, grad_y = make_inputs((2, 3, 6144), dtype, device, row_pad=0, requires_grad=True)
    assert kernels._aligned(6144, x.detach().view(-1, 6144)) and kernels._bwd_meta(6144, True)["ONE_CHUNK"]

    y = layer_norm(x, weight, EPS)
    y.backward(grad_y)

    (y64, dx64, dw64), (y_stock, dx_stock, dw_stock) = oracle_and_stock(x, weight, grad_y)
    assert_accurate(y, y64, y_stock)
    assert_accurate(x.grad, dx64, dx_stock)
    assert_accurate(weight.grad, dw64, dw_stock)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_cols", [100, CHUNKED])
def test_large_mean(device, dtype, n_cols):
    """Rows centred far from zero: the variance about the mean keeps its bits where E[x^2] - mean^2 would not, and
    the corrected mean keeps y to a few float32 ulps, where a plain float32 mean of C values near 300 (and stock's)
    is off by up to ~1e-5 of the row's spread."""
    x, weight, grad_y = make_inputs((3, n_cols), dtype, device, offset=300.0, requires_grad=True)

    y = layer_norm(x, weight, EPS)
    y.backward(grad_y)

    (y64, dx64, dw64), (y_stock, dx_stock, dw_stock) = oracle_and_stock(x, weight, grad_y)
    # In float32 no stock allowance: the round-off bound alone. (16-bit outputs are dominated by their rounding.)
    assert_accurate(y, y64, None if dtype == torch.float32 else y_stock)
    assert_accurate(x.grad, dx64, dx_stock)
    assert_accurate(weight.grad, dw64, dw_stock)


def test_statistics(device):
    """mean and rstd are float32 [N], one per row, for the backward."""
    x, weight, _ = make_inputs((2, 5, 100), torch.bfloat16, device)
    _, mean, rstd = layernorm_fwd(x, weight, EPS)
    x64 = x.double().reshape(-1, 100)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (10,)
    assert_accurate(mean, x64.mean(-1))
    assert_accurate(rstd, torch.rsqrt(x64.var(-1, unbiased=False) + EPS))


def test_rows_that_cannot_be_merged(device):
    """A transposed [S, B, C] view has no single row stride: the launcher copies it, the result is unchanged."""
    x, weight, grad_y = make_inputs((3, 4, 64), torch.float32, device)
    x = x.transpose(0, 1).requires_grad_()
    grad_y = grad_y.transpose(0, 1)

    y = layer_norm(x, weight, EPS)
    y.backward(grad_y)

    (y64, dx64, _), (y_stock, dx_stock, _) = oracle_and_stock(x, weight, grad_y)
    assert y.shape == x.shape
    assert_accurate(y, y64, y_stock)
    assert_accurate(x.grad, dx64, dx_stock)


def test_frozen_weight(device):
    """No weight gradient when the weight does not require one (frozen norms, LoRA)."""
    x, weight, grad_y = make_inputs((3, 100), torch.bfloat16, device)
    x.requires_grad_()
    layer_norm(x, weight, EPS).backward(grad_y)
    assert weight.grad is None
    (_, dx64, _), (_, dx_stock, _) = oracle_and_stock(x, weight, grad_y)
    assert_accurate(x.grad, dx64, dx_stock)


def test_expanded_gradient(device):
    """A gradient from .sum() arrives as an expanded view with zero strides; the Function copies it once."""
    x, weight, _ = make_inputs((3, 100), torch.float32, device, requires_grad=True)
    layer_norm(x, weight, EPS).sum().backward()
    (_, dx64, dw64), (_, dx_stock, dw_stock) = oracle_and_stock(x, weight, torch.ones(3, 100, device=device))
    assert_accurate(x.grad, dx64, dx_stock)
    assert_accurate(weight.grad, dw64, dw_stock)


@pytest.mark.parametrize("n_cols", [100, CHUNKED])
def test_weight_gradient_is_deterministic(device, n_cols):
    """Two backward passes give bitwise the same dweight (a fixed-order reduction, no atomics)."""
    # On a GPU, enough rows for many programs, where float atomics would reorder the sum from run to run.
    n_rows = 33 if INTERPRETED else 4096
    x, weight, grad_y = make_inputs((n_rows, n_cols), torch.bfloat16, device)
    _, mean, rstd = layernorm_fwd(x, weight, EPS)
    runs = [layernorm_bwd(grad_y, x, weight, mean, rstd) for _ in range(2)]
    assert torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][0], runs[1][0])


def test_empty_rows(device):
    x = torch.randn(0, 64, device=device)
    weight = torch.randn(64, device=device)
    y, mean, rstd = layernorm_fwd(x, weight, EPS)
    assert y.shape == (0, 64) and mean.shape == rstd.shape == (0,)
    dx, dweight = layernorm_bwd(x, x, weight, mean, rstd)
    assert dx.shape == (0, 64) and torch.equal(dweight, torch.zeros_like(weight))


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("float64", TypeError, "float64"),
        ("int", TypeError, "float16, bfloat16 or float32"),
        ("int weight", TypeError, "weight must be"),
        ("weight too short", ValueError, r"must be \[C\]"),
        ("2-d weight", ValueError, r"must be \[C\]"),
        ("strided last dim", ValueError, "unit stride"),
        ("empty rows", ValueError, "empty last dimension"),
    ],
)
def test_forward_bad_input_raises(device, case, error, match):
    x = torch.randn(3, 64, device=device)
    weight = torch.randn(64, device=device)
    if case == "float64":
        x = x.double()
    elif case == "int":
        x = x.int()
    elif case == "int weight":
        weight = weight.int()
    elif case == "weight too short":
        weight = weight[:32]
    elif case == "2-d weight":
        weight = weight[None]
    elif case == "strided last dim":
        x = torch.randn(3, 128, device=device)[:, ::2]
    elif case == "empty rows":
        x, weight = x[:, :0], weight[:0]
    with pytest.raises(error, match=match):
        layernorm_fwd(x, weight, EPS)


@pytest.mark.parametrize(
    "case, match",
    [
        ("dy other shape", "dy"),
        ("dy other dtype", "dy"),
        ("mean other length", "mean must be"),
        ("rstd float16", "rstd must be"),
    ],
)
def test_backward_bad_input_raises(device, case, match):
    x, weight, grad_y = make_inputs((3, 64), torch.float32, device)
    _, mean, rstd = layernorm_fwd(x, weight, EPS)
    if case == "dy other shape":
        grad_y = grad_y[:2]
    elif case == "dy other dtype":
        grad_y = grad_y.half()
    elif case == "mean other length":
        mean = mean[:2]
    elif case == "rstd float16":
        rstd = rstd.half()
    with pytest.raises(ValueError, match=match):
        layernorm_bwd(grad_y, x, weight, mean, rstd)


@pytest.mark.gpu
def test_custom_ops_pass_opcheck(device):
    """Schema, fake-tensor and AOT-dispatch checks for torch.compile. GPU only: under the interpreter wrap_triton
    hands back the raw kernel, which cannot run on fake tensors."""
    x, weight, grad_y = make_inputs((2, 3, 6144), torch.bfloat16, device)
    torch.library.opcheck(torch.ops.dbrx_fast.layernorm_fwd.default, (x, weight, EPS))
    _, mean, rstd = layernorm_fwd(x, weight, EPS)
    torch.library.opcheck(torch.ops.dbrx_fast.layernorm_bwd.default, (grad_y, x, weight, mean, rstd))


def test_row_counts_are_not_specialised():
    """The row counts change with every batch and only bound loops: not specialised on (the forward takes its rows
    from the grid)."""
    assert unspecialised(kernels._layernorm_fwd_kernel) == set()
    assert unspecialised(kernels._layernorm_bwd_kernel) == {"n_rows", "rows_per_program"}


@pytest.mark.gpu
def test_new_row_counts_compile_nothing(device):
    """A decode step (one row) and batches of any size share one compiled forward and backward (per config)."""
    fwd, bwd = kernels._layernorm_fwd_kernel, kernels._layernorm_bwd_kernel
    counts = []
    with forced_config(fwd, fwd.all_configs[0]), forced_config(bwd, bwd.all_configs[0]):
        for n_rows in (1, 5, 33, 1000):
            x, weight, grad_y = make_inputs((n_rows, 6144), torch.bfloat16, device, row_pad=0)
            _, mean, rstd = layernorm_fwd(x, weight, EPS)
            layernorm_bwd(grad_y, x, weight, mean, rstd)
            counts.append((compiled_variants(fwd), compiled_variants(bwd)))
    assert counts == counts[:1] * 4
