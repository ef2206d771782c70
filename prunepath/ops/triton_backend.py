"""The "triton" backend: kernels from :mod:`prunepath.triton_kernels`.

Runs on CUDA GPUs, and on the CPU under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import functools

from .backends import BackendUnavailable


@functools.cache
def _kernels():
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return err
    from prunepath import triton_kernels

    return triton_kernels


def ensure_available(name: str) -> None:
    k = _kernels()
    if isinstance(k, Exception):
        raise BackendUnavailable(f"backend='triton' needs Triton >= 3.6: `pip install triton` ({k})")


def route(logits, budget, min_experts, max_experts):
    return _kernels().route(logits, budget, min_experts, max_experts)


def routed_ffn(x, w_gate, w_up, w_down, mask, activation, b_up, b_down):
    return _kernels().routed_ffn(x, w_gate, w_up, w_down, mask, activation, b_up, b_down)
