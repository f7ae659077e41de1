"""patch / unpatch / is_patched: swap dbrx-fast's modules into one DbrxForCausalLM or DbrxModel instance, in place.

Only the classes of this instance's submodules change (never a class in transformers for everyone), so every
Parameter object, buffer, hook and state_dict key stays as it was; with the attention patched, the model's config also
names dbrx-fast's attention (`config._attn_implementation`, attention_interface.NAME, registered with transformers on
the first patch: adding a name changes nothing for other models). Everything is checked and planned before anything
is changed: a patch that raises leaves the model untouched. `unpatch` restores the recorded classes, buffers and
attention implementation.
"""

import math
import types
import warnings
from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers.models.dbrx.modeling_dbrx import (
    DbrxAttention,
    DbrxExpertGLU,
    DbrxExperts,
    DbrxFFN,
    DbrxForCausalLM,
    DbrxModel,
    DbrxRotaryEmbedding,
)

from . import attention_interface
from .backend import BACKENDS, resolve
from .modules import FastDbrxAttention, FastDbrxExperts, FastDbrxFFN, FastLayerNorm, FastRotaryEmbedding

# DBRX is computed wrongly by transformers before 5.15.
MIN_TRANSFORMERS = Version("5.15")
MAX_HEAD_DIM = 256
_RECORD = "_dbrx_fast_patch"


@dataclass(frozen=True)
class PatchOptions:
    attention: bool
    moe: bool
    rope: bool
    norm: bool
    backend: str
    fix_rope_theta: bool


@dataclass
class _PatchRecord:
    options: PatchOptions
    swapped: list  # (module, its original class)
    rotary_inv_freq: tuple | None  # (rotary module, inv_freq, original_inv_freq) before the rope_theta fix
    attn_implementations: list  # (config, its _attn_implementation_internal) for the config and its sub-configs


