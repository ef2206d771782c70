"""The "torch" backend: the plain PyTorch reference, always available."""

from .reference import route_reference as route
from .reference import routed_ffn_reference as routed_ffn


def ensure_available(name: str) -> None:
    return None


__all__ = ["route", "routed_ffn", "ensure_available"]
