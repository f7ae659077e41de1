"""Training activation memory of one MoE layer: what autograd saves for the backward, patched vs stock.

Counted with saved-tensor hooks, so it is the same number on any device: the bytes of every distinct storage saved
during the layer's forward, leaving out the parameters and the layer's input (they exist whatever the layer saves).
"""

import copy

import pytest
import torch
from models import tiny_config, tiny_model

import dbrx_fast


def saved_activation_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    excluded = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return sum(saved.values())


@pytest.mark.interpreter
def test_moe_layer_saves_at_most_half_of_stock():
    config = tiny_config(experts=16, top_k=4, ffn_hidden=112)  # DBRX's ratio: F = 1.75 * d_model
    stock = tiny_model(config).transformer.blocks[0].ffn.train()
    patched_model = dbrx_fast.patch(tiny_model(config), backend="triton")
    patched = patched_model.transformer.blocks[0].ffn.train()
    patched.load_state_dict(copy.deepcopy(stock.state_dict()))
    x = torch.randn(2, 96, config.d_model, requires_grad=True)

    ours, theirs = saved_activation_bytes(patched, x), saved_activation_bytes(stock, x)
    assert 0 < ours <= theirs / 2, f"patched MoE saves {ours} bytes, stock {theirs}"