def patch(
    model: nn.Module,
    *,
    attention: bool = True,
    moe: bool = True,
    rope: bool = True,
    norm: bool = True,
    backend: str = "auto",
    fix_rope_theta: bool = True,
) -> nn.Module:
    """Swap dbrx-fast's modules into `model` (a DbrxForCausalLM or DbrxModel) in place and return it.

    attention: patch the attention modules (fused clip, split and RoPE in fp32) and make dbrx-fast's attention the
        model's attention implementation (`config._attn_implementation`; unpatch restores the previous value).
    rope: inside the patched attention, on the triton backend, run the fused QKV kernel (clip, split, RoPE in one
        pass; else the clip and split in torch and RoPE in eager fp32).
    moe: fused routing and grouped GLU experts in place of the stock loop over experts (the FFN and its experts
        module are both swapped; the FFN calls `ffn.experts`, so hooks and FSDP2 on it work).
    norm: the bias-free LayerNorms (norm_1, norm_2, norm_f).
    backend: "triton" (CUDA, or the CPU under TRITON_INTERPRET=1), "torch" (the eager reference path, any device) or
        "auto" (triton on CUDA, torch elsewhere), chosen per call from the input's device. "triton" on a model
        with CPU parameters and no interpreter raises here.
    fix_rope_theta: transformers 5.x ignores `attn_config.rope_theta` (DBRX checkpoints say 500000; the model uses
        `rope_parameters`, 10000 by default). When they disagree, warn and give the model's rotary embedding the
        checkpoint's theta, for the patched and the stock paths alike; unpatch restores it.
    Patching again with the same options does nothing; with other options it re-patches.
    """
    if Version(transformers.__version__).release < MIN_TRANSFORMERS.release:
        raise RuntimeError(
            f"dbrx_fast needs transformers >= {MIN_TRANSFORMERS} (DBRX is computed wrongly before it); "
            f"found {transformers.__version__}."
        )
    if not isinstance(model, (DbrxForCausalLM, DbrxModel)):
        raise TypeError(f"dbrx_fast.patch expects a DbrxForCausalLM or DbrxModel, got {type(model).__name__}.")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend != "torch":
        backend = _kernels_backend(backend)
    if backend == "triton":
        for device in {p.device for p in model.parameters()} - {torch.device("meta")}:
            resolve(backend, device)  # raises off CUDA without the interpreter
    options = PatchOptions(attention, moe, rope, norm, backend, fix_rope_theta)
    record = vars(model).get(_RECORD)
    if record is not None:
        if record.options == options:
            return model
        unpatch(model)

    decoder = model.transformer if isinstance(model, DbrxForCausalLM) else model
    swaps = _plan_swaps(decoder, options)
    rope_theta, new_inv_freq = _rope_theta(decoder, fix_rope_theta)

    rotary = decoder.rotary_emb
    saved_inv_freq = None
    if new_inv_freq is not None:
        saved_inv_freq = (rotary, rotary.inv_freq, rotary.original_inv_freq)
        rotary.inv_freq = new_inv_freq
        rotary.original_inv_freq = new_inv_freq.clone()
    swapped = []
    for module, fast_class in swaps:
        swapped.append((module, type(module)))
        _set_class(module, fast_class)
        module.dbrx_fast_options = options
    if type(rotary) is FastRotaryEmbedding:
        rotary.dbrx_fast_rope_theta = rope_theta
    saved_implementations = []
    attentions = [m for m, _ in swaps if isinstance(m, FastDbrxAttention)]
    if attentions:
        attention_interface.register()
        config = decoder.config
        stock_attention = config._attn_implementation
        saved_implementations = [(c, c._attn_implementation_internal) for c in _config_tree(config)]
        config._attn_implementation = attention_interface.NAME  # the setter also sets it on the sub-configs
        for attn in attentions:
            attn.dbrx_fast_stock_attention = stock_attention  # what its fallbacks run (attention_interface)
    setattr(model, _RECORD, _PatchRecord(options, swapped, saved_inv_freq, saved_implementations))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the modules and rotary buffers `patch` changed; a model that is not patched is returned as is."""
    record = vars(model).pop(_RECORD, None)
    if record is None:
        return model
    for module, original_class in record.swapped:
        _set_class(module, original_class)
        del module.dbrx_fast_options
        vars(module).pop("dbrx_fast_rope_theta", None)
        vars(module).pop("dbrx_fast_stock_attention", None)
    # Restored only if still ours: an implementation the user chose after patching stays theirs.
    saved = record.attn_implementations
    if saved and saved[0][0]._attn_implementation == attention_interface.NAME:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation  # past the setter, which would recurse
    if record.rotary_inv_freq is not None:
        rotary, inv_freq, original_inv_freq = record.rotary_inv_freq
        device = rotary.inv_freq.device  # the model may have moved since it was patched
        rotary.inv_freq = inv_freq.to(device)
        rotary.original_inv_freq = original_inv_freq.to(device)
    return model


def is_patched(model: nn.Module) -> bool:
    return _RECORD in vars(model)


def _config_tree(config) -> list:
    """The config and, recursively, its sub-configs: the ones the `_attn_implementation` setter changes."""
    subconfigs = (getattr(config, key, None) for key in getattr(config, "sub_configs", {}))
    return [config, *(c for sub in subconfigs if sub is not None for c in _config_tree(sub))]


def _set_class(module: nn.Module, cls: type) -> None:
    """module.__class__ = cls, and the same for a forward bound to the instance: accelerate's hooks (device_map) keep
    the module's forward as `_old_forward` and replace `forward` on the instance, so without this a module hooked
    before patching would keep running its old class's forward."""
    old_forward = type(module).forward
    module.__class__ = cls
    for name in ("forward", "_old_forward"):
        bound = vars(module).get(name)
        if isinstance(bound, types.MethodType) and bound.__self__ is module and bound.__func__ is old_forward:
            setattr(module, name, types.MethodType(cls.forward, module))


def _kernels_backend(backend: str) -> str:
    """`backend` ("triton" or "auto") when the Triton kernels import (an old or missing Triton does not); else
    "triton" raises at patch time rather than at the first forward, and "auto" warns and becomes "torch"."""
    try:
        import dbrx_fast.kernels  # noqa: F401
    except ImportError as exc:
        if backend == "triton":
            raise RuntimeError(f"dbrx_fast: backend='triton' cannot import the kernels: {exc}") from exc
        _warn(f"the Triton kernels cannot be imported ({exc}); backend 'auto' uses the torch path.")
        return "torch"
    return backend


