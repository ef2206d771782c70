"""Plain PyTorch reference implementations of the ops.

These define the semantics every fast backend (C++ CPU, Triton, CUDA) must match
(:mod:`prunepath.ops.registry` pairs each op with its reference). They are deliberately
simple: readable, always available, and used by the tests as ground truth.
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


def routed_ffn_packed_reference(x, w_gate, w_up, w_down_t, mask, activation="silu", b_up=None,
                                b_down=None):
    """Plain PyTorch semantics: :func:`routed_ffn_reference` with ``w_down = w_down_t.T``."""
    up = F.linear(x, w_up, b_up)
    h = activate(up, activation) if w_gate is None else activate(F.linear(x, w_gate), activation) * up
    h = h * neuron_mask(mask, w_up.shape[0]).to(h.dtype)
    out = h @ w_down_t
    return out if b_down is None else out + b_down


def router_logits_reference(x, w_router, b_router=None, w_router_out=None, b_router_out=None,
                            hidden_activation="gelu"):
    """fp32 router logits [T, E] (the semantics every backend follows)."""
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    h = F.linear(x.float(), w_router.float(), f32(b_router))
    if w_router_out is None:
        return h
    if hidden_activation != "none":
        h = activate(h, hidden_activation)
    return F.linear(h, w_router_out.float(), f32(b_router_out))


def router_route_reference(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                           budget, min_experts, max_experts):
    """:func:`route_reference` of :func:`router_logits_reference` (``budget`` fp32 [T])."""
    logits = router_logits_reference(x, w_router, b_router, w_router_out, b_router_out,
                                     hidden_activation)
    return route_reference(logits.contiguous(), budget, min_experts, max_experts)


def router_routed_ffn_reference(x, w_router, b_router, w_router_out, b_router_out,
                                hidden_activation, budget, min_experts, max_experts, w_gate, w_up,
                                w_down, activation="silu", b_up=None, b_down=None):
    """``(y, mask)``: :func:`router_route_reference`, then :func:`routed_ffn_reference` of it."""
    mask = router_route_reference(x, w_router, b_router, w_router_out, b_router_out,
                                  hidden_activation, budget, min_experts, max_experts)
    return routed_ffn_reference(x, w_gate, w_up, w_down, mask, activation, b_up, b_down), mask


def linear_reference(x, weight, bias=None):
    """``x @ weight^T + bias``."""
    return F.linear(x, weight, bias)


def masked_act_reference(g, u, mask, activation: str = "silu") -> torch.Tensor:
    """``act(g) * u`` (``g`` None: ``act(u)``) ``[T, F]``, inactive experts' neurons zeroed."""
    h = activate(u, activation) if g is None else activate(g, activation) * u
    return h * neuron_mask(mask, u.shape[1]).to(h.dtype)


def routed_act_logits(z, b_router, w_router_out, b_router_out, hidden_activation):
    """fp32 router logits [T, E] from the router's first projection ``z`` [T, R] (no bias)."""
    h = z.float() if b_router is None else z.float() + b_router.float()
    if w_router_out is None:
        return h
    if hidden_activation != "none":
        h = activate(h, hidden_activation)
    return F.linear(h, w_router_out.float(),
                    None if b_router_out is None else b_router_out.float())


def routed_act_reference(g, u, z, budget, b_router=None, w_router_out=None, b_router_out=None,
                         hidden_activation="gelu", min_experts=1, max_experts=None,
                         activation="silu"):
    """``(h, mask)``: ``mask`` routed from the router projection ``z`` [T, R] (logits ``z +
    b_router``, or ``act(z + b_router) @ w_router_out^T + b_router_out``, in fp32), then
    :func:`masked_act_reference` of it. ``budget`` fp32 [T]."""
    logits = routed_act_logits(z, b_router, w_router_out, b_router_out, hidden_activation)
    e = logits.shape[1]
    mask = route_reference(logits, budget, min_experts, e if max_experts is None else max_experts)
    return masked_act_reference(g, u, mask, activation), mask
