"""How much quality can expert sparsity keep at best? Oracle routing by clustering and expert size.

    python bench/granularity.py --experts 48 96 192 1536 --clusterings balanced_kmeans coactivation \
        --targets 0.3 0.5 0.7 --windows 4 --out bench/results/granularity.json

No router is trained: every point routes on the *true* expert shares (``router="oracle"``, the
share of the FFN output each expert carries for this token), so the numbers bound what any
router can reach on those experts. For each clustering x E the SmolLM2 FFNs are MoEfied, then
two rules are scored at each target sparsity on the first ``--windows`` WikiText-2 test windows
(1024 tokens, stride 512; token-level ppl):

* ``oracle_topk``: the k experts with the largest true shares, the same k for every token;
* ``oracle_pp_T2``: PrunePath's cumulative-mass rule on the true shares at temperature 2,
  one global budget calibrated on held-out validation text to the target sparsity.

E = F (1536, one neuron per expert) is the neuron-level bound: clustering does not matter there.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

import prunepath
from prunepath.budget import set_budget, set_routing
from prunepath.data import calibration_texts
from prunepath.eval import suites
from prunepath.eval.methods import measure_sparsity, nearest_count
from prunepath.eval.sweep import SweepConfig, calibration_ids, write_json_atomic
from routing_rules import set_temperature  # bench/ is on sys.path when run as a script


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[48, 96, 192, 1536])
    ap.add_argument("--clusterings", nargs="+", default=["balanced_kmeans", "coactivation"],
                    choices=["balanced_kmeans", "coactivation", "none"])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--rules", nargs="+", default=["oracle_topk", "oracle_pp_T2"],
                    choices=["oracle_topk", "oracle_pp_T2"])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--cluster-tokens", type=int, default=32768,
                    help="calibration tokens for co-activation statistics (WikiText-2 valid sample)")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--out", default="bench/results/granularity.json")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    base, tok = prunepath.models.load("smollm2-135m-instruct", progress=False)
    base.eval()
    f = base.config.intermediate_size
    calib = calibration_ids(tok, SweepConfig(out_dir="-", calib_tokens=args.calib_tokens))
    out = {"command": " ".join([Path(sys.executable).name] + sys.argv),
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
           "args": vars(args), "windows": args.windows, "window": 1024, "stride": 512, "points": []}

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    with torch.no_grad():
        out["dense_ppl"] = suites.wikitext2(base, tok, limit=args.windows, progress=False)["ppl"]
    print(f"dense ppl {out['dense_ppl']:.3f}", flush=True)

    configs = []
    for e in args.experts:
        # one neuron per expert: every clustering is the same partition, run it once
        for c in (["none"] if e == f else args.clusterings):
            configs.append((e, c))
    for e, clustering in configs:
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        prunepath.convert(model, num_experts=e, clustering=clustering, router="oracle", backend="torch",
                          calibration=calibration_texts() if clustering == "coactivation" else None,
                          tokenizer=tok, train_tokens=args.cluster_tokens, progress=False)
        convert_s = time.perf_counter() - t0
        for target in args.targets:
            for rule in args.rules:
                t0 = time.perf_counter()
                set_temperature(model, 2.0 if rule.endswith("_T2") else 1.0)
                if rule == "oracle_topk":
                    knob = nearest_count(target, e)
                    set_routing(model, "topk", k=knob)
                else:
                    set_routing(model, "budget")
                    knob = prunepath.calibrate(model, calib, target_sparsity=target, tol=0.005, apply=False)
                    set_budget(model, knob)
                sparsity = measure_sparsity(model, calib)
                with torch.no_grad():
                    ppl = suites.wikitext2(model, tok, limit=args.windows, progress=False)["ppl"]
                pt = {"num_experts": e, "neurons_per_expert": f // e, "clustering": clustering,
                      "target": target, "rule": rule, "knob": knob, "calib_sparsity": sparsity, "ppl": ppl,
                      "ppl_vs_dense_pct": 100 * (ppl / out["dense_ppl"] - 1), "convert_s": convert_s,
                      "seconds": time.perf_counter() - t0}
                out["points"].append(pt)
                write_json_atomic(out_path, out)
                print(f"E {e:5d} {clustering:16s} target {target:.2f} {rule:13s} sparsity {sparsity:.3f} "
                      f"ppl {ppl:9.2f} ({pt['ppl_vs_dense_pct']:+.0f}%)  {pt['seconds']:.0f}s", flush=True)
        del model

    print("\n| E (neurons/expert) | clustering | rule | " + " | ".join(f"{100 * t:.0f}%" for t in args.targets) + " |")
    print("|---|---|---|" + "---|" * len(args.targets))
    for e, clustering in configs:
        for rule in args.rules:
            cells = []
            for t in args.targets:
                p = next(p for p in out["points"] if p["num_experts"] == e and p["clustering"] == clustering
                         and p["rule"] == rule and p["target"] == t)
                cells.append(f"{p['ppl']:.1f} ({p['ppl_vs_dense_pct']:+.0f}%)")
            print(f"| {e} ({f // e}) | {clustering} | {rule} | " + " | ".join(cells) + " |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
