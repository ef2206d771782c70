"""Store each FFN's up-projection weights (and a routed layer's router) as rows of one tensor.

A decode step of a gated FFN computes ``x W_gate^T`` and ``x W_up^T`` from the same input,
and a routed layer's router computes its first projection from it too. ``stack`` re-lays
``W_gate`` and ``W_up`` of every Llama-style MLP into one ``[2F, d]`` storage (``[F, d]``
pieces of it stay the parameters: same values, shapes, ``state_dict`` keys and Parameter
objects, no extra memory once the old storages are freed), and for a
:class:`~prunepath.layers.RoutedFFN` whose router has a folded form (linear or MLP router)
adds the router's first layer as further rows, ``[2F + R, d]``: the layer keeps a view of
those rows in ``router_rows``, and its folded router is written there
(:meth:`~prunepath.layers.RoutedFFN.fused_router`). Then

* a dense FFN (the lean step's, a routed layer's at budget 1) is one GEMM for both up
  projections (:func:`gate_up_view`);
* the masked-dense FFN path (:func:`prunepath.ops.router_masked_dense_ffn`) is one GEMM for
  both up projections and the router, with the routing inside the activation kernel.

Anything that re-allocates a parameter (``model.to(...)``, loading a state dict into new
tensors) undoes the layout silently; the views then stop being adjacent and each product
runs on its own again (same results). ``unstack`` restores separate storages. Stacking
copies each layer's weights once; an old storage stays alive while something else holds it
(a compiled step of a decoder made before, e.g. a dense baseline's: bench/decode.py's
peak memory then shows it).

>>> prunepath.decode.stacked_ffn.stack(model)     # number of FFNs re-laid
>>> prunepath.decode.stacked_ffn.unstack(model)
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import RoutedFFN
from ..ops.masked_dense import stacked


def _gated_mlps(model: nn.Module):
    """(module, owning RoutedFFN or None) for each MLP with ``gate_proj``/``up_proj`` Linears."""
    owners = {id(m.base): m for m in model.modules() if isinstance(m, RoutedFFN)}
    for mod in model.modules():
        if all(isinstance(getattr(mod, n, None), nn.Linear) for n in ("gate_proj", "up_proj")):
            if mod.gate_proj.bias is None and mod.up_proj.bias is None:
                yield mod, owners.get(id(mod))


def _router_first_layer(layer) -> torch.Tensor | None:
    """The routed layer's router first-layer weight (its row count and device), if folded."""
    src = layer._router_sources()
    return None if src is None else src[2]


def gate_up_view(mlp: nn.Module) -> torch.Tensor | None:
    """``[2F, d]``: the MLP's W_gate and W_up as one tensor (a view) when stacked, else None."""
    return stacked(mlp.gate_proj.weight, mlp.up_proj.weight)


def _is_stacked(mlp, layer) -> bool:
    joint = gate_up_view(mlp)
    if joint is None:
        return False
    if layer is None or _router_first_layer(layer) is None:
        return True
    rows = layer.router_rows
    return rows is not None and stacked(joint, rows) is not None


@torch.no_grad()
def stack(model: nn.Module) -> int:
    """Re-lay every gated MLP's W_gate and W_up (+ a routed layer's router rows) into one
    storage each; returns how many were re-laid (already stacked ones are skipped)."""
    n = 0
    for mlp, layer in _gated_mlps(model):
        if _is_stacked(mlp, layer):
            continue
        wg, wu = mlp.gate_proj.weight, mlp.up_proj.weight
        w1 = None if layer is None else _router_first_layer(layer)
        extra = 0 if w1 is None else w1.shape[0]
        joint = torch.empty((2 * wg.shape[0] + extra, wg.shape[1]), dtype=wg.dtype, device=wg.device)
        f = wg.shape[0]
        joint[:f].copy_(wg.data)
        joint[f:2 * f].copy_(wu.data)
        wg.data, wu.data = joint[:f], joint[f:2 * f]
        if layer is not None:
            layer.router_rows = joint[2 * f:] if extra else None
            layer._fused, layer._maybe_stacked = None, True  # refold into the rows
        n += 1
    return n


@torch.no_grad()
def unstack(model: nn.Module) -> int:
    """Undo :func:`stack`: W_gate and W_up in storages of their own, no router rows."""
    n = 0
    for mlp, layer in _gated_mlps(model):
        if gate_up_view(mlp) is None:
            continue
        mlp.gate_proj.weight.data = mlp.gate_proj.weight.data.clone()
        mlp.up_proj.weight.data = mlp.up_proj.weight.data.clone()
        if layer is not None:
            layer.router_rows, layer._fused, layer._maybe_stacked = None, None, False
        n += 1
    return n


def stacked_count(model: nn.Module) -> int:
    """How many MLPs of ``model`` hold stacked up projections (with their router rows)."""
    return sum(1 for mlp, layer in _gated_mlps(model) if _is_stacked(mlp, layer))


__all__ = ["gate_up_view", "stack", "stacked_count", "unstack"]
