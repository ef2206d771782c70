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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends, checks
from .reference import activate, neuron_mask


def masked_act_reference(g, u, mask, activation: str = "silu") -> torch.Tensor:
    """``act(g) * u`` (``g`` None: ``act(u)``) ``[T, F]``, inactive experts' neurons zeroed."""
    h = activate(u, activation) if g is None else activate(g, activation) * u
    return h * neuron_mask(mask, u.shape[1]).to(h.dtype)


def _masked_act_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton' for masked_act, got {backend!r}")
    if backend == "auto":  # the Triton kernel on a GPU, the reference elsewhere
        ok = device.type == "cuda" and backends.is_available("triton")
        return "triton" if ok else "torch"
    backends.resolve(backend, device, "masked_act")  # raises for a device it cannot run on
    backends.load(backend)
    return backend


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
    if _masked_act_backend(backend, u.device) == "torch":
        return masked_act_reference(g, u, mask, activation)
    from prunepath import triton_kernels

    c = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    return triton_kernels.masked_act(None if g is None else c(g), c(u), mask.contiguous(), activation)


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
