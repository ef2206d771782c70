"""Budgets that hit a target measured FFN sparsity, and named presets.

>>> p = prunepath.calibrate(model, texts, tokenizer=tok, target_sparsity=0.5)                 # one float
>>> ps = prunepath.calibrate(model, texts, tokenizer=tok, target_sparsity=0.5, per_layer=True) # per layer
>>> prunepath.calibrate_presets(model, texts, tokenizer=tok)   # s30/s50/s70/s90 into the config
>>> prunepath.set_budget(model, "s50")

Measured FFN sparsity = fraction of intermediate neurons inactive, averaged over tokens and
(width-weighted) layers, measured by running the routed model on the calibration tokens.

Both modes first capture, on the dense model, each layer's router logits for the
calibration tokens, which predict every layer's sparsity at any budget *offline* (for a
grid of budgets at once); the offline target is then corrected on the sparsity *measured*
by running the routed model (a bracketing secant/bisection search on the offline target;
upstream routing shifts later layers' inputs, so offline and measured differ slightly),
until within ``tol``. Typically 2-4 forwards over the calibration tokens.

* Global budget: one budget whose offline sparsity curve hits the (corrected) target.
* Per-layer budgets: one forward+backward of the dense model also gives, per layer and
  token, the gradient of the calibration loss at the FFN output and each expert's
  contribution y_e; the second-order (Fisher) estimate of the loss increase from dropping
  the experts a budget p drops is ``0.5 * sum_t (g_t . sum_{e dropped} y_te)^2``. Per-layer
  budgets minimise the summed estimate subject to the sparsity target (a Lagrange
  multiplier, each layer picking its best budget on a grid; interpolated between the two
  bracketing solutions), so sparsity is spent where the calibration loss rises least.
"""

from __future__ import annotations

import torch
from torch import nn

from ._modcall import make_module_callable
from .budget import (
    get_routing_state,
    measured_sparsity,
    reset_stats,
    restore_routing_state,
    routed_layers,
    set_budget,
    set_routing,
    stats,
)

BUDGET_GRID = torch.linspace(0.0, 1.0, 201)


def _calibration_ids(model, texts, tokenizer, num_tokens: int, seq_len: int) -> torch.Tensor:
    from .data import calibration_texts, token_batches

    if texts is None:
        if tokenizer is None:
            raise ValueError("calibrate needs calibration text (texts=..., tokenizer=...) or token ids")
        # the bundled WikiText-2 validation sample, skipping the part routers train on
        texts = calibration_texts()[len(calibration_texts()) // 2:]
    return token_batches(texts, tokenizer, num_tokens=num_tokens, seq_len=seq_len)


@torch.no_grad()
def measure(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 4) -> dict:
    """Run the routed model (no LM head) on ``input_ids`` [N, S]; return :func:`prunepath.stats`."""
    reset_stats(model)
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)
    for start in range(0, input_ids.shape[0], batch_size):
        body(input_ids[start:start + batch_size].to(device), use_cache=False)
    return stats(model, include_report=False)["cumulative"]


def _check_target(target_sparsity, model) -> float:
    if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, (int, float)):
        raise ValueError(f"target_sparsity must be a float in [0, 1), got {target_sparsity!r}")
    layers = routed_layers(model)
    max_s = min(1 - layer.min_experts / layer.num_experts for layer in layers)
    if not 0.0 <= target_sparsity <= max_s:
        raise ValueError(
            f"target_sparsity must lie in [0, {max_s:.4f}] (each token keeps at least "
            f"min_experts={layers[0].min_experts} of E={layers[0].num_experts} experts), "
            f"got {target_sparsity}"
        )
    return float(target_sparsity)


