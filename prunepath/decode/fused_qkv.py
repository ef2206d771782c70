"""Store each attention's q, k and v projection weights as consecutive rows of one tensor.

A decode step computes q, k and v from the same input: three matrix-vector products, each a
kernel launch (plus, on a GPU, a split-K reduction each), the small k/v ones far below the
memory bandwidth. ``fuse`` re-lays the three weights (and biases, when all three have one)
into one ``[Dq + 2 Dkv, d]`` storage and leaves each ``weight`` the view of its rows: the same
values, shapes, ``state_dict`` keys and Parameter objects (optimizers and references stay
valid), no extra memory once the old storages are freed; ``save_pretrained`` writes the
usual checkpoint. :func:`qkv_view` then hands the lean decode step
(:mod:`prunepath.decode.lean_step`) one ``[Dq + 2 Dkv, d]`` weight for one product. Anything that
re-allocates a parameter (``model.to(...)``, loading a state dict into new tensors) undoes
the layout silently; :func:`qkv_view` then returns None and the step runs three products.

>>> prunepath.decode.fused_qkv.fuse(model)     # number of attentions re-laid
>>> prunepath.decode.fused_qkv.unfuse(model)   # each projection its own storage again
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.masked_dense import stacked


def _projections(attn: nn.Module):
    return attn.q_proj, attn.k_proj, attn.v_proj


def _attentions(model: nn.Module):
    for mod in model.modules():
        if all(isinstance(getattr(mod, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
            yield mod


def qkv_view(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight [Dq + 2 Dkv, d], bias or None)`` of a fused attention, else None."""
    q, k, v = _projections(attn)
    weight = stacked(q.weight, k.weight, v.weight)
    if weight is None:
        return None
    biases = [q.bias, k.bias, v.bias]
    if all(b is None for b in biases):
        return weight, None
    bias = stacked(*biases)
    return None if bias is None else (weight, bias)


@torch.no_grad()
def fuse(model: nn.Module) -> int:
    """Re-lay every attention's q/k/v weights (and biases) into one storage each; returns
    how many attentions were re-laid (already fused ones are skipped)."""
    n = 0
    for attn in _attentions(model):
        if qkv_view(attn) is not None:
            continue
        projs = _projections(attn)
        groups = [[p.weight for p in projs]]
        if all(p.bias is not None for p in projs):
            groups.append([p.bias for p in projs])
        for params in groups:
            joined = torch.cat([p.data for p in params])
            start = 0
            for p in params:
                p.data = joined[start:start + p.shape[0]]
                start += p.shape[0]
        n += 1
    return n


@torch.no_grad()
def unfuse(model: nn.Module) -> int:
    """Undo :func:`fuse`: each projection's weight and bias in a storage of its own again."""
    n = 0
    for attn in _attentions(model):
        if qkv_view(attn) is None:
            continue
        for p in _projections(attn):
            p.weight.data = p.weight.data.clone()
            if p.bias is not None:
                p.bias.data = p.bias.data.clone()
        n += 1
    return n


def fused(model: nn.Module) -> int:
    """How many attentions of ``model`` hold fused q/k/v weights."""
    return sum(1 for attn in _attentions(model) if qkv_view(attn) is not None)


__all__ = ["fuse", "fused", "qkv_view", "unfuse"]
