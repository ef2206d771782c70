"""Which routing rule keeps quality best at a matched FFN sparsity? (analysis on a real checkpoint)

    python -m bench.routing_rules --checkpoint CKPT --targets 0.3 0.5 --windows 4 \
        --out bench/results/routing_rules.json

For each target sparsity, every rule is calibrated on the same calibration tokens (second half
of the bundled WikiText-2 valid sample) to the same measured sparsity, then scored on the first
``--windows`` sliding windows of WikiText-2 test (token-level ppl). Rules:

* ``pp``: PrunePath, the trained router's softmax, cumulative mass p (one global p);
* ``pp_T{t}``: the same at router temperature t (logits / t; t -> inf: top-k);
* ``topk``: the trained router's top-k, the same k for every token;
* ``oracle_pp`` / ``oracle_topk``: the same two rules on the true expert shares.

Besides ppl it reports how unevenly each rule spreads experts over tokens: the mean, 10th
and 90th percentile of active experts per token (all layers), and the share of token-layer
pairs that keep <= E/8 experts. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

import prunepath
from prunepath.budget import routed_layers, set_budget, set_router_temperature, set_routing
from prunepath.eval import suites
from prunepath.eval.methods import measure_sparsity, nearest_count, use_oracle_router
from prunepath.eval.sweep import SweepConfig, calibration_ids


class KCounter:
    """Records the active-expert count of every (token, layer) while installed."""

    def __init__(self, model):
        self.layers = routed_layers(model)
        self.counts: list[torch.Tensor] = []

    def __enter__(self):
        for layer in self.layers:
            orig = type(layer).expert_mask.__get__(layer)

            def wrapped(x, batch=None, _orig=orig):
                m = _orig(x, batch)
                self.counts.append(m.sum(-1).flatten().to(torch.int32))
                return m

            layer.expert_mask = wrapped  # instance attribute: analysis only, removed on exit
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.expert_mask

    def summary(self, num_experts: int) -> dict:
        if not self.counts:  # dense routing never builds a mask
            return {"mean_k": float(num_experts), "p10_k": float(num_experts), "p90_k": float(num_experts),
                    "share_le_E8": 0.0}
        k = torch.cat(self.counts).float()
        return {"mean_k": float(k.mean()), "p10_k": float(k.quantile(0.1)), "p90_k": float(k.quantile(0.9)),
                "share_le_E8": float((k <= num_experts / 8).float().mean())}


def set_temperature(model, t: float) -> None:
    """The budget rule's temperature on every layer (the checkpoint's presets are not used here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "dropping the presets": this script calibrates its own knobs
        set_router_temperature(model, t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--temperatures", type=float, nargs="*", default=[2.0, 4.0])
    ap.add_argument("--rules", nargs="*", default=None, help="subset of rules (default: all)")
    ap.add_argument("--min-experts", type=int, default=None,
                    help="floor on active experts per token for the budget rules (default: the checkpoint's)")
    ap.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows of 1024 (stride 512)")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--tol", type=float, default=0.005)
    ap.add_argument("--out", default="bench/results/routing_rules.json")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = prunepath.from_pretrained(args.checkpoint).eval()
    for layer in routed_layers(model):
        layer.backend = "torch"
        if args.min_experts is not None:
            layer.min_experts = args.min_experts
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    e = routed_layers(model)[0].num_experts
    ids = calibration_ids(tok, SweepConfig(out_dir="-", calib_tokens=args.calib_tokens))
    rules = ["pp", *[f"pp_T{t:g}" for t in args.temperatures], "topk", "oracle_pp", "oracle_topk"]
    if args.rules:
        rules = [r for r in rules if r in args.rules]
    out = {"command": " ".join([Path(sys.executable).name] + sys.argv),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "checkpoint": args.checkpoint,
           "num_experts": e, "min_experts": routed_layers(model)[0].min_experts, "windows": args.windows, "window": 1024, "stride": 512, "points": []}

    def score() -> tuple[float, dict]:
        with torch.no_grad(), KCounter(model) as kc:
            r = suites.wikitext2(model, tok, limit=args.windows, progress=False)
        return r["ppl"], kc.summary(e)

    set_routing(model, "dense")
    dense_ppl, _ = score()
    out["dense_ppl"] = dense_ppl
    print(f"dense ppl {dense_ppl:.3f}", flush=True)
    for target in args.targets:
        for rule in rules:
            t0 = time.perf_counter()
            oracle = rule.startswith("oracle")
            use_oracle_router(model, oracle)
            set_temperature(model, float(rule.split("_T")[1]) if "_T" in rule else 1.0)
            if rule.endswith("topk"):
                knob = nearest_count(target, e)
                set_routing(model, "topk", k=knob)
            else:
                knob = prunepath.calibrate(model, ids, target_sparsity=target, tol=args.tol, apply=False)
                set_budget(model, knob)
            calib = measure_sparsity(model, ids)
            ppl, ks = score()
            pt = {"target": target, "rule": rule, "knob": knob, "calib_sparsity": calib, "ppl": ppl,
                  "ppl_vs_dense_pct": 100 * (ppl / dense_ppl - 1), **ks, "seconds": time.perf_counter() - t0}
            out["points"].append(pt)
            print(f"target {target:.2f} {rule:12s} knob {knob!s:>8.8} sparsity {calib:.3f} ppl {ppl:10.2f} "
                  f"({pt['ppl_vs_dense_pct']:+.0f}%)  k mean {ks['mean_k']:.1f} p10 {ks['p10_k']:.0f} "
                  f"p90 {ks['p90_k']:.0f} <=E/8 {100 * ks['share_le_E8']:.0f}%", flush=True)
            set_temperature(model, 1.0)
            use_oracle_router(model, False)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.out).with_suffix(".tmp")
            tmp.write_text(json.dumps(out, indent=2))
            os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
