"""The patcher: instance-level, in place, idempotent, reversible; parameters, state_dict and wrappers survive."""

import copy
import functools
import importlib
import sys
import warnings

import pytest
import torch
from models import tiny_config, tiny_model
from packaging.version import Version
from torch import nn
from transformers import DbrxForCausalLM, DbrxModel
from transformers.models.dbrx.modeling_dbrx import DbrxExperts

import dbrx_fast
from dbrx_fast import backend, reference

PATCH_MODULE = importlib.import_module("dbrx_fast.patch")  # `dbrx_fast.patch` itself is the function


def module_classes(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def assert_untouched(model: nn.Module, classes: dict[str, type], state: dict[str, torch.Tensor]):
    assert not dbrx_fast.is_patched(model)
    assert module_classes(model) == classes
    assert not any(hasattr(m, "dbrx_fast_options") for m in model.modules())
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """One-time warnings are per process; each test sees its own."""
    monkeypatch.setattr(backend, "_warned", set())


def test_wrong_model_type_raises_naming_it():
    with pytest.raises(TypeError, match="Linear"):
        dbrx_fast.patch(nn.Linear(4, 4))


def test_dbrx_model_without_head_is_patched():
    model = DbrxModel(tiny_config())
    dbrx_fast.patch(model, backend="torch")
    assert type(model.blocks[0].ffn).__name__ == "FastDbrxFFN"
    assert type(model.norm_f).__name__ == "FastLayerNorm"


@pytest.mark.parametrize("problem", ["unknown backend", "old transformers"])
def test_failed_patch_leaves_the_model_untouched(problem, monkeypatch):
    model = tiny_model()
    classes, state = module_classes(model), copy.deepcopy(model.state_dict())
    if problem == "old transformers":
        # transformers' lazy module makes its own __version__ awkward to fake; the installed one stands in for an old
        # one by raising the floor above it.
        monkeypatch.setattr(PATCH_MODULE, "MIN_TRANSFORMERS", Version("99.0"))
        with pytest.raises(RuntimeError, match=r"transformers >= 99\.0"):
            dbrx_fast.patch(model)
    else:
        with pytest.raises(ValueError, match="backend"):
            dbrx_fast.patch(model, backend="cuda")
    assert_untouched(model, classes, state)


def test_patch_is_idempotent_and_unpatch_restores_exactly():
    model = tiny_model()
    classes, state = module_classes(model), copy.deepcopy(model.state_dict())
    params = {name: p for name, p in model.named_parameters()}

    assert dbrx_fast.patch(model, backend="torch") is model
    patched_classes = module_classes(model)
    assert patched_classes != classes
    assert dbrx_fast.is_patched(model)
    dbrx_fast.patch(model, backend="torch")
    assert module_classes(model) == patched_classes

    # The same Parameter objects (no copies), the same keys and values.
    assert all(p is params[name] for name, p in model.named_parameters())
    patched_state = model.state_dict()
    assert patched_state.keys() == state.keys()
    assert all(torch.equal(patched_state[k], state[k]) for k in state)

    assert dbrx_fast.unpatch(model) is model
    assert_untouched(model, classes, state)
    assert dbrx_fast.unpatch(model) is model  # unpatching an unpatched model is a no-op


@pytest.mark.parametrize("before", ["eager", "sdpa", None])
def test_patch_makes_ours_the_attention_implementation_and_unpatch_restores_it_exactly(before):
    model = tiny_model()
    config = model.config
    config._attn_implementation = before  # the setter sets the sub-configs too
    config.attn_config._attn_implementation_internal = "its own"  # unpatch restores each value, not the setter's
    configs = (config, config.attn_config, config.ffn_config)
    saved = [c._attn_implementation_internal for c in configs]
    ids = torch.randint(0, 97, (2, 7))
    stock_logits = model(ids).logits if before else None
    attentions = [b.norm_attn_norm.attn for b in model.transformer.blocks]

    dbrx_fast.patch(model, backend="torch", attention=False)
    assert [c._attn_implementation_internal for c in configs] == saved  # attention stock: the config too
    dbrx_fast.patch(model, backend="torch")
    assert all(c._attn_implementation == "dbrx_fast" for c in configs)
    assert all(a.dbrx_fast_stock_attention == before for a in attentions)  # what the fallbacks run
    dbrx_fast.unpatch(model)
    assert [c._attn_implementation_internal for c in configs] == saved
    assert not any(hasattr(a, "dbrx_fast_stock_attention") for a in attentions)
    if before:
        assert torch.equal(model(ids).logits, stock_logits)


def test_patching_with_other_options_repatches():
    model = tiny_model()
    dbrx_fast.patch(model, backend="torch")
    dbrx_fast.patch(model, backend="torch", moe=False)
    assert type(model.transformer.blocks[0].ffn).__name__ == "DbrxFFN"
    assert type(model.transformer.norm_f).__name__ == "FastLayerNorm"
    dbrx_fast.unpatch(model)
    assert type(model.transformer.norm_f) is nn.LayerNorm


def test_save_pretrained_after_patch_loads_in_stock_transformers(tmp_path):
    model = tiny_model()
    dbrx_fast.patch(model, backend="torch")
    model.save_pretrained(tmp_path)
    loaded = DbrxForCausalLM.from_pretrained(tmp_path)
    assert not dbrx_fast.is_patched(loaded)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


class CountingLoRA(nn.Module):
    """A LoRA-style wrapper: base(x) + x @ A.T @ B.T, counting its calls."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


def test_lora_wrapper_on_wqkv_is_still_called():
    model = tiny_model()
    for block in model.transformer.blocks:
        block.norm_attn_norm.attn.Wqkv = CountingLoRA(block.norm_attn_norm.attn.Wqkv)
    stock = copy.deepcopy(model)
    ids = torch.randint(0, 97, (2, 9))
    dbrx_fast.patch(model, backend="torch")
    out = model(ids).logits
    assert all(b.norm_attn_norm.attn.Wqkv.calls == 1 for b in model.transformer.blocks)
    torch.testing.assert_close(out, stock(ids).logits, rtol=1e-5, atol=1e-5)


def test_rope_theta_of_the_checkpoint_is_used_and_restored():
    config = tiny_config(rope_theta=500000.0)  # rope_parameters keeps transformers' default, 10000
    model = tiny_model(config)
    original_inv_freq = model.transformer.rotary_emb.inv_freq.clone()
    right = tiny_model(tiny_config(rope_theta=500000.0, rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    right.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (1, 40))

    with pytest.warns(UserWarning, match="rope_theta"):
        dbrx_fast.patch(model, backend="torch")
    torch.testing.assert_close(model.transformer.rotary_emb.inv_freq, right.transformer.rotary_emb.inv_freq)
    torch.testing.assert_close(model(ids).logits, right(ids).logits, rtol=1e-5, atol=1e-5)
    dbrx_fast.unpatch(model)
    assert torch.equal(model.transformer.rotary_emb.inv_freq, original_inv_freq)

    dbrx_fast.patch(model, backend="torch", fix_rope_theta=False)
    assert torch.equal(model.transformer.rotary_emb.inv_freq, original_inv_freq)


def test_unsupported_head_dim_keeps_attention_stock_with_a_warning():
    model = tiny_model(head_dim=24)
    stock = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="head_dim 24"):
        dbrx_fast.patch(model, backend="torch")
    assert type(model.transformer.blocks[0].norm_attn_norm.attn).__name__ == "DbrxAttention"
    assert type(model.transformer.blocks[0].ffn).__name__ == "FastDbrxFFN"
    ids = torch.randint(0, 97, (2, 7))
    torch.testing.assert_close(model(ids).logits, stock(ids).logits, rtol=1e-5, atol=1e-5)


def test_triton_backend_on_cpu_without_the_interpreter_raises_at_patch(monkeypatch):
    model = tiny_model()
    classes, state = module_classes(model), copy.deepcopy(model.state_dict())
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # this test process runs with the interpreter on
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dbrx_fast.patch(model, backend="triton")
    assert_untouched(model, classes, state)


def test_kernels_that_cannot_import_raise_for_triton_and_fall_back_for_auto(monkeypatch):
    """An old or missing Triton makes `import dbrx_fast.kernels` fail: backend='triton' says so at patch time, and
    backend='auto' warns and runs the torch path."""
    monkeypatch.setitem(sys.modules, "dbrx_fast.kernels", None)  # the next import of it raises ImportError
    model = tiny_model()
    classes, state = module_classes(model), copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="cannot import the kernels"):
        dbrx_fast.patch(model, backend="triton")
    assert_untouched(model, classes, state)
    with pytest.warns(UserWarning, match="backend 'auto' uses the torch path"):
        dbrx_fast.patch(model)
    assert vars(model)["_dbrx_fast_patch"].options.backend == "torch"


def test_triton_backend_on_cpu_tensors_without_the_interpreter_raises_per_call(monkeypatch):
    """A model patched where the kernels could run, then given CPU tensors without the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at each check: nothing here launches a kernel
    model = dbrx_fast.patch(tiny_model(), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        model(torch.randint(0, 97, (1, 5)))


def test_float64_on_triton_backend_falls_back_to_stock_with_one_warning(device):
    model = tiny_model(dtype=torch.float64).to(device)
    stock = copy.deepcopy(model)
    dbrx_fast.patch(model, backend="triton")
    ids = torch.randint(0, 97, (2, 6), device=device)
    with pytest.warns(UserWarning, match="float64") as record:
        out = model(ids).logits
    assert len({str(w.message) for w in record}) == len(record)  # each reason once, however many layers
    assert torch.equal(out, stock(ids).logits)


def test_auto_backend_on_cpu_is_the_torch_path():
    model = tiny_model()
    twin = copy.deepcopy(model)
    dbrx_fast.patch(model, backend="auto")
    dbrx_fast.patch(twin, backend="torch")
    ids = torch.randint(0, 97, (2, 6))
    assert torch.equal(model(ids).logits, twin(ids).logits)


def test_tensors_on_mixed_devices_take_the_stock_path_with_a_warning():
    x = torch.randn(3, 8)
    weight_elsewhere = torch.randn(8, device="meta")
    with pytest.warns(UserWarning, match="several devices"):
        assert backend.choose_path("torch", "LayerNorm", x, weight_elsewhere) == "stock"


@pytest.mark.parametrize("theta_from", ["rope_parameters", "patch's rope_theta fix"])
def test_rope_of_a_bf16_cast_model_at_long_positions_is_fp32_accurate(theta_from):
    """model.to(bfloat16) rounds the inv_freq buffer; the patched rotary embedding derives fp32 frequencies from the
    theta in use instead (cos would be off by up to 2 at head_dim 128 and positions 8128-8191 otherwise)."""
    theta, head_dim = 500000.0, 128
    consistent = {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    model = tiny_model(
        tiny_config(
            n_heads=1,
            kv_n_heads=1,
            head_dim=head_dim,
            rope_theta=theta,
            **(consistent if theta_from == "rope_parameters" else {}),
        )
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "dbrx_fast: the checkpoint's attn_config.rope_theta")
        dbrx_fast.patch(model, backend="torch")
    rotary = model.to(torch.bfloat16).transformer.rotary_emb
    assert rotary.inv_freq.dtype == torch.bfloat16
    positions = torch.arange(8128, 8192)[None]

    cos, sin = rotary(torch.empty(0, dtype=torch.bfloat16), positions)
    inv_freq64 = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions[..., None].double() * inv_freq64
    angles = torch.cat((angles, angles), dim=-1)
    assert cos.dtype == sin.dtype == torch.float32
    assert (cos - angles.cos()).abs().max() < 1e-3
    assert (sin - angles.sin()).abs().max() < 1e-3
    # What the test guards against: the same fp32 maths from the rounded buffer.
    rounded_cos, _ = reference.rope_cos_sin(positions, rotary.inv_freq.float())
    assert (rounded_cos - angles.cos()).abs().max() > 0.5
    dbrx_fast.unpatch(model)
    assert not hasattr(rotary, "dbrx_fast_rope_theta")


def test_patch_swaps_the_experts_with_the_ffn_and_leaves_replaced_experts_stock():
    model = dbrx_fast.patch(tiny_model(), backend="torch")
    assert [type(b.ffn.experts).__name__ for b in model.transformer.blocks] == ["FastDbrxExperts"] * 2

    class CustomExperts(DbrxExperts):
        pass

    model = tiny_model()
    model.transformer.blocks[0].ffn.experts.__class__ = CustomExperts
    with pytest.warns(UserWarning, match="MoE left stock.*CustomExperts"):
        dbrx_fast.patch(model, backend="torch")
    assert [type(b.ffn).__name__ for b in model.transformer.blocks] == ["DbrxFFN", "FastDbrxFFN"]


def add_accelerate_style_hook(module: nn.Module, calls: list) -> None:
    """What accelerate.hooks.add_hook_to_module does (device_map dispatch hooks wte, each block, norm_f and lm_head):
    the module's bound forward is kept as `_old_forward` and `forward` is replaced on the instance."""
    module._old_forward = module.forward

    def new_forward(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return module._old_forward(*args, **kwargs)

    module.forward = functools.partial(new_forward, module)


def test_modules_hooked_by_accelerate_before_patching_run_the_fast_forward(monkeypatch):
    model = tiny_model()
    stock = copy.deepcopy(model)
    calls, ran = [], []
    add_accelerate_style_hook(model.transformer.norm_f, calls)
    add_accelerate_style_hook(model.transformer.blocks[0].ffn.experts, calls)

    def counted(name, fn):
        return lambda *args: ran.append(name) or fn(*args)

    for name in ("layer_norm", "dispatch"):
        monkeypatch.setattr(reference, name, counted(name, getattr(reference, name)))
    ids = torch.randint(0, 97, (2, 6))

    dbrx_fast.patch(model, backend="torch")
    out = model(ids).logits
    assert calls == ["FastDbrxExperts", "FastLayerNorm"]
    assert ran.count("layer_norm") == 5 and ran.count("dispatch") == 2  # norm_f and block 0's experts are fast too
    torch.testing.assert_close(out, stock(ids).logits, rtol=1e-5, atol=1e-5)

    dbrx_fast.unpatch(model)
    calls.clear()
    ran.clear()
    assert torch.equal(model(ids).logits, stock(ids).logits)
    assert calls == ["DbrxExperts", "LayerNorm"] and ran == []
