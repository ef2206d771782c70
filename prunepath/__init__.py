"""PrunePath: structured, runtime-adjustable FFN sparsity for language models.

Pipeline, one module each: ``moefy`` (split FFNs into experts) -> ``routers`` (softmax
routers trained on calibration text) -> ``calibrate`` (budgets for target sparsities) ->
``checkpoint`` (one checkpoint, every budget) -> ``decode`` (fast generation).
The kernels behind it are in :mod:`prunepath.ops`.

Importing this package has no side effects: heavy pieces (transformers, Triton, the
compiled extension) load on first use.
"""

from __future__ import annotations

import importlib

from . import ops

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "PrunePathConfig": "prunepath.config",
    "convert": "prunepath.convert",
    "set_budget": "prunepath.budget",
    "budget": "prunepath.budget",
    "stats": "prunepath.budget",
    "set_routing": "prunepath.budget",
    "set_router_temperature": "prunepath.budget",
    "reset_stats": "prunepath.budget",
    "router_report": "prunepath.routers",
    "calibrate": "prunepath.calibrate",
    "save": "prunepath.checkpoint",
    "from_pretrained": "prunepath.checkpoint",
    "unload": "prunepath.convert",
    "generate": "prunepath.decode",
    "Decoder": "prunepath.decode",
    "DecodeConfig": "prunepath.decode",
    "models": "prunepath.models",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'prunepath' has no attribute {name!r}")
    mod = importlib.import_module(module)
    return mod if module.endswith("." + name) and not hasattr(mod, name) else getattr(mod, name)


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["ops", "__version__", *_LAZY]
