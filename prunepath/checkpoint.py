"""One checkpoint for every budget: plain HF weights (permuted) + PrunePath config + routers.

A checkpoint directory holds

* the permuted dense model in plain Hugging Face format (``config.json``,
  ``model.safetensors`` or a sharded index): ``AutoModelForCausalLM.from_pretrained(dir)``
  loads it and gives the original model's logits;
* ``prunepath_config.json``: the :class:`~prunepath.config.PrunePathConfig` fields (format
  version, model_type, E, clustering, router type/rank, presets, router report) plus the
  prunepath version and the sha256 of the router file;
* ``prunepath_routers.safetensors``: every layer's router parameters and buffers
  (``layers.{i}.{name}``), with metadata repeating the routing geometry.

:func:`save` writes everything into a temporary directory beside the target and renames
it into place (an existing checkpoint is replaced only once the new one is complete).
:func:`from_pretrained` checks the version, the files, the router file's checksum, its
metadata and every tensor's shape against the config and the model, and raises
:class:`CheckpointError` naming what is wrong. No pickle is read or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import types
import uuid
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .budget import routed_layers, set_budget
from .config import FORMAT_VERSION, PrunePathConfig
from .wrapping import is_converted, unwrap, unwrapped, wrap

CONFIG_NAME = "prunepath_config.json"
ROUTERS_NAME = "prunepath_routers.safetensors"
_EXTRA_KEYS = ("prunepath_version", "routers_sha256")


class CheckpointError(ValueError):
    """A PrunePath checkpoint is missing, partial, corrupt or does not match the model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _router_metadata(cfg: PrunePathConfig) -> dict:
    return {
        "format_version": str(FORMAT_VERSION),
        "num_experts": str(cfg.num_experts),
        "router": cfg.router,
        "router_rank": str(cfg.router_rank),
        "num_layers": str(cfg.num_layers),
        "hidden_size": str(cfg.hidden_size),
    }


def router_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every layer's router tensors as ``layers.{i}.{name}`` (CPU, contiguous)."""
    out = {}
    for layer in routed_layers(model):
        for key, value in layer.router.state_dict().items():
            out[f"layers.{layer.layer_idx}.{key}"] = value.detach().to("cpu").contiguous()
    return out


def save(model: nn.Module, save_directory, *, tokenizer=None, overwrite: bool = True,
         **hf_kwargs) -> Path:
    """Write ``model`` (converted) as one PrunePath checkpoint at ``save_directory``.

    ``tokenizer`` is saved beside it if given; ``hf_kwargs`` go to the HF
    ``save_pretrained`` (e.g. ``max_shard_size``). Returns the directory.
    """
    from safetensors.torch import save_file  # loaded when first needed, as the HF stack does

    if not is_converted(model):
        raise ValueError("prunepath.save needs a converted model (prunepath.convert or from_pretrained)")
    cfg: PrunePathConfig = model.prunepath_config
    cfg.validate()
    hf_kwargs.pop("safe_serialization", None)  # always safetensors
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tensors = router_state_dict(model)
        with unwrapped(model):
            type(model).save_pretrained(model, tmp, **hf_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / ROUTERS_NAME), metadata=_router_metadata(cfg))
        data = cfg.to_dict()
        data["prunepath_version"] = __version__
        data["routers_sha256"] = _sha256(tmp / ROUTERS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_pretrained_hook(model, save_directory, *args, **kwargs):
    """``model.save_pretrained(dir)`` of a converted model: :func:`prunepath.save`."""
    return save(model, save_directory, *args, **kwargs)


def attach_save_pretrained(model: nn.Module) -> None:
    """Route ``model.save_pretrained`` to :func:`save` (a wrapped model's hook; unwrap removes it)."""
    model.save_pretrained = types.MethodType(_save_pretrained_hook, model)


def read_config(directory) -> PrunePathConfig:
    """The :class:`PrunePathConfig` of a checkpoint directory (validated)."""
    cfg, _ = _read_config(Path(directory))
    return cfg


def _read_config(d: Path):
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory (expected a PrunePath checkpoint)")
    path = d / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{d} is not a PrunePath checkpoint: {CONFIG_NAME} is missing (a plain HF model "
            f"directory? convert it with prunepath.convert; or the save was interrupted)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable or not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    extras = {k: data.pop(k, None) for k in _EXTRA_KEYS}
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this prunepath reads format {FORMAT_VERSION}"
        )
    try:
        cfg = PrunePathConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path} holds an invalid PrunePath config: {err}") from None
    return cfg, extras


