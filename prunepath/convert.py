"""Convert a Hugging Face causal LM into a PrunePath model (in place) and back.

>>> cfg = prunepath.PrunePathConfig(num_experts=48, clustering="balanced_kmeans", router="mlp")
>>> model = prunepath.convert(model, cfg, calibration=texts, tokenizer=tok)
>>> dense = prunepath.unload(model)   # the plain (permuted) dense model again

``convert`` (1) checks the family and that E divides every FFN width, (2) clusters each
FFN's neurons into E equal experts and permutes the weights in place (see
:mod:`prunepath.moefy`), (3) wraps every FFN module in a :class:`~prunepath.layers.RoutedFFN`
(PEFT-style: the original module stays inside, nothing is copied; :func:`unload` puts it
back), (4) trains the routers on the calibration text (see :mod:`prunepath.routers`).
The model's ``save_pretrained`` is routed to :func:`prunepath.save` while converted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import types
import warnings

import torch
from torch import nn

from . import moefy, packed_down
from ._modcall import make_module_callable
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


def _check_widths(model: nn.Module, fam: Family, num_experts: int):
    widths = []
    for i, layer in enumerate(decoder_layers(model, fam)):
        w = ffn_weights(*projections(ffn_owner(layer, fam), fam), fam)
        moefy.check_num_experts(w.intermediate_size, num_experts, f" of layer {i}")
        widths.append(w.intermediate_size)
    return widths


def _fill_model_fields(cfg: PrunePathConfig, model: nn.Module, fam: Family, widths) -> None:
    cfg.model_type = model_type_of(model)
    cfg.num_layers = len(widths)
    cfg.intermediate_size = widths[0] if widths else None
    layer0 = decoder_layers(model, fam)[0]
    cfg.hidden_size = ffn_weights(*projections(ffn_owner(layer0, fam), fam), fam).hidden_size


def wrap(model: nn.Module, cfg: PrunePathConfig) -> nn.Module:
    """Wrap every FFN in a RoutedFFN with freshly initialised routers (no clustering, no training).

    Used by :func:`convert` and by :func:`prunepath.from_pretrained` (whose weights are
    already permuted). Sets ``model.prunepath_config`` and the save_pretrained hook.
    """
    if is_converted(model):
        raise ValueError("model is already converted to PrunePath; call prunepath.unload(model) first")
    fam = family_of(model)
    activation = activation_of(model, fam)
    widths = _check_widths(model, fam, cfg.num_experts)
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
        if fam.inline_ffn:
            setattr(owner, fam.up, routed)
            setattr(owner, fam.down, nn.Identity())
            setattr(owner, fam.act_attr, nn.Identity())
            routed._shape_hook = layer.register_forward_pre_hook(_record_seq_shape(routed),
                                                                 with_kwargs=True)
        else:
            parent, name = _parent_and_name(layer, fam.ffn)
            setattr(parent, name, routed)
    model.prunepath_config = cfg
    model.save_pretrained = types.MethodType(_save_pretrained_hook, model)
    return model


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


def _save_pretrained_hook(model, save_directory, *args, **kwargs):
    """``model.save_pretrained(dir)`` of a converted model: :func:`prunepath.save`."""
    from .checkpoint import save

    return save(model, save_directory, *args, **kwargs)


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
    unwrap(model)
    try:
        yield model
    finally:
        _rewrap(model, fam, saved_layers, cfg)


def _rewrap(model, fam, routed_layers, cfg):
    for layer, routed in zip(decoder_layers(model, fam), routed_layers):
        if fam.inline_ffn:
            owner = layer
            setattr(owner, fam.up, routed)
            setattr(owner, fam.down, nn.Identity())
            setattr(owner, fam.act_attr, nn.Identity())
            routed._shape_hook = layer.register_forward_pre_hook(_record_seq_shape(routed),
                                                                 with_kwargs=True)
        else:
            parent, name = _parent_and_name(layer, fam.ffn)
            setattr(parent, name, routed)
    model.prunepath_config = cfg
    model.save_pretrained = types.MethodType(_save_pretrained_hook, model)


def convert(model: nn.Module, cfg: PrunePathConfig | None = None, calibration=None,
            tokenizer=None, *, progress: bool = True, **overrides) -> nn.Module:
    """MoEfy ``model`` in place and return it.

    Args:
        model: a Hugging Face causal LM of a supported family (see ``prunepath.families``).
        cfg: the :class:`PrunePathConfig` (copied; the model's copy is
            ``model.prunepath_config``). Keyword ``overrides`` replace its fields.
        calibration: calibration text (list of strings or one string, with ``tokenizer``)
            or token ids ``[N, S]``: used to cluster by co-activation and to train the
            routers. Without it, routers stay untrained (a warning says so) unless
            ``cfg.router == "oracle"``.
        tokenizer: the model's tokenizer (needed for text calibration).
        progress: show tqdm progress bars.
    """
    cfg = dataclasses.replace(cfg or PrunePathConfig(), **overrides)
    cfg.presets = dict(cfg.presets)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    if is_converted(model):
        raise ValueError("model is already converted to PrunePath; call prunepath.unload(model) first")
    fam = family_of(model)
    activation_of(model, fam)
    _check_widths(model, fam, cfg.num_experts)
    cfg.router_report = {}

    ids = None
    if calibration is not None:
        from .data import token_batches

        ids = token_batches(calibration, tokenizer, num_tokens=cfg.train_tokens,
                            seq_len=cfg.train_seq_len)
    timings = {}
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        perms = moefy.compute_permutations(model, fam, cfg, ids, progress=progress)
        moefy.permute_model_(model, fam, perms)
        timings["clustering_s"] = time.perf_counter() - t0
        wrap(model, cfg)
        if cfg.router != "oracle":
            if ids is None:
                warnings.warn(
                    "prunepath.convert: no calibration text given, so the routers are untrained "
                    "(random); pass calibration=texts, tokenizer=tok to train them",
                    stacklevel=2,
                )
            else:
                from .routers import train_routers

                t0 = time.perf_counter()
                cfg.router_report = train_routers(model, ids, cfg, progress=progress)
                timings["router_training_s"] = time.perf_counter() - t0
        if timings:
            cfg.router_report = dict(cfg.router_report, timings=timings)
    finally:
        model.train(was_training)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove PrunePath from a converted model (in place): the plain, permuted dense model
    (a ``W_down`` stored transposed by :mod:`prunepath.packed_down` is laid out as nn.Linear's
    again)."""
    if not is_converted(model):
        raise ValueError("model is not a PrunePath model (nothing to unload)")
    packed_down.unpack(model)
    unwrap(model)
    if "prunepath_config" in model.__dict__:
        del model.prunepath_config
    return model


# ``prunepath.convert`` is both this module and the function (see prunepath._modcall)
make_module_callable(__name__)
