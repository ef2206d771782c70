"""Quality and cost by expert count E: oracle and trained routers, SmolLM2-135M-Instruct, CPU.

    python -m bench.granularity --experts 96 192 384 768 1536 --routers oracle lowrank \
        --targets 0.3 0.5 0.7 --out bench/results/granularity.json

For each E (co-activation clustering below one neuron per expert, none at E = F) and router, the
model is converted with ``prunepath.convert`` (routers fitted on ``--train-tokens`` calibration
tokens, no fine-tuning), one global budget is calibrated to each target FFN sparsity on held-out
validation text, and WikiText-2 test perplexity is measured on the first ``--windows`` windows of
1024 tokens (stride 512). ``oracle`` routes on each expert's true share of the FFN output: it bounds
what any router can reach on those experts.

Also per (E, router), on this CPU, T = 1, fp32, every layer's weights in turn (rotating, larger
than the caches): the router's size against the FFN's, the router + routing time, and the routed
FFN time at 50% of the experts against the dense FFN, as the CPU decoder runs them (matrix-vector
products by ``prunepath.ops.linear``, W_down stored transposed).

Prints a table and writes JSON and a PNG plot (perplexity against sparsity, one line per E).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunepath
from prunepath.calibrate import measure
from prunepath.data import calibration_texts
from prunepath.decode import fast_linear
from prunepath.eval import suites
from prunepath.eval.sweep import SweepConfig, calibration_ids
from prunepath.layers import RoutedFFN

from .common import atomic_write_json


def layer_times(model, repeats: int = 20) -> dict:
    """Median microseconds per layer at T = 1: dense FFN, routed FFN at 50% of the experts
    (random masks), router + routing at budget 0.5 -- each over every layer in turn. Matrix-vector
    products run as in the CPU decoder: ``prunepath.ops.linear`` (the dense FFN's three and the
    router's; ``prunepath.decode.fast_linear`` is enabled for this and disabled after)."""
    layers = [m for m in model.modules() if isinstance(m, RoutedFFN)]
    gen = torch.Generator().manual_seed(0)
    d = layers[0].hidden_size
    e = layers[0].num_experts
    xs = [torch.randn(1, d, generator=gen) for _ in layers]
    masks = []
    for _ in layers:
        m = torch.zeros(1, e, dtype=torch.bool)
        m[0, torch.randperm(e, generator=gen)[: e // 2]] = True
        masks.append(m)
    ws = [layer.weights() for layer in layers]
    # W_down stored transposed ([F, d] rows, viewed as [d, F]), as the CPU decoder keeps it
    downs = [w.w_down.t().contiguous().t() for w in ws]
    act = layers[0].activation

    def dense(i):
        w, x = ws[i], xs[i]
        h = F.silu(prunepath.ops.linear(x, w.w_gate)) * prunepath.ops.linear(x, w.w_up)
        return prunepath.ops.linear(h, downs[i])

    def routed(i):
        w = ws[i]
        return prunepath.ops.routed_ffn(xs[i], w.w_gate, w.w_up, downs[i], masks[i], activation=act)

    def routing(i):
        layer = layers[i]
        return prunepath.ops.route(layer.router_logits(xs[i]), 0.5, backend=layer.backend)

    out = {}
    fast_linear.enable(model)
    with torch.no_grad():
        for name, fn in (("dense_ffn_us", dense), ("routed_ffn_50_us", routed), ("routing_us", routing)):
            for i in range(len(layers)):
                fn(i)
            per = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for i in range(len(layers)):
                    fn(i)
                per.append((time.perf_counter() - t0) / len(layers) * 1e6)
            out[name] = statistics.median(per)
    fast_linear.disable(model)
    out["routed_speedup_50"] = out["dense_ffn_us"] / out["routed_ffn_50_us"]
    out["routed_plus_routing_speedup_50"] = out["dense_ffn_us"] / (out["routed_ffn_50_us"] + out["routing_us"])
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(p["num_experts"], p["router"]) for p in out["points"]})
    for e, router in keys:
        pts = sorted((p["calib_sparsity"], p["ppl"]) for p in out["points"]
                     if p["num_experts"] == e and p["router"] == router)
        ax.plot(*zip(*pts), marker="o", linestyle="--" if router == "oracle" else "-",
                label=f"E={e} {router}")
    ax.axhline(out["dense_ppl"], color="k", linewidth=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("measured FFN sparsity (calibration text)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("SmolLM2-135M-Instruct: quality by expert count and router")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[96, 192, 384, 768, 1536])
    ap.add_argument("--routers", nargs="+", default=["oracle", "lowrank"], choices=["oracle", "lowrank", "mlp"])
    ap.add_argument("--targets", type=float, nargs="*", default=[0.3, 0.5, 0.7])
    ap.add_argument("--config", default="{}",
                    help="JSON of PrunePathConfig fields to override (default: PrunePathConfig())")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--train-tokens", type=int, default=16384)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--checkpoint", default=None,
                    help="measure this converted checkpoint (its recipe) instead of converting for each E x router")
    ap.add_argument("--out", default="bench/results/granularity.json")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    base, tok = prunepath.models.load("smollm2-135m-instruct", progress=False)
    base.eval()
    f = base.config.intermediate_size
    overrides = json.loads(args.config)
    calib = calibration_ids(tok, SweepConfig(out_dir="-", calib_tokens=args.calib_tokens))
    out_path = Path(args.out)
    out = {"command": " ".join(["python -m bench.granularity"] + (sys.argv[1:] if argv is None else argv)),
           "date": datetime.date.today().isoformat(),
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "torch": torch.__version__},
           "args": vars(args), "window": 1024, "stride": 512, "points": [], "configs": []}
    if args.targets:
        with torch.no_grad():
            out["dense_ppl"] = suites.wikitext2(base, tok, limit=args.windows, progress=False)["ppl"]
        print(f"dense ppl {out['dense_ppl']:.3f}", flush=True)

    if args.checkpoint:
        runs = [(None, None)]
    else:
        runs = [(e, router) for e in args.experts for router in args.routers]
    for e, router in runs:
        t0 = time.perf_counter()
        if args.checkpoint:
            model = prunepath.from_pretrained(args.checkpoint)
            cfg = model.prunepath_config
            e, router = cfg.num_experts, cfg.router
        else:
            model = copy.deepcopy(base)
            cfg = prunepath.PrunePathConfig(**dict(overrides, num_experts=e, router=router,
                                                   clustering="none" if e == f else "coactivation",
                                                   train_tokens=args.train_tokens))
            prunepath.convert(model, cfg, calibration=calibration_texts(), tokenizer=tok, progress=False)
        clustering = cfg.clustering if e != f else "none"
        report = model.prunepath_config.router_report
        conf = {"num_experts": e, "neurons_per_expert": f // e, "clustering": clustering, "router": router,
                "router_rank": cfg.router_rank, "temperature": cfg.router_temperature,
                "convert_s": time.perf_counter() - t0,
                "router_cost": report.get("router_cost"),
                "kept_vs_oracle_at_0.5": report.get("mean", {}).get("0.5", {}).get("mass_kept_vs_oracle")}
        if not args.no_timing and router != "oracle":
            conf["cpu_t1"] = layer_times(model)
        out["configs"].append(conf)
        print(json.dumps(conf), flush=True)
        for target in args.targets:
            t0 = time.perf_counter()
            budget = prunepath.calibrate(model, calib, target_sparsity=target, tol=0.005, apply=False)
            prunepath.set_budget(model, budget)
            sparsity = float(measure(model, calib)["sparsity"])
            with torch.no_grad():
                ppl = suites.wikitext2(model, tok, limit=args.windows, progress=False)["ppl"]
            pt = {"num_experts": e, "router": router, "target": target, "budget": budget,
                  "calib_sparsity": sparsity, "ppl": ppl, "ppl_vs_dense_pct": 100 * (ppl / out["dense_ppl"] - 1),
                  "seconds": time.perf_counter() - t0}
            out["points"].append(pt)
            atomic_write_json(out_path, out)
            print(f"E {e:5d} {router:8s} target {target:.2f} sparsity {sparsity:.3f} "
                  f"ppl {ppl:9.2f} ({pt['ppl_vs_dense_pct']:+.1f}%)  {pt['seconds']:.0f}s", flush=True)
        del model
    atomic_write_json(out_path, out)
    if out["points"]:
        plot(out, out_path.with_suffix(".png"))

    print("\n| E (neurons/expert) | router | router/FFN weights | kept vs oracle @0.5 | "
          + " | ".join(f"{100 * t:.0f}%" for t in args.targets) + " | CPU T=1 routed 50% + routing vs dense |")
    print("|---|---|---|---|" + "---|" * len(args.targets) + "---|")
    for c in out["configs"]:
        cells = []
        for t in args.targets:
            p = next(p for p in out["points"] if p["num_experts"] == c["num_experts"]
                     and p["router"] == c["router"] and p["target"] == t)
            cells.append(f"{p['ppl']:.1f} ({p['ppl_vs_dense_pct']:+.0f}%)")
        cost = c["router_cost"]["router_over_ffn"] if c["router_cost"] else None
        kept = c["kept_vs_oracle_at_0.5"]
        speed = c.get("cpu_t1")
        print(f"| {c['num_experts']} ({c['neurons_per_expert']}) | {c['router']} | "
              f"{'-' if not cost else f'{100 * cost:.1f}%'} | {'-' if kept is None else f'{kept:.3f}'} | "
              + " | ".join(cells) + " | "
              + ("-" if not speed else f"{speed['routed_plus_routing_speedup_50']:.2f}x "
                 f"({speed['routed_ffn_50_us']:.0f}+{speed['routing_us']:.0f} vs {speed['dense_ffn_us']:.0f} us)")
              + " |")
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
