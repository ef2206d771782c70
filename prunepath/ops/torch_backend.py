"""The "torch" backend: the plain PyTorch references (:mod:`.reference`), always available.

Each function takes its op's checked arguments in the order :mod:`.registry` documents.
"""

from __future__ import annotations

from . import checks
from .reference import linear_reference as linear
from .reference import masked_act_reference as masked_act
from .reference import route_reference as route
from .reference import routed_act_reference, router_logits_reference
from .reference import routed_ffn_packed_reference as routed_ffn_packed
from .reference import routed_ffn_reference as routed_ffn


def ensure_available(name: str) -> None:
    return None


def router_route(x, w_router, b_router, w_router_out, b_router_out, hidden_activation, budget,
                 min_experts, max_experts):
    b = checks.budget_tensor(budget, x.shape[0], x.device)
    logits = router_logits_reference(x, w_router, b_router, w_router_out, b_router_out,
                                     hidden_activation)
    return route(logits.contiguous(), b, min_experts, max_experts)


def router_routed_ffn(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                      budget, min_experts, max_experts, w_gate, w_up, w_down, activation, b_up,
                      b_down):
    mask = router_route(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                        budget, min_experts, max_experts)
    return routed_ffn(x.contiguous(), w_gate, w_up, w_down, mask, activation, b_up, b_down), mask


def routed_act(g, u, z, b_router, w_router_out, b_router_out, hidden_activation, budget,
               min_experts, max_experts, activation):
    return routed_act_reference(g, u, z, budget, b_router, w_router_out, b_router_out,
                                hidden_activation, min_experts, max_experts, activation)


__all__ = ["route", "routed_ffn", "routed_ffn_packed", "router_route", "router_routed_ffn",
           "linear", "masked_act", "routed_act", "ensure_available"]
