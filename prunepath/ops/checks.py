"""Argument validation for the public ops: clear errors naming the argument.

Nothing here synchronizes with a GPU: value checks on CUDA budgets are done with a
device-side assert, and skipped entirely while tracing or capturing a CUDA graph.
"""

from __future__ import annotations

import torch

from .reference import ACTIVATIONS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def is_packed_down(w_down: torch.Tensor) -> bool:
    """Whether ``w_down`` [d, F] is the transposed view of a contiguous W_down^T [F, d] (how
    :func:`prunepath.decode.packed_down.pack` and GPT-2's Conv1D store it): the kernels then read the
    packed layout in place (each expert's block is contiguous rows), never a copy."""
    return (w_down.dim() == 2 and not w_down.is_contiguous() and w_down.t().is_contiguous())


def needs_grad(*tensors) -> bool:
    """Whether autograd needs a gradient through these (grad mode on, one requires it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [T, E] (2-D), got {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one expert (E >= 1)")


def budget_tensor(budget, num_tokens: int, device: torch.device, *,
                  device_range_check: bool = True, strided_ok: bool = False) -> torch.Tensor:
    """Validate ``budget`` (float in [0, 1] or a [T] tensor) and return it as fp32 [T].

    The [0, 1] range of a GPU tensor is checked by a device-side assert (no host sync), or
    not here when ``device_range_check`` is False (a kernel that checks it itself).
    ``strided_ok``: a strided fp32 tensor (e.g. one budget expanded to every token, stride 0)
    is returned as it is, not copied, for kernels that take the budget's stride."""
    if isinstance(budget, torch.Tensor):
        if budget.dim() == 0:
            budget = budget.reshape(1).expand(num_tokens)
        if budget.dim() != 1 or budget.shape[0] != num_tokens:
            raise ValueError(
                f"budget must be a float or a [T] tensor with T={num_tokens}, "
                f"got shape {tuple(budget.shape)}"
            )
        if budget.device != device:
            raise ValueError(f"budget is on {budget.device} but logits are on {device}")
        if not budget.is_floating_point():
            raise ValueError(f"budget tensor must be floating point, got {budget.dtype}")
        if budget.device.type == "cpu" and not _tracing():
            if budget.shape[0] <= 64:  # a decode step's few values: cheaper in Python
                vals = budget.tolist()
                bad_vals = [v for v in vals if not 0.0 <= v <= 1.0]  # NaN fails both
                if bad_vals:
                    raise ValueError(f"budget values must lie in [0, 1]; got {bad_vals[:4]}")
            else:
                bad = (budget < 0) | (budget > 1) | torch.isnan(budget)
                if bool(bad.any()):
                    raise ValueError(
                        f"budget values must lie in [0, 1]; got {budget[bad][:4].tolist()}"
                    )
        elif device_range_check and not _tracing():
            torch._assert_async(
                ((budget >= 0) & (budget <= 1)).all(), "budget values must lie in [0, 1]"
            )
        budget = budget.float()
        return budget if strided_ok else budget.contiguous()
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a float in [0, 1] or a [T] tensor, got {budget!r}")
    if not 0.0 <= float(budget) <= 1.0:
        raise ValueError(f"budget must lie in [0, 1], got {budget}")
    return torch.full((num_tokens,), float(budget), dtype=torch.float32, device=device)


def expert_count_bounds(min_experts: int, max_experts: int | None, num_experts: int):
    max_experts = num_experts if max_experts is None else max_experts
    if not isinstance(min_experts, int) or not 0 <= min_experts <= num_experts:
        raise ValueError(f"min_experts must be an int in [0, E={num_experts}], got {min_experts!r}")
    if not isinstance(max_experts, int) or not min_experts <= max_experts <= num_experts:
        raise ValueError(
            f"max_experts must be an int in [min_experts={min_experts}, E={num_experts}], "
            f"got {max_experts!r}"
        )
    return min_experts, max_experts


def check_ffn_args(x, w_gate, w_up, w_down, mask, activation, b_up, b_down) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must have shape [T, d] (2-D), got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    check_ffn_weights(w_gate, w_up, w_down, activation, b_up, b_down, d=x.shape[1],
                      dtype=x.dtype, device=x.device, dtype_of="x")
    check_ffn_inputs(x, mask, d=x.shape[1], f=w_up.shape[0], dtype=x.dtype, device=x.device)


def check_ffn_weights(w_gate, w_up, w_down, activation, b_up, b_down, *, d=None, dtype=None,
                      device=None, dtype_of="w_up") -> None:
    """The FFN's weights against each other (and ``d``/``dtype``/``device`` when given)."""
    if not isinstance(w_up, torch.Tensor) or w_up.dim() != 2:
        raise ValueError(f"w_up must be a 2-D tensor [F, d], got {getattr(w_up, 'shape', w_up)!r}")
    d = w_up.shape[1] if d is None else d
    dtype = w_up.dtype if dtype is None else dtype
    device = w_up.device if device is None else device
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"weights must be floating point, got dtype {dtype}")
    if w_up.shape[1] != d:
        raise ValueError(f"w_up must have shape [F, d={d}], got {tuple(w_up.shape)}")
    f = w_up.shape[0]
    if w_gate is not None and tuple(w_gate.shape) != (f, d):
        raise ValueError(f"w_gate must have shape [F={f}, d={d}] like w_up, got {tuple(w_gate.shape)}")
    if tuple(w_down.shape) != (d, f):
        raise ValueError(f"w_down must have shape [d={d}, F={f}], got {tuple(w_down.shape)}")
    if b_up is not None and tuple(b_up.shape) != (f,):
        raise ValueError(f"b_up must have shape [F={f}], got {tuple(b_up.shape)}")
    if b_down is not None and tuple(b_down.shape) != (d,):
        raise ValueError(f"b_down must have shape [d={d}], got {tuple(b_down.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down), ("b_up", b_up),
                    ("b_down", b_down)):
        if w is None:
            continue
        if w.device != device:
            raise ValueError(f"{name} is on {w.device} but {dtype_of} is on {device}")
        if w.dtype != dtype:
            raise ValueError(f"{name} has dtype {w.dtype} but {dtype_of} has {dtype}; use one dtype")


def check_ffn_inputs(x, mask, *, d, f, dtype, device) -> None:
    """A call's ``x`` [T, d] and ``mask`` [T, E] against already checked weights."""
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"x must have shape [T, d={d}], got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise ValueError(f"x has dtype {x.dtype} but the weights have {dtype}; use one dtype")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the weights are on {device}")
    check_mask(mask, x.shape[0], f, device)


def check_mask(mask, t: int, f: int, device) -> None:
    """An expert mask for ``t`` tokens of an FFN ``f`` neurons wide: bool [t, E], E divides f."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a bool tensor [T, E], got {type(mask).__name__}")
    if mask.dim() != 2 or mask.shape[0] != t:
        raise ValueError(f"mask must have shape [T={t}, E], got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (from prunepath.ops.route), got {mask.dtype}")
    e = mask.shape[1]
    if e < 1 or f % e != 0:
        raise ValueError(f"F={f} must be divisible by the number of experts E={e} (mask.shape[1])")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the FFN's inputs are on {device}")