def _warn(message: str) -> None:
    warnings.warn(f"dbrx_fast: {message}", stacklevel=3)


def _plan_swaps(decoder: DbrxModel, options: PatchOptions) -> list:
    """(module, fast class) pairs for every module this instance can have swapped; warns about the ones it can't."""
    blocks = list(decoder.blocks)
    swaps = []
    if options.norm:
        norms = [n for b in blocks for n in (b.norm_attn_norm.norm_1, b.norm_attn_norm.norm_2)] + [decoder.norm_f]
        for norm in norms:
            if type(norm) is nn.LayerNorm and norm.bias is None and len(norm.normalized_shape) == 1:
                swaps.append((norm, FastLayerNorm))
            else:
                _warn(f"left a {type(norm).__name__} stock: not a plain bias-free nn.LayerNorm.")
    if options.attention:
        reason = _attention_unsupported(decoder)
        if reason:
            _warn(f"attention left stock: {reason}.")
        else:
            swaps.append((decoder.rotary_emb, FastRotaryEmbedding))
            swaps.extend((b.norm_attn_norm.attn, FastDbrxAttention) for b in blocks)
    if options.moe:
        activation = decoder.config.ffn_config.ffn_act_fn.get("name", "silu")
        for block in blocks:
            ffn = block.ffn
            experts = getattr(ffn, "experts", None)
            stock_modules = type(ffn) is DbrxFFN and type(experts) is DbrxExperts and type(experts.mlp) is DbrxExpertGLU
            if stock_modules and activation in ("silu", "swish"):
                swaps.extend(((ffn, FastDbrxFFN), (experts, FastDbrxExperts)))
            else:
                kinds = f"{type(ffn).__name__} / {type(experts).__name__}"
                _warn(
                    f"MoE left stock: needs a stock DbrxFFN, DbrxExperts and DbrxExpertGLU with SiLU experts, got "
                    f"{kinds} with {activation!r} (patch before wrapping the experts, e.g. before fully_shard)."
                )
    return swaps


def _attention_unsupported(decoder: DbrxModel) -> str | None:
    config = decoder.config
    head_dim = config.d_model // config.n_heads
    if head_dim > MAX_HEAD_DIM or head_dim < 2 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two between 2 and {MAX_HEAD_DIM}"
    if type(decoder.rotary_emb) is not DbrxRotaryEmbedding or decoder.rotary_emb.rope_type != "default":
        return f"rotary embedding {decoder.rotary_emb.rope_type!r} is not the default RoPE"
    attentions = [b.norm_attn_norm.attn for b in decoder.blocks]
    odd = [type(a).__name__ for a in attentions if type(a) is not DbrxAttention]
    if odd:
        return f"attention modules of other classes ({', '.join(sorted(set(odd)))})"
    return None


def _rope_theta(decoder: DbrxModel, fix: bool) -> tuple[float | None, torch.Tensor | None]:
    """(the theta the rotary embedding uses after patching, new inv_freq for it or None if the buffer stays).

    With `fix`, the theta is the checkpoint's `attn_config.rope_theta` where transformers uses another one."""
    config = decoder.config
    checkpoint_theta = getattr(config.attn_config, "rope_theta", None)
    used_theta = (config.rope_parameters or {}).get("rope_theta")
    if not fix or checkpoint_theta is None or used_theta is None or math.isclose(checkpoint_theta, used_theta):
        return used_theta, None
    rotary = decoder.rotary_emb
    if rotary.rope_type != "default":
        _warn(
            f"attn_config.rope_theta={checkpoint_theta} but the model uses {used_theta} with "
            f"{rotary.rope_type!r} RoPE, which dbrx_fast cannot correct; left as it is."
        )
        return used_theta, None
    _warn(
        f"the checkpoint's attn_config.rope_theta is {checkpoint_theta} but transformers uses "
        f"rope_parameters['rope_theta']={used_theta}; the rotary embedding now uses {checkpoint_theta} "
        "(patch(..., fix_rope_theta=False) keeps transformers' value)."
    )
    head_dim = config.d_model // config.n_heads
    # Transformers' own formula, on the CPU as it computes it, then moved to where the buffer lives.
    inv_freq = 1.0 / (checkpoint_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    return checkpoint_theta, inv_freq.to(rotary.inv_freq.device)
