"""``RoutedFFN``: wraps one model FFN and runs it through the routed (expert-sparse) ops.

The wrapper keeps a reference to the original FFN module (``self.base``; its parameters
are used in place, never copied), a router (``self.router``) and the run-time routing
state as device buffers:

* ``budget``: fp32 scalar, or ``[B]`` (one budget per sequence). Changing its value does
  not change any shape, so compiled graphs stay valid.
* ``tau``: threshold for the "threshold" policy; ``static_keep``: ``[E]`` bool keep-mask
  for the "static" policy.
* statistics of the forwards (active-expert counts), accumulated on the device without
  any host synchronization: ``last_active`` (fraction of neurons active in the last
  forward), ``active_sum`` / ``token_count`` (running sums since the last reset).

Routing policies (all on the same experts; set with :func:`prunepath.set_routing`):
"budget" (cumulative softmax mass >= budget, the PrunePath rule), "topk" (fixed k per
layer), "threshold" (sigmoid(logit) > tau, independent per expert), "static" (a fixed
per-layer expert keep-mask: static structured pruning) and "dense".

Every other knob of a layer (policy, k, temperature, backends, the decoder's FFN path, ...)
is one immutable :class:`RoutingSettings`, ``layer.settings``, validated when made and
changed through one method, :meth:`RoutedFFN.configure` (the attributes of the same names,
``layer.policy`` etc., read and set it). :func:`routed_layers`, :func:`get_routing_state`
and :func:`restore_routing_state` find and snapshot the routed layers of a model.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from . import ops
from .config import BACKENDS, check_budget_value, is_temperature
from .families import Family, FFNWeights, ffn_weights, projections
from .ops.reference import activate
from .ops.router_route import fold_standardization

POLICIES = ("budget", "topk", "threshold", "static", "dense")
PREFILLS = ("routed", "dense")


@dataclasses.dataclass(frozen=True)
class RoutingSettings:
    """How one :class:`RoutedFFN` routes and runs (host-side; the budget, ``tau`` and
    ``static_keep`` values are device buffers beside it). Immutable: change it with
    :meth:`RoutedFFN.configure`, which validates the new settings.

    Attributes:
        topk: experts per token under the "topk" policy (1..E).
        policy: one of :data:`POLICIES`.
        min_experts: each token keeps at least this many experts ("budget" policy).
        temperature: the budget rule's softmax temperature (finite, > 0).
        prefill: "routed" or "dense": whether multi-token forwards (prompts) are routed.
        backend: ops backend (:data:`prunepath.config.BACKENDS`).
        ffn_backend: backend of ``ops.routed_ffn`` alone (``None``: ``backend``).
        record_stats: update the device-side statistics in every forward.
        fuse_router: plain linear/MLP routers run as one :func:`prunepath.ops.router_route`
            on folded weights (:meth:`RoutedFFN.fused_router`).
        fuse_routing: with a fused router, routing and the FFN as one
            :func:`prunepath.ops.router_routed_ffn` call.
        masked_dense: the FFN at dense cost with the same result (the decoder's "dense" FFN
            path): :func:`prunepath.ops.router_masked_dense_ffn` or
            :func:`prunepath.ops.masked_dense_ffn`.
        router_stream: the CUDA stream the masked-dense path routes on (or ``None``).
    """

    topk: int
    policy: str = "budget"
    min_experts: int = 1
    temperature: float = 1.0
    prefill: str = "routed"
    backend: str = "auto"
    ffn_backend: str | None = None
    record_stats: bool = True
    fuse_router: bool = True
    fuse_routing: bool = False
    masked_dense: bool = False
    router_stream: object = None

    def check(self, num_experts: int) -> None:
        """Raise ValueError unless every field is valid for a layer of ``num_experts``."""
        if self.policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("topk", "min_experts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if not 1 <= self.topk <= num_experts:
            raise ValueError(f"k must be an int in [1, E={num_experts}], got {self.topk!r}")
        if self.min_experts < 0:
            raise ValueError(f"min_experts must be >= 0, got {self.min_experts!r}")
        if not is_temperature(self.temperature):
            raise ValueError(f"temperature must be a finite float > 0, got {self.temperature!r}")
        if self.prefill not in PREFILLS:
            raise ValueError(f"prefill must be 'routed' or 'dense', got {self.prefill!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.ffn_backend is not None and self.ffn_backend not in BACKENDS:
            raise ValueError(f"ffn_backend must be None or one of {BACKENDS}, "
                             f"got {self.ffn_backend!r}")


_SETTINGS = tuple(f.name for f in dataclasses.fields(RoutingSettings))


def _setting(name: str):
    """``layer.NAME``: reads ``layer.settings.NAME``; setting it is ``layer.configure(NAME=v)``."""
    def get(self):
        return getattr(self.settings, name)

    def set_(self, value):
        self.configure(**{name: value})

    return property(get, set_, doc=f"``settings.{name}`` (:class:`RoutingSettings`)")


def routed_layers(model: nn.Module, *, required: bool = True) -> list[RoutedFFN]:
    """The model's RoutedFFN modules in layer order. Raises if there are none, unless
    ``required=False`` (then ``[]`` for a dense model)."""
    layers = [m for m in model.modules() if isinstance(m, RoutedFFN)]
    if not layers and required:
        raise ValueError(
            "model has no PrunePath routed FFNs; convert it first with prunepath.convert(model, cfg) "
            "or load it with prunepath.from_pretrained(dir)"
        )
    return sorted(layers, key=lambda r: r.layer_idx)


# the settings a routing-state snapshot puts back (backends, temperature and the fused paths
# keep whatever was set meanwhile)
_SNAPSHOT = ("policy", "topk", "prefill", "record_stats")


def get_routing_state(model: nn.Module) -> list[dict]:
    """A snapshot of every layer's routing state (restorable with :func:`restore_routing_state`):
    its policy, k, prefill and statistics recording (:class:`RoutingSettings`) and its budget,
    ``tau`` and ``static_keep`` values."""
    return [
        {"settings": layer.settings, "budget": layer.budget.clone(),
         "dense_budget": layer._dense_budget, "tau": layer.tau.clone(),
         "static_keep": layer.static_keep.clone()}
        for layer in routed_layers(model)
    ]


def restore_routing_state(model: nn.Module, state: list[dict]) -> None:
    """Put back what :func:`get_routing_state` returned."""
    for layer, st in zip(routed_layers(model), state):
        saved, now = st["settings"], layer.settings
        changes = {f: getattr(saved, f) for f in _SNAPSHOT if getattr(now, f) != getattr(saved, f)}
        if changes:
            layer.configure(**changes)
        layer._set_budget_tensor(st["budget"], st["dense_budget"])
        layer.tau.copy_(st["tau"])
        layer.static_keep.copy_(st["static_keep"])


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    # GPT-2's Conv1D weights are [in, out]: their nn.Linear-layout views are transposed
    # (non-contiguous); the kernels want contiguous W_gate/W_up, so those are copied per call
    # (correct, slower; only the Conv1D family pays it). W_down is passed as it is: every
    # backend takes its layout (a transposed one is read as the packed W_down^T in place).
    return t if t.is_contiguous() else t.contiguous()


@contextlib.contextmanager
def frozen(layers):
    """Inside the block, each :class:`RoutedFFN` of ``layers`` binds its ops once
    (:func:`prunepath.ops.bind_router_route` / :func:`~prunepath.ops.bind_routed_ffn` on its
    folded router and its weights) and reuses them: per call only the input, the mask and the
    budget are checked. For decode loops (eager steps on a CPU: ~80 us of Python per layer
    saved). Seen inside the block: budget values and shapes, policy, backends, temperature.
    Not seen: a router or weight *replaced* or updated in place -- leave the block first."""
    layers = list(layers)
    before = [m._frozen for m in layers]
    for m in layers:
        m._frozen, m._bound = True, None
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._frozen, m._bound = b, None


# the router classes with a folded form (exact classes: a subclass may change the forward)
_PLAIN_ROUTERS = {("prunepath.routers", "MLPRouter"): "mlp",
                  ("prunepath.routers", "LinearRouter"): "linear"}


def _plain_router_kind(router) -> str | None:
    """"mlp" / "linear" for a plain :class:`~prunepath.routers.MLPRouter` /
    :class:`~prunepath.routers.LinearRouter`, else None. Matched by the class's module and
    name, not by importing :mod:`prunepath.routers`: this module sits below it (its training
    code uses :func:`routed_layers` through :mod:`prunepath.budget`)."""
    cls = type(router)
    return _PLAIN_ROUTERS.get((cls.__module__, cls.__qualname__))


class InlineFFN(nn.Module):
    """Groups an FFN whose projections live directly on the decoder layer (OPT).

    Holds the layer's own up/down projection and activation modules (no copies) so they
    can be wrapped like an ``mlp`` submodule; ``forward`` is the original computation.
    """

    def __init__(self, owner: nn.Module, fam: Family):
        super().__init__()
        self.up_name, self.down_name, self.act_name = fam.up, fam.down, fam.act_attr
        self.add_module(fam.up, getattr(owner, fam.up))
        self.add_module(fam.down, getattr(owner, fam.down))
        self.add_module(fam.act_attr, getattr(owner, fam.act_attr))

    def forward(self, x):
        up, down, act = (getattr(self, n) for n in (self.up_name, self.down_name, self.act_name))
        return down(act(up(x)))


class RoutedFFN(nn.Module):
    """One FFN behind a router. See the module docstring.

    Args:
        base: the original FFN module (or an :class:`InlineFFN`), holding the projections
            named in ``fam``.
        fam: the model family (projection names, Conv1D layout).
        activation: ops activation name ("silu", "gelu", "gelu_tanh", "relu").
        num_experts: E; must divide the FFN width.
        router: module mapping ``[T, d]`` FFN inputs to ``[T, E]`` logits (or an
            ``OracleRouter``, which also needs the FFN itself).
        layer_idx: the decoder layer index (for messages and reports).
        prefill: "routed" or "dense" (forwards over more than one position per sequence run dense).
        min_experts: each token keeps at least this many experts.
        backend: ops backend.

    The run-time knobs below are fields of ``self.settings`` (:class:`RoutingSettings`),
    changed with :meth:`configure` (the attributes of the same names read and set them).

    ``ffn_backend`` (default ``None`` = same as ``backend``) overrides the backend
    of ``ops.routed_ffn`` alone; routing keeps ``backend``. ``masked_dense``
    (default ``False``): the FFN runs at dense cost with the same result -- the decoder's
    "dense" FFN path for near-dense unions: :func:`prunepath.ops.router_masked_dense_ffn`
    where the router has a folded form (the router's projection in the up GEMM when
    :mod:`prunepath.decode.stacked_ffn` laid the weights out, the routing inside the activation
    kernel), else :func:`prunepath.ops.masked_dense_ffn` (the mask first; on
    ``router_stream``, a CUDA stream, beside the up projections in eager and graph steps).

    ``fuse_router`` (default ``True``): when the router is a plain
    :class:`~prunepath.routers.LinearRouter` or :class:`~prunepath.routers.MLPRouter` and the
    policy is "budget" or "topk", the mask comes from one :func:`prunepath.ops.router_route`
    call (router projection + routing, fused on GPU with the Triton backend) on folded
    weights: the input standardisation folds into the first layer
    (``prunepath.ops.router_route.fold_standardization``) and ``1 / temperature`` into the
    last layer's weight and bias. Same rule as the unfused path (``route(router(x) / T)``);
    the logits are computed in fp32 (the unfused path computes them in the router's dtype,
    so on a bf16 model a token whose cumulative mass sits within rounding of the budget can
    differ). The folded tensors are cached on the module (:meth:`fused_router`) and rebuilt
    when the router, its weights (in-place updates are seen through tensor versions), the
    temperature or the dtype change; in-place weight updates refold into the same tensors.

    ``fuse_routing`` (default ``False``): with a fused router (above) and the
    routed FFN, a forward makes one :func:`prunepath.ops.router_routed_ffn` call instead of
    ``router_route`` + ``routed_ffn`` (same mask and output; see that op for what it fuses per
    backend: no measured gain on a CPU or an H200, BENCHMARKS.md). The decoder
    sets it per decode (``DecodeConfig(fuse_routing=...)``).
    """

    # the settings' fields as attributes (read: settings.NAME; set: configure(NAME=value))
    policy = _setting("policy")
    topk = _setting("topk")
    min_experts = _setting("min_experts")
    temperature = _setting("temperature")
    prefill = _setting("prefill")
    backend = _setting("backend")
    ffn_backend = _setting("ffn_backend")
    record_stats = _setting("record_stats")
    fuse_router = _setting("fuse_router")
    fuse_routing = _setting("fuse_routing")
    masked_dense = _setting("masked_dense")
    router_stream = _setting("router_stream")

    def __init__(self, base: nn.Module, fam: Family, activation: str, num_experts: int,
                 router: nn.Module, *, layer_idx: int = 0, prefill: str = "routed",
                 min_experts: int = 1, backend: str = "auto", temperature: float = 1.0):
        super().__init__()
        self.base = base
        self.router = router
        self.fam = fam
        self.activation = activation
        self.num_experts = int(num_experts)
        self.layer_idx = int(layer_idx)
        w = self.weights()
        self.hidden_size, self.intermediate_size = w.hidden_size, w.intermediate_size
        if self.intermediate_size % self.num_experts:
            raise ValueError(
                f"layer {layer_idx}: FFN width F={self.intermediate_size} is not divisible by "
                f"num_experts={num_experts}"
            )
        self.settings = RoutingSettings(  # budget rule: softmax(logits / temperature)
            topk=self.num_experts, min_experts=int(min_experts), temperature=float(temperature),
            prefill=prefill, backend=backend)
        self.settings.check(self.num_experts)
        # rows of the FFN's stacked up-projection storage that hold the folded router's first
        # layer (prunepath.decode.stacked_ffn.stack), so one GEMM makes g, u and the router projection
        self.router_rows: torch.Tensor | None = None
        self._stacked_views = (None, None)  # what stacked_views() last found (eagerly)
        self._maybe_stacked = False  # set by stacked_ffn.stack: stacked_views() looks at storages
        self._fused = None  # (shape key, versions, (w1, b1, w2, b2, activation)) cache
        self._dense_budget = True  # host-side: every budget is exactly 1.0 (exact dense path)
        self._seq_shape: tuple[int, int] | None = None  # (B, S) for flattened-input families
        self._frozen = False  # inside frozen(): reuse bound ops (see _bound_ops)
        self._bound = None  # (settings key, (bound router, bound FFN) or None)
        dev = w.w_up.device
        self.register_buffer("budget", torch.ones((), device=dev), persistent=False)
        self.register_buffer("tau", torch.zeros((), device=dev), persistent=False)
        self.register_buffer("static_keep", torch.ones(self.num_experts, dtype=torch.bool,
                                                       device=dev), persistent=False)
        self.register_buffer("last_active", torch.ones((), device=dev), persistent=False)
        # shape [1], not 0-dim: torch.compile (torch 2.13, CPU) silently drops in-place updates
        # of 0-dim float64 buffers, so compiled decode steps recorded no statistics
        self.register_buffer("active_sum", torch.zeros(1, dtype=torch.float64, device=dev),
                             persistent=False)
        self.register_buffer("token_count", torch.zeros(1, dtype=torch.float64, device=dev),
                             persistent=False)

    # --- settings and budget ------------------------------------------------------------
    def configure(self, settings: RoutingSettings | None = None, **changes) -> RoutingSettings:
        """Set this layer's :class:`RoutingSettings`: ``settings`` (a whole one, e.g. one this
        returned before) and/or ``changes`` (field names); validated here, once. Returns the
        settings it replaced."""
        old = self.settings
        new = old if settings is None else settings
        if changes:
            unknown = set(changes) - set(_SETTINGS)
            if unknown:
                raise TypeError(f"unknown routing setting(s) {sorted(unknown)}; "
                                f"RoutingSettings fields: {list(_SETTINGS)}")
            new = dataclasses.replace(new, **changes)
        if new is not old:
            if not isinstance(new, RoutingSettings):
                raise TypeError(f"settings must be RoutingSettings, got {type(new).__name__}")
            new.check(self.num_experts)
            object.__setattr__(self, "settings", new)  # (a plain attribute, not a submodule)
        return old

    def set_budget(self, value) -> None:
        """Select the "budget" policy with budget ``value``: a float in [0, 1] (1.0 = exactly
        dense) or a 1-D float tensor ``[B]`` (one budget per sequence; its values are checked
        where they are on the CPU). Validated here, once: forwards read the buffer as it is.
        A value of the same kind is written in place (captured graphs stay valid)."""
        if isinstance(value, torch.Tensor):
            if value.dim() != 1 or not value.is_floating_point() or value.numel() == 0:
                raise ValueError(f"a per-sequence budget must be a non-empty 1-D float tensor, "
                                 f"got {value.dtype} {tuple(value.shape)}")
            v = value.detach().float()
            if v.device.type == "cpu" and bool(((v < 0) | (v > 1) | torch.isnan(v)).any()):
                raise ValueError(f"budget values must lie in [0, 1], got {v[:8].tolist()}")
            self._set_budget_tensor(v.to(self.budget.device), False)
        else:
            check_budget_value(value, "budget")
            v = float(value)
            if self.budget.dim() == 0:
                self.budget.fill_(v)
            else:
                self.budget = torch.tensor(v, device=self.budget.device)
            self._dense_budget = v >= 1.0
        if self.settings.policy != "budget":
            self.configure(policy="budget")

    def _set_budget_tensor(self, value: torch.Tensor, dense: bool) -> None:
        if self.budget.shape == value.shape:
            self.budget.copy_(value)
        else:
            self.budget = value.clone()
        self._dense_budget = bool(dense)  # host-side: every budget exactly 1.0 (the dense path)

    # routing state and statistics: their dtype is fixed (a budget of 0.564 in bf16 is 0.5625;
    # a float16/bf16 token count stops counting at 2048/256); ``model.to(dtype)`` moves them only
    _STATE_BUFFERS = ("budget", "tau", "last_active", "active_sum", "token_count")

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers[n] for n in self._STATE_BUFFERS if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # converted from the original values, not the rounded ones
                self._buffers[name] = old.to(new.device)
        return out

    # --- weights ------------------------------------------------------------------------
    def projections(self):
        return projections(self.base, self.fam)

    def weights(self) -> FFNWeights:
        """The FFN's parameters as ``nn.Linear``-layout views (no copies)."""
        return ffn_weights(*self.projections(), self.fam)

    @property
    def expert_size(self) -> int:
        return self.intermediate_size // self.num_experts

    # --- routing ------------------------------------------------------------------------
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``[T, E]`` for FFN inputs ``x`` ``[T, d]``, divided by ``temperature``
        (top-k and calibrated thresholds are unaffected by it: it keeps the ranking)."""
        if getattr(self.router, "needs_ffn", False):
            logits = self.router(x, self)
        else:
            logits = self.router(x)
        return logits if self.settings.temperature == 1.0 else logits / self.settings.temperature

    def token_budget(self, num_tokens: int, batch: int | None) -> torch.Tensor:
        """The budget of each of ``num_tokens`` tokens (sequence-major), fp32 ``[T]``."""
        b = self.budget
        if b.dim() == 0:
            return b.reshape(1).expand(num_tokens)
        if batch is None or b.shape[0] != batch or num_tokens % batch:
            raise ValueError(
                f"per-sequence budget has {b.shape[0]} entries but the FFN of layer "
                f"{self.layer_idx} got a batch of {batch} sequences ({num_tokens} tokens); "
                f"call prunepath.set_budget with one budget per sequence of this batch"
            )
        return b.repeat_interleave(num_tokens // batch)

    def expert_mask(self, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Bool ``[T, E]`` mask of active experts for FFN inputs ``x`` ``[T, d]`` under the policy."""
        t = x.shape[0]
        policy = self.settings.policy
        if policy == "dense" or (policy == "budget" and self._dense_budget):
            return torch.ones(t, self.num_experts, dtype=torch.bool, device=x.device)
        if policy == "static":
            return self.static_keep.unsqueeze(0).expand(t, -1)
        if policy in ("budget", "topk"):
            router = self._bound_ops(x.dtype)[0]  # inside frozen(): bound once
            if router is not None:
                return router(x, self._route_args(t, batch)[0])
            fused = self.fused_router(x.dtype)
            if fused is not None:
                w1, b1, w2, b2, act = fused
                budget, lo, hi = self._route_args(t, batch)
                return ops.router_route(x, w1, budget, b_router=b1, w_router_out=w2,
                                        b_router_out=b2, hidden_activation=act,
                                        min_experts=lo, max_experts=hi, backend=self.settings.backend)
        logits = self.router_logits(x)
        if policy == "budget":
            return ops.route(logits, self.token_budget(t, batch), min_experts=self.settings.min_experts,
                             backend=self.settings.backend)
        if policy == "topk":
            k = self.settings.topk
            return ops.route(logits, 1.0, min_experts=k, max_experts=k, backend=self.settings.backend)
        if policy == "threshold":
            return torch.sigmoid(logits.float()) > self.tau
        raise ValueError(f"routing policy must be one of {POLICIES}, got {policy!r}")

    def _route_args(self, t: int, batch: int | None):
        """(budget, min_experts, max_experts) of the "budget" / "topk" policy's routing."""
        s = self.settings
        if s.policy == "budget":
            return self.token_budget(t, batch), s.min_experts, None
        return 1.0, s.topk, s.topk

    # --- fused router ---------------------------------------------------------------------
    def _router_sources(self):
        """The plain router's tensors (mean, inv_std, weights, biases), or None if it has no
        fused form (another router kind, a subclass, or ``fuse_router`` off)."""
        r = self.router
        if not self.settings.fuse_router:
            return None
        kind = _plain_router_kind(r)
        if kind == "mlp":
            return (r.in_mean, r.in_inv_std, r.fc1.weight, r.fc1.bias, r.fc2.weight, r.fc2.bias)
        if kind == "linear":
            return (r.in_mean, r.in_inv_std, r.proj.weight, r.proj.bias)
        return None

    @torch.no_grad()
    def _fold_router(self, src, dtype):
        """Folded ``(w1, b1, w2, b2, activation)``: standardisation into the first layer,
        ``1/temperature`` into the last; w1 in ``dtype`` (the input's), the rest fp32."""
        inv_t = 1.0 / self.settings.temperature
        mean, inv_std, w, b = src[:4]
        w1, b1 = fold_standardization(w.float(), b, mean, inv_std)
        if len(src) == 4:  # linear: logits = (w1 x + b1) / T
            return ((w1 * inv_t).to(dtype).contiguous(), (b1 * inv_t).contiguous(),
                    None, None, "none")
        w2, b2 = src[4], src[5]
        b2 = torch.zeros(w2.shape[0], device=w2.device) if b2 is None else b2.float()
        return (w1.to(dtype).contiguous(), b1.float().contiguous(),
                (w2.float() * inv_t).contiguous(), (b2 * inv_t).contiguous(), "gelu")

    def fused_router(self, dtype: torch.dtype | None = None):
        """The folded router tensors ``(w1, b1, w2, b2, hidden_activation)`` that
        :func:`prunepath.ops.router_route` takes for inputs of ``dtype``, or ``None`` when the
        router has no fused form. Cached: rebuilt (new tensors) when the router object, its
        tensors' storage/shape/dtype, ``temperature`` or ``dtype`` change; refolded in place
        (same tensors, so captured CUDA graphs stay valid) when its weights were updated in
        place. Cheap host-side check, no device work when nothing changed."""
        src = self._router_sources()
        if src is None:
            return None
        dtype = dtype or src[2].dtype
        if torch.compiler.is_compiling():
            # traced steps read the cache made eagerly before (the Decoder refreshes it before
            # every decode); one made for another router, dtype or temperature is not used.
            # In-place weight updates are not seen here: call fused_router() eagerly after them.
            c = self._fused
            if c is not None and c[0][:3] == (id(self.router), dtype, self.settings.temperature):
                return c[2]
            return self._fold_router(src, dtype)  # folded inside the traced step
        key = (id(self.router), dtype, self.settings.temperature,
               tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.device) for t in src if t is not None),
               tuple(t is None for t in src))
        versions = tuple(t._version for t in src if t is not None)
        cached = self._fused
        if cached is not None and cached[0] == key:
            if cached[1] != versions:  # weights changed in place: refold into the same tensors
                for old, new in zip(cached[2][:4], self._fold_router(src, dtype)[:4]):
                    if old is not None:
                        old.copy_(new)
                self._fused = (key, versions, cached[2])
            return cached[2]
        folded = self._fold_router(src, dtype)
        rows = self.router_rows
        if (rows is not None and rows.shape == folded[0].shape and rows.dtype == folded[0].dtype
                and rows.device == folded[0].device):
            rows.copy_(folded[0])  # the first layer lives in the stacked up-projection storage
            folded = (rows, *folded[1:])
        for t in folded[:4]:
            if t is not None:
                try:  # compiled steps (cudagraph trees) then read them in place, uncopied
                    torch._dynamo.mark_static_address(t)
                except Exception:  # pragma: no cover - older/odd torch builds
                    pass
        self._fused = (key, versions, folded)
        return folded

    # --- frozen: bound ops for decode loops ------------------------------------------------
    def _bound_ops(self, dtype: torch.dtype):
        """(bound router_route or None, bound routed_ffn or None, the two as one bound
        router_routed_ffn or None) for the current settings: made once per :func:`frozen`
        block and settings; Nones outside one or while tracing. None where the general path
        is needed (another policy or router kind, non-contiguous weights, ``fuse_routing``
        off for the third)."""
        # is_compiling first: a traced step must not read (and so guard on) _frozen
        if torch.compiler.is_compiling() or not self._frozen:
            return (None, None, None)
        s = self.settings
        key = (dtype, s.policy, s.backend, s.ffn_backend, s.temperature, s.min_experts, s.topk,
               s.fuse_router, s.fuse_routing)
        cached = self._bound
        if cached is not None and cached[0] == key:
            return cached[1]
        router = ffn = None
        fused = self.fused_router(dtype) if s.policy in ("budget", "topk") else None
        if fused is not None:
            w1, b1, w2, b2, act = fused
            lo, hi = (s.min_experts, None) if s.policy == "budget" else (s.topk, s.topk)
            router = ops.bind_router_route(w1, b_router=b1, w_router_out=w2, b_router_out=b2,
                                           hidden_activation=act, min_experts=lo, max_experts=hi,
                                           backend=s.backend)
        w = self.weights()
        if all(t is None or t.is_contiguous() for t in (w.w_gate, w.w_up)):
            ffn = ops.bind_routed_ffn(w.w_gate, w.w_up, w.w_down, activation=self.activation,
                                      b_up=w.b_up, b_down=w.b_down,
                                      backend=s.ffn_backend or s.backend)
        both = (ops.BoundRouterRoutedFFN(router, ffn)
                if s.fuse_routing and router is not None and ffn is not None else None)
        self._bound = (key, (router, ffn, both))
        return router, ffn, both

    # --- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.dim() == 3:
            batch, seq = shape[0], shape[1]
        elif self._seq_shape is not None:
            batch, seq = self._seq_shape
        else:
            batch, seq = None, None
        s = self.settings
        dense = s.policy == "dense" or (s.policy == "budget" and self._dense_budget) or (
            s.prefill == "dense" and seq is not None and seq > 1
        )
        if dense:
            if s.record_stats:
                self._record_dense(x.numel() // shape[-1])
            return self._dense(x)
        x2 = x.reshape(-1, shape[-1])
        if s.masked_dense:
            done = self._router_masked_dense(x2, batch)
            if done is not None:
                return self._finish(*done, shape)
            w = self.weights()
            y, mask = ops.masked_dense_ffn(
                x2, w.w_gate, w.w_up, w.w_down, lambda: self.expert_mask(x2, batch),
                activation=self.activation, b_up=w.b_up, b_down=w.b_down, stream=s.router_stream)
            return self._finish(y, mask, shape)
        if s.fuse_routing and s.policy in ("budget", "topk"):
            done = self._routed_with_routing(x2, batch)
            if done is not None:
                return self._finish(*done, shape)
        mask = self.expert_mask(x2, batch)
        ffn = self._bound_ops(x2.dtype)[1]
        if ffn is not None:
            y = ffn(x2, mask)
        else:
            w = self.weights()
            w_gate, w_up = (None if t is None else _contiguous(t) for t in (w.w_gate, w.w_up))
            y = ops.routed_ffn(x2, w_gate, w_up, w.w_down, mask, activation=self.activation,
                               b_up=w.b_up, b_down=w.b_down,
                               backend=s.ffn_backend or s.backend)
        return self._finish(y, mask, shape)

    def stacked_views(self):
        """``([W_gate; W_up] [2F, d], [W_gate; W_up; router_rows])`` views where
        :mod:`prunepath.decode.stacked_ffn` laid them out as one storage, else ``None`` each. Found
        by a host-side look at the storages in eager calls; a traced step (``torch.compile``
        cannot look) reads what the last eager call found -- the Decoder calls this before
        every decode."""
        if torch.compiler.is_compiling() or not self._maybe_stacked:
            return self._stacked_views if self._maybe_stacked else (None, None)
        w = self.weights()
        gu = None if w.w_gate is None or w.b_up is not None else ops.stacked(w.w_gate, w.w_up)
        rows = self.router_rows
        self._stacked_views = (gu, None if gu is None or rows is None else ops.stacked(gu, rows))
        return self._stacked_views

    def _dense(self, x):
        """The original FFN; one GEMM for both up projections where they are stacked
        (:mod:`prunepath.decode.stacked_ffn`)."""
        joint = self.stacked_views()[0]
        if joint is None:
            return self.base(x)
        w = self.weights()
        g, u = torch.nn.functional.linear(x, joint).chunk(2, dim=-1)
        return torch.nn.functional.linear(activate(g, self.activation) * u, w.w_down, w.b_down)

    def _router_masked_dense(self, x2, batch):
        """``(y, mask)`` from :func:`prunepath.ops.router_masked_dense_ffn` (the router in the
        up GEMM when stacked, the routing in the activation kernel), or None where the router
        has no folded form, the policy is not "budget"/"topk", or this instance's
        ``expert_mask`` was replaced (custom routing): the mask-first path."""
        if "expert_mask" in self.__dict__ or self.settings.policy not in ("budget", "topk"):
            return None
        fused = self.fused_router(x2.dtype)
        if fused is None:
            return None
        w1, b1, w2, b2, act = fused
        budget, lo, hi = self._route_args(x2.shape[0], batch)
        w = self.weights()
        joint = self.stacked_views()[1] if w1 is self.router_rows else None
        return ops.router_masked_dense_ffn(
            x2, w.w_gate, w.w_up, w.w_down, w1, budget, b_router=b1, w_router_out=w2,
            b_router_out=b2, hidden_activation=act, min_experts=lo, max_experts=hi,
            activation=self.activation, b_up=w.b_up, b_down=w.b_down, w_stacked=joint)

    def _routed_with_routing(self, x2, batch):
        """``(y, mask)`` from one :func:`prunepath.ops.router_routed_ffn` call, or None where
        the router has no fused form, W_gate/W_up are not contiguous or this instance's
        ``expert_mask`` was replaced (custom routing): the two-op path."""
        if "expert_mask" in self.__dict__:
            return None
        args = self._route_args(x2.shape[0], batch)
        both = self._bound_ops(x2.dtype)[2]  # inside frozen(): bound once
        if both is not None:
            return both(x2, args[0])
        fused = self.fused_router(x2.dtype)
        w = self.weights()
        if fused is None or not all(t is None or t.is_contiguous() for t in (w.w_gate, w.w_up)):
            return None
        w1, b1, w2, b2, act = fused
        budget, lo, hi = args
        return ops.router_routed_ffn(
            x2, w1, w.w_gate, w.w_up, w.w_down, budget, b_router=b1, w_router_out=w2,
            b_router_out=b2, hidden_activation=act, min_experts=lo, max_experts=hi,
            activation=self.activation, b_up=w.b_up, b_down=w.b_down,
            backend=self.settings.ffn_backend or self.settings.backend)

    def _finish(self, y, mask, shape):
        if self.settings.record_stats:
            self._record(mask)
        if self.fam.dropout is not None:
            y = getattr(self.base, self.fam.dropout)(y)
        return y.reshape(shape)

    # --- statistics (device-side, no host sync) --------------------------------------------
    @torch.no_grad()
    def _record(self, mask: torch.Tensor) -> None:
        # 4 small kernels (this runs inside every captured decode step)
        active = mask.sum(dtype=torch.float64)  # active experts, summed over tokens
        t = mask.shape[0]
        torch.div(active, self.num_experts * max(t, 1), out=self.last_active)
        self.active_sum.add_(active, alpha=1.0 / self.num_experts)  # sum of active fractions
        self.token_count.add_(t)

    @torch.no_grad()
    def _record_dense(self, t: int) -> None:
        self.last_active.fill_(1.0)
        self.active_sum.add_(t)
        self.token_count.add_(t)

    @torch.no_grad()
    def reset_stats(self) -> None:
        self.last_active.fill_(1.0)
        self.active_sum.zero_()
        self.token_count.zero_()

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, experts={self.num_experts}x{self.expert_size}, "
                f"activation={self.activation}, policy={self.settings.policy}, prefill={self.settings.prefill}")
