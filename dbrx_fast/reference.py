"""Eager, readable versions of every op dbrx-fast fuses.

They are the oracle for tests and benchmarks (call them with float64 tensors for an exact-as-possible answer) and
the ``backend="torch"`` path. Low-precision inputs are upcast to float32 for the maths and the result is rounded
once to the input dtype, as the kernels do.
"""

import torch
import torch.nn.functional as F

from .attention_mask import AttentionMask


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Bias-free LayerNorm over the last dimension, statistics in float32 (or float64)."""
    dt = compute_dtype(x)
    xc = x.to(dt)
    mean = xc.mean(-1, keepdim=True)
    var = (xc - mean).square().mean(-1, keepdim=True)
    return ((xc - mean) * torch.rsqrt(var + eps) * weight.to(dt)).to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [B, S, D] for positions [B, S] and inverse frequencies [D/2], in float32 or float64.

    The two halves repeat (Hugging Face's rotate-half convention). Angles are formed in float32 at least: at
    theta 500000 and long positions a bf16 angle or bf16 cos/sin loses most of its bits.
    """
    dt = compute_dtype(inv_freq)
    freqs = position_ids[..., None].to(dt) * inv_freq.to(dt)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, Hq, S, D] and k [B, Hkv, S, D] with cos/sin [B or 1, S, D] shared by all heads."""
    dt = compute_dtype(q)
    c, s = cos.to(dt).unsqueeze(1), sin.to(dt).unsqueeze(1)

    def rotate(x):
        xc = x.to(dt)
        return (xc * c + rotate_half(xc) * s).to(x.dtype)

    return rotate(q), rotate(k)


def route(router_logits: torch.Tensor, top_k: int, normalize_p: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DBRX routing: softmax over experts in float32, top-k, then division by the p-norm of the chosen weights.

    Returns (weights [T, k] in float32 or float64, expert indices [T, k] int64). Experts are ranked by logit (the
    order of the probabilities, as softmax is monotone, but immune to exp rounding to equal or zero probabilities),
    and equal logits go to the lower expert index. torch.topk does not define its tie order (CPU and CUDA differ), so
    this rule is ours. Stock transformers takes the softmax in the logits' dtype, so in bf16 it can choose other
    experts than this does.
    """
    logits = router_logits.to(compute_dtype(router_logits))
    probs = torch.softmax(logits, dim=-1)
    indices = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(-1, indices)
    if normalize_p is not None:
        weights = weights / torch.norm(weights, p=normalize_p, dim=-1, keepdim=True)
    return weights, indices


def moe_experts_by_ids(
    x: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
) -> torch.Tensor:
    """GLU experts on Hugging Face's native layout, summed over each token's k experts, one expert at a time.

    x [T, H]; w1, v1, w2 [E*F, H] (w2 is used as stored: y = h @ w2_e); weights and expert_ids [T, k].
    out[t] = sum_j weights[t, j] * (silu(x[t] @ w1_e.T) * (x[t] @ v1_e.T)) @ w2_e with e = expert_ids[t, j].
    """
    dt = compute_dtype(x)
    hidden = x.shape[-1]
    w1, v1, w2 = (w.view(num_experts, -1, hidden) for w in (w1, v1, w2))
    out = torch.zeros(x.shape, dtype=dt, device=x.device)
    for expert in range(num_experts):
        token, slot = torch.nonzero(expert_ids == expert, as_tuple=True)
        if token.numel() == 0:
            continue
        xe = x[token].to(dt)
        h = F.silu(xe @ w1[expert].to(dt).T) * (xe @ v1[expert].to(dt).T)
        y = (h @ w2[expert].to(dt)) * weights[token, slot, None].to(dt)
        out.index_add_(0, token, y)
    return out.to(x.dtype)


def gqa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention. q [B, Hq, Nq, D]; k, v [B, Hkv, Nk, D], query head h reading KV head
    h // (Hq / Hkv); `mask` says which keys each query sees (attention_mask.py).

    Returns (out [B, Nq, Hq, D] in q's dtype, the layout transformers' attention functions return; lse [B, Hq, Nq]
    in the compute dtype: the natural log of sum_j exp(scale * q.k_j) over the allowed keys). A query that sees no
    key gets out 0 and lse -inf.
    """
    dt = compute_dtype(q)
    group = q.shape[1] // k.shape[1]
    kc = k.to(dt).repeat_interleave(group, dim=1)
    vc = v.to(dt).repeat_interleave(group, dim=1)
    scores = (q.to(dt) @ kc.transpose(-1, -2)) * scale
    allowed = mask.dense(q.shape[-2], k.shape[-2])[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ vc).transpose(1, 2).to(q.dtype), lse


def dispatch(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch metadata for expert ids [T, k]: (sorted_slots [T*k], expert_offsets [E+1]), both int32.

    A slot is t*k + j. sorted_slots groups the slots by expert, ascending within an expert (so by token);
    expert e owns sorted_slots[expert_offsets[e]:expert_offsets[e+1]].
    """
    flat = expert_ids.reshape(-1).long()
    sorted_slots = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cat((counts.new_zeros(1), counts.cumsum(0)))
    return sorted_slots.to(torch.int32), offsets.to(torch.int32)
