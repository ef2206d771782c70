"""Putting RoutedFFN modules into a model and taking them out again (no files, no training).

:func:`wrap` replaces every decoder layer's FFN by a :class:`~prunepath.layers.RoutedFFN`
around it; :func:`unwrap` and :func:`unwrapped` put the original modules back. This is the
layer below both :mod:`prunepath.convert` (which clusters and trains, then wraps) and
:mod:`prunepath.checkpoint` (which saves a wrapped model's plain weights and wraps a loaded
one); the ``save_pretrained`` hook that calls :func:`prunepath.save` is added by those two.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import moefy
from .config import PrunePathConfig
from .families import (
    Family,
    activation_of,
    decoder_layers,
    family_of,
    ffn_owner,
    ffn_weights,
    model_type_of,
    projections,
)
from .layers import InlineFFN, RoutedFFN
from .routers import make_router


def is_converted(model: nn.Module) -> bool:
    return any(isinstance(m, RoutedFFN) for m in model.modules())


def check_widths(model: nn.Module, fam: Family, cfg: PrunePathConfig):
    """Every layer's FFN width; resolves ``cfg.num_experts=None`` to one neuron per expert (E = F)
    and checks that E divides every width."""
    widths = [ffn_weights(*projections(ffn_owner(layer, fam), fam), fam).intermediate_size
              for layer in decoder_layers(model, fam)]
    if cfg.num_experts is None:
        if len(set(widths)) > 1:
            raise ValueError(f"num_experts=None (one neuron per expert) needs one FFN width, but the "
                             f"layers' widths differ ({sorted(set(widths))}); pass num_experts=E")
        cfg.num_experts = widths[0]
        cfg.validate()
    for i, f in enumerate(widths):
        moefy.check_num_experts(f, cfg.num_experts, f" of layer {i}")
    return widths


def _fill_model_fields(cfg: PrunePathConfig, model: nn.Module, fam: Family, widths) -> None:
    cfg.model_type = model_type_of(model)
    cfg.num_layers = len(widths)
    cfg.intermediate_size = widths[0] if widths else None
    layer0 = decoder_layers(model, fam)[0]
    cfg.hidden_size = ffn_weights(*projections(ffn_owner(layer0, fam), fam), fam).hidden_size


def wrap(model: nn.Module, cfg: PrunePathConfig) -> nn.Module:
    """Wrap every FFN in a RoutedFFN with freshly initialised routers (no clustering, no training).

    Sets ``model.prunepath_config``. :func:`prunepath.convert.wrap` and
    :func:`prunepath.from_pretrained` call this and add the ``save_pretrained`` hook.
    """
    if is_converted(model):
        raise ValueError("model is already converted to PrunePath; call prunepath.unload(model) first")
    fam = family_of(model)
    activation = activation_of(model, fam)
    widths = check_widths(model, fam, cfg)
    _fill_model_fields(cfg, model, fam, widths)
    if cfg.num_layers and cfg.presets:
        cfg.validate()
    for i, layer in enumerate(decoder_layers(model, fam)):
        owner = ffn_owner(layer, fam)
        w = ffn_weights(*projections(owner, fam), fam)
        router = make_router(cfg.router, w.hidden_size, cfg.num_experts, cfg.router_rank,
                             seed=cfg.seed * 1000003 + i, intermediate_size=w.intermediate_size,
                             gated=w.w_gate is not None, activation=activation)
        router.to(device=w.w_up.device, dtype=w.w_up.dtype)
        if fam.inline_ffn:
            base = InlineFFN(owner, fam)
        else:
            base = owner
        routed = RoutedFFN(base, fam, activation, cfg.num_experts, router, layer_idx=i,
                           prefill=cfg.prefill, min_experts=cfg.min_experts, backend=cfg.backend,
                           temperature=cfg.router_temperature)
        _install(layer, fam, routed)
    model.prunepath_config = cfg
    return model


def _install(layer: nn.Module, fam: Family, routed: RoutedFFN) -> None:
    """Put ``routed`` in place of ``layer``'s FFN (an inline FFN's projections become identities)."""
    if fam.inline_ffn:
        owner = ffn_owner(layer, fam)
        setattr(owner, fam.up, routed)
        setattr(owner, fam.down, nn.Identity())
        setattr(owner, fam.act_attr, nn.Identity())
        routed._shape_hook = layer.register_forward_pre_hook(_record_seq_shape(routed), with_kwargs=True)
    else:
        parent, name = _parent_and_name(layer, fam.ffn)
        setattr(parent, name, routed)


def _record_seq_shape(routed: RoutedFFN):
    def hook(module, args, kwargs):
        hs = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hs, torch.Tensor) and hs.dim() == 3:
            routed._seq_shape = (hs.shape[0], hs.shape[1])
        return None
    return hook


def _parent_and_name(root: nn.Module, path: str):
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    return parent, name


def unwrap(model: nn.Module) -> nn.Module:
    """Put the original FFN modules back (in place); returns the model."""
    fam = family_of(model)
    for layer in decoder_layers(model, fam):
        if fam.inline_ffn:
            routed = getattr(layer, fam.up)
            if not isinstance(routed, RoutedFFN):
                continue
            base = routed.base
            setattr(layer, fam.up, getattr(base, fam.up))
            setattr(layer, fam.down, getattr(base, fam.down))
            setattr(layer, fam.act_attr, getattr(base, fam.act_attr))
            hook = getattr(routed, "_shape_hook", None)
            if hook is not None:
                hook.remove()
        else:
            parent, name = _parent_and_name(layer, fam.ffn)
            routed = getattr(parent, name)
            if isinstance(routed, RoutedFFN):
                setattr(parent, name, routed.base)
    if "save_pretrained" in model.__dict__:
        del model.save_pretrained
    return model


@contextlib.contextmanager
def unwrapped(model: nn.Module):
    """Temporarily restore the original FFN modules (e.g. to save plain HF weights)."""
    routed = {id(r): r for r in model.modules() if isinstance(r, RoutedFFN)}
    if not routed:
        yield model
        return
    fam = family_of(model)
    saved_layers = sorted(routed.values(), key=lambda r: r.layer_idx)
    cfg = getattr(model, "prunepath_config", None)
    hook = model.__dict__.get("save_pretrained")  # unwrap removes it; put the same one back
    unwrap(model)
    try:
        yield model
    finally:
        _rewrap(model, fam, saved_layers, cfg)
        if hook is not None:
            model.save_pretrained = hook


def _rewrap(model, fam, routed_layers, cfg):
    for layer, routed in zip(decoder_layers(model, fam), routed_layers):
        _install(layer, fam, routed)
    model.prunepath_config = cfg
