"""Triton kernels for PrunePath's ops, registered as torch custom ops (namespace ``prunepath_triton``).

* ``route(logits, budget, min_experts, max_experts)`` -> bool mask [T, E]
* ``router_route(x, w1, b1, w2, b2, hidden_activation, budget, min_experts, max_experts)``:
  fused router projection (linear, or low-rank ``act(x W1^T + b1) W2^T + b2``) + routing
* ``routed_ffn(x, w_gate, w_up, w_down, mask, activation, b_up, b_down)`` with nn.Linear's
  ``w_down`` [d, F]
* ``routed_ffn_packed(...)`` the same with a prepacked ``w_down_t`` = W_down^T [F, d]
  (contiguous expert blocks; what :func:`prunepath.ops.prepack_ffn` makes)
* ``masked_act(g, u, mask, activation)``: ``act(g) * u`` (or ``act(u)``) with inactive
  experts' neurons zeroed, the middle of :func:`prunepath.ops.masked_dense_ffn`
* ``routed_act(g, u, z, b1, w2, b2, hidden_activation, budget, min_experts, max_experts,
  activation)`` -> (h, mask): the same with the mask routed in the kernel from the router's
  first projection ``z``, the middle of :func:`prunepath.ops.router_masked_dense_ffn`

The custom ops have fake (meta) kernels, so they trace under ``torch.compile`` and can be
captured in CUDA graphs: no host synchronization, and every allocation depends on shapes
only. Kernels run on CUDA GPUs, or on the CPU under ``TRITON_INTERPRET=1`` (tests).
The kernels themselves are in :mod:`.route`, :mod:`.ffn` and :mod:`.masked_act`; block sizes
in :mod:`.launch`.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import launch
from . import masked_act as _masked_act
from .launch import FFNConfig, default_config

_NS = "prunepath_triton"


@torch.library.custom_op(f"{_NS}::route", mutates_args=())
def _route_op(logits: torch.Tensor, budget: torch.Tensor, min_experts: int,
              max_experts: int) -> torch.Tensor:
    return launch.route(logits, budget, min_experts, max_experts)


@_route_op.register_fake
def _(logits, budget, min_experts, max_experts):
    return torch.empty(logits.shape, dtype=torch.bool, device=logits.device)


@torch.library.custom_op(f"{_NS}::router_route", mutates_args=())
def _router_route_op(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                     w2: Optional[torch.Tensor], b2: Optional[torch.Tensor], hidden_activation: str,
                     budget: torch.Tensor, min_experts: int,
                     max_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    return launch.router_route(x, w1, b1, w2, b2, hidden_activation, budget, min_experts,
                               max_experts)


@_router_route_op.register_fake
def _(x, w1, b1, w2, b2, hidden_activation, budget, min_experts, max_experts):
    e = w1.shape[0] if w2 is None else w2.shape[0]
    return (x.new_empty((x.shape[0], e), dtype=torch.bool),
            x.new_empty((), dtype=torch.bool))


@torch.library.custom_op(f"{_NS}::routed_ffn", mutates_args=())
def _routed_ffn_op(x: torch.Tensor, w_gate: Optional[torch.Tensor], w_up: torch.Tensor,
                   w_down_t: torch.Tensor, mask: torch.Tensor, activation: str,
                   b_up: Optional[torch.Tensor], b_down: Optional[torch.Tensor]) -> torch.Tensor:
    return launch.routed_ffn(x, w_gate, w_up, w_down_t, mask, activation, b_up, b_down)


@_routed_ffn_op.register_fake
def _(x, w_gate, w_up, w_down_t, mask, activation, b_up, b_down):
    return torch.empty_like(x)


@torch.library.custom_op(f"{_NS}::masked_act", mutates_args=())
def _masked_act_op(g: Optional[torch.Tensor], u: torch.Tensor, mask: torch.Tensor,
                   activation: str) -> torch.Tensor:
    return _masked_act.masked_act(g, u, mask, activation)


@_masked_act_op.register_fake
def _(g, u, mask, activation):
    return torch.empty(u.shape, dtype=u.dtype, device=u.device)


@torch.library.custom_op(f"{_NS}::routed_act", mutates_args=())
def _routed_act_op(g: Optional[torch.Tensor], u: torch.Tensor, z: torch.Tensor,
                   b1: Optional[torch.Tensor], w2: Optional[torch.Tensor],
                   b2: Optional[torch.Tensor], hidden_activation: str, budget: torch.Tensor,
                   min_experts: int, max_experts: int,
                   activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _masked_act.routed_act(g, u, z, b1, w2, b2, hidden_activation, budget, min_experts,
                                  max_experts, activation)


@_routed_act_op.register_fake
def _(g, u, z, b1, w2, b2, hidden_activation, budget, min_experts, max_experts, activation):
    e = z.shape[1] if w2 is None else w2.shape[0]
    return (torch.empty(u.shape, dtype=u.dtype, device=u.device),
            torch.empty((u.shape[0], e), dtype=torch.bool, device=u.device))


def routed_act(g, u, z, b1, w2, b2, hidden_activation, budget, min_experts, max_experts,
               activation):
    """``(h [T, F], mask [T, E])``: routing from the router projection ``z`` [T, R] and the
    masked activation, one kernel (:func:`.masked_act.routed_act`)."""
    return _routed_act_op(g, u, z, b1, w2, b2, hidden_activation, budget, min_experts,
                          max_experts, activation)


def masked_act(g, u, mask, activation):
    """``act(g) * u`` (``g`` None: ``act(u)``) [T, F], inactive experts' neurons zeroed."""
    return _masked_act_op(g, u, mask, activation)


def route(logits, budget, min_experts, max_experts):
    """Cumulative-mass routing mask [T, E] from logits [T, E]; ``budget`` fp32 [T]."""
    return _route_op(logits, budget, min_experts, max_experts)


def router_route(x, w1, b1, w2, b2, hidden_activation, budget, min_experts, max_experts,
                 check_budget=False):
    """Routing mask from hidden states x [T, d]: logits = ``x @ w1^T + b1`` (w2 None) or
    ``act(x @ w1^T + b1) @ w2^T + b2`` (low-rank router); ``hidden_activation`` "none" or an
    FFN activation name. ``check_budget``: the route kernel also checks that every budget
    lies in [0, 1] and a device-side assert fails otherwise (no host sync; one assert
    launch instead of a chain of comparison kernels)."""
    mask, ok = _router_route_op(x, w1, b1, w2, b2, hidden_activation, budget, min_experts,
                                max_experts)
    if check_budget:
        torch._assert_async(ok, "budget values must lie in [0, 1]")
    return mask


def routed_ffn(x, w_gate, w_up, w_down, mask, activation, b_up, b_down):
    """Routed FFN with nn.Linear weights (``w_down`` [d, F], read through a transposed view)."""
    return _routed_ffn_op(x, w_gate, w_up, w_down.t(), mask, activation, b_up, b_down)


def routed_ffn_packed(x, w_gate, w_up, w_down_t, mask, activation, b_up, b_down):
    """Routed FFN with a prepacked, contiguous ``w_down_t`` = W_down^T [F, d]."""
    return _routed_ffn_op(x, w_gate, w_up, w_down_t, mask, activation, b_up, b_down)


__all__ = ["route", "router_route", "routed_ffn", "routed_ffn_packed", "masked_act", "routed_act",
           "FFNConfig", "default_config"]
