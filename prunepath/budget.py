"""The run-time knob: budgets, routing policies and measured sparsity of a converted model.

>>> prunepath.set_budget(model, 0.7)              # every layer, every sequence
>>> prunepath.set_budget(model, [0.6, 0.8, ...])   # one budget per layer
>>> prunepath.set_budget(model, torch.tensor([0.5, 0.9]))   # one budget per sequence [B]
>>> prunepath.set_budget(model, "s50")             # a calibrated preset saved in the config
>>> with prunepath.budget(model, 0.5): model.generate(...)
>>> prunepath.set_routing(model, "topk", k=12)     # baselines on the same experts
>>> prunepath.stats(model)                         # measured FFN sparsity of the last forward

Budgets live in device buffers of each :class:`~prunepath.layers.RoutedFFN`; setting a
new value of the same kind writes in place (no shape change, no recompilation). Values are
validated here, once, when set (:meth:`~prunepath.layers.RoutedFFN.set_budget`); the other
knobs are each layer's :class:`~prunepath.layers.RoutingSettings`, changed through
:meth:`~prunepath.layers.RoutedFFN.configure`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ._modcall import make_module_callable
from .config import BACKENDS, check_budget_value, is_temperature
from .layers import POLICIES, get_routing_state, restore_routing_state, routed_layers


def _config(model):
    return getattr(model, "prunepath_config", None)


def resolve_budget(model: nn.Module, value):
    """Turn a preset name into its budget; validate floats and per-layer lists."""
    if isinstance(value, str):
        cfg = _config(model)
        presets = {} if cfg is None else cfg.presets
        if value not in presets:
            raise ValueError(
                f"unknown budget preset {value!r}; this model has presets "
                f"{sorted(presets) or 'none (run prunepath.calibrate(..., name=...) first)'}"
            )
        return presets[value]
    return value


def set_budget(model: nn.Module, p) -> None:
    """Set the cumulative-mass budget (and select the "budget" routing policy).

    Args:
        p: a float in [0, 1] (1.0 = exactly dense); a list/tuple with one float per layer;
            a preset name (e.g. "s50"); a 1-D tensor ``[B]`` with one budget per sequence of
            the next batches; or a 2-D tensor ``[num_layers, B]``.
    """
    layers = routed_layers(model)
    n = len(layers)
    p = resolve_budget(model, p)
    if isinstance(p, torch.Tensor):
        if p.dim() not in (1, 2) or (p.dim() == 2 and p.shape[0] != n):
            raise ValueError(f"budget tensor must be [B] (per sequence) or [num_layers={n}, B], "
                             f"got shape {tuple(p.shape)}")
        if not p.is_floating_point():
            raise ValueError(f"budget tensor must be floating point, got {p.dtype}")
        if p.numel() == 0:
            raise ValueError("budget tensor is empty")
        pf = p.detach().float()
        if pf.device.type == "cpu" and bool(((pf < 0) | (pf > 1) | torch.isnan(pf)).any()):
            raise ValueError(f"budget values must lie in [0, 1], got {pf.flatten()[:8].tolist()}")
        rows = [pf] * n if p.dim() == 1 else list(pf)
        for layer, row in zip(layers, rows):  # (values checked above, once for every layer)
            layer._set_budget_tensor(row.to(layer.budget.device), False)
            if layer.settings.policy != "budget":
                layer.configure(policy="budget")
        return
    if isinstance(p, (list, tuple)):
        check_budget_value(list(p), "budget", n)
        values = [float(v) for v in p]
    else:
        check_budget_value(p, "budget")
        values = [float(p)] * n
    for layer, v in zip(layers, values):
        layer.set_budget(v)


def set_routing(model: nn.Module, policy: str, *, k=None, tau=None, keep=None,
                budget=None) -> None:
    """Select a routing policy on every routed FFN (all on the same experts).

    * ``"budget"``: cumulative softmax mass (PrunePath); optional ``budget=`` as in set_budget.
    * ``"topk"``: the router's top ``k`` experts (int, or one int per layer).
    * ``"threshold"``: experts with ``sigmoid(logit) > tau`` (float, or one per layer), independently.
    * ``"static"``: a fixed keep-mask per layer: ``keep`` is a list with one entry per layer
      (a bool [E] tensor or a list of expert indices), or a single such entry for every
      layer; static structured pruning.
    * ``"dense"``: every expert (the original FFN).
    """
    layers = routed_layers(model)
    n = len(layers)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")

    def per_layer(value, name):
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries, expected one per layer ({n})")
            return list(value)
        return [value] * n

    if policy == "budget":
        for layer in layers:
            layer.configure(policy="budget")
        if budget is not None:
            set_budget(model, budget)
        return
    if policy == "topk":
        if k is None:
            raise ValueError("set_routing(model, 'topk', k=...) needs k (int or one per layer)")
        ks = per_layer(k, "k")
        for layer, kk in zip(layers, ks):
            if isinstance(kk, bool) or not isinstance(kk, int) or not 1 <= kk <= layer.num_experts:
                raise ValueError(f"k must be an int in [1, E={layer.num_experts}], got {kk!r}")
        for layer, kk in zip(layers, ks):
            layer.configure(topk=kk, policy="topk")
        return
    if policy == "threshold":
        if tau is None:
            raise ValueError("set_routing(model, 'threshold', tau=...) needs tau (float or one per layer)")
        taus = per_layer(tau, "tau")
        for t in taus:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
                raise ValueError(f"tau must be a float in [0, 1] (a sigmoid threshold), got {t!r}")
        for layer, t in zip(layers, taus):
            layer.tau.fill_(float(t))
            layer.configure(policy="threshold")
        return
    if policy == "static":
        if keep is None:
            raise ValueError("set_routing(model, 'static', keep=[...]) needs one keep-mask per layer")
        flat = isinstance(keep, (list, tuple)) and all(
            isinstance(v, (int, bool)) for v in keep)  # one index list / mask for every layer
        keeps = per_layer(keep, "keep") if isinstance(keep, (list, tuple)) and not flat else [keep] * n
        masks = []
        for layer, kp in zip(layers, keeps):
            masks.append(_keep_mask(kp, layer.num_experts))
        for layer, m in zip(layers, masks):
            layer.static_keep.copy_(m.to(layer.static_keep.device))
            layer.configure(policy="static")
        return
    for layer in layers:  # dense
        layer.configure(policy="dense")


def _keep_mask(keep, num_experts: int) -> torch.Tensor:
    t = torch.as_tensor(keep)
    if t.dtype == torch.bool:
        if t.shape != (num_experts,):
            raise ValueError(f"static keep-mask must be bool [E={num_experts}], got {tuple(t.shape)}")
        return t
    if t.dtype not in (torch.int64, torch.int32) or t.dim() != 1:
        raise ValueError("static keep must be a bool [E] mask or a 1-D list of expert indices")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_experts):
        raise ValueError(f"static keep indices must lie in [0, {num_experts})")
    m = torch.zeros(num_experts, dtype=torch.bool)
    m[t.long()] = True
    return m


@contextlib.contextmanager
def routing_state(model: nn.Module, policy: str | None = None, **kwargs):
    """Temporarily change the routing (``policy`` and its arguments, as in :func:`set_routing`)."""
    saved = get_routing_state(model)
    try:
        if policy is not None:
            set_routing(model, policy, **kwargs)
        yield model
    finally:
        restore_routing_state(model, saved)


@contextlib.contextmanager
def budget(model: nn.Module, p):
    """``with prunepath.budget(model, 0.5): ...``: a budget for the block, restored afterwards."""
    saved = get_routing_state(model)
    try:
        set_budget(model, p)
        yield model
    finally:
        restore_routing_state(model, saved)


def set_prefill(model: nn.Module, mode: str) -> None:
    """"routed" (default) or "dense": whether multi-token forwards (prompts) are routed."""
    if mode not in ("routed", "dense"):
        raise ValueError(f"prefill must be 'routed' or 'dense', got {mode!r}")
    for layer in routed_layers(model):
        layer.configure(prefill=mode)
    cfg = _config(model)
    if cfg is not None:
        cfg.prefill = mode


def set_backend(model: nn.Module, backend: str) -> None:
    """The ops backend every routed FFN uses ("auto", "torch", "cpu", "triton", "cuda")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for layer in routed_layers(model):
        layer.configure(backend=backend)
    cfg = _config(model)
    if cfg is not None:
        cfg.backend = backend


