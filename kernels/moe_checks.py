"""The argument checks of every MoE kernel launcher (kernels/moe_experts.py, moe_input_grads.py, moe_weight_grads.py).

Each raises with a message that names the argument and says what it must be. A float64 tensor raises TypeError so
that callers fall back to the torch path; anything else malformed raises before a buffer is allocated.
"""

import torch

from .dtypes import check_dtype


def check_float(name: str, t: torch.Tensor, like: torch.Tensor | None = None, like_name: str = "x") -> None:
    """t is fp16, bf16 or fp32 (float64 raises TypeError so that callers fall back to torch), and has the dtype and
    device of `like` when given."""
    check_dtype(name, t)
    if like is not None and (t.dtype != like.dtype or t.device != like.device):
        raise TypeError(f"{name} ({t.dtype}, {t.device}) must match {like_name} ({like.dtype}, {like.device})")


def check_matrix(name: str, t: torch.Tensor, shape: tuple[int, int], what: str) -> None:
    """t is 2-D of exactly `shape`; `what` names the dimensions, e.g. "[T*k, F]"."""
    if t.dim() != 2 or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {what} = {list(shape)}, got shape {tuple(t.shape)}")


def check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")


def check_preact(gate: torch.Tensor, up: torch.Tensor, names: tuple[str, str] = ("gate", "up")) -> None:
    """gate and up (or dgate and dup): [T*k, F] in one supported dtype, on one device."""
    check_float(names[0], gate)
    if gate.dim() != 2:
        raise ValueError(f"{names[0]} must be [T*k, F], got shape {tuple(gate.shape)}")
    check_float(names[1], up, gate, names[0])
    check_matrix(names[1], up, tuple(gate.shape), f"[T*k, F] like {names[0]}")


def check_weights(weights: torch.Tensor, top_k: int, device: torch.device, num_tokens: int | None = None) -> int:
    """The routing weights: float32 [T, k] on `device` (T = num_tokens when given); returns T."""
    if weights.dtype != torch.float32:
        raise TypeError(f"weights must be float32, got {weights.dtype}")
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device}, the activations on {device}")
    if weights.dim() != 2 or weights.shape[1] != top_k or num_tokens not in (None, weights.shape[0]):
        tokens = "" if num_tokens is None else f", T = {num_tokens}"
        raise ValueError(f"weights must be [T, k] with k = {top_k}{tokens}, got shape {tuple(weights.shape)}")
    return weights.shape[0]


def check_routing(
    sorted_slots: torch.Tensor, expert_offsets: torch.Tensor, top_k: int, num_rows: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validates the dispatch metadata; returns it contiguous (a no-op for the router's output) and E."""
    check_top_k(top_k)
    for name, t in (("sorted_slots", sorted_slots), ("expert_offsets", expert_offsets)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the activations on {device}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if sorted_slots.numel() != num_rows:
        raise ValueError(f"sorted_slots has {sorted_slots.numel()} entries, expected T*k = {num_rows}")
    if expert_offsets.numel() < 2:
        raise ValueError(f"expert_offsets must have E+1 >= 2 entries, got {expert_offsets.numel()}")
    return sorted_slots.contiguous(), expert_offsets.contiguous(), expert_offsets.numel() - 1


def check_num_experts(expert_offsets: torch.Tensor, num_experts: int) -> None:
    """A launcher told E separately: expert_offsets has E+1 entries."""
    if num_experts < 1 or expert_offsets.numel() != num_experts + 1:
        raise ValueError(
            f"num_experts = {num_experts} needs expert_offsets of E+1 entries, got {expert_offsets.numel()}"
        )


def check_expert_weight(
    name: str,
    w: torch.Tensor,
    like: torch.Tensor,
    like_name: str,
    num_experts: int,
    hidden: int | None = None,
    ffn: int | None = None,
) -> int:
    """An expert weight [E*F, H] in `like`'s dtype and on its device, H = hidden and F = ffn where given; returns F."""
    check_float(name, w, like, like_name)
    if w.dim() != 2 or hidden not in (None, w.shape[1]):
        raise ValueError(f"{name} must be [E*F, H] with H = {hidden}, got {tuple(w.shape)}")
    if ffn is None:
        if w.shape[0] == 0 or w.shape[0] % num_experts:
            raise ValueError(f"{name} has {w.shape[0]} rows, which is not a positive multiple of E = {num_experts}")
        return w.shape[0] // num_experts
    if w.shape[0] != num_experts * ffn:
        raise ValueError(f"{name} must be [E*F, H] with E = {num_experts}, F = {ffn}, got {tuple(w.shape)}")
    return ffn


def check_down_grad_inputs(
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    weights: torch.Tensor,
    sorted_slots: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """The arguments of `moe_down_bwd`: dout [T, H] like gate, gate and up [T*k, F],
    weights [T, k] and the dispatch metadata. Returns (sorted_slots, expert_offsets, E, T*k, H)."""
    check_top_k(top_k)
    check_preact(gate, up)
    check_float("dout", dout, gate, "gate")
    if dout.dim() != 2:
        raise ValueError(f"dout must be [T, H], got shape {tuple(dout.shape)}")
    num_rows, hidden = dout.shape[0] * top_k, dout.shape[1]
    check_weights(weights, top_k, gate.device, dout.shape[0])
    check_matrix("gate", gate, (num_rows, gate.shape[1]), "[T*k, F]")
    sorted_slots, expert_offsets, num_experts = check_routing(
        sorted_slots, expert_offsets, top_k, num_rows, gate.device
    )
    return sorted_slots, expert_offsets, num_experts, num_rows, hidden
