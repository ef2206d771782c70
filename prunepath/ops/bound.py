"""Ops bound to one layer's weights: their checks and backend choice made once, not per call.

A decode step calls :func:`~prunepath.ops.router_route` and :func:`~prunepath.ops.routed_ffn`
once per layer with the same weights, thousands of times. On a CPU the per-call Python work
of the public ops (checking every weight, resolving ``backend="auto"``) is a large part of a
one-token call (SmolLM2, cache-hot: the two public ops 90 us, bound 63 us, the FFN kernel
31 us; ``bench/routed_layer_cpu.py``). A bound op checks the weights when it is made and, per
call, only what changes: the input (shape, dtype, device), the mask, the budget.

>>> ffn = prunepath.ops.bind_routed_ffn(w_gate, w_up, w_down, activation="silu")
>>> router = prunepath.ops.bind_router_route(w1, b_router=b1, w_router_out=w2, b_router_out=b2)
>>> y = ffn(x, router(x, budget=0.5))      # == routed_ffn(x, ..., router_route(x, ..., 0.5))
>>> y, mask = prunepath.ops.BoundRouterRoutedFFN(router, ffn)(x, 0.5)  # router_routed_ffn

The bound op holds references to the tensors it was given: in-place updates of them are seen,
a tensor replaced by another (``param.data = ...``, ``model.to(...)``) is not -- bind again.
Under autograd (grad mode on and an input or weight that requires a gradient) the bound FFN
runs the differentiable "torch" reference, like :func:`~prunepath.ops.routed_ffn`.
"""

from __future__ import annotations

import torch

from . import checks
from . import router_route as _rr
from .dispatch import implementation, resolve


class BoundRoutedFFN:
    """:func:`prunepath.ops.routed_ffn` with fixed weights; call as ``ffn(x, mask)``."""

    def __init__(self, w_gate, w_up, w_down, *, activation="silu", b_up=None, b_down=None,
                 backend="auto"):
        checks.check_ffn_weights(w_gate, w_up, w_down, activation, b_up, b_down)
        if backend != "auto":
            resolve(backend, w_up.device, "routed_ffn")  # raises for a bad name/device
        self.weights = (w_gate, w_up, w_down, b_up, b_down)
        self.activation, self.backend = activation, backend
        self.f, self.d = w_up.shape
        self.dtype, self.device = w_up.dtype, w_up.device
        self._names: dict = {}  # tokens -> resolved backend

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        checks.check_ffn_inputs(x, mask, d=self.d, f=self.f, dtype=self.dtype, device=self.device)
        w_gate, w_up, w_down, b_up, b_down = self.weights
        name = self.backend_for(x, mask.shape[1])
        return implementation("routed_ffn", name)(x.contiguous(), w_gate, w_up, w_down,
                                                  mask.contiguous(), self.activation, b_up, b_down)

    def backend_for(self, x: torch.Tensor, num_experts: int) -> str:
        """The concrete backend for a call on ``x`` (chosen once per token count)."""
        if checks.needs_grad(x, *self.weights):
            return "torch"
        t = x.shape[0]
        name = self._names.get(t)
        if name is None:
            key = (self.dtype, self.d, self.f, num_experts, self.weights[0] is not None, t)
            name = resolve(self.backend, self.device, "routed_ffn", key)
            if not checks._tracing():  # a choice made while tracing is a static default
                self._names[t] = name
        return name