def set_router_temperature(model: nn.Module, temperature: float) -> None:
    """The budget rule's softmax temperature on every routed FFN (1.0: the paper's rule).

    Budgets calibrated at another temperature keep other sparsities, so the model's saved
    presets are dropped (with a warning): calibrate again after changing it.
    """
    import warnings

    if not is_temperature(temperature):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    for layer in routed_layers(model):
        layer.configure(temperature=float(temperature))
    cfg = _config(model)
    if cfg is not None:
        if cfg.presets and cfg.router_temperature != temperature:
            warnings.warn(f"router temperature {cfg.router_temperature} -> {temperature}: dropping the "
                          f"presets {sorted(cfg.presets)} calibrated at the old one; calibrate again",
                          stacklevel=2)
            cfg.presets = {}
        cfg.router_temperature = float(temperature)


def set_stats_recording(model: nn.Module, enabled: bool) -> None:
    """Turn the per-forward statistics counters on or off (e.g. off inside CUDA graphs)."""
    for layer in routed_layers(model):
        layer.configure(record_stats=bool(enabled))


def reset_stats(model: nn.Module) -> None:
    """Zero the running token/active-expert counters of every routed FFN."""
    for layer in routed_layers(model):
        layer.reset_stats()


def stats(model: nn.Module, *, include_report: bool = True) -> dict:
    """Measured FFN sparsity (fraction of intermediate neurons inactive, averaged over tokens).

    Returns ``{"sparsity", "per_layer", "active_experts"}`` for the last forward, and
    ``"cumulative": {"sparsity", "per_layer", "tokens"}`` over every forward since the last
    :func:`reset_stats`. With a router report in the config (trained routers), also
    ``"router_report"`` (per-layer router quality; see :func:`prunepath.routers.router_quality`).
    Reads device counters (one host synchronization, here, not in the forward).
    """
    layers = routed_layers(model)
    last = torch.stack([layer.last_active.float().cpu() for layer in layers])
    sizes = torch.tensor([float(layer.intermediate_size) for layer in layers])
    act_sum = torch.cat([layer.active_sum.double().cpu().reshape(1) for layer in layers])
    tokens = torch.cat([layer.token_count.double().cpu().reshape(1) for layer in layers])
    cum = torch.where(tokens > 0, 1 - act_sum / tokens.clamp_min(1), torch.zeros_like(act_sum))
    out = {
        "sparsity": float(((1 - last) * sizes).sum() / sizes.sum()),
        "per_layer": [float(1 - a) for a in last],
        "active_experts": [float(a * layer.num_experts) for a, layer in zip(last, layers)],
        "cumulative": {
            "sparsity": float((cum * sizes.double()).sum() / sizes.sum()),
            "per_layer": [float(c) for c in cum],
            "tokens": int(tokens.max()) if len(tokens) else 0,
        },
        "policy": layers[0].settings.policy,
    }
    cfg = _config(model)
    if include_report and cfg is not None and cfg.router_report:
        out["router_report"] = cfg.router_report
    return out


def measured_sparsity(model: nn.Module) -> float:
    """Cumulative measured FFN sparsity since the last :func:`reset_stats` (one host sync)."""
    return stats(model, include_report=False)["cumulative"]["sparsity"]



# ``prunepath.budget`` is both this module and the context manager (see prunepath._modcall)
make_module_callable(__name__)
