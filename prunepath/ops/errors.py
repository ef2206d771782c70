"""The ops' own exception (imported by the backend modules and re-exported by the registry)."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """A backend was asked for but is not installed/built on this machine."""
