"""Where the pipeline's work runs: ``--device cpu|cuda|cuda:N|auto`` of the CLI commands."""

from __future__ import annotations

import torch

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The torch device for ``name``: ``"auto"`` is the first GPU when torch sees one, else the CPU.

    Raises ValueError for a name that is not a device, or for a GPU that this torch cannot use
    (a CPU-only build, no visible GPU, an index past the last GPU).
    """
    if name is None or str(name) == "cpu":
        return torch.device("cpu")
    if str(name) == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {name!r}") from e
    if dev.type != "cuda":
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device={str(name)!r} asked for a GPU, but this torch ({torch.__version__}) sees none "
                         f"(torch.cuda.is_available() is False); use device='cpu'")
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device={str(name)!r}: this machine has {torch.cuda.device_count()} GPU(s) "
                         f"(indices 0..{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)
