"""The kernel modules whose launches the compile-for-GPU check and `python -m dbrx_fast.inspect` cover."""

import importlib

KERNEL_MODULES = (
    "rope",
    "qkv_rope",
    "layernorm",
    "moe_routing",
    "moe_experts",
    "moe_input_grads",
    "moe_weight_grads",
    "attention_fwd",
    "attention_decode",
    "attention_bwd",
)


def all_compile_specs():
    """Every CompileSpec of every registered kernel module."""
    specs = []
    for name in KERNEL_MODULES:
        specs.extend(importlib.import_module(f"{__package__}.{name}").compile_specs())
    return specs
