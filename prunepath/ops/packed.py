"""Prepacked FFN weights for the GPU kernels: ``W_down^T`` stored ``[F, d]``.

nn.Linear keeps ``W_down`` as ``[d, F]``: an expert's block is then ``d`` short row
segments. Transposed once (at conversion time) to ``w_down_t = W_down^T [F, d]``, expert e's
block of every weight is one contiguous slab of rows ``[e*F/E, (e+1)*F/E)`` of
``w_gate``/``w_up``/``w_down_t``, which the block-sparse kernels stream with full-width
loads.

>>> packed = prunepath.ops.prepack_ffn(w_gate, w_up, w_down, activation="silu")
>>> y = packed(x, mask)                       # == routed_ffn(x, w_gate, w_up, w_down, mask)
>>> y = prunepath.ops.routed_ffn_packed(x, packed.w_gate, packed.w_up, packed.w_down_t, mask)

Backends: "triton", "cuda" and "cpu" read the packed layout natively (the CPU decode kernel
streams each active expert's rows of ``w_down_t`` front to back instead of ``d`` short
segments); "torch" uses the reference on the transposed view.
"""

from __future__ import annotations

import dataclasses

import torch

from . import checks
from .dispatch import implementation, resolve
from .reference import routed_ffn_packed_reference


@dataclasses.dataclass(frozen=True)
class PackedFFN:
    """An FFN's weights in the packed layout (all ``[F, d]`` except the biases)."""

    w_gate: torch.Tensor | None
    w_up: torch.Tensor
    w_down_t: torch.Tensor
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    activation: str = "silu"

    @property
    def num_neurons(self) -> int:
        return self.w_up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w_up.shape[1]

    def __call__(self, x: torch.Tensor, mask: torch.Tensor, *, backend: str = "auto"):
        return routed_ffn_packed(x, self.w_gate, self.w_up, self.w_down_t, mask,
                                 activation=self.activation, b_up=self.b_up, b_down=self.b_down,
                                 backend=backend)


def prepack_ffn(w_gate, w_up, w_down, *, b_up=None, b_down=None, activation="silu") -> PackedFFN:
    """Pack nn.Linear-layout FFN weights (``w_down`` ``[d, F]``) once; copies ``W_down^T``."""
    f, d = w_up.shape
    if w_down.dim() != 2 or tuple(w_down.shape) != (d, f):
        raise ValueError(f"w_down must have shape [d={d}, F={f}], got {tuple(w_down.shape)}")
    if w_gate is not None and tuple(w_gate.shape) != (f, d):
        raise ValueError(f"w_gate must have shape [F={f}, d={d}], got {tuple(w_gate.shape)}")
    return PackedFFN(
        None if w_gate is None else w_gate.contiguous(), w_up.contiguous(),
        w_down.t().contiguous(), b_up, b_down, activation,
    )


def routed_ffn_packed(
    x: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    mask: torch.Tensor,
    *,
    activation: str = "silu",
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`prunepath.ops.routed_ffn` with ``w_down_t`` = W_down^T ``[F, d]`` (see module doc)."""
    if w_down_t.dim() != 2 or w_down_t.shape != w_up.shape:
        raise ValueError(
            f"w_down_t must be W_down^T with shape [F, d] = {tuple(w_up.shape)} like w_up, "
            f"got {tuple(w_down_t.shape)}"
        )
    checks.check_ffn_args(x, w_gate, w_up, w_down_t.t(), mask, activation, b_up, b_down)
    if checks.needs_grad(x, w_gate, w_up, w_down_t, b_up, b_down):
        backend = "torch"  # the kernels have no backward (as in ops.routed_ffn)
    key = (x.dtype, x.shape[1], w_up.shape[0], mask.shape[1], w_gate is not None, x.shape[0])
    name = resolve(backend, x.device, "routed_ffn_packed", key)
    return implementation("routed_ffn_packed", name)(x.contiguous(), w_gate, w_up, w_down_t,
                                                     mask.contiguous(), activation, b_up, b_down)


__all__ = ["PackedFFN", "prepack_ffn", "routed_ffn_packed", "routed_ffn_packed_reference"]

