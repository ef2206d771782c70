"""Routers: small modules mapping an FFN's input to one logit per expert, and their training.

* :class:`LinearRouter` (d -> E) and :class:`MLPRouter` (d -> r -> E, low rank), both with
  fixed input standardisation (mean/std of the calibration inputs, saved with the router).
* :class:`LowRankRouter` (d -> r -> [g; u] -> E): a rank-r copy of the FFN's own up
  projections predicts every neuron's activation; logits = log of each expert's predicted
  share. Fitted in closed form to the FFN (:meth:`LowRankRouter.fit_to_ffn`); the router
  that keeps quality at one neuron per expert (EVAL.md, "Expert granularity").
* :class:`OracleRouter`: logits = log of each expert's true share of the FFN output (needs
  the FFN itself; as slow as the dense FFN; for analysis).
* :func:`expert_shares`: the training target ``s_e = ||y_e|| / sum_e' ||y_e'||`` with y_e the
  contribution of expert e (its neurons' activations times their W_down columns).
* :func:`train_routers`: captures every layer's real FFN inputs from the dense model on
  calibration tokens (hooks, batched), then fits each router with soft-label cross-entropy
  between ``softmax(router(x))`` and ``s``.
* :func:`router_quality`: share of the oracle's importance mass the router keeps at the same
  expert count, at budgets 0.5/0.7/0.9, and the mean active-expert count.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .budget import routed_layers, routing_state
from .ops.reference import activate

REPORT_BUDGETS = (0.5, 0.7, 0.9)


# --- router modules ----------------------------------------------------------------------
class _Standardize(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.register_buffer("in_mean", torch.zeros(hidden_size))
        self.register_buffer("in_inv_std", torch.ones(hidden_size))

    @torch.no_grad()
    def fit_input_stats(self, x: torch.Tensor) -> None:
        x = x.float()
        self.in_mean.copy_(x.mean(0))
        self.in_inv_std.copy_(x.std(0).clamp_min(1e-6).reciprocal())

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.in_mean.to(x.dtype)) * self.in_inv_std.to(x.dtype)


class LinearRouter(_Standardize):
    """logits = W standardize(x) + b."""

    kind = "linear"

    def __init__(self, hidden_size: int, num_experts: int, rank: int | None = None):
        super().__init__(hidden_size)
        self.proj = nn.Linear(hidden_size, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x.to(self.proj.weight.dtype))
        return self.proj(x)


class MLPRouter(_Standardize):
    """logits = W2 gelu(W1 standardize(x) + b1) + b2, W1: d -> rank."""

    kind = "mlp"

    def __init__(self, hidden_size: int, num_experts: int, rank: int = 64):
        super().__init__(hidden_size)
        self.fc1 = nn.Linear(hidden_size, rank)
        self.fc2 = nn.Linear(rank, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x.to(self.fc1.weight.dtype))
        return self.fc2(F.gelu(self.fc1(x)))


class LowRankRouter(nn.Module):
    """logits_e = log sum_{i in e} |act(g_i) u_i| c_i with [g; u] = A (B x) + a.

    A rank-``rank`` factorisation ``A B`` of the FFN's stacked up projections ``[W_gate; W_up]``
    (``W_up`` alone for a non-gated FFN) predicts each neuron's activation ``h_i``; ``c_i`` is the
    norm of its ``W_down`` column, so ``|h_i| c_i`` is the neuron's share of the output and
    ``softmax(logits)`` the predicted share of each expert (the budget rule's distribution).
    Costs ``rank * (d + 2F)`` weights (``rank * (d + F)`` non-gated) against the FFN's ``3 d F``.

    :meth:`fit_to_ffn` sets ``A``, ``B`` to the best rank-r approximation of the up projections
    under the calibration inputs' second moment (closed form): the error ``E ||M x - A B x||^2``
    is minimal among rank-r maps. :func:`refine_lowrank` then trains ``A``, ``B`` on what the
    routing ranks, ``sum_i c_i^2 (act(g_i) u_i - h_i)^2`` (EVAL.md: 50% sparsity on SmolLM2
    at rank 128, +36% -> +28% perplexity).
    """

    kind = "lowrank"

    def __init__(self, hidden_size: int, num_experts: int, rank: int = 256, *,
                 intermediate_size: int, gated: bool = True, activation: str = "silu"):
        super().__init__()
        if intermediate_size % num_experts:
            raise ValueError(f"intermediate_size={intermediate_size} is not divisible by "
                             f"num_experts={num_experts}")
        self.num_experts = int(num_experts)
        self.intermediate_size = int(intermediate_size)
        self.gated = bool(gated)
        self.activation = activation
        rank = min(int(rank), hidden_size)
        self.proj_in = nn.Linear(hidden_size, rank, bias=False)                    # B
        self.proj_out = nn.Linear(rank, (2 if gated else 1) * intermediate_size)  # A, a
        self.register_buffer("down_norm", torch.ones(intermediate_size))            # c

    def predicted_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted neuron activations ``h`` ``[T, F]`` (fp32)."""
        z = self.proj_out(self.proj_in(x.to(self.proj_in.weight.dtype))).float()
        if self.gated:
            g, u = z.split(self.intermediate_size, dim=-1)
            return activate(g, self.activation) * u
        return activate(z, self.activation)

    def neuron_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted ``|h_i| c_i`` ``[T, F]`` (fp32)."""
        return self.predicted_activations(x).abs() * self.down_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.neuron_scores(x)
        if self.num_experts != self.intermediate_size:
            s = s.reshape(*s.shape[:-1], self.num_experts, -1).sum(-1)
        return s.clamp_min(1e-30).log()

    @torch.no_grad()
    def fit_to_ffn(self, x: torch.Tensor, w) -> None:
        """Fit to the FFN weights ``w`` (:class:`~prunepath.families.FFNWeights`, permuted as
        served) on its calibration inputs ``x`` ``[N, d]``.

        With ``C = E[x x^T] = S^2`` (S symmetric) and ``M`` the stacked up projections, the
        best rank-r ``A B`` under ``C`` comes from the top eigenvectors ``V`` of
        ``S M^T M S``: ``A = M S V``, ``B = V^T S^-1``.
        """
        x = x.double()
        m = w.w_up.double() if w.w_gate is None else torch.cat([w.w_gate, w.w_up]).double()
        c = x.T @ x / x.shape[0]
        ev, evec = torch.linalg.eigh(c)
        ev = ev.clamp_min(ev.max() * 1e-10)
        s_half = (evec * ev.sqrt()) @ evec.T
        s_inv_half = (evec * ev.rsqrt()) @ evec.T
        ms = m @ s_half
        _, vecs = torch.linalg.eigh(ms.T @ ms)   # ascending
        v = vecs[:, -self.proj_in.out_features:].flip(-1)  # [d, r], largest first
        dtype = self.proj_in.weight.dtype
        self.proj_in.weight.copy_((v.T @ s_inv_half).to(dtype))
        self.proj_out.weight.copy_((ms @ v).to(dtype))
        bias = torch.zeros_like(self.proj_out.bias)
        if w.b_up is not None:
            bias[-self.intermediate_size:] = w.b_up.to(bias.dtype)
        self.proj_out.bias.copy_(bias)
        self.down_norm.copy_(w.w_down.float().norm(dim=0).to(self.down_norm.dtype))
        for p in self.parameters():
            p.requires_grad_(False)


def refine_lowrank(router: LowRankRouter, x: torch.Tensor, w, *, epochs: int, batch_tokens: int,
                   lr: float, generator: torch.Generator | None = None) -> float:
    """Train a fitted :class:`LowRankRouter` on FFN inputs ``x`` ``[N, d]`` to predict the FFN's
    neuron activations: loss ``mean_t sum_i c_i^2 (h^_i - h_i)^2`` (``c``: W_down column norms),
    relative to ``mean_t sum_i c_i^2 h_i^2``. AdamW, one-cycle schedule. Returns the final loss
    (NaN for ``epochs=0``)."""
    if epochs == 0:
        return float("nan")
    with torch.no_grad():
        target = neuron_activations(x, w, router.activation).float() * router.down_norm
        scale = target.pow(2).sum(-1).mean().clamp_min(1e-30)
    params = [router.proj_in.weight, router.proj_out.weight, router.proj_out.bias]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = x.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_tokens))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.1)
    loss_val = float("nan")
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * batch_tokens:(i + 1) * batch_tokens]
            h = router.predicted_activations(x[idx])
            loss = (h * router.down_norm - target[idx]).pow(2).sum(-1).mean() / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_val = float(loss.detach())
    for p in params:
        p.requires_grad_(False)
    return loss_val


class OracleRouter(nn.Module):
    """logits = log s_e(x), the true expert shares; computed from the wrapped FFN."""

    kind = "oracle"
    needs_ffn = True

    def forward(self, x: torch.Tensor, ffn) -> torch.Tensor:
        return torch.log(expert_shares(x, ffn.weights(), ffn.activation, ffn.num_experts)
                         .clamp_min(1e-12))


ROUTER_CLASSES = {"linear": LinearRouter, "mlp": MLPRouter, "lowrank": LowRankRouter,
                  "oracle": OracleRouter}


def make_router(kind: str, hidden_size: int, num_experts: int, rank: int = 64,
                seed: int | None = None, *, intermediate_size: int | None = None,
                gated: bool = True, activation: str = "silu") -> nn.Module:
    """A fresh router of ``kind``; "lowrank" also needs the FFN's ``intermediate_size``,
    whether it is ``gated`` and its ``activation``."""
    if kind not in ROUTER_CLASSES:
        raise ValueError(f"router must be one of {tuple(ROUTER_CLASSES)}, got {kind!r}")
    if kind == "oracle":
        return OracleRouter()
    if kind == "lowrank" and intermediate_size is None:
        raise ValueError("a 'lowrank' router needs the FFN's intermediate_size")
    gen_state = None
    if seed is not None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        if kind == "lowrank":
            return LowRankRouter(hidden_size, num_experts, rank, intermediate_size=intermediate_size,
                                 gated=gated, activation=activation)
        return ROUTER_CLASSES[kind](hidden_size, num_experts, rank)
    finally:
        if gen_state is not None:
            torch.random.set_rng_state(gen_state)


# --- the oracle shares ---------------------------------------------------------------------
def neuron_activations(x: torch.Tensor, w, activation: str) -> torch.Tensor:
    """h [T, F]: the FFN's intermediate activations for inputs x [T, d] (biases included)."""
    up = F.linear(x, w.w_up, w.b_up)
    if w.w_gate is None:
        return activate(up, activation)
    return activate(F.linear(x, w.w_gate), activation) * up


def down_gram(w, num_experts: int) -> torch.Tensor:
    """[E, n, n] Gram matrices W_down,e^T W_down,e of each expert's W_down columns (fp32)."""
    d, f = w.w_down.shape
    n = f // num_experts
    wd = w.w_down.float().reshape(d, num_experts, n).permute(1, 0, 2)  # [E, d, n]
    return wd.transpose(1, 2) @ wd


def expert_norms(h: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """||y_e|| [T, E] from activations h [T, F] and the Gram matrices [E, n, n]."""
    e, n, _ = gram.shape
    he = h.float().reshape(h.shape[0], e, n)
    sq = torch.einsum("ten,enm,tem->te", he, gram, he)
    return sq.clamp_min(0).sqrt()


def expert_shares(x: torch.Tensor, w, activation: str, num_experts: int,
                  gram: torch.Tensor | None = None) -> torch.Tensor:
    """s [T, E]: each expert's share ||y_e|| / sum ||y_e'|| of the FFN output for inputs x [T, d]."""
    with torch.no_grad():
        h = neuron_activations(x, w, activation)
        if gram is None:
            gram = down_gram(w, num_experts)
        norms = expert_norms(h, gram)
        return norms / norms.sum(-1, keepdim=True).clamp_min(1e-30)


# --- router quality -------------------------------------------------------------------------
@torch.no_grad()
def router_quality(logits: torch.Tensor, shares: torch.Tensor, budgets=REPORT_BUDGETS,
                   min_experts: int = 1) -> dict:
    """Per budget: the share of oracle importance mass kept at the same expert count.

    For each token, the router's mask at budget p keeps k experts; the oracle's best k
    experts hold mass ``m*``; the router's experts hold ``m``. Reports mean ``m / m*``
    (``mass_kept_vs_oracle``), mean ``m`` (``mass_kept``), mean ``k`` (``active_experts``).
    """
    out = {}
    sorted_s = shares.sort(-1, descending=True).values.cumsum(-1)
    for p in budgets:
        mask = ops.route(logits.float(), float(p), min_experts=min_experts, backend="torch")
        k = mask.sum(-1)
        kept = (shares * mask).sum(-1)
        best = sorted_s.gather(-1, (k - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
        best = torch.where(k > 0, best, torch.zeros_like(best))
        ratio = torch.where(best > 0, kept / best.clamp_min(1e-30), torch.ones_like(best))
        out[f"{p:g}"] = {
            "mass_kept_vs_oracle": float(ratio.mean()),
            "mass_kept": float(kept.mean()),
            "active_experts": float(k.float().mean()),
        }
    return out


def summarize_quality(per_layer: list[dict]) -> dict:
    """Mean over layers of :func:`router_quality` outputs."""
    if not per_layer:
        return {}
    out = {}
    for p in per_layer[0]:
        out[p] = {key: sum(q[p][key] for q in per_layer) / len(per_layer) for key in per_layer[0][p]}
    return out


# --- training -------------------------------------------------------------------------------
def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits.float(), -1)).sum(-1).mean()


def fit_router(router: nn.Module, x: torch.Tensor, s: torch.Tensor, *, epochs: int,
               batch_tokens: int, lr: float, weight_decay: float = 0.0,
               generator: torch.Generator | None = None) -> float:
    """Fit one router on inputs x [N, d] and target shares s [N, E]; returns the final train loss."""
    router.fit_input_stats(x)
    router.train()
    params = [p for p in router.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = x.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_tokens))
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    loss_val = float("nan")
    dtype = next(router.parameters()).dtype
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * batch_tokens:(i + 1) * batch_tokens]
            logits = router(x[idx].to(dtype))
            loss = soft_cross_entropy(logits, s[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_val = float(loss.detach())
    router.eval()
    for p in router.parameters():
        p.requires_grad_(False)
    return loss_val


@torch.no_grad()
def capture_ffn_io(model, routed, input_ids: torch.Tensor, *, batch_size: int = 8,
                   progress: bool = True, desc: str = "capturing FFN inputs", shares: bool = True):
    """Run the model dense on ``input_ids`` [N, S]; return per layer (inputs [N*S, d], shares [N*S, E]).

    ``routed`` are the model's RoutedFFN modules (run dense during capture). Inputs are
    kept in fp32 on the CPU. ``shares=False`` returns empty share lists (inputs only).
    """
    from tqdm.auto import tqdm

    xs = [[] for _ in routed]
    ss = [[] for _ in routed]
    grams = [down_gram(r.weights(), r.num_experts) for r in routed] if shares else None

    def hook_for(i):
        def hook(mod, args):
            x = args[0]
            x = x.reshape(-1, x.shape[-1])
            xs[i].append(x.float().cpu())
            if shares:
                ss[i].append(expert_shares(x, mod.weights(), mod.activation, mod.num_experts,
                                           grams[i]).cpu())
        return hook

    handles = [r.register_forward_pre_hook(hook_for(i)) for i, r in enumerate(routed)]
    device = next(model.parameters()).device
    try:
        with routing_state(model, policy="dense"):
            for start in tqdm(range(0, input_ids.shape[0], batch_size), desc=desc,
                              disable=not progress):
                model(input_ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in xs], [torch.cat(s) for s in ss] if shares else []


def _stacked_params(routers: list[nn.Module]) -> list[torch.Tensor]:
    """Trainable copies of L same-shaped routers' parameters, stacked for bmm ([L, in, out])."""
    kind = routers[0].kind
    if kind == "mlp":
        parts = [[r.fc1.weight.T, r.fc1.bias, r.fc2.weight.T, r.fc2.bias] for r in routers]
    elif kind == "linear":
        parts = [[r.proj.weight.T, r.proj.bias] for r in routers]
    else:
        raise ValueError(f"cannot train a {kind!r} router")
    return [torch.stack([p[i].detach().float() for p in parts]).contiguous().requires_grad_(True)
            for i in range(len(parts[0]))]


def _stacked_forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits [L, B, E] of L stacked routers on standardized inputs x [L, B, d]."""
    if len(params) == 4:
        w1, b1, w2, b2 = params
        return torch.baddbmm(b2.unsqueeze(1), F.gelu(torch.baddbmm(b1.unsqueeze(1), x, w1)), w2)
    w, b = params
    return torch.baddbmm(b.unsqueeze(1), x, w)


@torch.no_grad()
def _unstack_params(params: list[torch.Tensor], routers: list[nn.Module]) -> None:
    for i, r in enumerate(routers):
        if r.kind == "mlp":
            r.fc1.weight.copy_(params[0][i].T)
            r.fc1.bias.copy_(params[1][i])
            r.fc2.weight.copy_(params[2][i].T)
            r.fc2.bias.copy_(params[3][i])
        else:
            r.proj.weight.copy_(params[0][i].T)
            r.proj.bias.copy_(params[1][i])


def fit_routers(routers: list[nn.Module], xs: list[torch.Tensor], ss: list[torch.Tensor], *,
                epochs: int, batch_tokens: int, lr: float, weight_decay: float = 0.0,
                generator: torch.Generator | None = None, progress: bool = False) -> list[float]:
    """Fit L same-kind routers at once (batched matmuls), layer l on (xs[l] [N, d], ss[l] [N, E]).

    Equivalent to :func:`fit_router` per layer (same loss, optimiser and schedule; the
    summed loss keeps every layer's gradient its own), much faster on small routers.
    Inputs are standardized once (the routers' fixed input statistics). Returns the final
    per-layer training loss.
    """
    from tqdm.auto import tqdm

    n = xs[0].shape[0]
    if any(x.shape[0] != n for x in xs):
        raise ValueError("fit_routers needs the same number of tokens for every layer")
    for r, x in zip(routers, xs):
        r.fit_input_stats(x)
    x_std = torch.stack([r.standardize(x.float()) for r, x in zip(routers, xs)])  # [L, N, d]
    s_all = torch.stack([s.float() for s in ss])  # [L, N, E]
    params = _stacked_params(routers)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(n / batch_tokens))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.1)
    last = torch.full((len(routers),), float("nan"))
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"training {len(routers)} routers",
               disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * batch_tokens:(i + 1) * batch_tokens]
            logits = _stacked_forward(params, x_std[:, idx])
            target = s_all[:, idx]
            per_layer = -(target * F.log_softmax(logits, -1)).sum(-1).mean(-1)  # [L]
            opt.zero_grad(set_to_none=True)
            per_layer.sum().backward()
            opt.step()
            sched.step()
            last = per_layer.detach()
            bar.update(1)
    bar.close()
    _unstack_params(params, routers)
    for r in routers:
        r.eval()
        for p in r.parameters():
            p.requires_grad_(False)
    return [float(v) for v in last]


def train_routers(model, input_ids: torch.Tensor, cfg, *, progress: bool = True) -> dict:
    """Train every layer's router on calibration tokens; return the router report.

    Captures every layer's FFN inputs (and, for learned routers, the target shares) from the
    dense model and keeps ``cfg.holdout_fraction`` of the tokens out. "lowrank" routers are
    fitted to their FFN in closed form (:meth:`LowRankRouter.fit_to_ffn`); "linear"/"mlp"
    routers are trained together (:func:`fit_routers`). Reports, per layer, the final train
    loss, the held-out loss and target entropy, :func:`router_quality` on the held-out tokens
    (plus the mean), and the router's size against its FFN's (``router_cost``).
    """
    routed = routed_layers(model)
    closed_form = cfg.router == "lowrank"
    xs, ss = capture_ffn_io(model, routed, input_ids, progress=progress, shares=not closed_form,
                            desc="capturing FFN inputs for router training")
    gen = torch.Generator().manual_seed(cfg.seed)
    n = xs[0].shape[0]
    n_hold = int(n * cfg.holdout_fraction) if n >= 20 else 0
    perm = torch.randperm(n, generator=gen)
    hold, train = perm[:n_hold], perm[n_hold:]
    routers = [r.router for r in routed]
    devices = [next(r.parameters()).device for r in routers]
    for r in routers:
        r.cpu().float()
    if closed_form:
        from tqdm.auto import tqdm

        losses = []
        for r, layer, x in tqdm(list(zip(routers, routed, xs)), desc="fitting low-rank routers",
                                disable=not progress):
            w = layer.weights()
            cpu = type(w)(**{f.name: None if getattr(w, f.name) is None else
                             getattr(w, f.name).detach().cpu().float()
                             for f in dataclasses.fields(w)})
            r.fit_to_ffn(x[train], cpu)
            losses.append(refine_lowrank(r, x[train], cpu, epochs=cfg.router_epochs,
                                         batch_tokens=cfg.train_batch_tokens, lr=cfg.train_lr,
                                         generator=gen))
    else:
        losses = fit_routers(routers, [x[train] for x in xs], [s[train] for s in ss],
                             epochs=cfg.router_epochs, batch_tokens=cfg.train_batch_tokens,
                             lr=cfg.train_lr, weight_decay=cfg.train_weight_decay, generator=gen,
                             progress=progress)
    per_layer = []
    for i, r in enumerate(routers):
        entry = {"layer": i, "train_loss": losses[i]}
        if n_hold:
            with torch.no_grad():
                x = xs[i][hold]
                if closed_form:
                    layer = routed[i]
                    x_dev = x.to(layer.weights().w_up)
                    s = expert_shares(x_dev, layer.weights(), layer.activation,
                                      layer.num_experts).float().cpu()
                else:
                    s = ss[i][hold]
                logits = r(x)
                entry["holdout_loss"] = float(soft_cross_entropy(logits, s))
                entry["entropy_target"] = float(-(s * s.clamp_min(1e-30).log()).sum(-1).mean())
                entry["quality"] = router_quality(logits, s, min_experts=cfg.min_experts)
        per_layer.append(entry)
        r.to(devices[i], dtype=routed[i].weights().w_up.dtype)
    report = {"per_layer": per_layer, "train_tokens": int(input_ids.numel()),
              "holdout_tokens": n_hold, "router": cfg.router, "router_cost": router_cost(routed)}
    qual = [e["quality"] for e in per_layer if "quality" in e]
    if qual:
        report["mean"] = summarize_quality(qual)
    return report


def router_cost(routed) -> dict:
    """Router weights against FFN weights, summed over layers (bytes read per token scale
    with these counts at one dtype): ``router_params``, ``ffn_params`` and their ratio."""
    r_params = sum(p.numel() for layer in routed for p in layer.router.parameters())
    f_params = 0
    for layer in routed:
        w = layer.weights()
        f_params += sum(t.numel() for t in (w.w_gate, w.w_up, w.w_down) if t is not None)
    return {"router_params": int(r_params), "ffn_params": int(f_params),
            "router_over_ffn": r_params / max(f_params, 1)}


def router_report(model, calibration=None, tokenizer=None, *, budgets=REPORT_BUDGETS,
                  num_tokens: int = 4096, seq_len: int = 256, progress: bool = False) -> dict:
    """Router quality per layer: the stored report, or a fresh one on ``calibration``.

    Without ``calibration`` returns the report made when the routers were trained
    (``model.prunepath_config.router_report``: per-layer train/held-out loss and
    :func:`router_quality` on held-out tokens). With calibration text (or ids ``[N, S]``),
    measures on it: per layer, at each budget, the share of the oracle's importance mass
    the router keeps at the same expert count, the mass kept and the mean active experts.
    """
    if calibration is None:
        cfg = getattr(model, "prunepath_config", None)
        routed_layers(model)  # raises if not converted
        return {} if cfg is None else cfg.router_report
    from .data import token_batches

    ids = token_batches(calibration, tokenizer, num_tokens=num_tokens, seq_len=seq_len)
    routed = routed_layers(model)
    xs, ss = capture_ffn_io(model, routed, ids, progress=progress, desc="router report")
    per_layer = []
    with torch.no_grad():
        for i, r in enumerate(routed):
            logits = r.router_logits(xs[i].to(r.weights().w_up.dtype)).float()
            per_layer.append({"layer": i, "quality": router_quality(logits, ss[i], budgets,
                                                                    r.min_experts)})
    return {"per_layer": per_layer, "mean": summarize_quality([e["quality"] for e in per_layer]),
            "tokens": int(ids.numel())}


def format_router_report(report: dict) -> str:
    """A plain-text table of a router report (one row per layer, then the mean)."""
    rows = [e for e in report.get("per_layer", []) if "quality" in e]
    if not rows:
        return "(no router quality figures: routers untrained or oracle)"
    budgets = list(rows[0]["quality"])
    head = "layer | " + " | ".join(f"kept/oracle@{p}  experts@{p}" for p in budgets)
    lines = [head, "-" * len(head)]

    def fmt(q):
        return " | ".join(f"{q[p]['mass_kept_vs_oracle']:>14.3f}  {q[p]['active_experts']:>9.2f}"
                          for p in budgets)

    for e in rows:
        lines.append(f"{e['layer']:>5} | " + fmt(e["quality"]))
    if "mean" in report:
        lines.append(f"{'mean':>5} | " + fmt(report["mean"]))
    return "\n".join(lines)
