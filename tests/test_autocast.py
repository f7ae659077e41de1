"""Autocast: a patched model runs its fast paths under torch.autocast, in autocast's dtypes, and trains.

Stock DBRX cannot run under autocast at all (its expert loop index_add_s the bf16 expert outputs into an fp32 buffer),
so the baseline is the same model cast wholly to the autocast dtype and patched (stock cast to bf16 takes its router
softmax in bf16 and may choose other experts). The oracle is the fp32 model's weights in float64, without autocast.
Logits, loss and every parameter gradient under autocast must be within about twice the baseline's error (plus fp32
round-off), and no dbrx_fast warning may be raised: a fallback to the stock path would say so.
"""

import copy
import importlib
import os

import pytest
import torch
from accuracy import EPS, assert_accurate, rel_err
from models import tiny_config, tiny_model

import dbrx_fast

pytestmark = pytest.mark.filterwarnings("error:dbrx_fast")

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
# GQA ratio 4; every token on every expert (k = E), with L1 normalisation of the weights: with a choice of experts,
# near-ties in a tiny random model pick other experts in bf16 than in float64 in some layers, and the comparison would
# measure that discontinuity instead of the arithmetic (the kernel and parity tests cover top-k choices).
CONFIG = dict(n_heads=8, kv_n_heads=2, experts=4, top_k=4, clip_qkv=8.0, normalize=1.0)
AUTOCASTS = [
    pytest.param("cpu", torch.bfloat16, "torch", id="cpu-bfloat16-torch"),
    pytest.param("cpu", torch.bfloat16, "triton", marks=pytest.mark.interpreter, id="cpu-bfloat16-triton"),
    pytest.param("cuda", torch.bfloat16, "triton", marks=pytest.mark.gpu, id="cuda-bfloat16-triton"),
    pytest.param("cuda", torch.float16, "triton", marks=pytest.mark.gpu, id="cuda-float16-triton"),
]


def skip_cpu_kernels_without_the_interpreter(device: str, backend: str) -> None:
    if device == "cpu" and backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels run on the CPU only under the interpreter, which a GPU machine leaves off")


def run(model, ids, autocast_dtype=None):
    """(logits, loss, {name: grad}) of one training step, under autocast when autocast_dtype is given."""
    device = ids.device.type
    with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits, out.loss.reshape(1), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("device, dtype, backend", AUTOCASTS)
def test_logits_loss_and_every_gradient_against_the_all_low_precision_model(device, dtype, backend):
    skip_cpu_kernels_without_the_interpreter(device, backend)
    model = tiny_model(tiny_config(**CONFIG)).to(device)
    oracle = copy.deepcopy(model).double()
    patched = dbrx_fast.patch(copy.deepcopy(model), backend=backend)
    baseline = dbrx_fast.patch(copy.deepcopy(model).to(dtype), backend=backend)
    ids = torch.randint(0, 97, (2, 13), device=device)

    logits, loss, grads = run(patched, ids, dtype)
    base_logits, base_loss, base_grads = run(baseline, ids)
    ref_logits, ref_loss, ref_grads = run(oracle, ids)

    assert logits.dtype == dtype  # lm_head is a linear: autocast's
    assert_accurate(logits.float(), ref_logits, base_logits, what="logits")
    # A scalar: the baseline's round-off can cancel by luck, so the loss also gets one rounding in the autocast dtype.
    assert rel_err(loss, ref_loss) <= 2 * rel_err(base_loss, ref_loss) + EPS[dtype], "loss"
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == torch.float32, f"{name}: {None if grad is None else grad.dtype}"
        floor = scale if ref_grads[name].abs().max() < 1e-9 * scale else 1e-30
        assert_accurate(grad, ref_grads[name], base_grads[name], floor=floor, what=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linears_stay_autocasts_and_the_experts_run_in_its_dtype(backend, monkeypatch):
    """Forward hooks see what autocast made of the linears; a spy on the experts' GEMM step sees its inputs, which
    also proves that the fast path ran (stock's loop never calls it)."""
    skip_cpu_kernels_without_the_interpreter("cpu", backend)
    model = dbrx_fast.patch(tiny_model(tiny_config(**CONFIG)), backend=backend)
    seen = {}

    def record(name):
        return lambda module, args, out: seen.setdefault(name, set()).add(out.dtype)

    block = model.transformer.blocks[0]
    hooks = [
        block.norm_attn_norm.attn.Wqkv.register_forward_hook(record("Wqkv")),
        block.norm_attn_norm.attn.out_proj.register_forward_hook(record("out_proj")),
        block.ffn.router.layer.register_forward_hook(record("router")),
        block.ffn.experts.register_forward_hook(record("experts")),
        block.norm_attn_norm.norm_1.register_forward_hook(record("norm_1")),
    ]
    impl = importlib.import_module("dbrx_fast.ops.moe" if backend == "triton" else "dbrx_fast.moe_torch")
    expert_outputs = impl.expert_outputs

    def spy(x, w1, *args):
        seen.setdefault("expert GEMM inputs", set()).update({x.dtype, w1.dtype})
        return expert_outputs(x, w1, *args)

    monkeypatch.setattr(impl, "expert_outputs", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 97, (2, 9)))
    for hook in hooks:
        hook.remove()
    bf16, fp32 = {torch.bfloat16}, {torch.float32}
    # The CPU's autocast has no rule for layer_norm, which then runs in its input's dtype: the fp32 residual stream.
    assert seen == {
        "Wqkv": bf16,
        "out_proj": bf16,
        "router": bf16,
        "experts": bf16,
        "expert GEMM inputs": bf16,
        "norm_1": fp32,
    }


def test_stock_dbrx_raises_under_autocast():
    """What the README says: stock fails here, dbrx-fast does not (the tests above)."""
    model = tiny_model(tiny_config(**CONFIG))
    with pytest.raises(RuntimeError, match="index_add_"), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 97, (1, 5)))
