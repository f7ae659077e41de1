"""CUDA graphs: `dbrx_fast.warmup` runs every decode row-count bucket before capture, a capture that would autotune
says so clearly, and (on a GPU) a patched decode step captured in a CUDA graph replays with eager's results.

On the CPU the capture state is faked (`backend.capturing`), which checks what warmup covers and what the capture
check refuses; the real capture needs CUDA."""

import inspect

import pytest
import torch
import triton
from models import tiny_config, tiny_model
from transformers import StaticCache

import dbrx_fast
from dbrx_fast import backend
from dbrx_fast.kernels import autotune, layernorm
from dbrx_fast.warmup import decode_token_counts

CONFIG = dict(n_heads=4, kv_n_heads=2, experts=8, top_k=2)
# transformers < 5.24 names the cache argument `past_key_values`, later versions `cache`.
CACHE = "cache" if "cache" in inspect.signature(tiny_model().forward).parameters else "past_key_values"


@pytest.mark.parametrize("max_tokens, top_k", [(10, 4), (6, 3), (1, 1), (37, 2), (100, 5)])
def test_decode_token_counts_reach_every_bucket_once(max_tokens, top_k):
    def bucket(tokens):
        return 1 << (tokens * top_k - 1).bit_length()

    counts = decode_token_counts(max_tokens, top_k)
    assert sorted({bucket(t) for t in range(1, max_tokens + 1)}) == [bucket(t) for t in counts]
    assert counts[-1] == max_tokens
    if (max_tokens, top_k) == (10, 4):
        assert counts == [1, 2, 4, 8, 10]  # rows 4, 8, 16, 32, 40 -> buckets 4, 8, 16, 32, 64


def test_warmup_refuses_a_stock_model_and_no_tokens():
    with pytest.raises(ValueError, match="patched"):
        dbrx_fast.warmup(tiny_model(), max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        dbrx_fast.warmup(dbrx_fast.patch(tiny_model(), backend="torch"), max_tokens=0)


@pytest.mark.interpreter
def test_capture_before_warmup_raises_and_after_warmup_runs(monkeypatch, device):
    """Faked capture: every Triton call checks its autotune key before it launches."""
    model = dbrx_fast.patch(tiny_model(tiny_config(**CONFIG)).to(device), backend="triton")
    capture = {"on": False}
    monkeypatch.setattr(backend, "capturing", lambda device: capture["on"])
    monkeypatch.setattr(backend, "_ran_keys", set())  # as in a fresh process
    ids = torch.randint(0, 97, (5, 1), device=device)

    def decode(tokens, capturing):
        capture["on"] = capturing
        try:
            with torch.no_grad():
                return model(ids[:tokens], use_cache=False).logits
        finally:
            capture["on"] = False

    with pytest.raises(RuntimeError, match=r"layer_norm .*dbrx_fast\.warmup\(model, max_tokens=N\)"):
        decode(3, capturing=True)
    assert dbrx_fast.warmup(model, max_tokens=4) == [1, 2, 4]  # top-2: rows 2, 4, 8
    for tokens in (1, 2, 3, 4):
        assert torch.equal(decode(tokens, capturing=True), decode(tokens, capturing=False))
    with pytest.raises(RuntimeError, match="MoE experts"):
        decode(5, capturing=True)  # 10 rows: bucket 16, which a warm-up to 4 tokens did not reach


@pytest.mark.interpreter
def test_warmup_covers_a_static_cache_decode_step(monkeypatch, device):
    """Faked capture of a decode step that writes k and v into a StaticCache and attends over generate's padding
    mask: keys no uncached forward reaches (the QKV kernel's cache mode, the decode kernel with a key mask), which the
    prefill does not reach either (more queries than a decode step takes)."""
    model = dbrx_fast.patch(tiny_model(tiny_config(**CONFIG)).to(device), backend="triton")
    capture = {"on": False}
    monkeypatch.setattr(backend, "capturing", lambda device: capture["on"])
    monkeypatch.setattr(backend, "_ran_keys", set())
    batch, prompt_len = 3, 12
    prompt = torch.randint(0, 97, (batch, prompt_len), device=device)
    ids = torch.randint(0, 97, (batch, 1), device=device)
    caches = [StaticCache(config=model.config, max_cache_len=prompt_len + 1) for _ in range(3)]

    def step(cache, ids, start, capturing):
        end = start + ids.shape[1]
        capture["on"] = capturing
        try:
            return model(
                input_ids=ids,
                attention_mask=torch.ones((batch, end), dtype=torch.long, device=device),
                position_ids=torch.arange(start, end, device=device).expand(batch, -1),
                use_cache=True,
                **{CACHE: cache},
            ).logits
        finally:
            capture["on"] = False

    with torch.no_grad():
        for cache in caches:
            step(cache, prompt, 0, capturing=False)
        with pytest.raises(RuntimeError, match=r"qkv_rope .*dbrx_fast\.warmup"):
            step(caches[1], ids, prompt_len, capturing=True)
        dbrx_fast.warmup(model, max_tokens=batch)
        captured = step(caches[2], ids, prompt_len, capturing=True)
        assert torch.equal(captured, step(caches[0], ids, prompt_len, capturing=False))


def test_an_autotuner_refuses_to_benchmark_inside_a_capture(monkeypatch):
    """The guard on the tuners' own keys (kernels/autotune.py): Triton times a new key's configs through
    Autotuner._bench, which every autotuner of ours refuses while the current CUDA stream is being captured."""
    assert "self._bench(" in inspect.getsource(triton.runtime.autotuner.Autotuner.run)
    tuner = layernorm._layernorm_fwd_kernel
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="_layernorm_fwd_kernel meets a new autotune key inside CUDA-graph capture"):
        tuner._bench(config=tuner.configs[0])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert autotune._refused_in_capture(lambda **meta: meta, "k")(config="c") == {"config": "c"}


