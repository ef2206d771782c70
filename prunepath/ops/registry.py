"""The table of ops: each op's plain PyTorch reference and its implementation per backend.

Every public op dispatches through this table: it checks its arguments, resolves
``backend`` ("auto" included, :func:`prunepath.ops.dispatch.resolve`), then calls
``implementation(op, name)`` with the checked arguments in the order ``args`` gives. The
reference defines the semantics every implementation matches (the tests compare them);
its arguments are the same except where ``args`` notes otherwise.

=================  =============================  ==================================  =========
op                 reference                      implementations                     auto
=================  =============================  ==================================  =========
route              route_reference                torch, cpu, cuda, triton            measured
routed_ffn         routed_ffn_reference           torch, cpu, cuda, triton            measured
routed_ffn_packed  routed_ffn_packed_reference    torch, cpu, cuda, triton            measured
router_route       router_route_reference         torch, cpu, cuda, triton            measured
router_routed_ffn  router_routed_ffn_reference    torch, cpu, cuda, triton            as routed_ffn
linear             linear_reference               torch, cpu                          by shape
masked_act         masked_act_reference           torch, triton                       static
routed_act         routed_act_reference           torch, triton                       static
=================  =============================  ==================================  =========

"measured": on a GPU the candidates are timed once per shape (:mod:`.autotune`); on the CPU
a static order ("cpu", then "torch"). "static": the first available of the device's order.
:func:`~prunepath.ops.masked_dense_ffn` and :func:`~prunepath.ops.router_masked_dense_ffn`
are cuBLAS GEMMs around ``masked_act`` / ``routed_act``; :func:`~prunepath.ops.linear` takes
"cpu" for the few rows of a decode step on the CPU (:mod:`.decode_linear`), else "torch".

Implementations are named by attribute of the backend module; ``implementation`` loads the
backend and looks the function up once per (op, backend) (``autotune.clear()`` forgets them).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from . import backends, reference

_ALL = {"torch": "{op}", "cpu": "{op}", "cuda": "{op}", "triton": "{op}"}


@dataclasses.dataclass(frozen=True)
class Op:
    """One op: ``reference`` (plain torch) and ``impls`` (backend -> function name in that
    backend's module), the argument order they take, and whether ``backend="auto"`` times
    the candidates on a GPU (``measured``) or takes the device's static order."""

    name: str
    reference: Callable
    args: str
    impls: Mapping[str, str]
    measured: bool = True


def _impls(op: str, **special) -> dict:
    out = {b: f.format(op=op) for b, f in _ALL.items()}
    out.update(special)
    return out


_FFN_ARGS = "x, w_gate, w_up, w_down, mask, activation, b_up, b_down"
_ROUTER_ARGS = ("x, w_router, b_router, w_router_out, b_router_out, hidden_activation, budget, "
                "min_experts, max_experts")

OPS: dict[str, Op] = {op.name: op for op in (
    Op("route", reference.route_reference, "logits, budget (fp32 [T]), min_experts, max_experts",
       _impls("route")),
    Op("routed_ffn", reference.routed_ffn_reference, _FFN_ARGS, _impls("routed_ffn")),
    Op("routed_ffn_packed", reference.routed_ffn_packed_reference,
       "x, w_gate, w_up, w_down_t (W_down^T [F, d]), mask, activation, b_up, b_down",
       _impls("routed_ffn_packed")),
    Op("router_route", reference.router_route_reference,
       _ROUTER_ARGS + " (budget as the caller gave it; the reference takes fp32 [T])",
       _impls("router_route", cpu="router_route_cpu", cuda="router_route_cuda")),
    Op("router_routed_ffn", reference.router_routed_ffn_reference,
       _ROUTER_ARGS + ", w_gate, w_up, w_down, activation, b_up, b_down -> (y, mask) (budget "
       "as the caller gave it; the reference takes fp32 [T])",
       _impls("router_routed_ffn", cpu="router_routed_ffn_cpu", cuda="router_routed_ffn_cuda")),
    Op("linear", reference.linear_reference, "x, weight, bias",
       {"torch": "linear", "cpu": "linear"}, measured=False),
    Op("masked_act", reference.masked_act_reference, "g, u, mask, activation",
       {"torch": "masked_act", "triton": "masked_act"}, measured=False),
    Op("routed_act", reference.routed_act_reference,
       "g, u, z, b_router, w_router_out, b_router_out, hidden_activation, budget (fp32 [T]), "
       "min_experts, max_experts, activation -> (h, mask) (the reference takes budget fourth)",
       {"torch": "routed_act", "triton": "routed_act"}, measured=False),
)}

# (op, backend) -> function name
_IMPL_NAMES = {(op.name, b): f for op in OPS.values() for b, f in op.impls.items()}
# (op, backend) -> the function, once its backend loaded (a plain dict: the one lookup a call
# makes, traced by torch.compile)
_LOADED: dict = {}


def implementation(op: str, backend: str) -> Callable:
    """The function implementing ``op`` on the concrete ``backend`` (loaded: raises
    BackendUnavailable when its dependencies are missing)."""
    fn = _LOADED.get((op, backend))
    if fn is None:
        fn_name = _IMPL_NAMES.get((op, backend))
        if fn_name is None:
            if op not in OPS:
                raise ValueError(f"unknown op {op!r}; the ops are {sorted(OPS)}")
            backends.check_name(backend)
            raise ValueError(f"op {op!r} has no {backend!r} implementation; it has "
                             f"{sorted(OPS[op].impls)}")
        fn = _LOADED[(op, backend)] = getattr(backends.load(backend), fn_name)
    return fn


def clear() -> None:
    """Forget the loaded functions (and the loaded backends): re-checked on next use."""
    _LOADED.clear()
    backends._LOADED.clear()


def has_implementation(op: str, backend: str) -> bool:
    return (op, backend) in _IMPL_NAMES


__all__ = ["Op", "OPS", "implementation", "has_implementation"]
