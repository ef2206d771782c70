"""Backend registry: which implementations of the ops exist and how to load them.

A backend is a module exposing ``route(logits, budget, min_experts, max_experts)`` and
``routed_ffn(x, w_gate, w_up, w_down, mask, activation, b_up, b_down)`` over already
validated arguments (``budget`` is an fp32 [T] tensor). Backends are imported lazily,
so ``import prunepath`` never needs the compiled extension or Triton.
"""

from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")

_MODULES = {
    "torch": "prunepath.ops.torch_backend",
    "cpu": "prunepath.ops.cpp_backend",
    "cuda": "prunepath.ops.cpp_backend",
    "triton": "prunepath.ops.triton_backend",
}

# Which devices each backend computes on.
_DEVICES = {
    "torch": ("cpu", "cuda"),
    "cpu": ("cpu",),
    "cuda": ("cuda",),
    "triton": ("cuda", "cpu"),  # cpu only under TRITON_INTERPRET=1
}


class BackendUnavailable(RuntimeError):
    """A backend was asked for but is not installed/built on this machine."""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# backends that loaded fine (a plain dict lookup, so torch.compile can trace `load`)
_LOADED: dict = {}


def load(name: str):
    """Import and return the backend module ``name`` (raises BackendUnavailable with a fix)."""
    module = _LOADED.get(name)
    if module is not None:
        return module
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")
    module = importlib.import_module(_MODULES[name])
    module.ensure_available(name)
    _LOADED[name] = module
    return module


def is_available(name: str) -> bool:
    try:
        load(name)
    except BackendUnavailable:
        return False
    return True


def supports_device(name: str, device: torch.device) -> bool:
    if name == "triton" and device.type == "cpu":
        return triton_interpreted()
    return device.type in _DEVICES[name]


def resolve(backend: str, device: torch.device, op: str, key=None) -> str:
    """Turn ``backend`` (maybe "auto") into a concrete backend name for ``device``."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
        if not supports_device(backend, device):
            hint = " (set TRITON_INTERPRET=1 to run Triton on the CPU)" if backend == "triton" else ""
            raise ValueError(f"backend={backend!r} cannot run on device {device}{hint}")
        return backend
    from . import autotune

    return autotune.choose(op, device, key)
