"""The "triton" backend: kernels from :mod:`prunepath.triton_kernels`.

Runs on CUDA GPUs, and on the CPU under ``TRITON_INTERPRET=1`` (how CI tests it). Each
function takes its op's checked arguments in the order :mod:`.registry` documents.

Triton is an optional dependency: it is imported on first use (:func:`_kernels`), so
``import prunepath`` never needs it. The imported module is kept in a plain dict rather
than behind ``functools.lru_cache``: compiled decode steps call these functions inside
``torch.compile``, and Dynamo cannot trace an lru_cache wrapper (it warned on every
compiled GPU decode) while a dict lookup it traces and guards like any other global.
"""

from __future__ import annotations

import torch

from . import checks
from .errors import BackendUnavailable
from .reference import routed_act_logits

# "kernels" -> the prunepath.triton_kernels module, or the ImportError met importing Triton
_LOADED: dict = {}


def _import_kernels():
    try:
        import triton  # noqa: F401  (optional dependency)
    except ImportError as err:
        return err
    from prunepath import triton_kernels  # imports Triton: loaded only once it is asked for

    return triton_kernels


def _kernels():
    k = _LOADED.get("kernels")
    if k is None:
        k = _LOADED["kernels"] = _import_kernels()
    return k


def ensure_available(name: str) -> None:
    k = _kernels()
    if isinstance(k, Exception):
        raise BackendUnavailable(f"backend='triton' needs Triton >= 3.6: `pip install triton` ({k})")


def _contiguous(t):
    return None if t is None else t.contiguous()


def route(logits, budget, min_experts, max_experts):
    return _kernels().route(logits, budget, min_experts, max_experts)


def routed_ffn(x, w_gate, w_up, w_down, mask, activation, b_up, b_down):
    return _kernels().routed_ffn(x, w_gate, w_up, w_down, mask, activation, b_up, b_down)


def routed_ffn_packed(x, w_gate, w_up, w_down_t, mask, activation, b_up, b_down):
    return _kernels().routed_ffn_packed(x, w_gate, w_up.contiguous(), w_down_t.contiguous(),
                                        mask, activation, b_up, b_down)


def budget_for_kernel(budget, t, device):
    """(fp32 [T] budget, any stride -- one value expanded to every token is not copied --,
    whether the Triton route kernel must check its range). A GPU budget
    tensor gets every host-side check of :func:`checks.budget_tensor`; its [0, 1] range is
    checked by the route kernel (one flag, one device assert) instead of a chain of
    comparison kernels -- and, as there, not while tracing or capturing a graph."""
    gpu_tensor = isinstance(budget, torch.Tensor) and budget.device.type != "cpu"
    b = checks.budget_tensor(budget, t, device, device_range_check=not gpu_tensor, strided_ok=True)
    return b, gpu_tensor and not checks._tracing()


def router_route(x, w_router, b_router, w_router_out, b_router_out, hidden_activation, budget,
                 min_experts, max_experts):
    """Router projection + route, fused on the device (no host sync)."""
    b, kernel_check = budget_for_kernel(budget, x.shape[0], x.device)
    # the kernels read the router's small tensors in any float dtype (no casting copies)
    c = _contiguous
    return _kernels().router_route(
        x.contiguous(), w_router.contiguous(), c(b_router), c(w_router_out), c(b_router_out),
        hidden_activation, b, min_experts, max_experts, check_budget=kernel_check,
    )


def router_routed_ffn(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                      budget, min_experts, max_experts, w_gate, w_up, w_down, activation, b_up,
                      b_down):
    """The two ops back to back (routing inside the FFN kernels gained nothing; BENCHMARKS.md)."""
    mask = router_route(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                        budget, min_experts, max_experts)
    return routed_ffn(x.contiguous(), w_gate, w_up, w_down, mask, activation, b_up, b_down), mask


def masked_act(g, u, mask, activation):
    c = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    return _kernels().masked_act(None if g is None else c(g), c(u), mask.contiguous(), activation)


def routed_act(g, u, z, b_router, w_router_out, b_router_out, hidden_activation, budget,
               min_experts, max_experts, activation):
    if w_router_out is not None and w_router_out.shape[0] > 128:
        # the kernel's in-register second layer is for E <= 128: logits computed here
        z = routed_act_logits(z, b_router, w_router_out, b_router_out, hidden_activation)
        b_router = w_router_out = b_router_out = None
    c = _contiguous
    return _kernels().routed_act(g, u, z, c(b_router), c(w_router_out), c(b_router_out),
                                 hidden_activation, budget, min_experts, max_experts, activation)
