"""What a jump between experts costs the CPU routed FFN: the same number of live experts laid
out as one run, in runs of 4, every other expert, and at random (one token, packed W_down^T).

Each row is the median time of ``torch.ops.prunepath.routed_ffn_packed`` (the extension op,
no Python checks) over ``--calls`` calls, cycling through ``--copies`` weight sets so that the
weights come from memory, not cache; the layouts are interleaved round by round and the
medians of the rounds reported. ``GB/s`` counts the live experts' weight bytes.

    python -m bench.fragmentation_cpu                         # SmolLM2's FFN, E=96, fp32 + bf16
    python -m bench.fragmentation_cpu --dtypes bf16 --live 24,48 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .common import atomic_write_json, environment

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def layouts(e: int, k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """[E] bool masks with k live experts: one run, runs of 4 (4 live, 4 dead), every other
    expert (where 2k <= E) and random."""
    out = {}
    m = torch.zeros(e, dtype=torch.bool)
    m[:k] = True
    out["one run"] = m
    m = torch.zeros(e, dtype=torch.bool)
    live = [i for i in range(e) if i % 8 < 4][:k]
    if len(live) == k:
        m[live] = True
        out["runs of 4"] = m
    if 2 * k <= e:
        m = torch.zeros(e, dtype=torch.bool)
        m[0: 2 * k: 2] = True
        out["every other"] = m
    m = torch.zeros(e, dtype=torch.bool)
    m[torch.randperm(e, generator=gen)[:k]] = True
    out["random"] = m
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--f", type=int, default=1536)
    p.add_argument("--experts", type=int, default=96)
    p.add_argument("--live", default="12,24,48", help="live experts per call, comma list")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--copies", type=int, default=40)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from prunepath.ops import cpp_backend

    cpp_backend.ensure_available("cpu")
    torch.set_num_threads(a.threads)
    op = torch.ops.prunepath.routed_ffn_packed
    d, f, e = a.d, a.f, a.experts
    rows = []
    print(f"{'dtype':5s} {'live':>4s} {'layout':12s} {'us':>8s} {'GB/s':>6s} {'x one run':>9s}")
    for name in a.dtypes.split(","):
        dtype = DTYPES[name]
        gen = torch.Generator().manual_seed(0)
        weights = [tuple((torch.randn(f, d, generator=gen) * 0.05).to(dtype) for _ in range(3))
                   for _ in range(a.copies)]
        x = torch.randn(1, d, generator=gen).to(dtype)
        for k in (int(v) for v in a.live.split(",")):
            cases = layouts(e, k, gen)
            times = {lay: [] for lay in cases}
            for _ in range(a.rounds):
                for lay, m in cases.items():
                    mask = m[None]
                    ts = []
                    for i in range(a.calls):
                        wg, wu, wd = weights[i % a.copies]
                        t0 = time.perf_counter_ns()
                        op(x, wg, wu, wd, mask, "silu", None, None)
                        ts.append((time.perf_counter_ns() - t0) / 1e3)
                    times[lay].append(statistics.median(ts))
            nbytes = 3 * k * (f // e) * d * x.element_size()
            base = statistics.median(times["one run"])
            for lay, ts in times.items():
                us = statistics.median(ts)
                row = {"dtype": name, "live": k, "experts": e, "layout": lay, "us": us,
                       "gb_s": nbytes / us / 1e3, "vs_one_run": us / base, "rounds_us": ts}
                rows.append(row)
                print(f"{name:5s} {k:4d} {lay:12s} {us:8.1f} {row['gb_s']:6.1f} {us / base:9.2f}")
    if a.json:
        atomic_write_json(Path(a.json), {
            "env": environment("cpu"), "d": d, "f": f, "experts": e, "threads": a.threads,
            "copies": a.copies, "calls": a.calls, "rounds": a.rounds, "rows": rows})
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
