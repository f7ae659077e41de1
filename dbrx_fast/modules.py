"""Fast versions of DBRX's modules, swapped in by class on a model instance (see patch.py).

Each class subclasses the stock one and only overrides `forward`, so parameters, buffers, hooks, state_dict keys and
`isinstance` checks are untouched, and `super().forward` is the stock path every fallback takes. Each instance carries
`dbrx_fast_options` (patch.PatchOptions); `backend.choose_path` turns its backend into a path per call.
Submodules are called (`self.Wqkv(x)`, `self.router(x)`, `self.experts(...)`), never bypassed, so LoRA wrappers,
forward hooks, FSDP2's `fully_shard` and accelerate's hooks on them keep working.

Autocast: the linears (`Wqkv`, `out_proj`, `router.layer`) are called as modules and stay autocast's. What the modules
compute themselves follows autocast's rule for the op it replaces, then runs with autocast off so that the kernels
and the torch path see exactly those dtypes: the experts are matmuls, so they run in autocast's dtype
(`torch.get_autocast_dtype`); LayerNorm is on autocast's float32 list on CUDA and on no list on the CPU (there it runs
in its input's dtype); RoPE and the routing softmax are elementwise / reductions that already compute in fp32.
"""

import torch
from torch import nn
from transformers.cache_utils import StaticLayer
from transformers.models.dbrx.modeling_dbrx import (
    ALL_ATTENTION_FUNCTIONS,
    DbrxAttention,
    DbrxExperts,
    DbrxFFN,
    DbrxRotaryEmbedding,
    eager_attention_forward,
)

from . import moe_torch, reference
from .backend import check_capturable, choose_path, row_bucket

# Device types whose autocast runs layer_norm in float32 (torch/csrc/autograd/autocast_mode.cpp, the fp32 lists).
LAYER_NORM_FP32_UNDER_AUTOCAST = ("cuda",)


def _autocast_off(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)