class BoundRouterRoute:
    """:func:`prunepath.ops.router_route` with fixed router tensors; call as
    ``router(x, budget)``."""

    def __init__(self, w_router, *, b_router=None, w_router_out=None, b_router_out=None,
                 hidden_activation="gelu", min_experts=1, max_experts=None, backend="auto"):
        if not isinstance(w_router, torch.Tensor) or w_router.dim() != 2:
            raise ValueError(f"w_router must be a 2-D tensor [E or R, d], got "
                             f"{getattr(w_router, 'shape', w_router)!r}")
        probe = torch.empty((0, w_router.shape[1]), dtype=w_router.dtype, device=w_router.device)
        _rr._check(probe, w_router, b_router, w_router_out, b_router_out, hidden_activation)
        self.e = w_router.shape[0] if w_router_out is None else w_router_out.shape[0]
        self.lo, self.hi = checks.expert_count_bounds(min_experts, max_experts, self.e)
        self.tensors = (w_router, b_router, w_router_out, b_router_out)
        self.hidden_activation = hidden_activation
        self.d, self.dtype, self.device = w_router.shape[1], w_router.dtype, w_router.device
        self.backend = backend
        self._name = None

    def __call__(self, x: torch.Tensor, budget=1.0) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must have shape [T, d={self.d}], got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise ValueError(f"x has dtype {x.dtype} but w_router has {self.dtype}; use one dtype")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but w_router is on {self.device}")
        name = self._name
        if name is None:
            name = resolve(self.backend, self.device, "router_route", (self.dtype, self.d, self.e))
            if not checks._tracing():
                self._name = name
        w, b, w_out, b_out = self.tensors
        return implementation("router_route", name)(x, w, b, w_out, b_out, self.hidden_activation,
                                                    budget, self.lo, self.hi)


class BoundRouterRoutedFFN:
    """:func:`prunepath.ops.router_routed_ffn` with a bound router and a bound FFN; call as
    ``both(x, budget)`` -> ``(y, mask)``. The FFN's backend choice serves both."""

    def __init__(self, router: BoundRouterRoute, ffn: BoundRoutedFFN):
        if (router.d, router.dtype, router.device) != (ffn.d, ffn.dtype, ffn.device):
            raise ValueError(
                f"the router takes [T, {router.d}] {router.dtype} inputs on {router.device} but "
                f"the FFN takes [T, {ffn.d}] {ffn.dtype} on {ffn.device}")
        if ffn.f % router.e:
            raise ValueError(f"the router's E={router.e} experts must divide the FFN width "
                             f"F={ffn.f}")
        self.router, self.ffn = router, ffn

    def __call__(self, x: torch.Tensor, budget=1.0):
        r, f = self.router, self.ffn
        if x.dim() != 2 or x.shape[1] != f.d or x.dtype != f.dtype or x.device != f.device:
            raise ValueError(f"x must be a [T, d={f.d}] {f.dtype} tensor on {f.device}, got "
                             f"{tuple(x.shape)} {x.dtype} on {x.device}")
        name = f.backend_for(x, r.e)
        w1, b1, w2, b2 = r.tensors
        w_gate, w_up, w_down, b_up, b_down = f.weights
        return implementation("router_routed_ffn", name)(
            x, w1, b1, w2, b2, r.hidden_activation, budget, r.lo, r.hi, w_gate, w_up, w_down,
            f.activation, b_up, b_down)


def bind_routed_ffn(w_gate, w_up, w_down, *, activation="silu", b_up=None, b_down=None,
                    backend="auto") -> BoundRoutedFFN:
    """:func:`prunepath.ops.routed_ffn` bound to these weights (see the module doc)."""
    return BoundRoutedFFN(w_gate, w_up, w_down, activation=activation, b_up=b_up, b_down=b_down,
                          backend=backend)


def bind_router_route(w_router, *, b_router=None, w_router_out=None, b_router_out=None,
                      hidden_activation="gelu", min_experts=1, max_experts=None,
                      backend="auto") -> BoundRouterRoute:
    """:func:`prunepath.ops.router_route` bound to these router tensors (see the module doc)."""
    return BoundRouterRoute(w_router, b_router=b_router, w_router_out=w_router_out,
                            b_router_out=b_router_out, hidden_activation=hidden_activation,
                            min_experts=min_experts, max_experts=max_experts, backend=backend)
