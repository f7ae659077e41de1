"""Every kernel launch runs on its tensors' device: `kernels.launch.launch` makes that device current through
`launch.device_guard` (Triton launches on the current CUDA device, which on a model spread over several GPUs is not
always the tensors').

On the CPU a recorder stands in for the guard, and a wrapper around the interpreter's launch checks that each launch
of a patched model's forward and backward happens inside a guard taken for the device of all its tensors, so a
launcher that bypasses `launch` fails here. On two GPUs, a model split over both runs with the other device current
and matches the model on one device."""

import contextlib
import copy

import pytest
import torch
from models import tiny_config, tiny_model
from torch.utils._pytree import tree_map

import dbrx_fast
from dbrx_fast.kernels import launch

CONFIG = dict(n_heads=4, kv_n_heads=2, experts=8, top_k=2)
# What a training step of a patched model launches: every kernel of the forward and backward of each fused op.
MODEL_KERNELS = {
    "_layernorm_fwd_kernel",
    "_layernorm_bwd_kernel",
    "_qkv_rope_kernel",
    "_attention_fwd_kernel",
    "_attention_bwd_delta_kernel",
    "_attention_bwd_dkdv_kernel",
    "_attention_bwd_dq_kernel",
    "_route_fwd_kernel",
    "_route_scan_kernel",
    "_route_scatter_kernel",
    "_route_bwd_kernel",
    "_moe_glu_up_fwd_kernel",
    "_moe_down_fwd_kernel",
    "_moe_combine_kernel",
    "_moe_down_bwd_kernel",
    "_moe_sum_partials_kernel",
    "_moe_up_dgrad_kernel",
    "_moe_down_wgrad_kernel",
    "_moe_up_wgrad_kernel",
}


@pytest.mark.interpreter
def test_every_launch_of_forward_and_backward_takes_the_guard_for_its_tensors_device(monkeypatch, device):
    from triton.runtime import interpreter, jit

    guards, launches = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        guards.append(device)
        try:
            yield
        finally:
            guards.pop()

    def recorded(run):
        def recorded_run(self, *args, **kwargs):
            devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
            launches.append((self.fn.__name__, devices, guards[-1] if guards else None))
            return run(self, *args, **kwargs)

        return recorded_run

    monkeypatch.setattr(launch, "device_guard", recording_guard)
    # Where every launch ends, under the interpreter and on a GPU (the autotuner's benchmark runs included).
    for function in (interpreter.InterpretedFunction, jit.JITFunction):
        monkeypatch.setattr(function, "run", recorded(function.run))
    model = dbrx_fast.patch(tiny_model(tiny_config(**CONFIG)).to(device).train(), backend="triton")
    ids = torch.randint(0, 97, (2, 7), device=device)
    model(ids, labels=ids).loss.backward()

    assert {name for name, _, _ in launches} >= MODEL_KERNELS
    unguarded = sorted({name for name, devices, guard in launches if devices != {guard}})
    assert not unguarded, f"launched outside a guard for their tensors' device: {unguarded}"


def split_over(model, first: torch.device, second: torch.device):
    """The embeddings and the first half of the blocks on `first`, the rest on `second`, moving each module's inputs to
    its device as accelerate's hooks do."""
    decoder = model.transformer
    half = len(decoder.blocks) // 2
    placed = [(decoder.wte, first), (decoder.rotary_emb, first), (decoder.norm_f, second), (model.lm_head, second)]
    placed += [(block, first if i < half else second) for i, block in enumerate(decoder.blocks)]
    for module, device in placed:
        module.to(device)

        def to_device(module, args, kwargs, device=device):
            move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
            return tree_map(move, args), tree_map(move, kwargs)

        module.register_forward_pre_hook(to_device, with_kwargs=True)
    return model


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_split_over_two_gpus_matches_one_gpu():
    first, second = torch.device("cuda:0"), torch.device("cuda:1")
    stock = tiny_model(tiny_config(**CONFIG, layers=4))
    single = dbrx_fast.patch(copy.deepcopy(stock).to(first), backend="triton")
    split = dbrx_fast.patch(split_over(copy.deepcopy(stock), first, second), backend="triton")
    ids = torch.randint(0, 97, (2, 9), device=first)
    outputs = []
    for model in (single, split):
        with torch.cuda.device(first):  # the second half's kernels must not launch here
            out = model(ids, labels=ids)
            out.loss.backward()
        outputs.append((out.logits.to(first), {n: p.grad.to(first) for n, p in model.named_parameters()}))
    (logits, grads), (split_logits, split_grads) = outputs
    assert torch.equal(split_logits, logits)
    for name, grad in grads.items():
        assert torch.equal(split_grads[name], grad), name
