"""The masked-dense FFN: the result of :func:`prunepath.ops.routed_ffn` at dense cost.

>>> y, mask = prunepath.ops.masked_dense_ffn(x, w_gate, w_up, w_down, lambda: route_fn(x),
...                                          stream=side_stream)

Up projections over every expert (cuBLAS), the routing mask applied to the hidden state,
the down projection (cuBLAS). It is what a decode step should run when the union of a
batch's active experts is (nearly) every expert, so that reading only the active experts
saves nothing: there, this costs what the dense FFN costs, and the routing can hide.

``mask`` is a bool ``[T, E]`` tensor or a zero-argument callable returning one. With a
callable and a CUDA ``stream``, the mask is computed on that stream *while the up
projections run on the current one* (the router's few small kernels overlap the
weight-streaming GEMVs); the current stream then waits for it. This is a fork/join of the
current stream, so it captures into CUDA graphs. Anywhere else (CPU, no stream, while
``torch.compile`` traces) the callable simply runs first.

The middle step, :func:`masked_act` (``act(g) * u`` with inactive neurons zeroed), is one
Triton kernel on a GPU (:mod:`prunepath.triton_kernels.masked_act`): the same number of
kernels as the dense FFN's activation and product, so the mask itself costs nothing.
:func:`masked_act_reference` defines its semantics.

:func:`router_masked_dense_ffn` takes the router's weights instead of a mask: the router's
first projection is one more block of rows of the up projection's GEMM (one GEMM when
``w_gate``, ``w_up`` and ``w_router`` are consecutive rows of one storage, see
:func:`stacked`; three otherwise), and :func:`routed_act` routes each token inside the
masked-activation kernel. So the FFN costs the dense FFN's kernels plus E (or R) rows of
GEMM: no router kernels, no route kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checks
from .dispatch import implementation, resolve
from .reference import masked_act_reference, routed_act_logits, routed_act_reference
from .router_route import _check as _check_router


def _masked_act_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton' for masked_act, got {backend!r}")
    # "auto": the Triton kernel on a GPU, the reference elsewhere (the table's static order)
    return resolve(backend, device, "masked_act")  # raises for a device it cannot run on


def masked_act(g: torch.Tensor | None, u: torch.Tensor, mask: torch.Tensor, *,
               activation: str = "silu", backend: str = "auto") -> torch.Tensor:
    """``act(g) * u`` (or ``act(u)`` for a non-gated FFN, ``g=None``) ``[T, F]`` with each
    token's inactive experts' neurons zeroed; ``mask`` bool ``[T, E]``, E divides F."""
    if not isinstance(u, torch.Tensor) or u.dim() != 2 or u.dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"u must be a float tensor [T, F], got {getattr(u, 'shape', u)!r}")
    if g is not None and (tuple(g.shape) != tuple(u.shape) or g.dtype != u.dtype or g.device != u.device):
        raise ValueError(f"g must match u ({tuple(u.shape)}, {u.dtype}, {u.device}), got "
                         f"{tuple(g.shape)}, {g.dtype}, {g.device}")
    if activation not in checks.ACTIVATIONS:
        raise ValueError(f"activation must be one of {checks.ACTIVATIONS}, got {activation!r}")
    checks.check_mask(mask, u.shape[0], u.shape[1], u.device)
    return _masked_act_checked(g, u, mask, activation, backend)


def _masked_act_checked(g, u, mask, activation, backend):
    """:func:`masked_act` on arguments already checked."""
    return implementation("masked_act", _masked_act_backend(backend, u.device))(g, u, mask,
                                                                               activation)


def masked_dense_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    mask,
    *,
    activation: str = "silu",
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, mask)``: :func:`prunepath.ops.routed_ffn`'s result computed densely.

    Args as :func:`prunepath.ops.routed_ffn` (``nn.Linear`` layout), except ``mask``: a bool
    ``[T, E]`` tensor, or a zero-argument callable returning one, run on ``stream`` (CUDA)
    concurrently with the up projections. ``backend`` picks :func:`masked_act`'s kernel.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"x must be a float tensor [T, d], got {getattr(x, 'shape', x)!r}")
    checks.check_ffn_weights(w_gate, w_up, w_down, activation, b_up, b_down, d=x.shape[1],
                             dtype=x.dtype, device=x.device, dtype_of="x")
    overlap = (callable(mask) and stream is not None and x.is_cuda
               and not torch.compiler.is_compiling())
    if overlap:
        main = torch.cuda.current_stream(x.device)
        stream.wait_stream(main)  # x is ready
        with torch.cuda.stream(stream):
            m = mask()
    else:
        m = mask() if callable(mask) else mask
    g = None if w_gate is None else F.linear(x, w_gate)
    u = F.linear(x, w_up, b_up)
    checks.check_mask(m, x.shape[0], w_up.shape[0], x.device)
    if overlap:
        main.wait_stream(stream)
        if not torch.cuda.is_current_stream_capturing():
            m.record_stream(main)  # made on the side stream, used (and freed) on this one
    h = _masked_act_checked(g, u, m, activation, backend)  # g, u from checked weights
    return F.linear(h, w_down, b_down), m


def stacked(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    """The one tensor that ``tensors`` make when they are contiguous, consecutive pieces (in
    this order) of one storage with one row length -- a view, no copy -- else None."""
    if not tensors or any(t is None or not t.is_contiguous() for t in tensors):
        return None
    first = tensors[0]
    ptr, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (t.untyped_storage().data_ptr() != ptr or t.storage_offset() != offset
                or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]):
            return None
        offset += t.numel()
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return first.as_strided(shape, first.stride(), first.storage_offset())


def router_masked_dense_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    w_router: torch.Tensor,
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
    w_stacked: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, mask)``: :func:`prunepath.ops.router_route` then :func:`masked_dense_ffn`, with
    the router's first layer computed by the up projection's GEMM and the routing done in
    the masked-activation kernel (see the module docstring).

    Args as :func:`prunepath.ops.router_route` (the router) and
    :func:`prunepath.ops.routed_ffn` (the FFN). One GEMM for the up projections and the
    router when ``w_gate``, ``w_up``, ``w_router`` (or ``w_up``, ``w_router`` for a non-gated
    FFN) are consecutive rows of one storage (:func:`stacked`; found here in eager calls, but
    a traced caller -- ``torch.compile`` cannot look at storages -- passes that view as
    ``w_stacked``, whose shape is checked, not its storage). The router's projection is
    then rounded to ``x``'s dtype before its bias is added in fp32 (:func:`router_route`
    keeps it in fp32): a token whose cumulative mass lies within that rounding of the budget
    can route differently. ``backend`` picks the activation kernel as for :func:`masked_act`
    ("triton" on a GPU by default, else the torch reference).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"x must be a float tensor [T, d], got {getattr(x, 'shape', x)!r}")
    checks.check_ffn_weights(w_gate, w_up, w_down, activation, b_up, b_down, d=x.shape[1],
                             dtype=x.dtype, device=x.device, dtype_of="x")
    _check_router(x, w_router, b_router, w_router_out, b_router_out, hidden_activation)
    e = w_router.shape[0] if w_router_out is None else w_router_out.shape[0]
    f, r = w_up.shape[0], w_router.shape[0]
    if f % e:
        raise ValueError(f"the router's {e} experts must divide the FFN width F={f}")
    lo, hi = checks.expert_count_bounds(min_experts, max_experts, e)
    t = x.shape[0]
    b = checks.budget_tensor(budget, t, x.device, strided_ok=True)
    rows = [w for w in (w_gate, w_up, w_router) if w is not None]
    n_rows = sum(w.shape[0] for w in rows)
    if w_stacked is not None:
        if (tuple(w_stacked.shape) != (n_rows, x.shape[1]) or w_stacked.dtype != x.dtype
                or w_stacked.device != x.device):
            raise ValueError(f"w_stacked must be the [{n_rows}, {x.shape[1]}] {x.dtype} rows of "
                             f"w_gate, w_up and w_router, got {tuple(w_stacked.shape)} "
                             f"{w_stacked.dtype} on {w_stacked.device}")
        joint = w_stacked
    else:
        joint = None if torch.compiler.is_compiling() else stacked(*rows)
    if joint is not None:
        out = F.linear(x, joint)
        parts = list(out.split([w.shape[0] for w in rows], dim=1))
    else:
        parts = [F.linear(x, w) for w in rows]
    g, u, z = (None, *parts) if w_gate is None else parts
    if b_up is not None:
        u = u + b_up
    h, mask = implementation("routed_act", _masked_act_backend(backend, x.device))(
        g, u, z, b_router, w_router_out, b_router_out, hidden_activation, b, lo, hi, activation)
    return F.linear(h, w_down, b_down), mask


__all__ = ["masked_act", "masked_dense_ffn", "router_masked_dense_ffn", "stacked",
           "masked_act_reference", "routed_act_reference", "routed_act_logits"]