def _check_files(d: Path, extras: dict) -> None:
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d} is a partial checkpoint: config.json (HF model config) is missing")
    weights = [d / "model.safetensors", d / "model.safetensors.index.json"]
    if not any(w.is_file() for w in weights):
        raise CheckpointError(f"{d} is a partial checkpoint: model.safetensors is missing")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is corrupt: {err}") from None
        missing = sorted(s for s in shards if not (d / s).is_file())
        if missing:
            raise CheckpointError(f"{d} is a partial checkpoint: weight shards missing: {missing}")
    routers = d / ROUTERS_NAME
    if not routers.is_file():
        raise CheckpointError(f"{d} is a partial checkpoint: {ROUTERS_NAME} is missing")
    want = extras.get("routers_sha256")
    if want is not None and _sha256(routers) != want:
        raise CheckpointError(
            f"{routers} does not match {CONFIG_NAME} (sha256 differs): the router file is corrupt "
            f"or comes from another save"
        )


def _load_router_tensors(d: Path, cfg: PrunePathConfig) -> dict[str, torch.Tensor]:
    from safetensors import safe_open  # loaded when first needed, as in save

    path = d / ROUTERS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {err}") from None
    expected = _router_metadata(cfg)
    diff = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if diff:
        raise CheckpointError(
            f"{path} does not match {CONFIG_NAME}: (router file, config) differ in {diff}"
        )
    return tensors


def load_routers_(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "routers") -> None:
    """Copy router tensors (``layers.{i}.{name}``) into the model's routers, checking every key/shape."""
    layers = routed_layers(model)
    expected = {}
    for layer in layers:
        for key, value in layer.router.state_dict().items():
            expected[f"layers.{layer.layer_idx}.{key}"] = value
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} do not match the model's routers: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''}"
        )
    for key, ref in expected.items():
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, "
                                  f"the model expects {tuple(ref.shape)}")
    with torch.no_grad():
        for layer in layers:
            sd = {k.split(".", 2)[2]: v for k, v in tensors.items()
                  if k.startswith(f"layers.{layer.layer_idx}.")}
            own = layer.router.state_dict()
            for key, value in sd.items():
                own[key].copy_(value.to(own[key].dtype))
            for p in layer.router.parameters():
                p.requires_grad_(False)


def from_pretrained(directory, budget=None, *, model_class=None, **hf_kwargs) -> nn.Module:
    """Load a PrunePath checkpoint: the routed model, ready to run.

    Args:
        directory: a directory written by :func:`save` / ``model.save_pretrained``.
        budget: a float, per-layer list or preset name (e.g. "s50"); default: dense (1.0).
        model_class: HF class to load with (default ``AutoModelForCausalLM``).
        hf_kwargs: passed to ``from_pretrained`` of the HF class (``dtype``, ``device_map``...).
    """
    d = Path(directory)
    cfg, extras = _read_config(d)
    _check_files(d, extras)
    tensors = _load_router_tensors(d, cfg)
    if model_class is None:  # transformers is heavy: imported only when loading
        from transformers import AutoModelForCausalLM as model_class
    try:
        model = model_class.from_pretrained(str(d), **hf_kwargs)
    except Exception as err:
        raise CheckpointError(f"could not load the HF model weights from {d}: {err}") from err
    model_type = getattr(model.config, "model_type", None)
    if model_type != cfg.model_type:
        raise CheckpointError(f"{d}: the model is {model_type!r} but {CONFIG_NAME} says "
                              f"{cfg.model_type!r}")
    want = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size)
    try:
        wrap(model, cfg)
    except ValueError as err:
        raise CheckpointError(f"{d}: the model does not fit {CONFIG_NAME}: {err}") from err
    attach_save_pretrained(model)
    got = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size)
    if got != want:
        unwrap(model)  # as prunepath.unload does (a freshly loaded model has nothing packed)
        if "prunepath_config" in model.__dict__:
            del model.prunepath_config
        raise CheckpointError(
            f"{d}: {CONFIG_NAME} describes (layers, d, F) = {want} but the weights have {got}"
        )
    load_routers_(model, tensors, source=str(d / ROUTERS_NAME))
    model.eval()
    if budget is not None:
        set_budget(model, budget)
    return model