def _search(f, target: float, lo: float, hi: float, s_lo: float, s_hi: float, tol: float,
            max_iters: int):
    """Find x in [lo, hi] with f(x) ~= target, f non-increasing; s_lo=f(lo), s_hi=f(hi).

    Returns (x, f(x)) of the best point seen. Bisection safeguarded secant (Illinois).
    """
    best = min(((lo, s_lo), (hi, s_hi)), key=lambda t: abs(t[1] - target))
    side = 0
    for _ in range(max_iters):
        if abs(best[1] - target) <= tol:
            break
        if s_lo != s_hi:
            x = lo + (s_lo - target) * (hi - lo) / (s_lo - s_hi)
            x = min(max(x, lo + 0.02 * (hi - lo)), hi - 0.02 * (hi - lo))
        else:
            x = 0.5 * (lo + hi)
        s = f(x)
        if abs(s - target) < abs(best[1] - target):
            best = (x, s)
        if s > target:  # too sparse: raise the budget
            lo, s_lo = x, s
            if side == -1:
                s_hi = target + (s_hi - target) / 2
            side = -1
        else:
            hi, s_hi = x, s
            if side == 1:
                s_lo = target + (s_lo - target) / 2
            side = 1
    return best


# --- per-layer allocation ------------------------------------------------------------------
def _fisher_capture(model, input_ids, batch_size: int):
    """Per layer: router logits [T, E] and gradient-weighted expert contributions c [T, E].

    c[t, e] = g_t . y_{t,e}, with g_t = dLoss/d(FFN output at t) of the dense model's mean
    next-token loss and y_{t,e} expert e's contribution.
    """
    from .routers import neuron_activations

    layers = routed_layers(model)
    logits = [[] for _ in layers]
    contrib = [[] for _ in layers]
    device = next(model.parameters()).device
    saved = get_routing_state(model)
    set_routing(model, "dense")
    pending = []

    def hook_for(i):
        def hook(mod, args, out):
            x = args[0].detach()
            out.retain_grad()
            pending.append((i, mod, x, out))
        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start:start + batch_size].to(device)
            pending.clear()
            with torch.enable_grad():
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                out = model(inputs_embeds=emb, labels=ids, use_cache=False)
                out.loss.backward()
            with torch.no_grad():
                for i, mod, x, y in pending:
                    g = y.grad.reshape(-1, y.shape[-1])
                    x2 = x.reshape(-1, x.shape[-1])
                    w = mod.weights()
                    h = neuron_activations(x2, w, mod.activation)
                    gw = g.float() @ w.w_down.float()  # [T, F]
                    c = (gw * h.float()).reshape(x2.shape[0], mod.num_experts, -1).sum(-1)
                    contrib[i].append(c.cpu())  # the curves and the allocation run on the CPU
                    logits[i].append(mod.router_logits(x2).float().cpu())
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(True)
        restore_routing_state(model, saved)
    return [torch.cat(v) for v in logits], [torch.cat(v) for v in contrib]


def _layer_curves(logits: torch.Tensor, contrib: torch.Tensor, grid: torch.Tensor,
                  min_experts: int):
    """For each budget in ``grid``: (layer sparsity, Fisher loss-increase estimate)."""
    e = logits.shape[1]
    probs = torch.softmax(logits.float(), -1)
    sp, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sp.cumsum(-1) - sp
    c_sorted = contrib.gather(-1, order)
    c_cum = torch.cat([torch.zeros_like(c_sorted[:, :1]), c_sorted.cumsum(-1)], -1)  # [T, E+1]
    total = c_cum[:, -1]
    sparsity, cost = [], []
    for p in grid.tolist():
        if p >= 1.0:
            k = torch.full((logits.shape[0],), e, dtype=torch.long)
        else:
            k = (mass_before < p).sum(-1).clamp(min_experts, e)
        dropped = total - c_cum.gather(-1, k.unsqueeze(-1)).squeeze(-1)
        sparsity.append(1 - k.float().mean() / e)
        cost.append(0.5 * (dropped.double() ** 2).sum())
    return torch.stack(sparsity).double(), torch.stack(cost).double()


