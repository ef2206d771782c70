"""The public ops: cumulative-mass routing and the routed (block-sparse) FFN.

>>> mask = prunepath.ops.route(router_logits, budget=0.7)          # [T, E] bool
>>> y = prunepath.ops.routed_ffn(x, w_gate, w_up, w_down, mask)   # [T, d]

Also: :func:`router_route` (router projection + routing in one call, fused on GPU with
backend="triton"), :func:`router_routed_ffn` (that and the routed FFN as one op: on a GPU at
1-2 tokens one kernel routes in the FFN's prologue), :func:`prepack_ffn` /
:func:`routed_ffn_packed` (W_down^T stored [F, d] once, so every expert's block is
contiguous; see :mod:`prunepath.ops.packed`; a ``w_down`` that is the transposed view of such
a W_down^T, :func:`checks.is_packed_down`, is read that way by :func:`routed_ffn` too),
:func:`linear` (a decode step's matrix-vector products; C++ kernel on the CPU),
:func:`masked_dense_ffn` (the same result as :func:`routed_ffn` at dense cost, the routing
overlapped with the up projections on a side CUDA stream: for near-dense unions),
:func:`router_masked_dense_ffn` (the same from the router's weights: the router's projection
in the up projections' GEMM, the routing in the masked-activation kernel),
:func:`bind_routed_ffn` / :func:`bind_router_route` (the same ops bound to one layer's weights:
checks and backend choice once, for decode loops; see :mod:`prunepath.ops.bound`).
Every op dispatches through one table, :data:`prunepath.ops.registry.OPS`: per op its plain
torch reference and its implementation per backend ("torch", "cpu", "triton", "cuda").
``backend="auto"`` measures the GPU backends once per shape (:mod:`prunepath.ops.autotune`).
"""

from __future__ import annotations

import torch

from . import backends, checks, registry
from .backends import BACKENDS
from .dispatch import implementation, resolve
from .errors import BackendUnavailable
from .bound import (BoundRoutedFFN, BoundRouterRoute, BoundRouterRoutedFFN, bind_routed_ffn,
                    bind_router_route)
from .decode_linear import linear
from .masked_dense import masked_act, masked_dense_ffn, router_masked_dense_ffn, stacked
from .packed import PackedFFN, prepack_ffn, routed_ffn_packed
from .reference import ACTIVATIONS
from .router_route import router_route
from .router_routed_ffn import router_routed_ffn


def route(
    logits: torch.Tensor,
    budget=1.0,
    *,
    min_experts: int = 1,
    max_experts: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per token, the smallest top-probability expert set whose softmax mass reaches ``budget``.

    Args:
        logits: router logits ``[T, E]``, any float dtype (computed in fp32).
        budget: float in [0, 1] or a ``[T]`` tensor of per-token budgets. 1.0 = every expert.
        min_experts, max_experts: clamp the per-token expert count to this range.
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns a bool mask ``[T, E]``. Never synchronizes with the host.
    """
    checks.check_logits(logits)
    t, e = logits.shape
    lo, hi = checks.expert_count_bounds(min_experts, max_experts, e)
    b = checks.budget_tensor(budget, t, logits.device)
    name = resolve(backend, logits.device, "route", (e,))
    return implementation("route", name)(logits.contiguous(), b, lo, hi)


def routed_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    mask: torch.Tensor,
    *,
    activation: str = "silu",
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The dense FFN with each token's inactive experts' neurons zeroed.

    Weights use ``nn.Linear`` layout: ``w_gate``/``w_up`` ``[F, d]`` (``w_gate=None`` for a
    non-gated FFN), ``w_down`` ``[d, F]``. ``mask`` ``[T, E]`` from :func:`route`; expert e owns
    neurons ``[e*F/E, (e+1)*F/E)``. Experts are not re-weighted. Returns ``[T, d]``.

    Differentiable: when autograd needs a gradient (grad mode on and an input that requires
    one), the "torch" reference runs whatever ``backend`` says, since the compiled and Triton
    kernels have no backward. Run inference under ``torch.no_grad()`` (as ``generate`` does).
    """
    checks.check_ffn_args(x, w_gate, w_up, w_down, mask, activation, b_up, b_down)
    if checks.needs_grad(x, w_gate, w_up, w_down, b_up, b_down):
        backend = "torch"
    key = (x.dtype, x.shape[1], w_up.shape[0], mask.shape[1], w_gate is not None, x.shape[0])
    name = resolve(backend, x.device, "routed_ffn", key)
    return implementation("routed_ffn", name)(
        x.contiguous(), w_gate, w_up, w_down, mask.contiguous(), activation, b_up, b_down
    )


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device`` here (built, installed and supported)."""
    device = torch.device(device)
    return [n for n in BACKENDS if backends.supports_device(n, device) and backends.is_available(n)]


__all__ = [
    "route",
    "routed_ffn",
    "router_route",
    "router_routed_ffn",
    "linear",
    "bind_routed_ffn",
    "bind_router_route",
    "BoundRoutedFFN",
    "BoundRouterRoute",
    "BoundRouterRoutedFFN",
    "prepack_ffn",
    "routed_ffn_packed",
    "PackedFFN",
    "masked_dense_ffn",
    "masked_act",
    "router_masked_dense_ffn",
    "stacked",
    "available_backends",
    "registry",
    "ACTIVATIONS",
    "BACKENDS",
    "BackendUnavailable",
]
