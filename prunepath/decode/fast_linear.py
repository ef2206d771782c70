"""Decode steps on the CPU: route the model's ``nn.Linear`` layers through
:func:`prunepath.ops.linear` (the C++ matrix-vector kernel) when they see a few tokens.

>>> prunepath.decode.fast_linear.enable(model)    # number of layers switched; Decoder does this on CPU
>>> prunepath.decode.fast_linear.disable(model)   # back to torch.nn.functional.linear

A decode step is a chain of matrix-vector products; ``torch.nn.functional.linear`` runs
them at about half the rate the CPU's memory allows (on a 2-core Zen 3), for the dense
model and PrunePath alike. ``enable`` replaces the ``forward`` of every plain ``nn.Linear``
on the CPU by one that calls :func:`prunepath.ops.linear` for inputs of at most
``prunepath.ops.decode_linear.MAX_TOKENS`` rows (decode steps) and ``F.linear`` otherwise (prefill,
training, autograd). The modules, their parameters and ``state_dict`` keys stay as they are
(an instance attribute, removed by :func:`disable`); results equal ``F.linear`` up to fp32
summation order.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.decode_linear import MAX_TOKENS

_FLAG = "_prunepath_fast_linear"


def _fast_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if x.device.type != "cpu" or rows == 0 or rows > MAX_TOKENS:
        return F.linear(x, self.weight, self.bias)
    y = ops.linear(x.reshape(rows, x.shape[-1]), self.weight, self.bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def enable(model: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` on the CPU to the fast decode path;
    returns how many were switched (0 where the compiled extension is missing)."""
    if not ops.backends.is_available("cpu"):
        return 0
    n = 0
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.weight.device.type == "cpu" and not getattr(mod, _FLAG, False):
            mod.forward = types.MethodType(_fast_forward, mod)
            setattr(mod, _FLAG, True)
            n += 1
    return n


def disable(model: nn.Module) -> int:
    """Undo :func:`enable`; returns how many layers were switched back."""
    n = 0
    for mod in model.modules():
        if getattr(mod, _FLAG, False):
            del mod.forward
            delattr(mod, _FLAG)
            n += 1
    return n


def is_fast(module: nn.Module) -> bool:
    """Whether :func:`enable` switched this ``nn.Linear`` to the fast decode path."""
    return getattr(module, _FLAG, False)


def enabled(model: nn.Module) -> int:
    """How many layers of ``model`` use the fast decode path."""
    return sum(1 for mod in model.modules() if getattr(mod, _FLAG, False))
