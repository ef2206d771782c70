"""``linear``: ``x @ weight^T + bias`` for the few tokens of a decode step.

On the CPU with the compiled extension (fp32 / bf16 / fp16, at most 8 tokens, no autograd)
this is the C++ kernel of csrc/cpu/linear.cpp: the routed FFN's dot kernels over every row
of ``weight``, the rows split over the threads. A decode step's projections are matrix-vector
products, which that kernel streams at about twice the rate of ``torch.nn.functional.linear``
on 2 Zen 3 / Zen 4 cores (BENCHMARKS.md). A weight stored transposed (the view of a
contiguous ``weight^T``: a packed W_down, :mod:`prunepath.decode.packed_down`) is read in place by
the routed FFN's row-sum kernel, rows split over the threads. Everything else (GPU, more
tokens, fp64, other strides, autograd) is ``torch.nn.functional.linear``. Same result up to
fp32 summation order.
"""

from __future__ import annotations

import torch

from . import backends, checks
from .registry import implementation

MAX_TOKENS = 8  # more rows: a matrix-matrix product, at::linear's job (csrc/cpu/linear.cpp)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           backend: str = "auto") -> torch.Tensor:
    """``x @ weight^T + bias`` for ``x`` ``[T, d]``, ``weight`` ``[N, d]`` (nn.Linear layout).

    ``backend``: "auto" (the C++ kernel where it applies, else torch), "cpu" or "torch".
    """
    if backend not in ("auto", "cpu", "torch"):
        raise ValueError(f"backend must be one of ('auto', 'cpu', 'torch'), got {backend!r}")
    if x.dim() != 2 or x.dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"x must be a float tensor [T, d], got {tuple(x.shape)} {x.dtype}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape [N, d={x.shape[1]}], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")
    if backend == "cpu" and x.device.type != "cpu":
        raise ValueError(f"backend='cpu' cannot run on device {x.device}")
    fast = (backend != "torch" and x.device.type == "cpu" and x.dtype != torch.float64
            and x.shape[0] <= MAX_TOKENS and backends.is_available("cpu")
            and not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, weight, bias))))
    if not fast:
        if backend == "cpu" and not backends.is_available("cpu"):
            backends.load("cpu")  # raises BackendUnavailable with the build hint
        return implementation("linear", "torch")(x, weight, bias)
    return implementation("linear", "cpu")(x, weight, bias)