def _autocast_cast(dtype: torch.dtype, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as autocast casts an op's inputs: every floating tensor but float64 to `dtype`."""
    return tuple(t if t.dtype == torch.float64 else t.to(dtype) for t in tensors)


class FastLayerNorm(nn.LayerNorm):
    """Bias-free LayerNorm: fp32 statistics, deterministic weight gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xr, weight = x, self.weight
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.float32 if x.device.type in LAYER_NORM_FP32_UNDER_AUTOCAST else x.dtype
            xr, weight = _autocast_cast(dtype, x, weight)
        path = choose_path(self.dbrx_fast_options.backend, "LayerNorm", xr, weight)
        if path == "stock":
            return super().forward(x)
        with _autocast_off(x):
            if path == "triton":
                from .ops.layernorm import layer_norm  # imported at first use: triton is only needed for this path

                check_capturable("layer_norm", xr, xr.shape[-1])
                return layer_norm(xr, weight, self.eps)
            return reference.layer_norm(xr, weight, self.eps)


class FastRotaryEmbedding(DbrxRotaryEmbedding):
    """Returns cos and sin in float32 whatever the activations' dtype.

    Only the patched attention consumes them, and it rotates in fp32: cos/sin rounded to bf16 lose the low bits of
    the angle at theta 500000 and long positions. A stock fallback casts them back, which is exactly what stock does.
    The frequencies are the fp32 `inv_freq` buffer, or, when `model.to(torch.bfloat16)` has rounded that buffer (cos
    off by up to 2 at head_dim 128 and position 8191), recomputed in fp32 from the theta in use
    (`dbrx_fast_rope_theta`, set by `patch`) with transformers' formula, on the buffer's device so that nothing is
    copied from the host inside a CUDA-graph capture. Only the default RoPE type is patched, whose scaling is 1.
    """

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.dtype not in (torch.float32, torch.float64):
            dim = 2 * inv_freq.numel()
            exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=inv_freq.device) / dim
            inv_freq = 1.0 / (self.dbrx_fast_rope_theta**exponents)
        # fp32 as stock computes them (before it rounds them to x's dtype), so a stock fallback gets stock's values.
        return reference.rope_cos_sin(position_ids, inv_freq.to(x.device, torch.float32))


class FastDbrxAttention(DbrxAttention):
    """DBRX attention: on the triton backend the fused QKV kernel (clip, split, RoPE in fp32, one pass), in torch the
    same steps eagerly; then the cache update and the attention core named by `config._attn_implementation` (after
    `patch`, dbrx-fast's: attention_interface.py, which also holds the per-call fallbacks to transformers' attention).

    Under autocast, q, k and v come from the autocast `Wqkv` in its dtype and are rotated in it; the attention core
    runs under autocast as in stock."""

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
        with _autocast_off(qkv):
            if path == "triton" and self.dbrx_fast_options.rope:
                from .ops.qkv import qkv_rope  # imported at first use: triton is only needed for this path

                layer = _static_layer(cache, self.layer_idx, qkv)
                check_capturable(
                    "qkv_rope",
                    qkv,
                    self.num_heads,
                    self.num_key_value_heads,
                    self.head_dim,
                    self.clip_qkv is None,
                    layer is None,  # the kernel's cache-writing mode is a tuning key of its own
                )
                if layer is None:
                    q, k, v = qkv_rope(qkv, cos, sin, self.clip_qkv, self.num_heads, self.num_key_value_heads)
                else:  # k and v straight into the StaticCache, as StaticLayer.update would put them, without its copy
                    rows = layer.cumulative_length + torch.arange(qkv.shape[1], device=qkv.device)
                    # As StaticLayer.update's index_copy_ fails past the cache, without a host sync (graph capture).
                    torch._assert_async(rows[-1] < layer.keys.shape[2], "dbrx_fast: tokens past the StaticCache")
                    q, k, v = qkv_rope(
                        qkv,
                        cos,
                        sin,
                        self.clip_qkv,
                        self.num_heads,
                        self.num_key_value_heads,
                        k_cache=layer.keys,
                        v_cache=layer.values,
                        cache_position=rows,
                    )
                    layer.cumulative_length.add_(qkv.shape[1])
                    cache = None  # updated
            else:
                if self.clip_qkv is not None:
                    qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
                kv_width = self.num_key_value_heads * self.head_dim
                q, k, v = (
                    t.view(*input_shape, -1, self.head_dim).transpose(1, 2)
                    for t in qkv.split([self.hidden_size, kv_width, kv_width], dim=-1)
                )
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


def _static_layer(cache, layer_idx: int, qkv: torch.Tensor) -> StaticLayer | None:
    """The StaticCache layer the QKV kernel can write k and v into directly: a plain StaticLayer, already allocated
    (the first update allocates it), on qkv's device and in its dtype, of a cache that does not offload, in a no-grad
    call; else None, and `cache.update` runs."""
    layers = getattr(cache, "layers", None)
    if torch.is_grad_enabled() or getattr(cache, "offloading", False) or not layers or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if type(layer) is not StaticLayer or not layer.is_initialized:
        return None
    if layer.keys.device != qkv.device or layer.keys.dtype != qkv.dtype or layer.values.dtype != qkv.dtype:
        return None
    return layer


class FastDbrxFFN(DbrxFFN):
    """DBRX's MoE: fused routing, then `self.experts(...)` with stock's arguments (so hooks and FSDP2 on the experts
    fire as on stock), plus the dispatch metadata the routing kernel makes on the way. The stock router module is kept
    (router logits and the auxiliary loss are recorded from it as before)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        path = choose_path(self.dbrx_fast_options.backend, "MoE routing", hidden_states)
        if path == "stock":
            return super().forward(hidden_states)  # stock routing; it still calls self.experts
        x = hidden_states
        if self.training and self.router.moe_jitter_eps is not None:
            # The stock router jitters its input in place and the experts then see the jittered tokens: keep that,
            # on a copy, so no tensor that autograd saved is modified in place.
            x = x.clone()
        router_logits = self.router(x)
        if path == "triton":
            from .ops.routing import route

            check_capturable("routing", router_logits, *router_logits.shape[1:], self.top_k)
            routing = route(router_logits, self.top_k, self.moe_normalize_expert_weights)
            dispatch = (routing.sorted_slots, routing.expert_offsets)
            return self.experts(x, routing.expert_ids, routing.weights, dispatch=dispatch)
        weights, expert_ids = reference.route(router_logits, self.top_k, self.moe_normalize_expert_weights)
        return self.experts(x, expert_ids, weights)


class FastDbrxExperts(DbrxExperts):
    """The grouped GLU experts, called like stock's `DbrxExperts` (hidden_states, top_k_index, top_k_weights).

    Three steps, each its own call, so that expert parallelism can later put an all-to-all between them:
    1. dispatch: the routing metadata (sorted_slots [T*k], slots grouped by expert; expert_offsets [E+1]), passed in
       as `dispatch` by FastDbrxFFN from the routing kernel, else computed from top_k_index (`reference.dispatch`).
    2. expert GEMMs: `expert_outputs` gives y [T, k, H], each slot's expert output times its routing weight, from the
       unpermuted tokens (the kernels gather the rows of x inside the GEMM). Its backward takes any gradient of y:
       the combine's (one [T, H] gradient broadcast over k, read as is) or a per-slot one (such as an all-to-all's).
    3. combine: `combine` sums each token's k slots in a fixed order and rounds once.
    For expert parallelism the rows go out in dispatch order and the GEMMs run on each rank's local experts with
    identity metadata (slot p, top-1), which the same kernels take; the results come back to slot order for step 3.

    The expert weights are read here, after the forward pre-hooks on this module have run (FSDP2 unshards them there).
    `experts.mlp` is not called (stock calls it once per expert, passing its weights): hooks on it do not fire.
    """

    def forward(self, hidden_states, top_k_index, top_k_weights, dispatch=None):
        mlp = self.mlp
        x, w1, v1, w2 = hidden_states.reshape(-1, self.hidden_size), mlp.w1, mlp.v1, mlp.w2
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)  # the experts are matmuls: autocast's lower precision
            x, w1, v1, w2 = _autocast_cast(dtype, x, w1, v1, w2)
        path = choose_path(self.dbrx_fast_options.backend, "MoE experts", x, w1, v1, w2)
        if path != "stock" and not x.dtype == w1.dtype == v1.dtype == w2.dtype:
            path = "stock"  # stock matmuls raise on mixed dtypes, which is the right answer here too
        if path == "stock":
            # Stock takes int64 ids and the routing weights in the activations' dtype, as stock routing makes them.
            return super().forward(hidden_states, top_k_index.long(), top_k_weights.to(hidden_states.dtype))

        with _autocast_off(x):
            if path == "triton":
                from .ops import moe as impl

                check_capturable(
                    "MoE experts",
                    x,
                    row_bucket(x.shape[0] * top_k_index.shape[1]),
                    self.hidden_size,
                    self.ffn_hidden_size,
                    self.num_experts,
                    torch.get_float32_matmul_precision(),  # whether fp32 dots may use TF32
                )
                top_k_weights = top_k_weights.float()
            else:
                impl = moe_torch
            if dispatch is None:
                dispatch = reference.dispatch(top_k_index, self.num_experts)
            sorted_slots, expert_offsets = dispatch
            y = impl.expert_outputs(x, w1, v1, w2, top_k_weights, sorted_slots, expert_offsets)
            out = impl.combine(y, x.dtype)
        return out.view(hidden_states.shape[0], -1, self.hidden_size)
