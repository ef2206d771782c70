"""Dispatch: a public op's ``backend`` argument -> a concrete backend -> the function of the
op table (:mod:`.registry`) that runs it.

>>> name = resolve(backend, x.device, "routed_ffn", key)       # "auto" -> autotune
>>> y = implementation("routed_ffn", name)(x, w_gate, w_up, w_down, mask, act, b_up, b_down)
"""

from __future__ import annotations

import torch

from . import autotune, backends
from .registry import implementation

__all__ = ["resolve", "implementation"]


def resolve(backend: str, device: torch.device, op: str, key=None) -> str:
    """Turn ``backend`` (maybe "auto") into a concrete backend name for ``op`` on ``device``."""
    if backend != "auto":
        backends.check_device(backend, device)
        return backend
    return autotune.choose(op, device, key)
