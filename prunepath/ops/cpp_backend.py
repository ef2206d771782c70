"""The "cpu" and "cuda" backends: the compiled extension ``prunepath._C``.

The extension registers ``torch.ops.prunepath.route``, ``torch.ops.prunepath.routed_ffn``
and ``torch.ops.prunepath.routed_ffn_packed`` (W_down^T [F, d]) (CPU kernels always; CUDA
kernels when built with nvcc) and ``torch.ops.prunepath.router_route``
(router projection + route; CPU kernel), ``torch.ops.prunepath.router_routed_ffn`` (the two
in one call; CPU kernel) and ``torch.ops.prunepath.linear`` (decode-step
matrix-vector products; CPU kernel). Fake kernels for ``torch.compile``
are registered here, once, when the extension is first loaded.

Each op of :mod:`.registry` maps to one function here taking its checked arguments
(``router_route`` and ``router_routed_ffn`` are the bare CPU kernels; the ops of those names
are ``router_route_cpu`` / ``router_routed_ffn_cpu``, which fall back to torch logits for
fp64, and ``*_cuda``, torch logits and this backend's route).
"""

from __future__ import annotations

import torch

from . import checks
from .errors import BackendUnavailable
from .reference import router_logits_reference

_BUILD_HINT = (
    "the compiled extension prunepath._C is not built; install from a source checkout with "
    "`pip install torch && pip install --no-build-isolation .`"
)


# "extension" -> None once prunepath._C loaded (and the fakes are registered), or its ImportError
# (a plain dict, not functools.cache: a first call may come inside torch.compile, and Dynamo
# cannot trace an lru_cache wrapper)
_LOADED: dict = {}


def _load():
    if "extension" not in _LOADED:
        try:
            from prunepath import _C  # noqa: F401  (optional compiled extension; registers the ops)
        except ImportError as err:
            _LOADED["extension"] = err
        else:
            _register_fakes()
            _LOADED["extension"] = None
    return _LOADED["extension"]


def _register_fakes() -> None:
    @torch.library.register_fake("prunepath::route")
    def _(logits, budget, min_experts, max_experts):
        return torch.empty(logits.shape, dtype=torch.bool, device=logits.device)

    @torch.library.register_fake("prunepath::router_route")
    def _(x, w_router, b_router, w_router_out, b_router_out, hidden_activation, budget,
          min_experts, max_experts):
        e = (w_router if w_router_out is None else w_router_out).shape[0]
        return torch.empty((x.shape[0], e), dtype=torch.bool, device=x.device)

    @torch.library.register_fake("prunepath::router_routed_ffn")
    def _(x, w_router, b_router, w_router_out, b_router_out, hidden_activation, budget,
          min_experts, max_experts, w_gate, w_up, w_down, activation, b_up, b_down, packed_down):
        e = (w_router if w_router_out is None else w_router_out).shape[0]
        return (torch.empty_like(x),
                torch.empty((x.shape[0], e), dtype=torch.bool, device=x.device))

    @torch.library.register_fake("prunepath::linear")
    def _(x, weight, bias):
        return torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)

    @torch.library.register_fake("prunepath::routed_ffn")
    def _(x, w_gate, w_up, w_down, mask, activation, b_up, b_down):
        return torch.empty_like(x)

    @torch.library.register_fake("prunepath::routed_ffn_packed")
    def _(x, w_gate, w_up, w_down_t, mask, activation, b_up, b_down):
        return torch.empty_like(x)


def ensure_available(name: str) -> None:
    err = _load()
    if err is not None:
        raise BackendUnavailable(f"backend={name!r}: {_BUILD_HINT} ({err})")
    if name == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "prunepath::routed_ffn", "CUDA"
    ):
        raise BackendUnavailable(
            "backend='cuda': prunepath._C was built without CUDA kernels; rebuild on a machine "
            "with nvcc and a CUDA build of torch: `pip install --no-build-isolation .`"
        )


def route(logits, budget, min_experts, max_experts):
    return torch.ops.prunepath.route(logits, budget, min_experts, max_experts)


def router_route(x, w_router, b_router, w_router_out, b_router_out, hidden_activation, budget,
                 min_experts, max_experts):
    """Router projection + route (CPU kernel; fp32/bf16/fp16 ``x``)."""
    c = _contiguous
    return torch.ops.prunepath.router_route(
        x.contiguous(), w_router.contiguous(), c(b_router), c(w_router_out), c(b_router_out),
        hidden_activation, budget, min_experts, max_experts,
    )


