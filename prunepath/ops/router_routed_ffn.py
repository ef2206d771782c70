"""Routing and the routed FFN as one op: :func:`router_route`, then :func:`routed_ffn` on its mask.

>>> y, mask = prunepath.ops.router_routed_ffn(x, w_router, w_gate, w_up, w_down, budget=0.5,
...                                            w_router_out=w2, b_router_out=b2)

Same results as the two ops (``mask`` is the routing mask the FFN used), with fewer steps
between them:

* ``backend="cpu"``: one call into the extension (``torch.ops.prunepath.router_routed_ffn``,
  the two C++ kernels back to back): one dispatch instead of two.
* other backends, Triton included: the two ops. Routing inside the Triton FFN kernels (in a
  one-launch FFN's prologue, or in the two-phase FFN's up kernel) was built and measured on
  an H200 and gained nothing against the two ops, so it was removed (BENCHMARKS.md has the
  numbers, git history the kernels).
"""

from __future__ import annotations

import torch

from . import checks
from .dispatch import implementation, resolve
from .router_route import _check


def router_routed_ffn(
    x: torch.Tensor,
    w_router: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    budget=1.0,
    *,
    b_router: torch.Tensor | None = None,
    w_router_out: torch.Tensor | None = None,
    b_router_out: torch.Tensor | None = None,
    hidden_activation: str = "gelu",
    min_experts: int = 1,
    max_experts: int | None = None,
    activation: str = "silu",
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [T, d], mask [T, E])``: ``mask = router_route(x, w_router, budget, ...)`` and
    ``y = routed_ffn(x, w_gate, w_up, w_down, mask, ...)``; arguments as those two ops take
    them (the router's E must divide the FFN width). ``backend`` picks the FFN's backend
    ("auto": as :func:`routed_ffn` chooses it); the routing runs on the same one."""
    _check(x, w_router, b_router, w_router_out, b_router_out, hidden_activation)
    e = w_router.shape[0] if w_router_out is None else w_router_out.shape[0]
    lo, hi = checks.expert_count_bounds(min_experts, max_experts, e)
    checks.check_ffn_weights(w_gate, w_up, w_down, activation, b_up, b_down, d=x.shape[1],
                             dtype=x.dtype, device=x.device, dtype_of="x")
    if w_up.shape[0] % e:
        raise ValueError(f"the router's E={e} experts must divide the FFN width F={w_up.shape[0]}")
    if checks.needs_grad(x, w_gate, w_up, w_down, b_up, b_down):
        backend = "torch"
    key = (x.dtype, x.shape[1], w_up.shape[0], e, w_gate is not None, x.shape[0])
    name = resolve(backend, x.device, "routed_ffn", key)
    return run(name, x, (w_router, b_router, w_router_out, b_router_out), hidden_activation,
               budget, lo, hi, (w_gate, w_up, w_down, b_up, b_down), activation)


def run(name, x, router, hidden_activation, budget, lo, hi, ffn, activation):
    """:func:`router_routed_ffn` on checked arguments with a concrete backend ``name``;
    ``router`` = (w_router, b_router, w_router_out, b_router_out), ``ffn`` = (w_gate, w_up,
    w_down, b_up, b_down) in nn.Linear layout (``w_down`` maybe the transposed view of a
    packed W_down^T)."""
    w1, b1, w2, b2 = router
    w_gate, w_up, w_down, b_up, b_down = ffn
    return implementation("router_routed_ffn", name)(
        x, w1, b1, w2, b2, hidden_activation, budget, lo, hi, w_gate, w_up, w_down, activation,
        b_up, b_down)

