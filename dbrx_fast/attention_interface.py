"""dbrx-fast's attention core, registered with transformers under one name (NAME) for attention and masks alike.

`patch` sets `config._attn_implementation = NAME`. transformers' `create_causal_mask` then calls `attention_mask`
below, which returns the compact AttentionMask (attention_mask.py: no [Nq, Nk] mask in memory, no host sync), and every
attention module hands it to `attention_forward`. Both names must be registered: an attention function registered
alone receives `attention_mask=None`, and padding and the static cache's tail slots would vanish silently. The name must
not contain "flash", which transformers reads as a request for a flash-attention hub kernel.

What transformers passes (5.15 to 5.24 alike): the mask function gets `q_offset` (the cache length before this step: a
python int, or a 0-d device tensor for StaticCache, so a CUDA graph replays with the new value), `kv_offset` (0 for
full-attention caches), `kv_length` (the cached length plus Nq, or a StaticCache's `max_cache_len`) and the 2D padding
mask of the tokens seen so far. Query i sits at absolute position i + q_offset and key slot j at j + kv_offset, so the
causal bound is j <= i + (q_offset - kv_offset); a StaticCache's slots past the valid length are out of that bound and
need no mask. The padding mask is kept whenever it is given (knowing that it is all ones would take a host sync).

Packed sequences (position_ids that restart, as padding-free collators make) are isolated from each other whenever the
position ids say so, with or without a cache (stock isolates them only with use_cache=False, because its mask function
sees them only then): `position_ids` reaches the attention function in its kwargs, and `key_start` is derived from it
here (`packed_key_start`). A decode step of at most DECODE_MAX_QUERIES tokens against a cache is taken as the
continuation of one sequence per row, as stock does.

Per call, `attention_forward` picks the Triton kernels (`attention_decode` for a no-grad step of at most
DECODE_MAX_QUERIES queries, else the differentiable `ops.attention`), the torch path (SDPA on the dense mask, GQA via
enable_gqa), or the stock attention with a one-time warning: output_attentions=True (only eager computes the weights),
attention dropout in training, a dtype or head_dim the kernels cannot serve, and a mask that is not an AttentionMask
(a 4D mask the caller made itself, or none at all) go to transformers' eager or sdpa function with the equivalent mask.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.dbrx.modeling_dbrx import eager_attention_forward

from .attention_mask import AttentionMask
from .backend import check_capturable, choose_path, warn_once

NAME = "dbrx_fast"
DECODE_MAX_QUERIES = 8  # the decode kernel's limit
# Head dims every Triton attention kernel serves: attention_fwd.HEAD_DIMS (a test ties them; importing the kernels
# here would need Triton on the torch path too).
TRITON_HEAD_DIMS = (16, 32, 64, 128)


class PreparedAttentionMask(AttentionMask):
    """The AttentionMask the mask function returns. generate() builds the mask of a StaticCache step ahead and passes
    it to the model's forward as `attention_mask`, whose `create_causal_mask` reads `.ndim` (2 would mean a padding
    mask to expand) and then hands it back to the mask function, which returns it as it is."""

    ndim = 4


def register() -> None:
    """Register NAME with transformers' attention and mask interfaces (idempotent; `patch` calls it)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, compact_causal_mask)


def compact_causal_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    local_size: int | None = None,
    use_vmap: bool = False,
    **kwargs,
) -> PreparedAttentionMask:
    """The mask function for NAME: transformers' mask arguments as an AttentionMask (see the module docstring)."""
    if local_size is not None or use_vmap:
        # A sliding window, or extra or/and mask functions, which the compact mask cannot express: DBRX has neither.
        raise ValueError(
            f"attn_implementation {NAME!r} serves plain causal masks (with padding and packing) only, not a sliding "
            "window or custom mask functions; use 'sdpa' or 'eager' for this model."
        )
    if isinstance(attention_mask, AttentionMask):  # built ahead by generate (see PreparedAttentionMask)
        return attention_mask
    device = torch.device(device)
    offset = q_offset - kv_offset
    if isinstance(offset, torch.Tensor):
        offset = offset.to(device, torch.int32).reshape(1).repeat(batch_size)
    else:
        offset = torch.full((batch_size,), offset, dtype=torch.int32, device=device)
    key_mask = None
    if attention_mask is not None:
        if attention_mask.ndim != 2 or attention_mask.shape[0] != batch_size:
            raise ValueError(
                f"attention_mask: expected a 2D padding mask [{batch_size}, keys] (or a prepared 4D mask), got shape "
                f"{tuple(attention_mask.shape)}"
            )
        key_mask = attention_mask.to(device, torch.bool)
        end = kv_offset + kv_length
        if key_mask.shape[1] < end:  # a StaticCache's slots past the tokens seen so far: never reached causally
            key_mask = F.pad(key_mask, (0, end - key_mask.shape[1]))
        key_mask = key_mask[:, kv_offset:end].contiguous()
    return PreparedAttentionMask(offset, key_mask)


