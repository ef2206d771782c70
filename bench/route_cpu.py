"""CPU routing at large expert counts: prunepath.ops.route (C++) against the torch reference.

    python -m bench.route_cpu [--experts 96,1536,14336] [--tokens 1,16] [--out runs/bench_route_cpu.json]

For each (E, T): fresh logits ~ N(0, 3^2) per repeat (budget 0.5), median microseconds per call of the compiled "cpu"
backend and of the plain torch reference (softmax, full sort, cumulative sum). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from prunepath import ops

from .common import atomic_write_json, environment


def time_us(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        per.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(per)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="96,1536,14336")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_route_cpu.json"))
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for e in (int(v) for v in args.experts.split(",")):
        for t in (int(v) for v in args.tokens.split(",")):
            logits = [torch.randn(t, e, generator=gen) * 3 for _ in range(8)]
            it = iter(range(10**9))
            row = {"experts": e, "tokens": t}
            for backend in ("cpu", "torch"):
                row[f"{backend}_us"] = time_us(
                    lambda b=backend: ops.route(logits[next(it) % 8], 0.5, backend=b), args.repeats)
            rows.append(row)
            print(f"E {e:6d}  T {t:3d}   cpu {row['cpu_us']:9.1f} us   torch {row['torch_us']:9.1f} us", flush=True)
    atomic_write_json(args.out, {"environment": environment("cpu"), "args": vars(args) | {"out": str(args.out)}, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