def _allocate(curves, widths, target: float):
    """Per-layer grid indices minimising total cost at width-weighted mean sparsity ~ target.

    Lagrangian: each layer picks the grid point minimising ``cost - lam * sparsity``; ``lam``
    is bisected. Such solutions only reach the lower convex hull's vertices, so the two
    bracketing solutions are returned: ``(idx_hi, idx_lo, s_hi, s_lo)`` with offline
    sparsities ``s_lo <= target <= s_hi`` (callers interpolate between them).
    """
    sp = torch.stack([c[0] for c in curves])  # [L, G]
    cost = torch.stack([c[1] for c in curves])  # [L, G]
    w = torch.tensor(widths, dtype=torch.float64)
    w = w / w.sum()

    def pick(lam):
        idx = (cost - lam * sp * w.unsqueeze(1) * len(widths)).argmin(1)
        s = (sp.gather(1, idx.unsqueeze(1)).squeeze(1) * w).sum()
        return idx, float(s)

    lo, hi = 0.0, 1.0
    while pick(hi)[1] < target and hi < 1e30:
        hi *= 4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if pick(mid)[1] < target:
            lo = mid
        else:
            hi = mid
    (idx_hi, s_hi), (idx_lo, s_lo) = pick(hi), pick(lo)
    return idx_hi, idx_lo, s_hi, s_lo