def decode_step(model, ids, cache, position):
    return model(input_ids=ids, position_ids=position, use_cache=True, **{CACHE: cache}).logits


@pytest.mark.gpu
def test_a_patched_decode_step_replays_in_a_cuda_graph(monkeypatch):
    """Prefill eagerly into two StaticCaches; capture one decode step on the second and replay it step by step
    against eager decode on the first: the same kernels with the same tuned configs give the same bits."""
    device = torch.device("cuda")
    model = dbrx_fast.patch(tiny_model(tiny_config(**CONFIG)).to(device, torch.bfloat16), backend="triton")
    batch, prompt_len, steps = 3, 6, 4
    monkeypatch.setattr(backend, "_ran_keys", set())
    caches = [StaticCache(config=model.config, max_cache_len=prompt_len + steps) for _ in range(3)]
    prompt = torch.randint(0, 97, (batch, prompt_len), device=device)
    positions = torch.arange(prompt_len, device=device).expand(batch, -1)
    stream = torch.cuda.Stream()
    with torch.no_grad():
        for cache in caches:  # eager decode, the captured one, and a scratch one for the side-stream warm-up
            logits = decode_step(model, prompt, cache, positions)
        ids = logits[:, -1:].argmax(-1)
        static_ids, static_position = ids.clone(), torch.full((batch, 1), prompt_len, device=device)

        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="warmup"), torch.cuda.graph(graph, stream=stream):
            decode_step(model, static_ids, caches[1], static_position)
        dbrx_fast.warmup(model, max_tokens=batch)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # torch's own advice: run the step once on the capture stream first
            decode_step(model, static_ids, caches[2], static_position)
        torch.cuda.current_stream().wait_stream(stream)

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            static_logits = decode_step(model, static_ids, caches[1], static_position)
        for step in range(steps):
            expected = decode_step(model, ids, caches[0], torch.full((batch, 1), prompt_len + step, device=device))
            static_ids.copy_(ids)
            static_position.fill_(prompt_len + step)
            graph.replay()
            assert torch.equal(static_logits, expected), f"step {step}"
            ids = expected[:, -1:].argmax(-1)
