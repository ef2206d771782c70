"""``PrunePathConfig``: every choice that defines a converted model, saved as JSON.

One config describes how the FFNs were split into experts (``num_experts``, ``clustering``),
which routers were trained and how (``router``, ``router_rank``, the ``train_*`` fields),
how the model routes at run time (``prefill``, ``min_experts``, ``backend``) and the
calibrated budget presets (``presets``: name -> float or per-layer list). It is written
beside the checkpoint as ``prunepath_config.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field

FORMAT_VERSION = 1

CLUSTERINGS = ("balanced_kmeans", "coactivation", "none")
ROUTERS = ("linear", "mlp", "lowrank", "oracle")
PREFILL_MODES = ("routed", "dense")
BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")
# router kind -> training epochs when train_epochs is None
DEFAULT_ROUTER_EPOCHS = {"linear": 8, "mlp": 8, "lowrank": 0}


@dataclass
class PrunePathConfig:
    """How to MoEfy a model and route its FFNs. The defaults are the best recipe measured
    (EVAL.md, "Expert granularity"): one neuron per expert, rank-256 low-rank routers.

    Expert split:
        num_experts: experts per FFN (E); must divide the FFN width F. None (the default):
            one neuron per expert, E = F, set at conversion.
        clustering: "coactivation" (neurons that fire together on calibration text),
            "balanced_kmeans" (neuron weight vectors, MoEfication-style) or "none" (keep the
            original neuron order; experts are consecutive blocks). Unused at one neuron per
            expert.
        kmeans_iters: iterations of balanced k-means.
    Routers:
        router: "lowrank" (a rank-``router_rank`` copy of the FFN's up projections predicts
            each neuron's activation; fitted in closed form, then refined), "linear" (d -> E),
            "mlp" (d -> router_rank -> E, trained on the expert shares) or "oracle" (true expert
            shares computed from the FFN itself; for analysis, as slow as the dense FFN).
        router_rank: rank of the "lowrank" router, hidden width of the "mlp" one.
        train_tokens: calibration tokens used to train routers (and to cluster by coactivation).
        train_seq_len: tokens per calibration sequence.
        train_epochs, train_batch_tokens, train_lr, train_weight_decay: router optimisation
            (for "lowrank": the refinement after the closed-form fit). ``train_epochs=None``:
            the router kind's default (:attr:`router_epochs`: 8, or 0 for "lowrank", whose
            refinement gained nothing at rank 256, EVAL.md).
        holdout_fraction: share of calibration tokens kept out of training for the router report.
    Routing at run time:
        prefill: "routed" (prompt tokens are routed like decode tokens) or "dense".
        min_experts: every token keeps at least this many experts (budget 0 -> min_experts).
        router_temperature: the budget rule reads softmax(logits / router_temperature).
            1.0 is the paper's rule (for "lowrank": the predicted shares themselves); > 1
            flattens the distribution, so tokens and layers whose router is very confident keep
            more experts. Presets are calibrated for one value.
        backend: ops backend for routing and the routed FFN ("auto" picks one).
        presets: calibrated budgets by name, e.g. {"s50": 0.62} or {"s50": [per-layer list]}.
        seed: seeds clustering and router initialisation.
    Filled in by :func:`prunepath.convert`: model_type, num_layers, hidden_size,
    intermediate_size, router_report (router-quality figures, see prunepath.routers).
    Filled in by :func:`prunepath.finetune.finetune`: finetune (its config, tokens, final KL).
    """

    num_experts: int | None = None
    clustering: str = "coactivation"
    kmeans_iters: int = 25
    router: str = "lowrank"
    router_rank: int = 256
    train_tokens: int = 32768
    train_seq_len: int = 512
    train_epochs: int | None = None
    train_batch_tokens: int = 1024
    train_lr: float = 2e-3
    train_weight_decay: float = 0.0
    holdout_fraction: float = 0.1
    prefill: str = "routed"
    min_experts: int = 1
    router_temperature: float = 1.0
    backend: str = "auto"
    seed: int = 0
    presets: dict = field(default_factory=dict)
    # filled in at conversion time
    model_type: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    router_report: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)  # filled in by prunepath.finetune (empty: not fine-tuned)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""

        need = functools.partial(require, self)

        def pos_int(name):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "an int >= 1")

        if self.num_experts is not None:
            pos_int("num_experts")
        for name in ("kmeans_iters", "router_rank", "train_tokens",
                     "train_seq_len", "train_batch_tokens"):
            pos_int(name)
        need(self.train_epochs is None or (isinstance(self.train_epochs, int)
                                            and not isinstance(self.train_epochs, bool)
                                            and self.train_epochs >= 0),
             "train_epochs", "None or an int >= 0")
        need(self.clustering in CLUSTERINGS, "clustering", f"one of {CLUSTERINGS}")
        need(self.router in ROUTERS, "router", f"one of {ROUTERS}")
        need(self.prefill in PREFILL_MODES, "prefill", f"one of {PREFILL_MODES}")
        need(self.backend in BACKENDS, "backend", f"one of {BACKENDS}")
        need(isinstance(self.train_lr, (int, float)) and self.train_lr > 0, "train_lr", "> 0")
        need(isinstance(self.train_weight_decay, (int, float)) and self.train_weight_decay >= 0,
             "train_weight_decay", ">= 0")
        need(isinstance(self.holdout_fraction, (int, float)) and 0 <= self.holdout_fraction < 1,
             "holdout_fraction", "in [0, 1)")
        need(isinstance(self.min_experts, int) and 0 <= self.min_experts
             <= (self.num_experts if self.num_experts is not None else self.min_experts),
             "min_experts", f"an int in [0, num_experts={self.num_experts}]")
        need(is_temperature(self.router_temperature), "router_temperature", "a finite float > 0")
        need(isinstance(self.seed, int), "seed", "an int")
        need(isinstance(self.presets, dict), "presets", "a dict name -> budget")
        for key, value in self.presets.items():
            check_budget_value(value, f"presets[{key!r}]", self.num_layers)
        need(self.format_version == FORMAT_VERSION, "format_version",
             f"{FORMAT_VERSION} (this prunepath reads format {FORMAT_VERSION} only)")

    @property
    def router_epochs(self) -> int:
        """Training epochs of this router kind: ``train_epochs``, or the kind's default."""
        if self.train_epochs is not None:
            return self.train_epochs
        return DEFAULT_ROUTER_EPOCHS.get(self.router, 8)

    # --- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> PrunePathConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a PrunePath config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PrunePathConfig fields {unknown}; known: {sorted(known)}")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"prunepath_config.json has format_version {version}, this prunepath reads "
                f"{FORMAT_VERSION}; upgrade prunepath or re-convert the model"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> PrunePathConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"prunepath config is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def replace(self, **changes) -> PrunePathConfig:
        return dataclasses.replace(self, **changes)


def require(owner, cond, name: str, expected: str) -> None:
    """Raise ValueError "<Class>.<name> must be <expected>, got <value>" unless ``cond``."""
    if not cond:
        raise ValueError(f"{type(owner).__name__}.{name} must be {expected}, got {getattr(owner, name)!r}")


def is_temperature(value) -> bool:
    """A valid router temperature: a finite number > 0 (not a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0 < value < float("inf"))


def check_budget_value(value, name: str = "budget", num_layers: int | None = None) -> None:
    """A budget is a float in [0, 1] or a per-layer list of them (length ``num_layers`` if known)."""
    if isinstance(value, (list, tuple)):
        if num_layers is not None and len(value) != num_layers:
            raise ValueError(f"{name} is a per-layer list of length {len(value)}, "
                             f"expected one budget per layer ({num_layers})")
        for i, v in enumerate(value):
            check_budget_value(v, f"{name}[{i}]")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a float in [0, 1] or a per-layer list, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
