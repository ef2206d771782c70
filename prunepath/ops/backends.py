"""The backends: which exist, which devices each computes on, and loading them.

A backend is a module (:mod:`.torch_backend`, :mod:`.cpp_backend` for "cpu" and "cuda",
:mod:`.triton_backend`) with one function per op it implements, over already validated
arguments; :mod:`.registry` says which function implements which op. The modules themselves
are cheap to import: what they need beyond torch (the compiled extension ``prunepath._C``,
Triton) is imported by their ``ensure_available``, on first use, so ``import prunepath``
never needs either.
"""

from __future__ import annotations

import os

import torch

from . import cpp_backend, torch_backend, triton_backend
from .errors import BackendUnavailable

BACKENDS = ("torch", "cpu", "triton", "cuda")

_MODULES = {
    "torch": torch_backend,
    "cpu": cpp_backend,
    "cuda": cpp_backend,
    "triton": triton_backend,
}

# Which devices each backend computes on.
_DEVICES = {
    "torch": ("cpu", "cuda"),
    "cpu": ("cpu",),
    "cuda": ("cuda",),
    "triton": ("cuda", "cpu"),  # cpu only under TRITON_INTERPRET=1
}


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# backends that loaded fine (a plain dict lookup, so torch.compile can trace `load`)
_LOADED: dict = {}


def check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")


def load(name: str):
    """The backend module ``name``, its dependencies loaded (raises BackendUnavailable with a
    fix when they are missing)."""
    module = _LOADED.get(name)
    if module is not None:
        return module
    check_name(name)
    module = _MODULES[name]
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


def check_device(name: str, device: torch.device) -> None:
    """Raise ValueError when backend ``name`` (not "auto") cannot run on ``device``."""
    check_name(name)
    if not supports_device(name, device):
        hint = " (set TRITON_INTERPRET=1 to run Triton on the CPU)" if name == "triton" else ""
        raise ValueError(f"backend={name!r} cannot run on device {device}{hint}")


__all__ = ["BACKENDS", "BackendUnavailable", "load", "is_available", "supports_device",
           "check_device", "triton_interpreted"]
