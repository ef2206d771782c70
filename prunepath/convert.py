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

import dataclasses
import time
import warnings

from torch import nn

from . import moefy
from ._modcall import make_module_callable
from .checkpoint import attach_save_pretrained
from .config import PrunePathConfig
from .data import token_batches
from .decode import restore as restore_decode_layouts
from .families import activation_of, family_of
from .routers import train_routers
from .wrapping import check_widths, is_converted, unwrap, unwrapped
from .wrapping import wrap as _wrap

__all__ = ["convert", "wrap", "unwrap", "unwrapped", "unload", "is_converted"]


def wrap(model: nn.Module, cfg: PrunePathConfig) -> nn.Module:
    """Wrap every FFN in a RoutedFFN with freshly initialised routers (no clustering, no training).

    Used by :func:`convert` (whose weights are permuted first). Sets ``model.prunepath_config``
    and the save_pretrained hook (:func:`prunepath.wrapping.wrap` without the hook).
    """
    _wrap(model, cfg)
    attach_save_pretrained(model)
    return model


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
    check_widths(model, fam, cfg)
    cfg.router_report = {}

    ids = None
    if calibration is not None:
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
    (whatever a :class:`~prunepath.decode.Decoder` changed -- layouts, patched linears -- is
    undone first: :func:`prunepath.decode.restore`)."""
    if not is_converted(model):
        raise ValueError("model is not a PrunePath model (nothing to unload)")
    restore_decode_layouts(model)
    unwrap(model)
    if "prunepath_config" in model.__dict__:
        del model.prunepath_config
    return model


# ``prunepath.convert`` is both this module and the function (see prunepath._modcall)
make_module_callable(__name__)
