"""Tiny random DBRX models for the tests: DBRX's structure at widths the Triton interpreter runs in seconds."""

import torch
from transformers import DbrxConfig, DbrxForCausalLM


def tiny_config(
    *,
    n_heads: int = 4,
    kv_n_heads: int = 2,
    head_dim: int = 16,
    experts: int = 4,
    top_k: int = 2,
    clip_qkv: float | None = 8.0,
    normalize: float | None = 1.0,
    layers: int = 2,
    rope_theta: float = 10000.0,
    moe_jitter_eps: float | None = None,
    ffn_hidden: int = 24,
    **overrides,
) -> DbrxConfig:
    return DbrxConfig(
        d_model=n_heads * head_dim,
        n_heads=n_heads,
        n_layers=layers,
        max_seq_len=128,
        vocab_size=97,
        # A wider init than DBRX's 0.02 so that routing and attention are far from uniform in a tiny model.
        initializer_range=0.1,
        # Stock DbrxAttention reads attn_config.rope_theta (real checkpoints say 500000) but rotates with
        # rope_parameters["rope_theta"] (10000 unless given): patch() reconciles them.
        attn_config={"kv_n_heads": kv_n_heads, "clip_qkv": clip_qkv, "rope_theta": rope_theta},
        ffn_config={
            "ffn_hidden_size": ffn_hidden,
            "moe_num_experts": experts,
            "moe_top_k": top_k,
            "moe_normalize_expert_weights": normalize,
            "moe_jitter_eps": moe_jitter_eps,
        },
        **overrides,
    )


def tiny_model(config: DbrxConfig | None = None, dtype: torch.dtype = torch.float32, **kw) -> DbrxForCausalLM:
    """A random model in eval mode with the eager attention (the oracle that also runs in float64)."""
    config = config or tiny_config(**kw)
    config._attn_implementation = "eager"
    return DbrxForCausalLM(config).to(dtype).eval()
