"""The experts seam: the patched FFN calls `ffn.experts`, which reads its own parameters after its forward pre-hooks
(as FSDP2 and accelerate need), and its three steps (dispatch, expert GEMMs, combine) compose and differentiate
separately, so that an all-to-all can later sit between them."""

import copy

import pytest
import torch
import torch.distributed as dist
from accuracy import assert_accurate
from models import tiny_config, tiny_model
from torch import nn

import dbrx_fast
from dbrx_fast import moe_torch, reference

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
CONFIG = dict(n_heads=4, kv_n_heads=2, experts=8, top_k=2)


def experts_of(model):
    return [block.ffn.experts for block in model.transformer.blocks]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_on_the_experts_fire_once_per_forward_as_on_stock(backend, device):
    stock = tiny_model(tiny_config(**CONFIG)).to(device)
    patched = dbrx_fast.patch(copy.deepcopy(stock), backend=backend)
    ids = torch.randint(0, 97, (2, 7), device=device)
    counts = {}
    for name, model in (("stock", stock), ("patched", patched)):
        calls = counts[name] = []
        for layer, experts in enumerate(experts_of(model)):
            experts.register_forward_pre_hook(
                lambda module, args, layer=layer, calls=calls: calls.append(("pre", layer))
            )
            experts.register_forward_hook(
                lambda module, args, out, layer=layer, calls=calls: calls.append(("post", layer))
            )
        model(ids, labels=ids).loss.backward()
        model(ids)
    layers = range(stock.config.n_layers)
    assert counts["patched"] == counts["stock"] == [(when, n) for n in layers for when in ("pre", "post")] * 2


class Unshard:
    """FSDP2's pattern, by hand: between forwards the experts hold placeholders (empty "shards"); a pre-hook puts the
    full parameters in, a post-hook takes them out. Reading the weights anywhere but inside the experts' forward
    fails on the placeholders."""

    def __init__(self, experts: nn.Module):
        self.full = {name: getattr(experts.mlp, name) for name in ("w1", "v1", "w2")}
        self._set(experts, {name: nn.Parameter(torch.empty(0)) for name in self.full})
        experts.register_forward_pre_hook(lambda module, args: self._set(module, self.full))
        experts.register_forward_hook(lambda module, args, out: self._set(module, self.placeholders))

    def _set(self, experts, params):
        self.placeholders = {name: getattr(experts.mlp, name) for name in self.full}
        for name, p in params.items():
            setattr(experts.mlp, name, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_experts_read_their_parameters_after_their_pre_hooks(backend, device):
    stock = tiny_model(tiny_config(**CONFIG)).to(device)
    patched = dbrx_fast.patch(copy.deepcopy(stock), backend=backend)
    unshards = [Unshard(experts) for experts in experts_of(patched)]
    ids = torch.randint(0, 97, (2, 7), device=device)
    out, base = patched(ids, labels=ids), stock(ids, labels=ids)
    out.loss.backward()
    base.loss.backward()
    torch.testing.assert_close(out.logits, base.logits, rtol=1e-4, atol=1e-5)
    for unshard, experts in zip(unshards, experts_of(stock), strict=True):
        for name, p in unshard.full.items():
            # The gradient reached the parameters the pre-hook put in.
            torch.testing.assert_close(p.grad, getattr(experts.mlp, name).grad, rtol=1e-3, atol=1e-6)


@pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")  # the experts return a view, as stock's do
def test_fully_shard_on_the_experts(tmp_path):
    """FSDP2 on the experts of a patched model (one process, gloo, on the CPU): it unshards in the experts' pre-hook,
    and the patched model matches stock."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    stock = tiny_model(tiny_config(**CONFIG))
    patched = dbrx_fast.patch(copy.deepcopy(stock), backend="torch")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for experts in experts_of(patched):
            fully_shard(experts, mesh=mesh)
        ids = torch.randint(0, 97, (2, 7))
        out, base = patched(ids, labels=ids), stock(ids, labels=ids)
        out.loss.backward()
        base.loss.backward()
        torch.testing.assert_close(out.logits, base.logits, rtol=1e-4, atol=1e-5)
        for ours, theirs in zip(experts_of(patched), experts_of(stock), strict=True):
            torch.testing.assert_close(ours.mlp.w1.grad.full_tensor(), theirs.mlp.w1.grad, rtol=1e-3, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_called_with_stocks_arguments_match_stock(backend, device):
    """Called from outside (no dispatch metadata: it is computed from the ids), with stock's argument types."""
    model = tiny_model(tiny_config(**CONFIG)).to(device)
    stock = model.transformer.blocks[0].ffn.experts
    patched = experts_of(dbrx_fast.patch(copy.deepcopy(model), backend=backend))[0]
    hidden = torch.randn(2, 5, model.config.d_model, device=device)
    ids = torch.rand(10, 8, device=device).argsort(-1)[:, :2]
    weights = torch.rand(10, 2, device=device)
    torch.testing.assert_close(patched(hidden, ids, weights), stock(hidden, ids, weights), rtol=1e-4, atol=1e-5)


def _problem(device, tokens=11, experts=4, top_k=2, hidden=32, ffn=24):
    x = torch.randn(tokens, hidden, device=device)
    w1, v1, w2 = (torch.randn(experts * ffn, hidden, device=device) / hidden**0.5 for _ in range(3))
    ids = torch.rand(tokens, experts, device=device).argsort(-1)[:, :top_k]
    weights = torch.rand(tokens, top_k, device=device) + 0.1
    return [x, w1, v1, w2, weights], ids, experts


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_expert_outputs_take_a_per_slot_gradient(impl, device):
    """The GEMM step's backward under a gradient that is not the combine's broadcast (what an all-to-all between the
    GEMMs and the combine hands back), against the float64 torch step (itself checked against the reference through
    the combine in test_moe_torch.py)."""
    step = moe_torch if impl == "torch" else pytest.importorskip("dbrx_fast.ops.moe")
    inputs, ids, experts = _problem(device)
    sorted_slots, expert_offsets = reference.dispatch(ids, experts)
    leaves = [t.clone().requires_grad_() for t in inputs]
    leaves64 = [t.double().requires_grad_() for t in inputs]
    y = step.expert_outputs(*leaves, sorted_slots, expert_offsets)
    y64 = moe_torch.expert_outputs(*leaves64, sorted_slots, expert_offsets)
    assert y.shape == (11, 2, 32)
    assert_accurate(y, y64, what="y")
    grad_y = torch.randn(y.shape, dtype=torch.float64, device=device)  # every slot its own gradient
    grads = torch.autograd.grad(y, leaves, grad_y.to(y.dtype))
    grads64 = torch.autograd.grad(y64, leaves64, grad_y)
    for name, grad, grad64 in zip(("x", "w1", "v1", "w2", "weights"), grads, grads64, strict=True):
        assert_accurate(grad, grad64, what=name)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_the_three_steps_make_the_reference(impl, device):
    step = moe_torch if impl == "torch" else pytest.importorskip("dbrx_fast.ops.moe")
    inputs, ids, experts = _problem(device)
    out = step.combine(step.expert_outputs(*inputs, *reference.dispatch(ids, experts)), torch.float32)
    ref = reference.moe_experts_by_ids(*(t.double() for t in inputs), ids, experts)
    assert_accurate(out, ref)