@torch.no_grad()
def _capture_logits(model, input_ids, batch_size: int):
    """Per layer, router logits [T, E] on the inputs the dense model gives each FFN."""
    layers = routed_layers(model)
    logits = [[] for _ in layers]

    def hook_for(i):
        def hook(mod, args):
            x = args[0]
            logits[i].append(mod.router_logits(x.reshape(-1, x.shape[-1])).float().cpu())
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    saved = get_routing_state(model)
    set_routing(model, "dense")
    body = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            body(input_ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        restore_routing_state(model, saved)
    return [torch.cat(v) for v in logits]


class Calibration:
    """Calibration state for one model and one set of calibration tokens.

    Captures (once, lazily) the router logits on the dense model's FFN inputs and, for
    per-layer budgets, the Fisher loss estimates; maps an *offline* sparsity target to
    budgets (global or per layer), then corrects on the sparsity *measured* by running the
    routed model, until within ``tol``. Reused by :func:`calibrate_presets` for every target.
    """

    def __init__(self, model, input_ids, *, batch_size: int = 4, grid: torch.Tensor = BUDGET_GRID):
        self.model, self.ids, self.batch_size, self.grid = model, input_ids, batch_size, grid
        self.layers = routed_layers(model)
        self.widths = [layer.intermediate_size for layer in self.layers]
        self._global_curve = None
        self._curves = None
        self._tau_curve = None
        self.forwards = 0

    def _offline_curves(self, with_cost: bool):
        if with_cost:
            logits, contrib = _fisher_capture(self.model, self.ids, self.batch_size)
        else:
            logits = _capture_logits(self.model, self.ids, self.batch_size)
            contrib = [torch.zeros_like(lg) for lg in logits]
        return [_layer_curves(lg, c, self.grid, layer.min_experts)
                for lg, c, layer in zip(logits, contrib, self.layers)]

    def global_budget(self, offline_target: float) -> float:
        """The budget whose offline (dense-input) sparsity is ``offline_target``."""
        if self._global_curve is None:
            curves = self._curves or self._offline_curves(with_cost=False)
            w = torch.tensor(self.widths, dtype=torch.float64)
            self._global_curve = (torch.stack([c[0] for c in curves]) * (w / w.sum()).unsqueeze(1)).sum(0)
        s = self._global_curve  # non-increasing along the grid
        g = self.grid.double()
        t = float(offline_target)
        if t >= float(s[0]):
            return 0.0
        if t <= float(s[-1]):
            return 1.0
        j = int((s >= t).sum()) - 1  # last grid point with s >= t
        s0, s1 = float(s[j]), float(s[j + 1])
        a = 0.0 if s0 == s1 else (s0 - t) / (s0 - s1)
        return float(g[j] + a * (g[j + 1] - g[j]))

    def per_layer_budgets(self, offline_target: float) -> list[float]:
        """Budgets minimising the summed Fisher estimate at offline sparsity ``offline_target``."""
        if self._curves is None:
            self._curves = self._offline_curves(with_cost=True)
        t = min(max(offline_target, 0.0), 0.9999)
        idx_hi, idx_lo, s_hi, s_lo = _allocate(self._curves, self.widths, t)
        # interpolate between the two bracketing allocations to reach the target continuously
        a = 1.0 if s_hi <= s_lo else min(max((t - s_lo) / (s_hi - s_lo), 0.0), 1.0)
        return [float((1 - a) * self.grid[i] + a * self.grid[j]) for i, j in zip(idx_lo, idx_hi)]

    def threshold_tau(self, offline_target: float) -> float:
        """The sigmoid threshold whose offline sparsity (policy "threshold") is ``offline_target``."""
        if self._tau_curve is None:
            logits = _capture_logits(self.model, self.ids, self.batch_size)
            w = torch.tensor(self.widths, dtype=torch.float64)
            w = w / w.sum()
            probs = [torch.sigmoid(lg).flatten().double().sort().values for lg in logits]
            self._tau_curve = (w, probs)
        w, probs = self._tau_curve
        lo, hi = 0.0, 1.0  # sparsity(tau) = weighted share of sigmoid scores <= tau, increasing

        def sparsity(tau):
            return sum(float(wl) * float(torch.searchsorted(p, tau, right=True)) / p.numel()
                       for wl, p in zip(w, probs))

        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if sparsity(mid) < offline_target:
                lo = mid
            else:
                hi = mid
        return hi

    def measured(self, setting, mode: str = "global") -> float:
        if mode == "threshold":
            set_routing(self.model, "threshold", tau=float(setting))
        else:
            set_budget(self.model, setting)
        self.forwards += 1
        return measure(self.model, self.ids, batch_size=self.batch_size)["sparsity"]

    def solve(self, target: float, per_layer: bool = False, *, tol: float = 0.005,
              max_iters: int = 10, mode: str | None = None):
        """(setting, measured sparsity) with measured sparsity within ``tol`` of ``target``.

        ``mode``: "global" (one budget), "per_layer" (a budget per layer) or "threshold"
        (a sigmoid threshold tau for the "threshold" policy); default from ``per_layer``.
        """
        mode = mode or ("per_layer" if per_layer else "global")
        if target <= 0:
            dense = {"global": 1.0, "per_layer": [1.0] * len(self.layers), "threshold": 0.0}
            return dense[mode], 0.0
        budgets_for = {"global": self.global_budget, "per_layer": self.per_layer_budgets,
                       "threshold": self.threshold_tau}[mode]

        def f(t):
            return self.measured(budgets_for(t), mode)

        # measured sparsity increases with the offline target: bracket, then search
        # (on the negated function, to reuse the non-increasing search)
        first = f(target)
        if abs(first - target) <= tol:
            return budgets_for(target), first
        a, s_a = target, first
        step = abs(target - first) + 0.005
        b, s_b = a, s_a
        for _ in range(8):
            b = min(max(a + (step if first < target else -step), 0.0), 0.9999)
            s_b = f(b)
            if abs(s_b - target) <= tol:
                return budgets_for(b), s_b
            if (s_b - target) * (first - target) <= 0 or b in (0.0, 0.9999):
                break
            a, s_a, step = b, s_b, 2 * step
        (lo, s_lo), (hi, s_hi) = sorted([(a, s_a), (b, s_b)])
        x, s = _search(lambda t: -f(t), -target, lo, hi, -s_lo, -s_hi, tol, max_iters)
        return budgets_for(x), -s


# --- public --------------------------------------------------------------------------------
def calibrate(model: nn.Module, texts=None, tokenizer=None, *, target_sparsity: float,
              per_layer: bool = False, name: str | None = None, num_tokens: int = 2048,
              seq_len: int = 256, tol: float = 0.005, apply: bool = True,
              batch_size: int = 4, calibration: Calibration | None = None):
    """Find budget(s) whose measured FFN sparsity on the calibration text hits the target.

    Args:
        texts: calibration text (list of strings / string, with ``tokenizer``) or token ids
            ``[N, S]``; default: the bundled WikiText-2 validation sample.
        target_sparsity: wanted fraction of FFN neurons inactive (e.g. 0.5).
        per_layer: one budget per layer (spending sparsity where the estimated calibration
            loss rises least) instead of one global budget.
        name: store the result as a preset (e.g. "s50") in ``model.prunepath_config``.
        num_tokens, seq_len: calibration tokens used for the measurement.
        tol: accepted |measured - target| (the search stops once within it).
        apply: leave the model set to the found budget(s) (else restore the previous state).
        calibration: a :class:`Calibration` to reuse (its tokens replace ``texts``).

    Returns the budget: a float, or a list with one float per layer.
    """
    target = _check_target(target_sparsity, model)
    if calibration is None:
        ids = _calibration_ids(model, texts, tokenizer, num_tokens, seq_len)
        calibration = Calibration(model, ids, batch_size=batch_size)
    ids = calibration.ids
    saved = get_routing_state(model)
    was_training = model.training
    model.eval()
    try:
        p, got = calibration.solve(target, per_layer, tol=tol)
    finally:
        model.train(was_training)
        restore_routing_state(model, saved)
    if abs(got - target) > 0.01:
        import warnings

        warnings.warn(f"calibrate: measured sparsity {got:.4f} misses the target {target:.4f} by "
                      f"more than 1 point (too few calibration tokens or a router whose mass is "
                      f"concentrated on few experts?)", stacklevel=2)
    cfg = getattr(model, "prunepath_config", None)
    if name is not None and cfg is not None:
        cfg.presets[name] = p
        info = cfg.router_report.setdefault("calibration", {})
        info[name] = {"target_sparsity": target, "measured_sparsity": got,
                      "per_layer": per_layer, "tokens": int(ids.numel())}
    if apply:
        set_budget(model, p)
    reset_stats(model)
    return p


def calibrate_presets(model: nn.Module, texts=None, tokenizer=None, *,
                      targets=(0.3, 0.5, 0.7, 0.9), per_layer: bool = True, **kwargs) -> dict:
    """Calibrate presets ``s30``/``s50``/``s70``/``s90`` (``s{100*target}``); returns name -> budget."""
    from tqdm.auto import tqdm

    out = {}
    ids = _calibration_ids(model, texts, tokenizer, kwargs.pop("num_tokens", 2048),
                           kwargs.pop("seq_len", 256))
    cal = Calibration(model, ids, batch_size=kwargs.pop("batch_size", 4))
    for t in tqdm(list(targets), desc="calibrating presets", disable=not kwargs.pop("progress", True)):
        name = f"s{round(100 * t)}"
        out[name] = calibrate(model, target_sparsity=t, per_layer=per_layer, name=name,
                              apply=False, calibration=cal, **kwargs)
    return out


# --- baselines on the same experts ----------------------------------------------------------
def calibrate_threshold(model: nn.Module, texts=None, tokenizer=None, *, target_sparsity: float,
                        num_tokens: int = 2048, seq_len: int = 256, tol: float = 0.005,
                        batch_size: int = 4) -> float:
    """One sigmoid threshold tau (policy "threshold") hitting the target measured sparsity."""
    target = _check_target(target_sparsity, model)
    ids = _calibration_ids(model, texts, tokenizer, num_tokens, seq_len)
    saved = get_routing_state(model)
    try:
        tau, got = Calibration(model, ids, batch_size=batch_size).solve(target, mode="threshold",
                                                                       tol=tol)
    finally:
        restore_routing_state(model, saved)
    return float(tau)


@torch.no_grad()
def static_keep_masks(model: nn.Module, texts=None, tokenizer=None, *, target_sparsity: float,
                      num_tokens: int = 2048, seq_len: int = 256, batch_size: int = 4):
    """Static structured pruning: per layer keep the experts with the largest mean share.

    Importance = mean over calibration tokens of the expert's true output share (oracle
    shares of the dense model); each layer keeps ``round((1 - target) * E)`` experts
    (at least one). Returns one bool ``[E]`` mask per layer (for ``set_routing("static", keep=...)``).
    """
    from .routers import capture_ffn_io

    target = _check_target(target_sparsity, model)
    ids = _calibration_ids(model, texts, tokenizer, num_tokens, seq_len)
    layers = routed_layers(model)
    _, shares = capture_ffn_io(model, layers, ids, batch_size=batch_size, progress=False)
    masks = []
    for layer, s in zip(layers, shares):
        keep = max(1, round((1 - target) * layer.num_experts))
        top = s.mean(0).topk(keep).indices
        m = torch.zeros(layer.num_experts, dtype=torch.bool)
        m[top] = True
        masks.append(m)
    return masks


# ``prunepath.calibrate`` is both this module and the function (see prunepath._modcall)
make_module_callable(__name__)

__all__ = ["calibrate", "calibrate_presets", "calibrate_threshold", "static_keep_masks",
           "measure", "measured_sparsity"]
