"""Convert SmolLM2-135M-Instruct with PrunePath and measure it: time, router quality, budgets, ppl.

    python -m bench.smollm2_convert --experts 48 96 --eval-tokens 16384 \
        --out bench/results/smollm2_convert.json

For each E: converts the model (balanced k-means experts, trained routers on the bundled
WikiText-2 *validation* sample), reports router quality (share of the oracle's importance
mass kept at the same expert count, budgets 0.5/0.7/0.9, held-out calibration tokens),
calibrates budgets for each target sparsity (global and per-layer; measured on validation
text), then evaluates WikiText-2 *test* perplexity (token level, strided sliding window,
first ``--eval-tokens`` tokens of test.txt) at each preset, with the FFN sparsity measured
on the test forwards. Prints tables and writes every number to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

import prunepath
from prunepath.calibrate import Calibration, _calibration_ids
from prunepath.data import calibration_texts
from prunepath.routers import format_router_report

DEFAULT_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"


@torch.no_grad()
def strided_ppl(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Token-level perplexity of ``ids`` [N] with a sliding window; each token scored once,
    with up to ``window - 1`` tokens of context (the standard HF strided evaluation)."""
    nll, count, scored_to = 0.0, 0, 0
    for begin in range(0, ids.numel() - 1, stride):
        end = min(begin + window, ids.numel())
        x = ids[begin:end].unsqueeze(0)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
        new = losses[max(scored_to - begin - 1, 0):]  # targets at positions >= scored_to
        nll += float(new.sum())
        count += new.numel()
        scored_to = end
        if end == ids.numel():
            break
    return math.exp(nll / count), count


def summarize_budget(p) -> str:
    if isinstance(p, list):
        return f"per-layer {min(p):.3f}..{max(p):.3f} (mean {sum(p) / len(p):.3f})"
    return f"{p:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[48, 96])
    ap.add_argument("--clustering", default="balanced_kmeans",
                    choices=["balanced_kmeans", "coactivation", "none"])
    ap.add_argument("--router", default="mlp", choices=["mlp", "linear", "oracle"],
                    help="oracle: route on the true expert shares (no router; the rule's upper bound)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--train-tokens", type=int, default=32768)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--modes", nargs="+", default=["global", "per_layer"],
                    choices=["global", "per_layer"])
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--test-file", default=str(DEFAULT_TEST))
    ap.add_argument("--backend", default="torch",
                    help="ops backend of the routed FFN; 'torch' (dense matmuls, then masked) is the "
                    "fastest on CPU for 1024-token windows")
    ap.add_argument("--save-dir", default=None, help="save each converted checkpoint here")
    ap.add_argument("--out", default="bench/results/smollm2_convert.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    progress = not args.quiet

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "args": vars(args),
        "eval": {"data": "WikiText-2 test (tokenized form), first eval_tokens tokens",
                 "window": args.window, "stride": args.stride},
        "runs": [],
    }
    import transformers

    results["machine"]["transformers"] = transformers.__version__

    def dump():
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, out_path)

    t0 = time.perf_counter()
    model, tok = prunepath.models.load("smollm2-135m-instruct", progress=progress)
    results["load_s"] = time.perf_counter() - t0
    text = Path(args.test_file).read_text(encoding="utf-8")
    test_ids = tok(text, return_tensors="pt")["input_ids"][0][: args.eval_tokens + 1]
    t0 = time.perf_counter()
    dense_ppl, n_scored = strided_ppl(model, test_ids, args.window, args.stride)
    results["dense"] = {"ppl": dense_ppl, "scored_tokens": n_scored,
                        "eval_s": time.perf_counter() - t0}
    print(f"dense WikiText-2 test ppl {dense_ppl:.3f} ({n_scored} tokens, window {args.window}, "
          f"stride {args.stride}) in {results['dense']['eval_s']:.0f}s", flush=True)
    dump()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    texts = calibration_texts()
    for e in args.experts:
        model.load_state_dict(state)  # the original (unpermuted) weights again
        cfg = prunepath.PrunePathConfig(num_experts=e, clustering=args.clustering, router=args.router,
                                        router_rank=args.rank, train_tokens=args.train_tokens,
                                        train_epochs=args.epochs, backend=args.backend)
        t0 = time.perf_counter()
        prunepath.convert(model, cfg, calibration=texts[: len(texts) // 2], tokenizer=tok,
                          progress=progress)
        convert_s = time.perf_counter() - t0
        report = prunepath.router_report(model)
        run = {"num_experts": e, "config": model.prunepath_config.to_dict(), "convert_s": convert_s,
               "router_quality_mean": report.get("mean"), "points": []}
        print(f"\n=== E={e}: converted in {convert_s:.0f}s "
              f"({report.get('timings')}) ===\n{format_router_report(report)}", flush=True)
        ids = _calibration_ids(model, texts[len(texts) // 2:], tok, args.calib_tokens, 256)
        cal = Calibration(model, ids)
        for mode in args.modes:
            for target in [0.0] + list(args.targets):
                t0 = time.perf_counter()
                name = f"s{round(100 * target)}" + ("" if mode == "per_layer" else "_global")
                p = prunepath.calibrate(model, target_sparsity=target, per_layer=mode == "per_layer",
                                        name=name, calibration=cal)
                calib_s = time.perf_counter() - t0
                calib_measured = model.prunepath_config.router_report["calibration"][name]["measured_sparsity"]
                prunepath.set_budget(model, p)
                prunepath.reset_stats(model)
                t0 = time.perf_counter()
                if target == 0.0:  # budget 1.0 runs the original FFNs: exactly the dense model
                    ppl, test_sparsity = dense_ppl, 0.0
                else:
                    ppl, _ = strided_ppl(model, test_ids, args.window, args.stride)
                    test_sparsity = prunepath.stats(model)["cumulative"]["sparsity"]
                point = {"mode": mode, "target": target, "preset": name, "budget": p,
                         "calib_sparsity": calib_measured, "test_sparsity": test_sparsity,
                         "ppl": ppl, "ppl_vs_dense_pct": 100 * (ppl / dense_ppl - 1),
                         "calibrate_s": calib_s, "eval_s": time.perf_counter() - t0}
                run["points"].append(point)
                print(f"E={e:<3} {mode:<9} target {target:.2f}  budget {summarize_budget(p):<34} "
                      f"sparsity calib {calib_measured:.3f} test {test_sparsity:.3f}  ppl {ppl:8.3f} "
                      f"({point['ppl_vs_dense_pct']:+.1f}%)", flush=True)
                dump()
        run["presets"] = model.prunepath_config.presets
        run["router_report"] = model.prunepath_config.router_report
        if args.save_dir:
            prunepath.save(model, Path(args.save_dir) / f"smollm2-135m-instruct-E{e}", tokenizer=tok)
        results["runs"].append(run)
        dump()
        prunepath.unload(model)

    print("\n| E | mode | target | test sparsity | ppl | vs dense |")
    print("|---|---|---|---|---|---|")
    print(f"| - | dense | 0 | 0.000 | {dense_ppl:.3f} | +0.0% |")
    for run in results["runs"]:
        for pt in run["points"]:
            print(f"| {run['num_experts']} | {pt['mode']} | {pt['target']:.2f} | {pt['test_sparsity']:.3f} "
                  f"| {pt['ppl']:.3f} | {pt['ppl_vs_dense_pct']:+.1f}% |")
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
