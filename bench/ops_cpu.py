"""CPU micro-benchmark of the routed FFN: prunepath's compiled "cpu" backend vs dense torch.

    python -m bench.ops_cpu [--repeats 60] [--out runs/bench_ops_cpu.json]
                            [--dtypes fp32,bf16] [--sparsities 0,0.5,0.7,0.9] [--batch 1]

For each dtype and FFN sparsity s (gated SiLU FFN, d=2048, F=8192, E=64 experts of 128
neurons), each repeat draws a fresh mask with exactly round((1 - s) * E) active experts per
token, then times, in alternating order,
  * dense:  F.silu(x @ Wg.T) * (x @ Wu.T) @ Wd.T      (plain torch matmuls, all experts)
  * cpu:    prunepath.ops.routed_ffn(..., backend="cpu")  (reads only the active experts)
  * cpu_packed (--packed): prunepath.ops.routed_ffn_packed(..., backend="cpu") on W_down^T
    [F, d] (each active expert's down block is contiguous rows, not d short segments)
Weights are random normal (never zero) and each call uses the next of --copies weight sets
(the dense and cpu calls of a repeat never share one), so no call finds its weights in cache:
one fp32 set is 201 MB (bf16: 101 MB), already far over a 32 MB L3; by default enough sets
are made that at least twice the L3 (lscpu) is read between two uses of one set. Times are
medians over --repeats, with p10/p90 and the minimum beside them (the minimum is the closest
to an unloaded machine when other jobs share this one). torch's thread count is left at its
default unless --threads.
Prints a table and writes JSON (machine, date, load average, every timing).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from prunepath import ops

from .common import atomic_write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_SPEEDUP_AT_HALF = 1.6  # cpu vs dense at 50 % sparsity, batch 1
TARGET_MAX_SLOWDOWN_DENSE = 1.10  # cpu at most 10 % slower than dense at sparsity 0


def lscpu() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def l3_bytes(text: str | None) -> int:
    """'32 MiB (1 instance)' -> bytes (0 if unknown)."""
    try:
        num, unit = text.split()[:2]
        return int(float(num) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit])
    except (AttributeError, ValueError, KeyError):
        return 0


def default_copies(set_bytes: int, l3: int) -> int:
    """Enough weight sets that between two uses of one, at least 2x the L3 is read."""
    return max(3, -(-2 * l3 // set_bytes) + 1)


def machine_info(threads: int) -> dict:
    cpu = lscpu()
    flags = cpu.get("Flags", "").split()
    return {
        "cpu": cpu.get("Model name", platform.processor()),
        "cores": os.cpu_count(),
        "sockets": cpu.get("Socket(s)"),
        "l3": cpu.get("L3 cache"),
        "isa": [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16")
                if f in flags],
        "torch": torch.__version__,
        "torch_threads": threads,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_before": os.getloadavg(),
    }


def make_weights(d, f, dtype, copies, gen):
    """`copies` independent (w_gate, w_up, w_down) sets, random normal at nn.Linear-like scale."""
    sets = []
    for _ in range(copies):
        wg = (torch.randn(f, d, generator=gen) / d**0.5).to(dtype)
        wu = (torch.randn(f, d, generator=gen) / d**0.5).to(dtype)
        wd = (torch.randn(d, f, generator=gen) / f**0.5).to(dtype)
        sets.append((wg, wu, wd))
    return sets


def random_mask(t, e, active, gen):
    """[t, e] bool with exactly `active` experts per token, chosen uniformly at random."""
    scores = torch.rand(t, e, generator=gen)
    idx = scores.argsort(dim=-1)[:, :active]
    return torch.zeros(t, e, dtype=torch.bool).scatter_(1, idx, True)


def dense_ffn(x, wg, wu, wd):
    return F.silu(x @ wg.T) * (x @ wu.T) @ wd.T


def summarize(times_s):
    ms = sorted(t * 1e3 for t in times_s)
    q = statistics.quantiles(ms, n=10)
    return {"median_ms": statistics.median(ms), "p10_ms": q[0], "p90_ms": q[-1], "min_ms": ms[0]}


def bench_case(dtype, sparsity, args, weights, gen):
    e, t = args.experts, args.batch
    active = round((1 - sparsity) * e)
    x = torch.randn(t, args.d, generator=gen).to(dtype)
    copies = len(weights)
    calls = {
        "dense": lambda w, m: dense_ffn(x, *w[:3]),
        "cpu": lambda w, m: ops.routed_ffn(x, *w[:3], m, backend="cpu"),
    }
    if args.packed:  # w[3] = W_down^T [F, d], contiguous
        calls["cpu_packed"] = lambda w, m: ops.routed_ffn_packed(x, w[0], w[1], w[3], m,
                                                                 backend="cpu")
    # correctness guard: the cpu result equals the masked dense FFN (not only fast)
    m0 = random_mask(t, e, active, gen)
    ref = ops.routed_ffn(x.float(), *(w.float() for w in weights[0][:3]), m0, backend="torch")
    errs = {n: float((calls[n](weights[0], m0).float() - ref).norm() / ref.norm().clamp_min(1e-30))
            for n in calls if n != "dense"}
    err = errs["cpu"]
    for name in calls:  # warm-up
        for i in range(2):
            calls[name](weights[i % copies], m0)
    times = {name: [] for name in calls}
    slot = 0
    for r in range(args.repeats):
        mask = random_mask(t, e, active, gen)
        order = list(calls) if r % 2 == 0 else list(reversed(calls))
        for name in order:
            w = weights[slot % copies]
            slot += 1
            t0 = time.perf_counter()
            calls[name](w, mask)
            times[name].append(time.perf_counter() - t0)
    stats = {name: summarize(v) for name, v in times.items()}
    esize = torch.finfo(dtype).bits // 8
    dense_bytes = 3 * args.d * args.f * esize
    cpu_bytes = dense_bytes * active / e  # batch 1: only the active experts' weights
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "sparsity": sparsity,
        "active_experts": active,
        "experts": e,
        "batch": t,
        "dense": stats["dense"],
        "cpu": stats["cpu"],
        "speedup": stats["dense"]["median_ms"] / stats["cpu"]["median_ms"],
        "dense_GBps": dense_bytes / stats["dense"]["median_ms"] / 1e6,
        "cpu_GBps": cpu_bytes / stats["cpu"]["median_ms"] / 1e6 if t == 1 else None,
        "cpu_rel_err_vs_fp32_reference": err,
        **({"cpu_packed": stats["cpu_packed"],
            "speedup_packed": stats["dense"]["median_ms"] / stats["cpu_packed"]["median_ms"],
            "cpu_packed_GBps": (cpu_bytes / stats["cpu_packed"]["median_ms"] / 1e6
                                if t == 1 else None),
            "cpu_packed_rel_err_vs_fp32_reference": errs["cpu_packed"]}
           if "cpu_packed" in stats else {}),
        "times_ms": {k: [round(s * 1e3, 4) for s in v] for k, v in times.items()},
    }


def print_table(info, rows):
    print(f"\n{info['cpu']}, {info['cores']} cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), {info['date']}, "
          f"load average {info['loadavg_before'][0]:.2f} -> {info['loadavg_after'][0]:.2f}")
    head = (f"{'dtype':8} {'sparsity':>8} {'experts':7} {'dense ms (p10-p90)':>22} "
            f"{'cpu ms (p10-p90)':>22} {'speedup':>8} {'dense GB/s':>10} {'cpu GB/s':>9} "
            f"{'min: dense':>10} {'cpu':>6} {'speedup':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        dn, cp = r["dense"], r["cpu"]
        gbps = f"{r['cpu_GBps']:9.1f}" if r["cpu_GBps"] is not None else f"{'-':>9}"
        print(f"{r['dtype']:8} {r['sparsity']:8.2f} {r['active_experts']:3d}/{r['experts']:<3d}"
              f"{dn['median_ms']:9.2f} ({dn['p10_ms']:5.2f}-{dn['p90_ms']:6.2f}) "
              f"{cp['median_ms']:9.2f} ({cp['p10_ms']:5.2f}-{cp['p90_ms']:6.2f}) "
              f"{r['speedup']:7.2f}x {r['dense_GBps']:10.1f} {gbps} "
              f"{dn['min_ms']:10.2f} {cp['min_ms']:6.2f} {dn['min_ms'] / cp['min_ms']:6.2f}x")
        if "cpu_packed" in r:
            pk = r["cpu_packed"]
            gb = f"{r['cpu_packed_GBps']:9.1f}" if r["cpu_packed_GBps"] is not None else f"{'-':>9}"
            print(f"{'  packed':8} {'':8} {'':7}{'':24} {pk['median_ms']:9.2f} "
                  f"({pk['p10_ms']:5.2f}-{pk['p90_ms']:6.2f}) {r['speedup_packed']:7.2f}x "
                  f"{'':10} {gb} {'':10} {pk['min_ms']:6.2f} {dn['min_ms'] / pk['min_ms']:6.2f}x")


def check_targets(rows):
    verdicts = []
    for r in rows:
        if r["batch"] != 1:
            continue
        if r["sparsity"] == 0.5:
            ok = r["speedup"] >= TARGET_SPEEDUP_AT_HALF
            verdicts.append(f"{r['dtype']} s=0.5: {r['speedup']:.2f}x >= {TARGET_SPEEDUP_AT_HALF}x "
                            f"{'PASS' if ok else 'FAIL'}")
        if r["sparsity"] == 0:
            ok = r["speedup"] >= 1 / TARGET_MAX_SLOWDOWN_DENSE
            verdicts.append(f"{r['dtype']} s=0: cpu/dense time {1 / r['speedup']:.2f} <= "
                            f"{TARGET_MAX_SLOWDOWN_DENSE} {'PASS' if ok else 'FAIL'}")
    return verdicts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench_ops_cpu.json"))
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {sorted(DTYPES)}")
    p.add_argument("--sparsities", default="0,0.5,0.7,0.9")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--f", type=int, default=8192)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--copies", type=int, default=None,
                   help="weight sets rotated through (>= 2; default: enough that 2x the L3 is "
                        "read between two uses of one set, at least 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--packed", action="store_true",
                   help="also time routed_ffn_packed (W_down^T [F, d]) on the cpu backend")
    args = p.parse_args(argv)
    if args.copies is not None and args.copies < 2:
        p.error("--copies must be >= 2 so that no call finds its weights in cache")
    if args.repeats < 5:
        p.error("--repeats must be >= 5")
    if args.f % args.experts:
        p.error("--f must be divisible by --experts")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if "cpu" not in ops.available_backends("cpu"):
        raise SystemExit("the 'cpu' backend is not built: pip install --no-build-isolation -e .")
    info = machine_info(torch.get_num_threads())
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        set_bytes = 3 * args.d * args.f * (torch.finfo(dtype).bits // 8)
        copies = args.copies or default_copies(set_bytes, l3_bytes(info["l3"]))
        info.setdefault("copies", {})[name] = copies
        weights = make_weights(args.d, args.f, dtype, copies, gen)
        if args.packed:  # + W_down^T per set (the packed layout's copy of W_down)
            weights = [(wg, wu, wd, wd.t().contiguous()) for wg, wu, wd in weights]
        for s in (float(v) for v in args.sparsities.split(",")):
            rows.append(bench_case(dtype, s, args, weights, gen))
            r = rows[-1]
            print(f"  {r['dtype']} s={s:.2f}: dense {r['dense']['median_ms']:.2f} ms, "
                  f"cpu {r['cpu']['median_ms']:.2f} ms ({r['speedup']:.2f}x)"
                  + (f", packed {r['cpu_packed']['median_ms']:.2f} ms ({r['speedup_packed']:.2f}x)"
                     if "cpu_packed" in r else ""), flush=True)
        del weights
    info["loadavg_after"] = os.getloadavg()
    print_table(info, rows)
    verdicts = check_targets(rows)
    for v in verdicts:
        print(v)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    atomic_write_json(args.out, {"machine": info, "config": config, "results": rows, "targets": verdicts})
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