def packed_key_start(position_ids: torch.Tensor, mask: AttentionMask, num_queries: int) -> torch.Tensor:
    """key_start int32 [B, Nq]: the key slot where query i's packed sequence starts.

    transformers' packing rule, position_ids[i] != position_ids[i - 1] + 1, taken over the tokens that are not padding:
    generate gives padding position 1, and a gap of padding inside a row must not cut the row in two. The first token
    of the chunk continues what the cache holds. All on the device, no host sync.
    """
    batch = mask.q_offset.shape[0]
    positions = position_ids.expand(batch, num_queries)
    index = torch.arange(num_queries, device=positions.device)
    key_index = index.to(torch.int32)[None] + mask.q_offset[:, None]
    if mask.key_mask is None:
        real = torch.ones_like(positions, dtype=torch.bool)
    else:
        real = mask.key_mask.gather(1, key_index.long().clamp(0, mask.key_mask.shape[1] - 1))
    last_real = torch.where(real, index, -1).cummax(dim=1).values  # the last real token at or before i
    previous = torch.cat((torch.full_like(last_real[:, :1], -1), last_real[:, :-1]), dim=1)
    previous_position = positions.gather(1, previous.clamp(min=0))
    starts = real & (previous >= 0) & (positions != previous_position + 1)
    return torch.where(starts, key_index, 0).cummax(dim=1).values


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: AttentionMask | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] (a StaticCache's whole
    storage included) -> (out [B, Nq, Hq, D] contiguous, None)."""
    batch, _, num_queries, head_dim = query.shape
    num_keys = key.shape[2]
    scale = head_dim**-0.5 if scaling is None else scaling
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"attention: q, k and v must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")

    # As a forward argument or in the config: transformers' output capture reads either, only the first reaches here.
    config_wants_weights = getattr(getattr(module, "config", None), "output_attentions", False)
    wants_weights = kwargs.get("output_attentions", config_wants_weights)
    reason = _stock_reason(attention_mask, dropout, wants_weights)
    path = "stock"
    if reason is None:
        options = getattr(module, "dbrx_fast_options", None)
        path = choose_path(options.backend if options else "auto", "attention", query, key, value)
    if path == "triton" and head_dim not in TRITON_HEAD_DIMS:
        reason = f"head_dim {head_dim} is not one the Triton attention kernels serve ({TRITON_HEAD_DIMS})"
    if reason is not None:
        warn_once(f"attention: {reason}; using transformers' attention for these calls.")
        path = "stock"
    if path == "stock":
        return _stock_attention(module, query, key, value, attention_mask, dropout, scale, wants_weights, kwargs)

    attention_mask.check(batch, num_queries, num_keys, query.device)
    # A step of a few queries behind more keys is a decode step (the module does not pass the cache on): no packing.
    decode = num_queries <= DECODE_MAX_QUERIES and num_keys > num_queries
    position_ids = kwargs.get("position_ids")
    if num_queries > 1 and not decode and position_ids is not None:
        mask = AttentionMask(
            attention_mask.q_offset,
            attention_mask.key_mask,
            packed_key_start(position_ids, attention_mask, num_queries),
        )
    else:
        mask = attention_mask
    if path == "torch":
        allowed = mask.dense(num_queries, num_keys)[:, None]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    if num_queries <= DECODE_MAX_QUERIES and mask.key_start is None and not torch.is_grad_enabled():
        from .kernels.attention_decode import attention_decode  # imported at first use: triton only on this path

        check_capturable("attention_decode", query, *query.shape[1:], key.shape[1], mask.key_mask is None)
        return attention_decode(query, key, value, mask.q_offset, mask.key_mask, scale), None
    from .ops.attention import attention

    check_capturable("attention", query, *query.shape[1:], key.shape[1], mask.key_mask is None, mask.key_start is None)
    return attention(query, key, value, mask, scale), None


def _stock_reason(attention_mask, dropout: float, wants_weights: bool) -> str | None:
    """Why this call must run transformers' attention instead (None: it need not)."""
    if wants_weights:
        return "output_attentions=True (only the eager attention computes the weights)"
    if dropout > 0:
        return "attention dropout in training"
    if isinstance(attention_mask, torch.Tensor):
        return f"a prepared {attention_mask.ndim}D attention mask was passed in"
    if attention_mask is None:
        return "no attention mask was built for it (create_causal_mask was not called)"
    return None


def _stock_attention(module, query, key, value, attention_mask, dropout, scale, wants_weights, kwargs):
    """transformers' eager function (for output_attentions=True, or a model that was eager before `patch`) or its sdpa
    function, with an AttentionMask turned into the dense mask each of them reads."""
    eager = wants_weights or getattr(module, "dbrx_fast_stock_attention", None) == "eager"
    if isinstance(attention_mask, AttentionMask):
        attention_mask = attention_mask.dense(query.shape[2], key.shape[2])[:, None]
        if eager:  # eager adds its mask to the scores
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min
            )
    stock = eager_attention_forward if eager else sdpa_attention_forward
    return stock(module, query, key, value, attention_mask, dropout=dropout, scaling=scale, **kwargs)
