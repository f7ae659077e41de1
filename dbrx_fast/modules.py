"""Fast versions of DBRX's modules, swapped in by class on a model instance (see patch.py).

Each class subclasses the stock one and only overrides `forward`, so parameters, buffers, hooks, state_dict keys and
`isinstance` checks are untouched, and `super().forward` is the stock path every fallback takes. Each instance carries
`dbrx_fast_options` (patch.PatchOptions); `backend.choose_path` turns its backend into a path per call.
Submodules are called (`self.Wqkv(x)`, `self.router(x)`), never their raw weights, so LoRA wrappers and hooks on them
keep working. The expert weights are read as parameters: DBRX stores them as such, not as submodules.
"""

import torch
from torch import nn
from transformers.models.dbrx.modeling_dbrx import (
    ALL_ATTENTION_FUNCTIONS,
    DbrxAttention,
    DbrxFFN,
    DbrxRotaryEmbedding,
    eager_attention_forward,
)

from . import reference
from .backend import choose_path
from .moe_torch import moe_experts_grouped


class FastLayerNorm(nn.LayerNorm):
    """Bias-free LayerNorm: fp32 statistics, deterministic weight gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = choose_path(self.dbrx_fast_options.backend, "LayerNorm", x, self.weight)
        if path == "triton":
            from .ops.layernorm import layer_norm  # imported at first use: triton is only needed for this path

            return layer_norm(x, self.weight, self.eps)
        if path == "torch":
            return reference.layer_norm(x, self.weight, self.eps)
        return super().forward(x)


class FastRotaryEmbedding(DbrxRotaryEmbedding):
    """Returns cos and sin in float32 whatever the activations' dtype.

    Only the patched attention consumes them, and it rotates in fp32: cos/sin rounded to bf16 lose the low bits of
    the angle at theta 500000 and long positions. A stock fallback casts them back, which is exactly what stock does.
    """

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The stock forward reads only x's device and dtype.
        return super().forward(x.new_empty(0, dtype=torch.float32), position_ids)


class FastDbrxAttention(DbrxAttention):
    """DBRX attention with the fused RoPE kernel; the attention core is the model's attention implementation."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        cos, sin = position_embeddings
        path = choose_path(self.dbrx_fast_options.backend, "attention", hidden_states)
        if path == "stock":
            stock_embeddings = (cos.to(hidden_states.dtype), sin.to(hidden_states.dtype))
            return super().forward(hidden_states, attention_mask, stock_embeddings, **kwargs)

        # transformers < 5.17 names the cache `past_key_values`, later versions `cache`.
        cache = kwargs.pop("cache", None)
        legacy_cache = kwargs.pop("past_key_values", None)
        cache = legacy_cache if cache is None else cache

        input_shape = hidden_states.shape[:-1]
        qkv = self.Wqkv(hidden_states)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        kv_width = self.num_key_value_heads * self.head_dim
        q, k, v = (
            t.view(*input_shape, -1, self.head_dim).transpose(1, 2)
            for t in qkv.split([self.hidden_size, kv_width, kv_width], dim=-1)
        )

        if path == "triton" and self.dbrx_fast_options.rope:
            from .ops.rope import rope

            q, k = rope(q, k, cos, sin)
        else:
            q, k = reference.rope(q, k, cos, sin)

        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


class FastDbrxFFN(DbrxFFN):
    """DBRX's MoE: fused routing and grouped GLU experts, with the stock router module kept (router logits and the
    auxiliary loss are recorded from it as before)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mlp = self.experts.mlp
        path = choose_path(self.dbrx_fast_options.backend, "MoE", hidden_states, mlp.w1, mlp.v1, mlp.w2)
        if path != "stock" and not hidden_states.dtype == mlp.w1.dtype == mlp.v1.dtype == mlp.w2.dtype:
            path = "stock"  # stock matmuls raise on mixed dtypes, which is the right answer here too
        if path == "stock":
            return super().forward(hidden_states)

        x = hidden_states
        if self.training and self.router.moe_jitter_eps is not None:
            # The stock router jitters its input in place and the experts then see the jittered tokens: keep that,
            # on a copy, so no tensor that autograd saved is modified in place.
            x = x.clone()
        router_logits = self.router(x)
        tokens = x.reshape(-1, x.shape[-1])
        num_experts = self.experts.num_experts

        if path == "triton":
            from .ops.moe import moe_experts
            from .ops.routing import route

            routing = route(router_logits, self.top_k, self.moe_normalize_expert_weights)
            out = moe_experts(tokens, mlp.w1, mlp.v1, mlp.w2, routing, num_experts)
        else:
            weights, expert_ids = reference.route(router_logits, self.top_k, self.moe_normalize_expert_weights)
            out = moe_experts_grouped(tokens, mlp.w1, mlp.v1, mlp.w2, weights, expert_ids, num_experts)
        return out.view(hidden_states.shape[0], -1, hidden_states.shape[-1])
