"""MoEfication: split each FFN's F neurons into E equal-size experts and permute the weights.

After :func:`permute_model_`, expert e is the contiguous block ``[e*F/E, (e+1)*F/E)`` of rows
of W_gate/W_up (and b_up) and columns of W_down. Permuting neurons does not change the
dense model.

Clustering methods (``PrunePathConfig.clustering``):

* ``"balanced_kmeans"``: spherical k-means on each neuron's normalized weight vector
  (``[w_gate_i, w_up_i]`` for gated FFNs, ``w_up_i`` otherwise), MoEfication's parameter
  clustering, with equal-size clusters.
* ``"coactivation"``: neurons that fire together on calibration tokens: kernel k-means on
  the cosine similarity of the neurons' |activation| patterns (accumulated as an F x F
  Gram matrix while the dense model runs), equal-size clusters.
* ``"none"``: the original order (experts are consecutive blocks of neurons).

Equal sizes come from :func:`balanced_assign`, a greedy capacity-constrained assignment:
every unplaced neuron proposes to its most similar cluster that still has room; each
cluster accepts its best proposers up to its capacity; repeat.
"""

from __future__ import annotations

import torch
from torch import nn

from .families import Family, decoder_layers, ffn_owner, permute_ffn_, projections


def suggest_num_experts(f: int, e: int, count: int = 6) -> list[int]:
    """Divisors of ``f`` nearest to ``e`` (valid expert counts)."""
    divs = [d for d in range(1, f + 1) if f % d == 0]
    return sorted(sorted(divs, key=lambda d: (abs(d - e), d))[:count])


def check_num_experts(f: int, e: int, where: str = "") -> None:
    if not isinstance(e, int) or e < 1 or f % e:
        raise ValueError(
            f"num_experts={e!r} must divide the FFN width F={f}{where} so that experts have "
            f"equal size; valid choices near it: {suggest_num_experts(f, max(int(e), 1))}"
        )


def balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each of F items to one of E clusters, exactly ``capacity`` per cluster.

    ``sim`` [F, E] (higher = better), ``F == E * capacity``. Returns a cluster index per item.
    """
    f, e = sim.shape
    if f != e * capacity:
        raise ValueError(f"balanced_assign: F={f} != E={e} * capacity={capacity}")
    sim = sim.float()
    assign = torch.full((f,), -1, dtype=torch.long)
    room = torch.full((e,), capacity, dtype=torch.long)
    neg_inf = torch.tensor(float("-inf"))
    while True:
        free = (assign < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return assign
        s = torch.where((room > 0).unsqueeze(0), sim[free], neg_inf)
        val, best = s.max(1)
        # within each cluster, rank proposers by similarity (descending)
        order = torch.argsort(val, descending=True, stable=True)
        order = order[torch.argsort(best[order], stable=True)]
        b_sorted = best[order]
        starts = torch.searchsorted(b_sorted, b_sorted, right=False)
        rank = torch.arange(b_sorted.numel()) - starts
        accept = rank < room[b_sorted]
        chosen = order[accept]
        assign[free[chosen]] = best[chosen]
        room -= torch.bincount(best[chosen], minlength=e)


def _members_onehot(assign: torch.Tensor, e: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(assign, e).float()  # [F, E]


def _init_assign(f: int, e: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(f, generator=generator) % e


def balanced_kmeans(x: torch.Tensor, num_clusters: int, *, iters: int = 25,
                    seed: int = 0) -> torch.Tensor:
    """Spherical balanced k-means of rows of ``x`` [F, D]; returns a cluster index per row."""
    f = x.shape[0]
    n = f // num_clusters
    x = torch.nn.functional.normalize(x.double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    # k-means++-style seeding: spread initial centroids over the sphere
    first = int(torch.randint(f, (1,), generator=gen))
    cent_idx = [first]
    best_sim = x @ x[first]
    for _ in range(1, num_clusters):
        dist = (1 - best_sim).clamp_min(0) ** 2 + 1e-12  # k-means++: D^2 sampling
        nxt = int(torch.multinomial(dist.float(), 1, generator=gen))
        cent_idx.append(nxt)
        best_sim = torch.maximum(best_sim, x @ x[nxt])
    cent = x[cent_idx]
    assign = balanced_assign(x @ cent.T, n)
    for _ in range(iters):
        cent = torch.nn.functional.normalize(_members_onehot(assign, num_clusters).double().T @ x,
                                             dim=1)
        new = balanced_assign(x @ cent.T, n)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def balanced_kernel_kmeans(gram: torch.Tensor, num_clusters: int, *, iters: int = 25,
                           seed: int = 0) -> torch.Tensor:
    """Balanced k-means on a similarity (cosine kernel) matrix ``gram`` [F, F]."""
    f = gram.shape[0]
    n = f // num_clusters
    k = gram.double()
    gen = torch.Generator().manual_seed(seed)
    # seed clusters from a balanced assignment around spread-out "centre" neurons
    first = int(torch.randint(f, (1,), generator=gen))
    centres = [first]
    best = k[first].clone()
    for _ in range(1, num_clusters):
        dist = (1 - best).clamp_min(0) ** 2 + 1e-12  # k-means++: D^2 sampling
        nxt = int(torch.multinomial(dist.float(), 1, generator=gen))
        centres.append(nxt)
        best = torch.maximum(best, k[nxt])
    assign = balanced_assign(k[:, centres], n)
    for _ in range(iters):
        m = _members_onehot(assign, num_clusters).double()  # [F, E]
        km = k @ m  # [F, E]: sum of similarities to each cluster's members
        cent_norm = (m * km).sum(0).clamp_min(1e-30).sqrt()  # ||sum of members|| in feature space
        new = balanced_assign(km / cent_norm, n)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def assignment_to_permutation(assign: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """perm [F] such that cluster c's members (ascending index) fill block c."""
    key = assign.long() * assign.numel() + torch.arange(assign.numel())
    return torch.argsort(key)


