"""Store each routed FFN's down projection transposed: W_down^T ``[F, d]`` contiguous.

nn.Linear keeps ``W_down`` as ``[d, F]``, so one expert's block of it is ``d`` short runs of
``F / E`` neurons (64 bytes per row for SmolLM2's 16-neuron fp32 experts). ``pack`` re-lays
the parameter's storage as ``W_down^T`` and leaves ``weight`` the ``[d, F]`` view of it: the
same values, shape, ``state_dict`` key and Parameter object (optimizers and tied references
stay valid), no extra memory. The kernels see the layout
(:func:`prunepath.ops.checks.is_packed_down`) and read each active expert's block as
contiguous rows; the dense paths (``nn.Linear``, :func:`prunepath.ops.linear`) read the
transposed weight in place.

>>> prunepath.decode.packed_down.pack(model)     # number of down projections re-laid
>>> prunepath.decode.packed_down.unpack(model)   # back to nn.Linear's contiguous [d, F]

GPT-2's Conv1D already stores ``c_proj`` as ``[F, d]``: nothing to do there.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import RoutedFFN
from ..ops.checks import is_packed_down


def _down_weights(model: nn.Module):
    for mod in model.modules():
        if isinstance(mod, RoutedFFN) and not mod.fam.conv1d:
            yield mod.projections()[2].weight


@torch.no_grad()
def pack(model: nn.Module) -> int:
    """Re-lay every routed layer's ``W_down`` as a contiguous ``W_down^T``; returns how many
    were re-laid (already packed ones are skipped)."""
    n = 0
    for p in _down_weights(model):
        if p.is_contiguous():
            p.data = p.data.t().contiguous().t()
            n += 1
    return n


@torch.no_grad()
def unpack(model: nn.Module) -> int:
    """Undo :func:`pack`: contiguous ``[d, F]`` weights again; returns how many."""
    n = 0
    for p in _down_weights(model):
        if is_packed_down(p):
            p.data = p.data.contiguous()
            n += 1
    return n


def packed(model: nn.Module) -> int:
    """How many routed layers of ``model`` hold a packed ``W_down``."""
    return sum(1 for p in _down_weights(model) if is_packed_down(p))
