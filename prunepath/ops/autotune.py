"""Choosing a backend for ``backend="auto"``.

This is the one piece of explicit global state in the library: a cache of choices keyed
by (op, device, key). Until a measured choice exists, a static preference order is used.
"""

from __future__ import annotations

import torch

from . import backends

_CHOICES: dict = {}

_PREFERENCE = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "cuda", "torch"),
}


def choose(op: str, device: torch.device, key=None) -> str:
    cache_key = (op, device.type, key)
    hit = _CHOICES.get(cache_key)
    if hit is not None:
        return hit
    for name in _PREFERENCE.get(device.type, ("torch",)):
        if backends.supports_device(name, device) and backends.is_available(name):
            _CHOICES[cache_key] = name
            return name
    _CHOICES[cache_key] = "torch"
    return "torch"


def clear() -> None:
    """Forget every cached choice."""
    _CHOICES.clear()
