"""Where one decode step's device time goes: kernels of the *replayed* step (CUDA graph or
compiled), per step, for a random Llama shape, dense and PrunePath at given sparsities.

    python -m bench.profile_step_gpu --model llama3-8b --mode compile --step lean \
        --sparsities 0,0.5 --json out.json

Each kernel's device time is summed over ``--steps`` replayed steps (torch profiler, CUDA
activity; graph kernels are traced) and reported per step, largest first, with a total per
kernel group (GEMV/GEMM libraries, inductor's fused kernels, PrunePath's kernels, other).
Masks come from bench.common's synthetic banks (independent, exactly k of E experts).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

from .common import (atomic_write_json, build_llama, environment, install_masks, make_bank, sync,
                     time_decode)


def group(name: str) -> str:
    n = name.lower()
    if n.startswith("triton_") or "fused" in n and "prunepath" not in n:
        return "inductor fused"
    if any(k in n for k in ("_routed_ffn", "_route", "_router", "masked_act", "_list_blocks",
                            "prunepath")):
        return "prunepath"
    if any(k in n for k in ("gemv", "gemm", "xmma", "cutlass", "cublas", "splitk", "reduce_kernel")):
        return "gemv/gemm"
    return "other"


def profile_steps(dec, steps: int, sync) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dec.device.type == "cuda" else [])
    with dec.preserved_state():
        for _ in range(3):
            dec.step()
        sync(dec.device)
        with profile(activities=acts) as prof:
            for _ in range(steps):
                dec.step()
            sync(dec.device)
    kern = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    kern.sort(key=lambda e: -e.device_time_total)
    groups = defaultdict(float)
    for e in kern:
        groups[group(e.key)] += e.device_time_total / steps
    return {"kernel_us_per_step": sum(e.device_time_total for e in kern) / steps,
            "kernels_per_step": sum(e.count for e in kern) / steps,
            "groups_us": dict(groups),
            "top": [{"name": e.key[:140], "us": e.device_time_total / steps,
                     "calls": e.count / steps, "group": group(e.key)} for e in kern[:40]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--mode", default="compile", choices=("graph", "compile"))
    p.add_argument("--step", default="lean", choices=("hf", "lean"))
    p.add_argument("--sparsities", default="0,0.5")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ffn-path", default="sparse", choices=("sparse", "dense", "auto"),
                   help="Decoder ffn_path of the routed rows (dense: the masked-dense FFN)")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default="profile_step_gpu.json")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of this script (no kernels)")
    args = p.parse_args(argv)
    import prunepath
    from prunepath.convert import wrap
    from prunepath.decode import Decoder

    dev = torch.device(args.device)
    model = build_llama(args.model, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    cfg, e = model.config, args.experts
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt)).to(dev)
    max_len = args.prompt + args.new
    out = {"env": environment(dev), "args": vars(args), "rows": []}
    for s in [float(x) for x in args.sparsities.split(",")]:
        if s > 0 and not prunepath.decode.routed_layers(model):
            wrap(model, prunepath.PrunePathConfig(num_experts=e, clustering="none", router="mlp",
                                                  router_rank=64, prefill="dense"))
        if s > 0:
            k = max(1, round(e * (1 - s)))
            install_masks(model, make_bank(cfg.num_hidden_layers, 64, args.batch, e, k, seed=k))
        dec = Decoder(model, args.batch, max_len, mode=args.mode, step=args.step,
                      ffn_path=args.ffn_path if s > 0 else "auto")
        t = time_decode(dec, prompt, 64)
        dec.prefill(prompt, eos_token_id=[])
        dec.decode(8)
        row = {"sparsity": s, "ms_per_step": t["ms_per_step"], **profile_steps(dec, args.steps, sync)}
        out["rows"].append(row)
        print(f"\n== {args.model} {args.mode} {args.step} B={args.batch} sparsity {s}: {t['ms_per_step']:.3f} ms/step, "
              f"kernels {row['kernel_us_per_step']:.0f} us/step in {row['kernels_per_step']:.0f} launches")
        for g, us in sorted(row["groups_us"].items(), key=lambda kv: -kv[1]):
            print(f"   {g:15s} {us:8.1f} us")
        for k_ in row["top"][:25]:
            print(f"   {k_['us']:8.1f} us {k_['calls']:6.1f}x  [{k_['group']}] {k_['name'][:100]}")
        del dec
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    atomic_write_json(Path(args.json), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
