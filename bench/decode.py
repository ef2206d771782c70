"""End-to-end decoding speed: PrunePath vs dense, next to the Amdahl ceiling from bytes.

Run from the repository root (or as ``prunepath bench decode ...``, which calls :func:`main`
with the same arguments).

GPU (random bf16 weights at real Llama shapes, built on the device; nothing downloaded):

    python -m bench.decode gpu [--quick] [--models llama3-8b,llama2-7b] [--out DIR]

  For each model, batch (1/2/4/8) and FFN sparsity (50/70/75/90 %), the same decode loop
  (prunepath.decode.Decoder: static KV cache, one CUDA graph per step) runs the dense model
  (cuBLAS FFN) and the PrunePath model. The expert masks are controlled: each RoutedFFN runs
  its own routing (fused router on an MLP router) and a :class:`MaskInjector` then takes a
  precomputed per-step mask instead (so exactly k of E experts per token); for batch > 1
  the masks are either independent per sequence (the worst case for the union of experts)
  or drawn with the expert-popularity skew measured on SmolLM2's trained routers
  (``overlap`` JSON from the ``overlap`` command below), fitted to its measured union.
  Reported with each speed: the union density, the Amdahl ceiling from bytes (weights + KV
  read per step, dense / with only the union's FFN experts), the achieved fraction of it,
  the FFN's share of step time (torch profiler) and peak memory.

CPU (the real SmolLM2-135M-Instruct, batch 1, dense vs calibrated presets):

    python -m bench.decode cpu [--checkpoint DIR] [--quick]

SmolLM2 expert overlap in a batch (CPU; writes the JSON the GPU run reads):

    python -m bench.decode overlap [--checkpoint DIR]

Every command prints a table last and writes JSON (``--out``, default ``runs/bench_decode``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .common import (CPU_DTYPES, LLAMA_SHAPES, SMOLLM2_CHECKPOINT, WIKITEXT,  # noqa: F401
                     MaskInjector, atomic_write_json, build_llama, environment, install_masks,
                     log, make_bank, smollm2_routed, sync, text_prompt, time_decode)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = Path("runs/bench_decode")
DEFAULT_OVERLAP = HERE / "results" / "smollm2_overlap.json"
MASK_MODELS = ("independent", "smollm2")


# --------------------------------------------------------------------------- synthetic masks


def fit_popularity(freq: torch.Tensor, k: int, batch: int, target_union: float,
                   steps: int = 4096, seed: int = 0) -> tuple[float, float]:
    """Scale ``tau`` of popularity logits ``tau * log(freq)`` so that Gumbel-top-k masks of
    ``batch`` tokens have mean union density ``target_union``. Returns (tau, union)."""
    logp = freq.clamp_min(1e-4).log()
    gen = torch.Generator().manual_seed(seed)

    def union(tau):
        g = -torch.empty(steps, batch, freq.shape[-1]).exponential_(generator=gen).log()
        idx = (tau * logp + g).topk(k, dim=-1).indices
        m = torch.zeros(steps, batch, freq.shape[-1], dtype=torch.bool).scatter_(-1, idx, True)
        return m.any(1).float().mean().item()

    lo, hi = 0.0, 8.0
    if union(lo) <= target_union:
        return lo, union(lo)
    for _ in range(20):
        mid = (lo + hi) / 2
        if union(mid) > target_union:
            lo = mid
        else:
            hi = mid
    return hi, union(hi)


def resample(freq: torch.Tensor, n: int) -> torch.Tensor:
    """A length-``n`` popularity vector with the same sorted profile as ``freq``."""
    s = freq.sort(descending=True).values
    pos = torch.linspace(0, len(s) - 1, n)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class LogitInjector:
    """Controls routing through the router's logits instead of replacing the mask (what
    ``--mask-source bias`` uses; the only way to control routing that happens inside the FFN
    kernel, ``Decoder(fuse_routing=True)``). A forward pre-hook on each RoutedFFN writes the
    current step's logits into the layer's folded router bias ``b2`` (fp32 [E], read in place
    by the captured step): ``LOGIT`` on the step's chosen experts, 0 elsewhere; the router's
    second-layer weight is scaled to ~0 (``NOISE``), so the softmax gives each chosen expert
    ~1/k and the budget ``1 - 0.5/k`` takes exactly those k. The real routing work runs (both
    router layers, the softmax, the cumulative-mass rule). One bias per layer: every token of
    a step gets the same experts, so this serves batch 1."""

    LOGIT = 20.0
    NOISE = 1e-4

    def __init__(self, index: int, bank: torch.Tensor, cur: torch.Tensor, step: torch.Tensor,
                 b2: torch.Tensor, advance: bool):
        self.index, self.bank, self.cur, self.step = index, bank, cur, step
        self.b2, self.advance = b2, advance

    def __call__(self, module, args):
        if self.index == 0:
            torch.index_select(self.bank, 0, self.step, out=self.cur)
        self.b2.copy_(self.cur[0, self.index])
        if self.advance:
            self.step.add_(1).remainder_(self.bank.shape[0])


def install_router_logits(model, chosen: torch.Tensor, dtype: torch.dtype) -> None:
    """:class:`LogitInjector` hooks over ``chosen`` [L, S, 1, E] (batch 1) on every RoutedFFN
    (an MLP router, folded for inputs of ``dtype``); budget 1 - 0.5/k. Hooks already
    installed with the same bank shape are refilled in place (a captured step keeps reading
    the same tensors); ``prunepath.unload`` drops them with the wrappers."""
    import prunepath
    from prunepath.budget import routed_layers

    if chosen.shape[2] != 1:
        raise ValueError(f"router-logit masks serve batch 1, got batch {chosen.shape[2]}")
    layers = routed_layers(model)
    dev = layers[0].budget.device
    bank = (chosen[:, :, 0].permute(1, 0, 2).float() * LogitInjector.LOGIT).contiguous().to(dev)
    old = [h for m in layers for h in m._forward_pre_hooks.values() if isinstance(h, LogitInjector)]
    if len(old) == len(layers) and tuple(old[0].bank.shape) == tuple(bank.shape):
        old[0].bank.copy_(bank)
        old[0].step.zero_()
    else:
        if old:
            raise ValueError("router-logit hooks of another bank shape are installed")
        step = torch.zeros(1, dtype=torch.long, device=dev)
        cur = torch.empty((1,) + tuple(bank.shape[1:]), device=dev)
        for t in (bank, cur, step):
            torch._dynamo.mark_static_address(t)
        for i, layer in enumerate(layers):
            with torch.no_grad():
                layer.router.fc2.weight.mul_(LogitInjector.NOISE)
            folded = layer.fused_router(dtype)
            if folded is None or folded[3] is None:
                raise ValueError("router-logit masks need an MLP router with a fused form")
            layer.register_forward_pre_hook(
                LogitInjector(i, bank, cur, step, folded[3], advance=i == len(layers) - 1))
    k = int(chosen[0, 0, 0].sum())
    prunepath.set_budget(model, 1.0 - 0.5 / k)


def routing_union(model, ids: torch.Tensor) -> tuple[float, float]:
    """(union density, expert density per token) of the model's own routing at its budgets:
    each RoutedFFN routes its input at the last position of every row of ``ids`` [B, S]
    (one eager forward; what ``--mask-source router`` reports, averaged over layers)."""
    from prunepath.budget import routed_layers

    seen = []

    def grab(module, args):
        x = args[0][:, -1]  # [B, d]
        seen.append(module.expert_mask(x, x.shape[0]))

    hooks = [m.register_forward_pre_hook(grab) for m in routed_layers(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    masks = torch.stack(seen).float()  # [L, B, E]
    return masks.amax(1).mean().item(), masks.mean().item()


def union_density(chosen: torch.Tensor) -> float:
    """Mean over layers and steps of the fraction of experts some token of the batch uses."""
    return chosen.any(dim=2).float().mean().item()


# --------------------------------------------------------------------------- bytes model


def step_bytes(cfg, batch: int, cache_len: int, ffn_density: float = 1.0,
               num_experts: int = 0, router_rank: int = 0, elem: int = 2) -> float:
    """Bytes of weights + KV cache one decode step must read (each once)."""
    d, f, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q = cfg.num_attention_heads * hd
    kv = cfg.num_key_value_heads * hd
    attn = d * q + 2 * d * kv + q * d
    ffn = 3 * d * f * ffn_density
    router = (d * router_rank + router_rank * num_experts) if router_rank else d * num_experts
    router = router if ffn_density < 1.0 else 0
    norms = 2 * d
    per_layer = attn + ffn + router + norms
    lm_head = cfg.vocab_size * d + d
    kv_cache = 2 * kv * cache_len * batch * n_layers
    return float((n_layers * per_layer + lm_head + kv_cache) * elem)


# --------------------------------------------------------------------------- timing


def ffn_modules(model) -> list[nn.Module]:
    return [layer.mlp for layer in model.model.layers]


@contextlib.contextmanager
def ffn_annotated(model, name="prunepath_ffn"):
    """Wrap every FFN module's forward in a profiler range called ``name``."""
    from torch.autograd.profiler import record_function

    open_ranges, hooks = {}, []
    for m in ffn_modules(model):
        def pre(mod, args):
            r = record_function(name)
            r.__enter__()
            open_ranges[id(mod)] = r

        def post(mod, args, out):
            open_ranges.pop(id(mod)).__exit__(None, None, None)

        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def profile_ffn_ms(dec, model, prompt, steps: int = 3) -> dict:
    """Time per decode step spent in the FFNs (routing included), from the torch profiler over
    eager steps after a prefill of ``prompt``: device (kernel) time on a GPU -- kernel times
    do not depend on graph replay -- and host time on a CPU. ``step_ms``: the profiled
    steps' wall time (CPU share = ffn_ms / step_ms; on a GPU divide by the graph step time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = dec.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    dec.prefill(prompt, eos_token_id=[])
    with dec.preserved_state():
        dec.step(eager=True)  # warm
        sync(dec.device)
        with ffn_annotated(model), profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                dec.step(eager=True)
            sync(dec.device)
            wall = time.perf_counter() - t0
    avgs = prof.key_averages()
    ffn = [e for e in avgs if e.key == "prunepath_ffn" and e.device_type == DeviceType.CPU]
    attr = "device_time_total" if cuda else "cpu_time_total"
    out = {"ffn_ms": sum(getattr(e, attr) for e in ffn) / 1e3 / steps,
           "step_ms": wall * 1e3 / steps}
    if cuda:  # per-kernel breakdown (device time and launches per step)
        kern = [e for e in avgs if e.device_type == DeviceType.CUDA and e.key != "prunepath_ffn"]
        kern.sort(key=lambda e: -e.device_time_total)
        out["kernel_us_per_step"] = sum(e.device_time_total for e in kern) / steps
        out["kernels_per_step"] = sum(e.count for e in kern) / steps
        out["top_kernels"] = [{"name": e.key[:120], "us": e.device_time_total / steps,
                               "calls": e.count / steps} for e in kern[:25]]
    return out


# --------------------------------------------------------------------------- GPU suite


@dataclass
class Row:
    model: str
    batch: int
    masks: str  # "dense", "independent", "smollm2"
    sparsity: float  # per-token FFN sparsity
    union: float  # union density of the batch's experts (mean over layers and steps)
    ms_per_step: float
    tok_s: float  # generated tokens per second, whole batch
    speedup: float = 1.0  # dense ms / this ms (same batch)
    ceiling: float = 1.0  # Amdahl ceiling from bytes
    of_ceiling: float = 1.0
    path: str = "dense"  # FFN path the decoder chose ("sparse" or masked "dense")
    path_ms: dict = field(default_factory=dict)
    ffn_ms: float | None = None
    ffn_share: float | None = None
    peak_gib: float = 0.0
    prefill_ms: float = 0.0
    mode: str = "graph"  # Decoder mode: "graph" (CUDA graph per step) or "compile"
    ffn_backend: str | None = None  # routed-FFN kernel backend the decoder chose (auto)
    step: str = "lean"  # Decoder step run: "hf" (the model's forward) or "lean" (prunepath.decode.lean_step)
    fused_qkv: bool = False  # the lean step computed q/k/v with one product (prunepath.decode.fused_qkv)


def _qkv_fused(dec) -> bool:
    return dec.lean is not None and any(wb is not None for wb in dec.lean.qkv)


def load_overlap(path: Path) -> dict | None:
    if not path.exists():
        return None
    return json.loads(path.read_text())


def popularity_for(overlap: dict, sparsity: float, num_layers: int, num_experts: int, k: int,
                   batch: int) -> tuple[torch.Tensor, dict]:
    """Per-layer popularity logits [L, E] for a Llama of ``num_layers``/``num_experts``,
    from SmolLM2's measured expert frequencies at the nearest measured sparsity, scaled so
    that the union of ``batch`` tokens matches SmolLM2's measured union at that batch."""
    levels = overlap["levels"]
    lv = min(levels, key=lambda r: abs(r["sparsity"] - sparsity))
    freq = torch.tensor(lv["freq"])  # [L_smol, E_smol]
    rows = []
    for i in range(num_layers):
        j = round(i * (freq.shape[0] - 1) / max(num_layers - 1, 1))
        rows.append(resample(freq[j], num_experts))
    freq_l = torch.stack(rows)
    target = lv["union"].get(str(batch))
    info = {"smollm2_sparsity": lv["sparsity"], "smollm2_union": target}
    if batch == 1 or target is None:
        return freq_l.clamp_min(1e-4).log(), info
    # SmolLM2's union is measured at its own per-token sparsity; match the *excess* over one
    # token's share, scaled to this run's per-token density.
    own = 1 - lv["sparsity"]
    excess = (target - own) / max(1 - own, 1e-6)
    want = (k / num_experts) + excess * (1 - k / num_experts)
    tau, got = fit_popularity(freq_l[num_layers // 2], k, batch, want)
    info.update(tau=tau, fitted_union=got)
    return tau * freq_l.clamp_min(1e-4).log(), info


def gpu_suite(args) -> list[dict]:
    import traceback

    import prunepath
    from prunepath.convert import wrap
    from prunepath.decode import Decoder

    t_start = time.perf_counter()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elem = torch.finfo(dtype).bits // 8
    overlap = load_overlap(Path(args.overlap))
    if overlap is None:
        log(f"[no overlap file {args.overlap}: smollm2-overlap masks skipped]")
    prompt_len, new = args.prompt, args.new
    max_len = prompt_len + new
    rows, results, errors = [], [], []
    out_json = Path(args.out) / "gpu.json"

    def save():
        atomic_write_json(out_json, {"env": environment(device), "args": vars(args),
                                     "rows": [asdict(r) for r in rows], "details": results,
                                     "errors": errors,
                                     "elapsed_s": time.perf_counter() - t_start})

    def time_left() -> float:
        return args.deadline - (time.perf_counter() - t_start) if args.deadline else math.inf

    def measure(dec, model, prompt, batch, profile):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time_decode(dec, prompt, new, repeats=args.repeats)
        peak = _peak_gib(device)
        prof = {}
        if profile:
            try:  # a profiler failure must not lose the timing
                prof = profile_ffn_ms(dec, model, prompt)
            except Exception as exc:
                log(f"!! profile failed: {exc!r}")
                errors.append({"config": "profile", "error": repr(exc)})
        return t, prof, peak

    def record(row, info, prof, t):
        rows.append(row)
        results.append({**asdict(row), "mask_info": info, "profile": prof,
                        "all_ms_per_step": t["all_ms_per_step"]})
        log(_fmt(row))
        save()

    def guarded(what, fn):
        try:
            return fn()
        except Exception as exc:  # one failing configuration must not lose the others
            log(f"!! {what} failed: {exc!r}")
            errors.append({"config": what, "error": repr(exc),
                           "traceback": traceback.format_exc()[-3000:]})
            save()
            return None

    for name in args.models:
        if time_left() < 60:
            log(f"[deadline: {name} skipped]")
            break
        t0 = time.perf_counter()
        model = build_llama(name, device, dtype)
        cfg = model.config
        log(f"== {name}: built in {time.perf_counter() - t0:.1f}s")
        e = args.experts
        runs = [(b, m, st) for b in args.batches for m in args.modes for st in args.steps
                if m != "compile" or b in args.compile_batches]
        for batch, mode, step in runs:
            if time_left() < 15:
                log(f"[deadline: {name} batch {batch} {mode} skipped]")
                break
            gen = torch.Generator().manual_seed(batch)
            prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen).to(device)
            # dense: the unconverted model, same decoder
            if prunepath.decode.routed_layers(model):
                prunepath.unload(model)
            dense_bytes = step_bytes(cfg, batch, max_len, elem=elem)
            profile_this = args.profile and mode != "compile"

            def dense_run():
                dec = Decoder(model, batch, max_len, mode=mode, step=step, fuse_qkv=args.fuse_qkv,
                              stack_ffn=args.stack_ffn)
                t, prof, peak = measure(dec, model, prompt, batch, profile_this)
                ms = t["ms_per_step"]
                row = Row(name, batch, "dense", 0.0, 1.0, ms, batch * 1e3 / ms,
                          ffn_ms=prof.get("ffn_ms"),
                          ffn_share=(prof["ffn_ms"] / ms) if prof else None,
                          peak_gib=peak, prefill_ms=t["prefill_ms"], mode=dec.mode, step=dec.step_kind,
                          fused_qkv=_qkv_fused(dec))
                record(row, {}, prof, t)
                return ms

            dense_ms = guarded(f"{name} B={batch} {mode} {step} dense", dense_run)
            if dense_ms is None:
                continue
            # PrunePath: wrap (no clustering: random weights), then synthetic masks
            wrap(model, prunepath.PrunePathConfig(num_experts=e, clustering="none", router="mlp",
                                                  router_rank=args.router_rank,
                                                  prefill="dense", backend=args.backend))
            kinds = ["independent"] if batch == 1 else list(MASK_MODELS)
            if args.mask_source == "router":
                kinds = ["router"]
            configs = [(s_, kind, "") for s_ in args.sparsities for kind in kinds]
            logits = args.mask_source == "logits"
            if logits and batch > 1:
                log(f"[{name} B={batch}: --mask-source logits serves batch 1; routed rows skipped]")
                configs = []
            if batch == 1 and mode != "compile" and not logits:  # overhead variants
                configs += [(s_, "independent", v) for v in args.variants
                            for s_ in args.sparsities if s_ in (0.5, 0.75)]
            dec = Decoder(model, batch, max_len, mode=mode, ffn_path=args.ffn_path, step=step,
                          packed_down=args.packed_down, fuse_qkv=args.fuse_qkv,
                          fuse_routing=args.fuse_routing, stack_ffn=args.stack_ffn)
            for sparsity, kind, variant in configs:
                if time_left() < 10:
                    log(f"[deadline: {name} B={batch} s={sparsity} {kind} {variant} skipped]")
                    break
                if kind == "smollm2" and overlap is None:
                    continue
                label = kind + (f"+{variant}" if variant else "") + ("+logits" if logits else "")
                label += "+fusedroute" if args.fuse_routing else ""

                def sparse_run():
                    k = max(1, round(e * (1 - sparsity)))
                    info = {}
                    if kind == "smollm2":
                        pop, info = popularity_for(overlap, sparsity, cfg.num_hidden_layers, e, k,
                                                   batch)
                    else:
                        pop = None
                    chosen = None if kind == "router" else make_bank(
                        cfg.num_hidden_layers, args.bank_steps, batch, e, k, pop,
                        seed=batch * 100 + k)
                    if kind == "router":  # the routers' own masks at budget 1 - sparsity
                        prunepath.set_budget(model, 1.0 - sparsity)
                    elif logits:
                        install_router_logits(model, chosen, dtype)
                    else:
                        install_masks(model, chosen, project=variant != "norouter")
                    used = dec
                    if variant:  # a fresh decoder: its steps capture the variant's kernels
                        used = Decoder(model, batch, max_len, mode=mode, ffn_path=args.ffn_path,
                                       record_stats=variant == "stats", step=step,
                                       fuse_qkv=args.fuse_qkv, fuse_routing=args.fuse_routing,
                                       stack_ffn=args.stack_ffn)
                    if kind == "router":
                        u, density = routing_union(model, prompt)
                        k = density * e
                        info = {"budget": 1.0 - sparsity, "experts_per_token": k}
                    else:
                        u = union_density(chosen)
                    profile = profile_this and batch in (1, 8)
                    t, prof, peak = measure(used, model, prompt, batch, profile)
                    ms = t["ms_per_step"]
                    sparse_bytes = step_bytes(cfg, batch, max_len, u, e,
                                              args.router_rank if variant != "norouter" else 0,
                                              elem)
                    ceiling = dense_bytes / sparse_bytes
                    row = Row(name, batch, label, 1 - k / e, u, ms, batch * 1e3 / ms,
                              speedup=dense_ms / ms, ceiling=ceiling,
                              of_ceiling=dense_ms / ms / ceiling,
                              path=getattr(used, "last_path", "sparse"),
                              path_ms=dict(getattr(used, "path_timings", {}) or {}),
                              ffn_ms=prof.get("ffn_ms"),
                              ffn_share=(prof["ffn_ms"] / ms) if prof else None,
                              peak_gib=peak, prefill_ms=t["prefill_ms"], mode=used.mode,
                              ffn_backend=getattr(used, "last_ffn_backend", None),
                              step=used.step_kind, fused_qkv=_qkv_fused(used))
                    record(row, info, prof, t)

                guarded(f"{name} B={batch} {mode} {step} s={sparsity} {label}", sparse_run)
            del dec
            prunepath.unload(model)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    return [asdict(r) for r in rows]


def _peak_gib(device) -> float:
    if torch.device(device).type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30


def _fmt(r: Row) -> str:
    share = "" if r.ffn_share is None else f" ffn {100 * r.ffn_share:4.1f}%"
    return (f"{r.model:10s} {r.mode:7s} {r.step:4s} B={r.batch} {r.masks:11s} s={r.sparsity:.2f} "
            f"union={r.union:.3f} "
            f"{r.ms_per_step:7.3f} ms/step {r.tok_s:8.1f} tok/s x{r.speedup:.2f} "
            f"(ceiling x{r.ceiling:.2f}, {100 * r.of_ceiling:.0f}%) {r.path}"
            f"{':' + r.ffn_backend if r.ffn_backend else ''}{share} "
            f"peak {r.peak_gib:.1f} GiB")


def print_table(rows: list[dict], title: str) -> None:
    cols = ["model", "mode", "step", "batch", "masks", "sparsity", "union", "ms_per_step", "tok_s",
            "speedup", "ceiling", "of_ceiling", "path", "ffn_backend", "ffn_share", "peak_gib"]
    if rows and "cpu_ms_per_step" in rows[0]:
        cols[-1:] = ["baseline", "speedup_paired", "cpu_ms_per_step", "cpu_speedup"]
    log(f"\n{title}")
    log(" | ".join(cols))
    for r in rows:
        vals = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                v = f"{v:.3f}" if c not in ("tok_s", "peak_gib") else f"{v:.1f}"
            vals.append("-" if v is None else str(v))
        log(" | ".join(vals))


# --------------------------------------------------------------------------- SmolLM2 (CPU)


def cpu_suite(args) -> list[dict]:
    import prunepath
    from prunepath.decode import fast_linear, packed_down
    from prunepath.budget import reset_stats, set_routing, stats
    from prunepath.decode import Decoder

    torch.set_num_threads(args.threads)
    model, tok = smollm2_routed(Path(args.checkpoint), args.dtype)
    elem = torch.finfo(CPU_DTYPES[args.dtype]).bits // 8
    # the ops backend is a run-time choice, not the checkpoint's (a checkpoint written by an
    # evaluation script may carry "torch", the masked-dense reference)
    prunepath.budget.set_backend(model, args.backend)
    cfg = model.config
    presets = [p for p in args.presets if p in model.prunepath_config.presets]
    prompt = text_prompt(tok, args.prompt)
    max_len = args.prompt + args.new
    dec = Decoder(model, 1, max_len, mode=args.mode, record_stats=True,  # sparsity column
                  fast_linears=args.fast_linears, step=args.steps[0], fuse_qkv=args.fuse_qkv,
                  fuse_routing=args.fuse_routing)
    configs = [("dense", None)] + [(p, p) for p in presets]
    if dec.fast_linears:  # also the dense model with torch's F.linear everywhere (stock HF)
        configs.append(("dense_torch_linear", "torch_linear"))
    if args.packed_down:  # the same presets with W_down stored transposed (packed_down)
        configs += [("dense_packed", None)] + [(p + "_packed", p) for p in presets]
    times = {name: [] for name, _ in configs}
    cpu_times = {name: [] for name, _ in configs}
    sparsity, paths = {}, {}

    def use(name, preset):
        (packed_down.pack if name.endswith("_packed") else packed_down.unpack)(model)
        if dec.fast_linears:
            (fast_linear.disable if preset == "torch_linear" else fast_linear.enable)(model)
        if preset in (None, "torch_linear"):
            set_routing(model, "dense")
        else:
            prunepath.set_budget(model, preset)

    for name, preset in configs:  # warm-up: compiles (mode="compile") and path timing stay out of the timed reps
        use(name, preset)
        dec.prefill(prompt, eos_token_id=[])
        dec.decode(4)
    for rep in range(args.repeats):  # interleaved: a busy machine slows every config alike
        for name, preset in configs:
            use(name, preset)
            dec.prefill(prompt, eos_token_id=[])
            reset_stats(model)
            t0, c0 = time.perf_counter(), time.process_time()
            n = dec.decode(args.new)
            times[name].append((time.perf_counter() - t0) * 1e3 / max(n - 1, 1))
            # CPU time of this process: on a shared, busy machine (and with 1 thread) it
            # excludes the time spent waiting for a core, which wall time does not
            cpu_times[name].append((time.process_time() - c0) * 1e3 / max(n - 1, 1))
            paths[name] = dec.last_path if preset not in (None, "torch_linear") else "dense"
            sparsity[name] = stats(model, include_report=False)["cumulative"]["sparsity"]
            log(f"  rep {rep} {name:6s} {times[name][-1]:.2f} ms/token (process CPU time "
                f"{cpu_times[name][-1]:.2f} ms/token) sparsity {sparsity[name]:.3f}")
    e = model.prunepath_config.num_experts
    rank = model.prunepath_config.router_rank
    dense_bytes = step_bytes(cfg, 1, max_len, elem=elem)
    rows = []
    for name, _ in configs:
        # each row against the dense step of its own W_down layout: same decode loop, same
        # kernels for every linear, and timed right before it in each rep (this VM's speed
        # flips between two states within a rep, so the neighbour pairs best)
        base = "dense_packed" if name.endswith("_packed") and name != "dense_packed" else "dense"
        dense_ms = statistics.median(times[base])
        dense_cpu_ms = statistics.median(cpu_times[base])
        ms = statistics.median(times[name])
        s = sparsity[name] if not name.startswith("dense") else 0.0
        ceiling = dense_bytes / step_bytes(cfg, 1, max_len, 1 - s, e, rank, elem) if s else 1.0
        rows.append({"model": "smollm2-135m", "dtype": args.dtype, "mode": dec.mode,
                     "step": dec.step_kind,
                     "batch": 1, "masks": name, "sparsity": s,
                     "union": 1 - s, "ms_per_step": ms, "tok_s": 1e3 / ms,
                     "speedup": dense_ms / ms, "ceiling": ceiling, "baseline": base,
                     # the ratio rep by rep (each rep times every config back to back): holds
                     # when a shared machine's speed drifts between reps
                     "speedup_paired": statistics.median(
                         [a / b for a, b in zip(times[base], times[name])]),
                     "of_ceiling": dense_ms / ms / ceiling, "path": paths[name], "ffn_share": None,
                     "peak_gib": 0.0, "all_ms": times[name],
                     "cpu_ms_per_step": statistics.median(cpu_times[name]),
                     "cpu_speedup": dense_cpu_ms / statistics.median(cpu_times[name]),
                     "all_cpu_ms": cpu_times[name],
                     "linears": "torch" if name == "dense_torch_linear" or not dec.fast_linears
                     else "prunepath.ops.linear"})
    if args.profile:
        for row, (name, preset) in zip(rows, configs):
            use(name, preset)
            dec.prefill(prompt, eos_token_id=[])
            p = profile_ffn_ms(dec, model, prompt, steps=5)
            row["ffn_share"] = p["ffn_ms"] / p["step_ms"]
            row["ffn_ms"] = p["ffn_ms"]
    atomic_write_json(Path(args.out) / "cpu.json", {"env": environment("cpu"), "args": vars(args),
                                                   "rows": rows})
    return rows


def overlap_suite(args) -> dict:
    """Measure, on SmolLM2's trained routers, each expert's activation frequency per layer and
    the union density of B tokens from B different sequences at the same position."""
    import prunepath
    from prunepath.budget import routed_layers

    torch.set_num_threads(args.threads)
    model, tok = smollm2_routed(Path(args.checkpoint))
    text = WIKITEXT.read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt").input_ids[0]
    nseq, seqlen = args.overlap_seqs, args.overlap_len
    ids = ids[: nseq * seqlen].reshape(nseq, seqlen)
    layers = routed_layers(model)
    masks = {}

    def hook(layer):
        def pre(mod, args_):
            x = args_[0]
            masks.setdefault(mod.layer_idx, []).append(
                mod.expert_mask(x.reshape(-1, x.shape[-1]), x.shape[0]).reshape(
                    x.shape[0], x.shape[1], -1))
        return layer.register_forward_pre_hook(pre)

    levels = []
    presets = [p for p in args.presets if p in model.prunepath_config.presets]
    for preset in presets:
        prunepath.set_budget(model, preset)
        masks.clear()
        hooks = [hook(layer) for layer in layers]
        with torch.no_grad():
            for i in range(0, nseq, 8):
                model(ids[i: i + 8])
        for h in hooks:
            h.remove()
        m = torch.stack([torch.cat(masks[i]) for i in range(len(layers))])  # [L, N, S, E]
        e = m.shape[-1]
        sparsity = 1 - m.float().mean().item()
        freq = m.float().mean(dim=(1, 2))  # [L, E]
        unions, indep = {}, {}
        gen = torch.Generator().manual_seed(0)
        for b in (1, 2, 4, 8):
            vals = []
            for _ in range(32):
                seqs = torch.randperm(nseq, generator=gen)[:b]
                vals.append(m[:, seqs].any(dim=1).float().mean().item())
            unions[str(b)] = statistics.mean(vals)
            per_tok = m.float().sum(-1).mean().item() / e
            indep[str(b)] = 1 - (1 - per_tok) ** b
        levels.append({"preset": preset, "sparsity": sparsity, "num_experts": e,
                       "freq": freq.tolist(), "union": unions, "independent_union": indep})
        log(f"{preset}: sparsity {sparsity:.3f} union {unions} (independent: "
            f"{ {k: round(v, 3) for k, v in indep.items()} })")
    data = {"env": environment("cpu"), "model": "smollm2-135m-instruct",
            "checkpoint": str(args.checkpoint), "sequences": nseq, "seq_len": seqlen,
            "levels": levels}
    atomic_write_json(Path(args.overlap), data)
    return data


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="prunepath bench decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=("gpu", "cpu", "overlap"))
    p.add_argument("--quick", action="store_true", help="fewer configurations and tokens")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--device", default=None, help="gpu suite: device (default cuda)")
    p.add_argument("--models", default="llama3-8b,llama2-7b")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--sparsities", default="0.5,0.7,0.75,0.9")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--router-rank", type=int, default=64)
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (gpu 256, cpu 64)")
    p.add_argument("--new", type=int, default=None, help="decoded tokens (gpu 256, cpu 128)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--mode", default="auto", help="Decoder mode (cpu suite)")
    p.add_argument("--modes", default="auto",
                   help="gpu suite: Decoder modes to run, e.g. graph,compile (auto = graph on "
                        "a GPU)")
    p.add_argument("--compile-batches", default="1",
                   help="gpu suite: batch sizes that also run mode compile (if in --modes)")
    p.add_argument("--ffn-path", default="auto", help="Decoder ffn_path")
    p.add_argument("--fuse-qkv", default="auto", choices=("auto", "on", "off"),
                   help="lean step: q/k/v weights fused into one product (prunepath.decode.fused_qkv); "
                   "auto: Decoder's default (on)")
    p.add_argument("--mask-source", default="where", choices=("where", "logits", "router"),
                   help="gpu suite: how the synthetic expert sets reach the routed FFNs: where "
                   "(MaskInjector: the real routing runs, then its mask is replaced) or logits "
                   "(LogitInjector: the router's logits are set so the real routing picks "
                   "them; batch 1 only; needed by --fuse-routing on); router: no synthetic "
                   "sets, the random routers' own routing at budget 1 - sparsity (the only "
                   "source the masked-dense path's in-kernel routing sees; the union and "
                   "experts per token are measured and reported)")
    p.add_argument("--stack-ffn", default="auto", choices=("auto", "on", "off"),
                   help="Decoder(stack_ffn=...): W_gate, W_up (and the router) as one product "
                   "(prunepath.decode.stacked_ffn); auto: the Decoder's default (on for a GPU)")
    p.add_argument("--fuse-routing", default="off", choices=("off", "on"),
                   help="Decoder(fuse_routing=...): routing and the routed FFN as one op "
                   "(prunepath.ops.router_routed_ffn)")
    p.add_argument("--steps", default="auto",
                   help="Decoder step(s): auto, hf (the model's forward), lean (prunepath.decode.lean_step); "
                        "the gpu suite runs each, the cpu suite the first")
    p.add_argument("--backend", default="auto", help="ops backend of the routed FFNs")
    p.add_argument("--bank-steps", type=int, default=64, help="distinct mask steps (cycled)")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--variants", default="stats,norouter",
                   help="gpu suite, batch 1 at 50/75%%: extra rows with statistics recording "
                        "in every step (stats; the decoder's default is off) and without any "
                        "routing work (norouter); empty for none")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="gpu suite: start no new configuration after this many seconds "
                        "(0: no limit); the JSON holds every row measured so far")
    p.add_argument("--overlap", default=str(DEFAULT_OVERLAP))
    p.add_argument("--overlap-seqs", type=int, default=32)
    p.add_argument("--overlap-len", type=int, default=128)
    p.add_argument("--checkpoint", default=str(SMOLLM2_CHECKPOINT))
    p.add_argument("--presets", default="s30,s50,s70,s90")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=tuple(CPU_DTYPES), help="cpu suite: model dtype")
    p.add_argument("--no-fast-linears", dest="fast_linears", action="store_false",
                   help="cpu: keep torch's F.linear in decode steps (default: prunepath.decode.fast_linear, "
                   "with a dense_torch_linear row for comparison)")
    p.add_argument("--packed-down", action=argparse.BooleanOptionalAction, default=None,
                   help="cpu (default on): also time every config with W_down stored transposed "
                   "(prunepath.decode.packed_down, the CPU Decoder's default; rows named "
                   "<config>_packed); gpu (default off): the routed models' decoders store it "
                   "so (Decoder(packed_down=True))")
    a = p.parse_args(argv)
    a.fuse_qkv = {"auto": None, "on": True, "off": False}[a.fuse_qkv]
    a.stack_ffn = {"auto": None, "on": True, "off": False}[a.stack_ffn]
    a.fuse_routing = a.fuse_routing == "on"
    if a.fuse_routing and a.suite == "gpu" and a.mask_source != "logits":
        p.error("--fuse-routing on routes inside the FFN op, past MaskInjector: "
                "add --mask-source logits")
    a.models = a.models.split(",")
    a.batches = [int(b) for b in a.batches.split(",")]
    a.sparsities = [float(s) for s in a.sparsities.split(",")]
    a.presets = a.presets.split(",")
    a.variants = [v for v in a.variants.split(",") if v]
    bad = set(a.variants) - {"stats", "norouter"}
    if bad:
        p.error(f"--variants: unknown {sorted(bad)}; choose from stats, norouter")
    a.modes = [m for m in a.modes.split(",") if m]
    a.steps = [s for s in a.steps.split(",") if s]
    a.compile_batches = [int(b) for b in a.compile_batches.split(",") if b]
    gpu = a.suite == "gpu"
    if a.packed_down is None:
        a.packed_down = not gpu
    a.device = a.device or ("cuda" if gpu else "cpu")
    a.prompt = a.prompt or (256 if gpu else 64)
    a.new = a.new or (256 if gpu else 128)
    a.repeats = a.repeats or (1 if gpu else 5)
    if a.quick:
        if gpu:
            a.models = a.models[:1]
            a.batches = [b for b in a.batches if b in (1, 8)] or a.batches[:1]
            a.sparsities = [s for s in a.sparsities if s in (0.5, 0.75)] or a.sparsities[:1]
            a.new = min(a.new, 128)
        else:
            a.presets = [p for p in a.presets if p == "s50"] or a.presets[:1]
            a.new = min(a.new, 64)
            a.repeats = min(a.repeats, 3)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.suite == "gpu":
        rows = gpu_suite(args)
        print_table(rows, f"decode speed, {environment(args.device).get('gpu', args.device)}, "
                          f"prompt {args.prompt}, decode {args.new}")
    elif args.suite == "cpu":
        rows = cpu_suite(args)
        print_table(rows, f"decode speed, CPU ({args.threads} threads), SmolLM2-135M, batch 1, "
                          f"prompt {args.prompt}, decode {args.new}")
    else:
        overlap_suite(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
