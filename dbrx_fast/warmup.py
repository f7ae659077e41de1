"""Warm-up before CUDA-graph capture: run every decode row-count bucket once, and one step against a StaticCache, so
nothing is autotuned in the capture.

Triton autotunes a kernel the first time it meets a new autotune key, and benchmarking the configs synchronises the
device, which fails inside `torch.cuda.graph` capture. The MoE expert kernels key on the row bucket
next_power_of_2(T*k) (T tokens, top-k) and the model's widths, so each decode batch size can be a new key; the other
kernels key on the model's widths only. `warmup(model, max_tokens=N)` runs one no-grad forward of N' tokens (batch N',
one position each) for every bucket that 1 <= T <= N reaches, N' the largest such T of the bucket. Then two one-token
steps against a scratch StaticCache: the first allocates the cache, the second writes k and v straight into it (the
QKV kernel's cache mode) and attends over a padding mask (the decode kernel's masked mode, as `generate` passes one).
Every Triton call of a patched module passes `backend.check_capturable` with its key: a key that never ran raises a
clear RuntimeError during capture instead of failing inside a kernel launch.

On the CPU nothing is autotuned (the interpreter pins one config) and nothing is captured; `warmup` runs the same
forwards there (cheap for a small model), which is what the CPU tests check.
"""

import inspect

import torch
from torch import nn
from transformers import StaticCache

from .backend import row_bucket
from .patch import is_patched


def decode_token_counts(max_tokens: int, top_k: int) -> list[int]:
    """For each row bucket next_power_of_2(T*k) with 1 <= T <= max_tokens, the largest T that falls in it."""
    largest = {}
    for tokens in range(1, max_tokens + 1):
        largest[row_bucket(tokens * top_k)] = tokens
    return sorted(largest.values())


def warmup(model: nn.Module, *, max_tokens: int) -> list[int]:
    """Run a patched DBRX model once per decode row-count bucket up to `max_tokens` tokens per step, and two one-token
    steps against a scratch StaticCache; returns the token counts of the bucket runs. Call it after `patch` and before
    capturing a decode step of at most `max_tokens` tokens (the batch size, for one new token per sequence) in a CUDA
    graph, in the dtype and on the devices the capture will use."""
    if not is_patched(model):
        raise ValueError("dbrx_fast.warmup expects a model patched with dbrx_fast.patch.")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
    config = model.config
    device = model.get_input_embeddings().weight.device
    generator = torch.Generator().manual_seed(0)  # random tokens spread over the experts; the caller's RNG is untouched

    def random_ids(tokens: int) -> torch.Tensor:
        return torch.randint(config.vocab_size, (tokens, 1), generator=generator).to(device)

    counts = decode_token_counts(max_tokens, config.ffn_config.moe_top_k)
    with torch.no_grad():
        for tokens in counts:
            model(input_ids=random_ids(tokens), use_cache=False)
        # transformers < 5.24 names the cache argument `past_key_values`, later versions `cache`.
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cache = StaticCache(config=config, max_cache_len=2)
        for position in range(2):
            model(
                input_ids=random_ids(1),
                attention_mask=torch.ones((1, position + 1), dtype=torch.long, device=device),
                position_ids=torch.full((1, 1), position, device=device),
                use_cache=True,
                **{cache_arg: cache},
            )
    return counts
