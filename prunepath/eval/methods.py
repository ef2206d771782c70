"""Sparsity methods compared at matched measured sparsity, all on the same experts and routers.

=============  =====================================================================  ==============
method         what it does                                                            knob
=============  =====================================================================  ==============
dense          the original FFN                                                        none
static         static structured pruning: each layer keeps, for good, the experts      kept experts
               with the largest mean output share on the calibration text
topk           MoEfication: the trained router's top-k experts, fixed k                k
threshold      independent thresholding (LTE-style): experts with sigmoid(logit)>tau   tau
pp_global      PrunePath: one cumulative softmax-mass budget for every layer           p
pp_layer       PrunePath: per-layer budgets calibrated on the calibration loss         p per layer
pp_oracle      (analysis) PrunePath rule on the oracle router (true expert shares)     p
=============  =====================================================================  ==============

Matching: each method's knob is calibrated on the same calibration tokens so that the
measured FFN sparsity (fraction of intermediate neurons inactive, averaged over tokens)
hits the target; the measured value is recorded for every point, on calibration and on
each evaluation suite. Discrete knobs (k, kept experts) take the value nearest the target
(within 1/(2E)).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import torch

from .names import ALL_METHODS, METHODS  # noqa: E402,F401

METHOD_LABELS = {
    "dense": "dense",
    "static": "static pruning",
    "topk": "MoEfication top-k",
    "threshold": "threshold (sigmoid>tau)",
    "pp_global": "PrunePath global p",
    "pp_layer": "PrunePath per-layer p",
    "pp_oracle": "PrunePath, oracle router",
}


@dataclass
class Setting:
    """One point of the sweep: a method, its target sparsity and the calibrated knob."""

    method: str
    target: float
    knob: object = None  # JSON-able: None, int k, float tau/p, list of per-layer p, list of kept experts
    calib_sparsity: float | None = None  # measured on the calibration tokens
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "dense" if self.method == "dense" else f"{self.method}@{round(100 * self.target)}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["name"] = self.name
        return d


def check_method(method: str) -> None:
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {ALL_METHODS}")


@contextlib.contextmanager
def routed_backend(model, backend: str | None):
    """Temporarily run every routed FFN on ops ``backend`` (None: leave as is).

    "torch" (the reference: the dense FFN with inactive neurons zeroed) gives the same
    results as every backend and is the fast choice for prompt-length forwards on a CPU.
    """
    from prunepath.budget import routed_layers

    layers = routed_layers(model) if backend else []
    saved = [layer.backend for layer in layers]
    try:
        for layer in layers:
            layer.backend = backend
        yield model
    finally:
        for layer, b in zip(layers, saved):
            layer.backend = b


def use_oracle_router(model, on: bool) -> None:
    """Swap every layer's trained router for the oracle (true shares), or put the trained one back."""
    from prunepath.budget import routed_layers
    from prunepath.routers import OracleRouter

    for layer in routed_layers(model):
        saved = layer.__dict__.get("_eval_trained_router")
        if on and saved is None:
            layer.__dict__["_eval_trained_router"] = layer.router
            layer.router = OracleRouter()
        elif not on and saved is not None:
            layer.router = saved
            del layer.__dict__["_eval_trained_router"]


def check_target(target) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be a float in [0, 1), got {target!r}")
    return float(target)


def nearest_count(target: float, num_experts: int, *, min_count: int = 1) -> int:
    """Experts to keep so that 1 - k/E is nearest ``target`` (k in [min_count, E])."""
    check_target(target)
    k = round((1.0 - target) * num_experts)
    return int(min(max(k, min_count), num_experts))


def sparsity_of_count(k: int, num_experts: int) -> float:
    return 1.0 - k / num_experts


def apply_setting(model, s: Setting) -> None:
    """Put ``model``'s routed FFNs into the state ``s`` describes."""
    from prunepath.budget import set_budget, set_routing

    check_method(s.method)
    use_oracle_router(model, s.method == "pp_oracle")
    if s.method == "dense":
        set_routing(model, "dense")
    elif s.method == "static":
        set_routing(model, "static", keep=[list(k) for k in s.knob])
    elif s.method == "topk":
        set_routing(model, "topk", k=int(s.knob))
    elif s.method == "threshold":
        set_routing(model, "threshold", tau=float(s.knob))
    else:  # pp_global, pp_layer, pp_oracle
        set_budget(model, s.knob)


def measure_sparsity(model, input_ids: torch.Tensor, *, batch_size: int = 4) -> float:
    """Measured FFN sparsity of the model's current routing on ``input_ids`` ``[N, S]``."""
    from prunepath.calibrate import measure

    return float(measure(model, input_ids, batch_size=batch_size)["sparsity"])


def calibrate_setting(
    model, method: str, target: float, calib_ids: torch.Tensor, *, tol: float = 0.005, batch_size: int = 4
) -> Setting:
    """Calibrate ``method``'s knob on ``calib_ids`` to measured sparsity ``target``; leaves the
    model in that state and returns the :class:`Setting` (with its measured sparsity)."""
    import prunepath
    from prunepath.budget import routed_layers
    from prunepath.calibrate import calibrate_threshold, static_keep_masks

    check_method(method)
    target = check_target(target)
    use_oracle_router(model, method == "pp_oracle")
    if method == "dense" or target == 0.0:
        s = Setting("dense" if method == "dense" else method, target, None)
        if method in ("pp_global", "pp_layer", "pp_oracle"):
            s.knob = 1.0
        elif method == "topk":
            s.knob = routed_layers(model)[0].num_experts
        elif method == "threshold":
            s.knob = 0.0
        elif method == "static":
            s.knob = [list(range(layer.num_experts)) for layer in routed_layers(model)]
    elif method == "static":
        masks = static_keep_masks(model, calib_ids, target_sparsity=target, batch_size=batch_size)
        s = Setting(method, target, [torch.nonzero(m).flatten().tolist() for m in masks])
    elif method == "topk":
        e = routed_layers(model)[0].num_experts
        s = Setting(method, target, nearest_count(target, e))
    elif method == "threshold":
        tau = calibrate_threshold(model, calib_ids, target_sparsity=target, tol=tol, batch_size=batch_size)
        s = Setting(method, target, float(tau))
    else:
        p = prunepath.calibrate(
            model, calib_ids, target_sparsity=target, per_layer=(method == "pp_layer"), tol=tol, apply=False,
            batch_size=batch_size,
        )
        s = Setting(method, target, p)
    apply_setting(model, s)
    s.calib_sparsity = measure_sparsity(model, calib_ids, batch_size=batch_size)
    return s


def unmatched(settings: list[Setting], tol: float = 0.01) -> list[Setting]:
    """Settings whose calibration sparsity misses their target by more than ``tol``."""
    return [
        s for s in settings
        if s.method != "dense" and (s.calib_sparsity is None or abs(s.calib_sparsity - s.target) > tol)
    ]
