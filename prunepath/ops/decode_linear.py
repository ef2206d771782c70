"""``linear``: ``x @ weight^T + bias`` for the few tokens of a decode step.

On the CPU with the compiled extension (fp32 / bf16 / fp16, at most 8 tokens, no autograd)
this is the C++ kernel of csrc/cpu/linear.cpp: the routed FFN's dot kernels over every row
of ``weight``, the rows split over the threads. A decode step's projections are matrix-vector
products, which that kernel streams at about twice the rate of ``torch.nn.functional.linear``
on a 2-core Zen 3 (BENCHMARKS.md); a weight stored transposed (the view of a contiguous
``weight^T``, :mod:`prunepath.packed_down`) goes to at::linear uncopied (a row-streaming
kernel for it was slower than at::linear's: 124-128 vs 88-91 us for 576 x 1536 fp32 on a
2-core Xeon, 2026-12-04). Everything else (GPU, more tokens, fp64, autograd) is
``torch.nn.functional.linear``. Same result up to fp32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends, checks

MAX_TOKENS = 8  # more rows: a matrix-matrix product, at::linear's job (csrc/cpu/linear.cpp)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           backend: str = "auto") -> torch.Tensor:
    """``x @ weight^T + bias`` for ``x`` ``[T, d]``, ``weight`` ``[N, d]`` (nn.Linear layout).

    ``backend``: "auto", "cpu" (the C++ kernel), "triton" (:mod:`prunepath.triton_kernels.gemv`;
    no autograd) or "torch" (``F.linear``). "auto": on the CPU the C++ kernel where it applies;
    on a GPU, for at most ``MAX_TOKENS`` rows of a weight with unit stride along ``d``, the
    faster of triton and torch as measured once per shape (:mod:`prunepath.ops.autotune`);
    everything else (more rows, fp64, autograd) ``F.linear``.
    """
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"backend must be one of {LINEAR_BACKENDS}, got {backend!r}")
    if x.dim() != 2 or x.dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"x must be a float tensor [T, d], got {tuple(x.shape)} {x.dtype}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape [N, d={x.shape[1]}], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if backend in ("cpu", "triton"):
        if not backends.supports_device(backend, x.device):
            raise ValueError(f"backend={backend!r} cannot run on device {x.device}")
        if grad:
            raise ValueError(f"backend={backend!r} has no backward: use backend='torch' "
                             "(or 'auto') where gradients are needed")
        backends.load(backend)  # raises BackendUnavailable with the install hint
    name = backend if backend != "auto" else _auto(x, weight, grad)
    if name == "triton":
        if weight.stride(1) != 1:
            weight = weight.contiguous()
        return backends.load("triton").linear(x.contiguous(), weight, bias)
    if name == "cpu" and x.shape[0] <= MAX_TOKENS and x.dtype != torch.float64:
        if not checks.is_packed_down(weight):  # a transposed one goes to at::linear, uncopied
            weight = weight.contiguous()
        return torch.ops.prunepath.linear(x.contiguous(), weight, bias)
    return F.linear(x, weight, bias)


LINEAR_BACKENDS = ("auto", "cpu", "triton", "torch")


def _auto(x: torch.Tensor, weight: torch.Tensor, grad: bool) -> str:
    if grad or x.shape[0] > MAX_TOKENS or x.dtype == torch.float64:
        return "torch"
    if x.device.type == "cpu":
        return "cpu" if backends.is_available("cpu") else "torch"
    if x.device.type != "cuda" or weight.stride(1) != 1:
        return "torch"
    from . import autotune

    return autotune.choose("linear", x.device,
                           (x.dtype, weight.shape[0], weight.shape[1], x.shape[0]))