def weight_features(gate: nn.Module | None, up: nn.Module, fam: Family) -> torch.Tensor:
    """Each neuron's normalized weight vector [F, D] ([w_gate_i, w_up_i] for gated FFNs)."""
    parts = []
    for mod in (gate, up):
        if mod is None:
            continue
        wt = mod.weight.detach().float().cpu()
        wt = wt.t() if fam.conv1d else wt  # [F, d]
        parts.append(torch.nn.functional.normalize(wt, dim=1))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def coactivation_grams(model: nn.Module, fam: Family, input_ids: torch.Tensor, *,
                       batch_size: int = 8, progress: bool = True) -> list[torch.Tensor]:
    """Per layer, the cosine similarity [F, F] of neurons' |activation| over the calibration tokens.

    Activations are the inputs of each FFN's down projection (act(gate) * up, or act(up)),
    captured with forward pre-hooks while the (unconverted) model runs.
    """
    from tqdm.auto import tqdm

    layers = decoder_layers(model, fam)
    grams: list[torch.Tensor | None] = [None] * len(layers)

    def hook_for(i):
        def hook(mod, args):
            h = args[0].reshape(-1, args[0].shape[-1]).abs().double().cpu()
            g = h.T @ h
            grams[i] = g if grams[i] is None else grams[i].add_(g)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        _, _, down = projections(ffn_owner(layer, fam), fam)
        handles.append(down.register_forward_pre_hook(hook_for(i)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, input_ids.shape[0], batch_size),
                          desc="co-activation statistics", disable=not progress):
            model(input_ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for g in grams:
        d = g.diagonal().clamp_min(1e-30).sqrt()
        out.append(g / d.unsqueeze(0) / d.unsqueeze(1))
    return out


def compute_permutations(model: nn.Module, fam: Family, cfg, input_ids=None, *,
                         progress: bool = True) -> list[torch.Tensor]:
    """One neuron permutation [F] per decoder layer for ``cfg.clustering``."""
    from tqdm.auto import tqdm

    layers = decoder_layers(model, fam)
    e = cfg.num_experts
    perms = []
    widths = {projections(ffn_owner(layer, fam), fam)[1].weight.shape[1 if fam.conv1d else 0]
              for layer in layers}
    if cfg.clustering == "none" or widths == {e}:  # one neuron per expert: every order is the same split
        for layer in layers:
            _, up, _ = projections(ffn_owner(layer, fam), fam)
            f = up.weight.shape[1] if fam.conv1d else up.weight.shape[0]
            perms.append(torch.arange(f))
        return perms
    if cfg.clustering == "coactivation":
        if input_ids is None:
            raise ValueError("clustering='coactivation' needs calibration text: "
                             "pass calibration=... (and tokenizer=...) to prunepath.convert")
        grams = coactivation_grams(model, fam, input_ids, progress=progress)
        for i in tqdm(range(len(layers)), desc="co-activation clustering", disable=not progress):
            assign = balanced_kernel_kmeans(grams[i], e, iters=cfg.kmeans_iters, seed=cfg.seed + i)
            grams[i] = None
            perms.append(assignment_to_permutation(assign, e))
        return perms
    if cfg.clustering == "balanced_kmeans":
        for i, layer in enumerate(tqdm(layers, desc="balanced k-means", disable=not progress)):
            gate, up, _ = projections(ffn_owner(layer, fam), fam)
            feats = weight_features(gate, up, fam)
            assign = balanced_kmeans(feats, e, iters=cfg.kmeans_iters, seed=cfg.seed + i)
            perms.append(assignment_to_permutation(assign, e))
        return perms
    raise ValueError(f"clustering must be 'balanced_kmeans', 'coactivation' or 'none', "
                     f"got {cfg.clustering!r}")


def permute_model_(model: nn.Module, fam: Family, perms: list[torch.Tensor]) -> None:
    """Apply one permutation per layer in place to the FFN parameters."""
    for layer, perm in zip(decoder_layers(model, fam), perms):
        gate, up, down = projections(ffn_owner(layer, fam), fam)
        permute_ffn_(gate, up, down, fam, perm)