def router_routed_ffn(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                      budget, min_experts, max_experts, w_gate, w_up, w_down, activation, b_up,
                      b_down):
    """router_route and routed_ffn as one extension call (CPU kernel); ``w_down`` as
    :func:`routed_ffn` takes it (a transposed view of a packed W_down^T is read in place)."""
    c = _contiguous
    packed = checks.is_packed_down(w_down)
    return torch.ops.prunepath.router_routed_ffn(
        x.contiguous(), w_router.contiguous(), c(b_router), c(w_router_out), c(b_router_out),
        hidden_activation, budget, min_experts, max_experts, c(w_gate), c(w_up),
        w_down.t() if packed else w_down.contiguous(), activation, c(b_up), c(b_down), packed)


def _contiguous(t):
    return None if t is None else t.contiguous()


def routed_ffn(x, w_gate, w_up, w_down, mask, activation, b_up, b_down):
    # The kernels index weights as row-major slabs (and check it). A w_down that is the
    # transposed view of a contiguous W_down^T runs the packed kernel in place; any other
    # non-contiguous weight is copied here rather than rejected (correct, but a copy per call).
    if checks.is_packed_down(w_down):
        return routed_ffn_packed(x, w_gate, w_up, w_down.t(), mask, activation, b_up, b_down)
    w_gate, w_up, w_down, b_up, b_down = map(_contiguous, (w_gate, w_up, w_down, b_up, b_down))
    return torch.ops.prunepath.routed_ffn(x, w_gate, w_up, w_down, mask, activation, b_up, b_down)


def routed_ffn_packed(x, w_gate, w_up, w_down_t, mask, activation, b_up, b_down):
    """The routed FFN with W_down^T [F, d] (each expert's down block is contiguous rows)."""
    w_gate, w_up, w_down_t, b_up, b_down = map(_contiguous, (w_gate, w_up, w_down_t, b_up, b_down))
    return torch.ops.prunepath.routed_ffn_packed(x, w_gate, w_up, w_down_t, mask, activation,
                                                 b_up, b_down)


def router_route_cpu(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                     budget, min_experts, max_experts):
    """Op "router_route" on "cpu": the kernel (fp32/bf16/fp16), else (fp64) as on "cuda"."""
    b = checks.budget_tensor(budget, x.shape[0], x.device)
    if x.dtype != torch.float64:
        return router_route(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                            b, min_experts, max_experts)
    return _route_logits(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                         b, min_experts, max_experts)


def router_route_cuda(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                      budget, min_experts, max_experts):
    """Op "router_route" on "cuda": fp32 torch logits, then this backend's route."""
    b = checks.budget_tensor(budget, x.shape[0], x.device)
    return _route_logits(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                         b, min_experts, max_experts)


def _route_logits(x, w_router, b_router, w_router_out, b_router_out, hidden_activation, b,
                  min_experts, max_experts):
    logits = router_logits_reference(x, w_router, b_router, w_router_out, b_router_out,
                                     hidden_activation)
    return route(logits.contiguous(), b, min_experts, max_experts)


def router_routed_ffn_cpu(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                          budget, min_experts, max_experts, w_gate, w_up, w_down, activation,
                          b_up, b_down):
    """Op "router_routed_ffn" on "cpu": one extension call (fp64: the two ops)."""
    if x.dtype != torch.float64:
        return router_routed_ffn(
            x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
            checks.budget_tensor(budget, x.shape[0], x.device), min_experts, max_experts,
            w_gate, w_up, w_down, activation, b_up, b_down)
    mask = router_route_cpu(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                            budget, min_experts, max_experts)
    return routed_ffn(x.contiguous(), w_gate, w_up, w_down, mask, activation, b_up, b_down), mask


def router_routed_ffn_cuda(x, w_router, b_router, w_router_out, b_router_out, hidden_activation,
                           budget, min_experts, max_experts, w_gate, w_up, w_down, activation,
                           b_up, b_down):
    """Op "router_routed_ffn" on "cuda": the two ops."""
    mask = router_route_cuda(x, w_router, b_router, w_router_out, b_router_out,
                             hidden_activation, budget, min_experts, max_experts)
    return routed_ffn(x.contiguous(), w_gate, w_up, w_down, mask, activation, b_up, b_down), mask


def linear(x, weight, bias):
    """Op "linear": the decode-step matrix-vector kernel (CPU, fp32/bf16/fp16, few rows)."""
    if not checks.is_packed_down(weight):  # a transposed one goes to at::linear, uncopied
        weight = weight.contiguous()
    return torch.ops.prunepath.linear(x.contiguous(), weight, bias)
