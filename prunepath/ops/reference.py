"""Plain PyTorch reference implementations of the two core ops.

These define the semantics every fast backend (C++ CPU, Triton, CUDA) must match.
They are deliberately simple: readable, always available, and used by the tests
as ground truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply one of :data:`ACTIVATIONS` elementwise."""
    if activation == "silu":
        return F.silu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def route_reference(
    logits: torch.Tensor, budget: torch.Tensor, min_experts: int, max_experts: int
) -> torch.Tensor:
    """Cumulative-mass routing.

    ``logits`` [T, E] (any float dtype, computed in fp32); ``budget`` [T] fp32.
    Per token: softmax, take experts in descending probability (ties toward the
    lower index) until the cumulative mass reaches the budget, the crossing
    expert included; clamp the count to [min_experts, max_experts]. A budget of
    1 (or more) selects every expert. Returns a bool mask [T, E].
    """
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the experts ranked above
    b = budget.float().unsqueeze(-1)
    take = (mass_before < b) | (b >= 1.0)
    count = take.sum(dim=-1).clamp(min_experts, max_experts)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    keep_sorted = rank.unsqueeze(0) < count.unsqueeze(-1)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def neuron_mask(mask: torch.Tensor, num_neurons: int) -> torch.Tensor:
    """Expand an expert mask [T, E] to a neuron mask [T, F] (expert e owns a contiguous block)."""
    return mask.repeat_interleave(num_neurons // mask.shape[-1], dim=-1)


def routed_ffn_reference(
    x: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    mask: torch.Tensor,
    activation: str = "silu",
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense FFN with each token's inactive experts' neurons zeroed (no re-weighting).

    Weights are in ``nn.Linear`` layout: ``w_gate``/``w_up`` [F, d], ``w_down`` [d, F].
    Gated: ``act(x Wg^T) * (x Wu^T + b_up)``; non-gated: ``act(x Wu^T + b_up)``;
    then ``@ Wd^T + b_down``.
    """
    up = F.linear(x, w_up, b_up)
    if w_gate is None:
        h = activate(up, activation)
    else:
        h = activate(F.linear(x, w_gate), activation) * up
    h = h * neuron_mask(mask, w_up.shape[0]).to(h.dtype)
    return F.linear(h, w_down, b_down)
