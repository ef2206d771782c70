"""Routing straight from hidden states: router projection + softmax + cumulative-mass mask.

Two router shapes (both as plain weight tensors, any float dtype matching ``x``):

* linear:   ``logits = x @ w_router^T + b_router``                    (``w_router`` [E, d])
* low rank: ``logits = act(x @ w_router^T + b_router) @ w_router_out^T + b_router_out``
  (``w_router`` [R, d], ``w_router_out`` [E, R]; ``hidden_activation`` "gelu", "relu",
  "silu", "gelu_tanh" or "none").

Input standardisation ``(x - mean) * inv_std`` folds into the first layer:
``w' = w * inv_std``, ``b' = b - w' @ mean`` (see :func:`fold_standardization`).

With ``backend="triton"`` this is one fused pass on the device (split-d projection kernel +
route kernel, the latter a programmatic dependent launch on sm_90+; no host sync; a GPU
budget tensor's [0, 1] range is checked by the route kernel). Other backends compute the
logits with torch (fp32) and call that backend's :func:`prunepath.ops.route`. Logits are
computed in fp32 everywhere.
"""

from __future__ import annotations

import torch

from . import checks
from .dispatch import implementation, resolve
from .reference import router_logits_reference

HIDDEN_ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu", "silu")


def fold_standardization(w, b, mean, inv_std):
    """Fold ``W ((x - mean) * inv_std) + b`` into ``W' x + b'``; returns ``(W', b')``."""
    w2 = w.float() * inv_std.float()[None, :]
    b2 = -(w2 @ mean.float())
    if b is not None:
        b2 = b2 + b.float()
    return w2.to(w.dtype), b2


def _check(x, w_router, b_router, w_router_out, b_router_out, hidden_activation):
    if x.dim() != 2 or x.dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"x must be a float tensor [T, d], got {tuple(x.shape)} {x.dtype}")
    d = x.shape[1]
    if w_router.dim() != 2 or w_router.shape[1] != d:
        raise ValueError(f"w_router must have shape [E or R, d={d}], got {tuple(w_router.shape)}")
    r = w_router.shape[0]
    if b_router is not None and tuple(b_router.shape) != (r,):
        raise ValueError(f"b_router must have shape [{r}], got {tuple(b_router.shape)}")
    if w_router_out is not None:
        if w_router_out.dim() != 2 or w_router_out.shape[1] != r:
            raise ValueError(
                f"w_router_out must have shape [E, R={r}], got {tuple(w_router_out.shape)}"
            )
        e = w_router_out.shape[0]
        if b_router_out is not None and tuple(b_router_out.shape) != (e,):
            raise ValueError(f"b_router_out must have shape [{e}], got {tuple(b_router_out.shape)}")
    elif b_router_out is not None:
        raise ValueError("b_router_out needs w_router_out (a low-rank router)")
    if hidden_activation not in HIDDEN_ACTIVATIONS:
        raise ValueError(
            f"hidden_activation must be one of {HIDDEN_ACTIVATIONS}, got {hidden_activation!r}"
        )
    for name, t in (("w_router", w_router), ("b_router", b_router),
                    ("w_router_out", w_router_out), ("b_router_out", b_router_out)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if w_router.dtype != x.dtype:
        raise ValueError(f"w_router has dtype {w_router.dtype} but x has {x.dtype}; use one dtype")


def router_route(
    x: torch.Tensor,
    w_router: torch.Tensor,
    budget=1.0,
    *,
    b_router: torch.Tensor | None = None,
    w_router_out: torch.Tensor | None = None,
    b_router_out: torch.Tensor | None = None,
    hidden_activation: str = "gelu",
    min_experts: int = 1,
    max_experts: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Bool mask [T, E]: :func:`prunepath.ops.route` of the router's logits for ``x`` [T, d]."""
    _check(x, w_router, b_router, w_router_out, b_router_out, hidden_activation)
    e = w_router.shape[0] if w_router_out is None else w_router_out.shape[0]
    lo, hi = checks.expert_count_bounds(min_experts, max_experts, e)
    name = resolve(backend, x.device, "router_route", (x.dtype, x.shape[1], e))
    return run(name, x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
               budget, lo, hi)


def run(name, x, w_router, b_router, w_router_out, b_router_out, hidden_activation, budget,
        lo, hi):
    """:func:`router_route` on checked arguments with a concrete backend ``name``."""
    return implementation("router_route", name)(x, w_router, b_router, w_router_out,
                                                b_router_out, hidden_activation, budget, lo, hi)


__all__ = ["router_route", "router_logits_reference", "fold_standardization",
           "HIDDEN_ACTIVATIONS"]
