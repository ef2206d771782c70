"""GPU micro-benchmark of the routed FFN and routing for decoding (issue 7).

For each FFN shape (gated, W_gate/W_up/W_down), expert count E, tokens per step T and
sparsity s (each token keeps round((1-s)E) random experts; the union over the T tokens is
what the kernels must read), it times, eager and under CUDA graphs (medians):

* ``routed_ffn`` per GPU backend (triton, cuda; nn.Linear layout and prepacked W_down^T),
* the dense cuBLAS FFN (torch matmuls), and a pre-sliced dense FFN with the same number of
  neurons per token (the static-pruning ideal),
* routing: ``route`` from logits per backend and the fused ``router_route`` (x @ Wr^T ->
  softmax -> mask, on device),

and reports the effective bandwidth (bytes of live experts' weights / time) next to the
card's measured copy bandwidth. Weight copies are rotated so L2 never holds them.

    python -m bench.ops_gpu                 # full table (issue 7), JSON to runs/bench_ops_gpu.json
    python -m bench.ops_gpu --quick         # small subset
    python -m bench.ops_gpu --sweep         # also sweep Triton block configs (tuning aid)
    python -m bench.ops_gpu --profile       # also per-kernel device times (torch.profiler)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import sys
from pathlib import Path

import torch

from prunepath import ops

from .common import atomic_write_json, dense_ffn, make_copies, time_eager, time_graph

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------ timing


def copy_bandwidth_gbs():
    n = 1 << 28  # 1 GiB of fp32
    a = torch.empty(n, device="cuda").uniform_()
    b = torch.empty_like(a)
    ms = time_eager(lambda i: b.copy_(a), 1, reps=5, batches=7)
    del a, b
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------ inputs


def make_mask(t, e, sparsity, gen):
    k = max(1, round((1 - sparsity) * e))
    order = torch.rand(t, e, device="cuda", generator=gen).argsort(-1)
    mask = torch.zeros(t, e, dtype=torch.bool, device="cuda")
    mask.scatter_(1, order[:, :k], True)
    return mask, k


# ------------------------------------------------------------------------------- bench


def bench_case(copies, sliced, d, f, e, t, sparsity, dtype, backends, gen, graphs=True):
    ncopies = len(copies)
    x = torch.randn(t, d, device="cuda", generator=gen).to(dtype)
    mask, k = make_mask(t, e, sparsity, gen)
    union = int(mask.any(0).sum())
    elt = torch.finfo(dtype).bits // 8
    live_bytes = union * (f // e) * d * 3 * elt
    row = {"d": d, "F": f, "E": e, "T": t, "sparsity": sparsity, "experts_per_token": k,
           "union_experts": union, "union_density": union / e, "live_weight_bytes": live_bytes,
           "times_ms": {}}

    def timed(name, fn):
        try:
            eager = time_eager(fn, ncopies)
            graph = time_graph(fn, ncopies) if graphs else None
        except Exception as err:  # record and go on: one broken backend must not stop the table
            row.setdefault("errors", {})[name] = repr(err)[:300]
            return
        row["times_ms"][name] = {"eager": eager, "graph": graph}

    timed("dense", lambda i: dense_ffn(x, copies[i]["wg"], copies[i]["wu"], copies[i]["wd"]))
    if sliced is not None:
        timed("sliced", lambda i: dense_ffn(x, *sliced[i % len(sliced)]))
    for b in backends:
        timed(b, lambda i, b=b: ops.routed_ffn(x, copies[i]["wg"], copies[i]["wu"],
                                               copies[i]["wd"], mask, backend=b))
        timed(b + "_packed", lambda i, b=b: ops.routed_ffn_packed(
            x, copies[i]["wg"], copies[i]["wu"], copies[i]["wdt"], mask, backend=b))
    return row


def bench_route(d, e, t, dtype, backends, gen, rank=64):
    """Graph time of ``route`` from logits and of the fused ``router_route`` from x, with a
    linear router (Wr [E, d]) and a low-rank GELU router (W1 [rank, d] + b1, W2 [E, rank] +
    b2, as prunepath's trained routers); ``router_route_lowrank_<b>_eager`` is the eager time."""
    x = torch.randn(t, d, device="cuda", generator=gen).to(dtype)
    wr = (torch.randn(e, d, device="cuda", generator=gen) / d**0.5).to(dtype)
    w1 = (torch.randn(rank, d, device="cuda", generator=gen) / d**0.5).to(dtype)
    b1 = torch.randn(rank, device="cuda", generator=gen) * 0.1
    w2 = torch.randn(e, rank, device="cuda", generator=gen) / rank**0.5
    b2 = torch.randn(e, device="cuda", generator=gen) * 0.1
    logits = torch.randn(t, e, device="cuda", generator=gen)
    budget = torch.full((t,), 0.5, device="cuda")
    out = {}
    for b in backends + ["torch"]:
        try:
            out["route_" + b] = time_graph(lambda i, b=b: ops.route(logits, budget, backend=b), 1)
            out["router_route_" + b] = time_graph(
                lambda i, b=b: ops.router_route(x, wr, budget, backend=b), 1)
            low = lambda i, b=b: ops.router_route(  # noqa: E731
                x, w1, budget, b_router=b1, w_router_out=w2, b_router_out=b2,
                hidden_activation="gelu", backend=b)
            out["router_route_lowrank_" + b] = time_graph(low, 1)
            out["router_route_lowrank_" + b + "_eager"] = time_eager(low, 1)
        except Exception as err:
            out["error_" + b] = repr(err)[:300]
    return out


def sweep_triton(copies, d, f, e, t, sparsity, dtype, gen, packed=True, only=None):
    """Graph time of Triton block configs for one case (a tuning aid for launch.default_config):
    variants of the default, one field changed at a time (``only``: these names)."""
    import dataclasses

    from prunepath.triton_kernels import launch

    x = torch.randn(t, d, device="cuda", generator=gen).to(dtype)
    mask, _ = make_mask(t, e, sparsity, gen)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    default = launch.default_config(t, d, f, sms, False, f // e, linear_down=not packed,
                                     elem_bytes=copies[0]["wu"].element_size())
    variants = [("default", {}), ("chunks", {"compact": False}), ("compact", {"compact": True}),
                ("compact+up_n=64", {"compact": True, "up_block_n": 64}),
                ("compact+up_n=16", {"compact": True, "up_block_n": 16}),
                ("compact+dn_n=32", {"compact": True, "down_block_n": 32}),
                ("compact+dn_n=128", {"compact": True, "down_block_n": 128}),
                ("plain(no pdl/fold)", {"pdl": False, "fold_reduce": False}),
                ("pdl", {"pdl": True}), ("no_pdl", {"pdl": False}),
                ("fold", {"fold_reduce": True}), ("no_fold", {"fold_reduce": False}),
                ("pdl+fold", {"pdl": True, "fold_reduce": True}),
                ("pdl+dn_d=256", {"pdl": True, "down_block_d": 256}),
                ("up_fill=1", {"up_fill": 1.0})]
    for ks in (1, 4):
        variants.append((f"ks={ks}", {"ks": ks}))
    if t > 2:
        variants += [("dn_d=64", {"down_block_d": 64}), ("dn_d=256", {"down_block_d": 256}),
                     ("dn_n=32", {"down_block_n": 32}), ("dn_n=128", {"down_block_n": 128})]
    for s_ in (4, 8, 16, 32):
        variants.append((f"s={s_}", {"s": s_}))
    if t <= 2:  # the up phase's tiles and occupancy, the down phase's tiles
        variants += [("up_n=16", {"up_block_n": 16}), ("up_n=64", {"up_block_n": 64}),
                     ("up_k=64", {"up_block_k": 64}), ("up_k=256", {"up_block_k": 256}),
                     ("stages=2", {"num_stages": 2}), ("stages=4", {"num_stages": 4}),
                     ("stages=5", {"num_stages": 5}), ("warps=2", {"num_warps": 2}),
                     ("warps=8", {"num_warps": 8}), ("up_progs=2/SM", {"up_programs": 2 * sms}),
                     ("up_progs=8/SM", {"up_programs": 8 * sms}),
                     ("up_fill=0.5", {"up_fill": 0.5}), ("up_fill=1.5", {"up_fill": 1.5}),
                     ("up_fill=2", {"up_fill": 2.0}), ("up_fill=3", {"up_fill": 3.0}),
                     ("up_fill=4", {"up_fill": 4.0}), ("ks=2", {"ks": 2}),
                     ("up_progs=1/SM", {"up_programs": sms}),
                     ("up_n=16,up_fill=2", {"up_block_n": 16, "up_fill": 2.0}),
                     ("dn_n=32", {"down_block_n": 32}),
                     ("dn_n=128", {"down_block_n": 128}), ("dn_d=64", {"down_block_d": 64}),
                     ("dn_d=256", {"down_block_d": 256}),
                     ("up_n=16,stages=4", {"up_block_n": 16, "num_stages": 4}),
                     ("up_n=16,up_fill=1.5", {"up_block_n": 16, "up_fill": 1.5}),
                     ("up_k=256,stages=4", {"up_block_k": 256, "num_stages": 4}),
                     ("up_n=16,up_k=256", {"up_block_n": 16, "up_block_k": 256}),
                     # few or no splits of F in the down phase (s<S>_d<down_block_d>_n<down_
                     # block_n>): with s1 each program owns a narrow d-slab of every live row
                     # and writes the output itself (no fp32 partials, no fold)
                     ("s1_d32_n128", {"s": 1, "down_block_d": 32, "down_block_n": 128}),
                     ("s1_d32_n256", {"s": 1, "down_block_d": 32, "down_block_n": 256}),
                     ("s1_d16_n256", {"s": 1, "down_block_d": 16, "down_block_n": 256}),
                     ("s1_d16_n128", {"s": 1, "down_block_d": 16, "down_block_n": 128}),
                     ("s2_d32_n128", {"s": 2, "down_block_d": 32, "down_block_n": 128}),
                     ("s2_d64_n128", {"s": 2, "down_block_d": 64, "down_block_n": 128}),
                     ("s4_d64", {"s": 4, "down_block_d": 64})]
    if t > 16:
        variants.append(("stages=4", {"num_stages": 4}))
        variants.append(("up_n=32", {"up_block_n": 32}))
        variants.append(("stages=2", {"num_stages": 2}))
        variants.append(("up_progs=1/SM", {"up_programs": sms // -(-t // default.block_t)}))
    res = []
    for name, change in variants:
        if only is not None and name not in only:
            continue
        cfg = dataclasses.replace(default, **change)

        def fn(i, cfg=cfg):
            c = copies[i]
            wdt = c["wdt"] if packed else c["wd"].t()
            return launch.routed_ffn(x, c["wg"], c["wu"], wdt, mask, "silu", None, None,
                                     config=cfg)
        try:
            ms = time_graph(fn, len(copies), batches=5)
        except Exception as err:
            ms = repr(err)[:200]
        res.append({"name": name, "cfg": dataclasses.asdict(cfg), "packed": packed, "ms": ms})
    return res


def profile_kernels(copies, d, f, e, t, sparsity, dtype, backends, gen):
    """Per-kernel device time (torch.profiler, eager launches, weights rotated) in us."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(t, d, device="cuda", generator=gen).to(dtype)
    mask, _ = make_mask(t, e, sparsity, gen)
    out = {}
    for b in backends:
        for packed in (False, True):
            def fn(i):
                c = copies[i % len(copies)]
                if packed:
                    return ops.routed_ffn_packed(x, c["wg"], c["wu"], c["wdt"], mask, backend=b)
                return ops.routed_ffn(x, c["wg"], c["wu"], c["wd"], mask, backend=b)
            try:
                for i in range(3):
                    fn(i)
                torch.cuda.synchronize()
                n = 2 * len(copies)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for i in range(n):
                        fn(i)
                    torch.cuda.synchronize()
                out[b + ("_packed" if packed else "")] = kernel_times(prof, n)
            except Exception as err:
                out[b + ("_packed" if packed else "")] = repr(err)[:200]
    return out


def kernel_times(prof, n: int) -> dict:
    """Device time (us) per call of every kernel that ran at least ``n`` times in ``prof``."""
    ker = {}
    for ev in prof.key_averages():
        tot = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
        if tot > 0 and ev.count >= n:
            ker[ev.key[:60]] = round(tot / n, 2)
    return ker


def profile_router(d, e, dtype, gen, rank=64, n=20):
    """Per-kernel device time (us) of the fused low-rank router_route at T = 1 (eager)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, d, device="cuda", generator=gen).to(dtype)
    w1 = (torch.randn(rank, d, device="cuda", generator=gen) / d**0.5).to(dtype)
    w2 = torch.randn(e, rank, device="cuda", generator=gen) / rank**0.5
    budget = torch.full((1,), 0.5, device="cuda")

    def fn():
        return ops.router_route(x, w1, budget, w_router_out=w2, hidden_activation="gelu",
                                backend="triton")
    try:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        return kernel_times(prof, n)
    except Exception as err:
        return repr(err)[:200]


def fmt(v, w=7):
    return f"{v:{w}.3f}" if isinstance(v, float) else f"{'-':>{w}}"


def print_table(rows, copy_bw, backends):
    names = ["dense", "sliced"] + [n for b in backends for n in (b, b + "_packed")]
    head = (f"{'shape':>11} {'E':>4} {'T':>3} {'sp':>4} {'union':>5} | "
            + " | ".join(f"{n:>15}" for n in names)
            + f" | {'best':>13} {'x dense':>7} {'eff GB/s':>8} {'%copy':>5}")
    print(f"\nroutine ms, eager/graph (median); copy bandwidth {copy_bw:.0f} GB/s")
    print(head)
    print("-" * len(head))
    for r in rows:
        tm = r["times_ms"]
        cells = []
        for n in names:
            v = tm.get(n)
            cells.append(f"{fmt(v['eager'])}/{fmt(v['graph'])}" if v else f"{'-':>15}")
        routed = {n: tm[n]["graph"] for n in names[2:] if n in tm and tm[n]["graph"]}
        best = min(routed, key=routed.get) if routed else None
        dense = tm.get("dense", {}).get("graph")
        bw = r["live_weight_bytes"] / (routed[best] * 1e-3) / 1e9 if best else None
        print(f"{r['d']:>5}x{r['F']:<5} {r['E']:>4} {r['T']:>3} {r['sparsity']:>4.2f} "
              f"{r['union_density']:>5.2f} | " + " | ".join(cells)
              + f" | {best or '-':>13} "
              + (f"{dense / routed[best]:>7.2f} {bw:>8.0f} {100 * bw / copy_bw:>5.0f}" if best
                 else ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small subset")
    ap.add_argument("--sweep", action="store_true", help="also sweep Triton block configs")
    ap.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp16")
    ap.add_argument("--json", default="runs/bench_ops_gpu.json")
    ap.add_argument("--backends", default=None, help="comma list (default: available GPU ones)")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="per-kernel device times (torch.profiler) of --profile-cases, every shape and E")
    ap.add_argument("--profile-cases", default="1:0.0,1:0.5,1:0.7,1:0.9,16:0.9",
                    help="T:sparsity cases of --profile")
    ap.add_argument("--no-route", action="store_true", help="skip the routing timings")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x11008,8192x28672")
    ap.add_argument("--experts", default=None, help="e.g. 64,128")
    ap.add_argument("--tokens", default=None, help="e.g. 1,4,16,64")
    ap.add_argument("--sparsities", default=None, help="e.g. 0,0.5,0.7,0.9")
    ap.add_argument("--sweep-cases", default="1:0.9,1:0.7,1:0.5,1:0.0,4:0.9,64:0.0",
                    help="T:sparsity cases of --sweep (every shape and E of the run)")
    ap.add_argument("--sweep-variants", default=None,
                    help="comma list of sweep variant names (default: all)")
    ap.add_argument("--sweep-layouts", default="packed",
                    help="W_down layouts of --sweep: packed, linear or both (comma list)")
    ap.add_argument("--sweep-only", action="store_true",
                    help="with --sweep: skip the table rows and routing timings")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = False
    backends = (args.backends.split(",") if args.backends else
                [b for b in ("triton", "cuda") if b in ops.available_backends("cuda")])
    shapes = [(4096, 11008), (4096, 14336), (8192, 28672)]
    experts, tokens, sparsities = [64, 128], [1, 4, 16, 64], [0.0, 0.5, 0.7, 0.9]
    if args.quick:
        shapes, experts, tokens, sparsities = [(4096, 11008)], [64], [1, 16], [0.0, 0.5, 0.9]
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    if args.experts:
        experts = [int(v) for v in args.experts.split(",")]
    if args.tokens:
        tokens = [int(v) for v in args.tokens.split(",")]
    if args.sparsities:
        sparsities = [float(v) for v in args.sparsities.split(",")]
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_bw = copy_bandwidth_gbs()
    meta = {"device": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
            "l2_bytes": l2, "torch": torch.__version__, "date": str(datetime.date.today()),
            "copy_bandwidth_GBps": copy_bw, "command": " ".join(["python -m bench.ops_gpu"] +
                                                                 (argv or sys.argv[1:]))}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(meta))
    rows, routes, sweeps, profiles = [], [], [], []

    def save():
        result = {"meta": meta, "rows": rows, "route": routes, "sweep": sweeps,
                  "profile": profiles}
        atomic_write_json(Path(args.json), result)

    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for (d, f) in shapes:
            full = 3 * d * f * 2
            ncopies = max(2, min(16, math.ceil(3 * l2 / (0.1 * full))))
            copies = make_copies(d, f, dtype, ncopies, gen)
            for e in experts:
                for s in ([] if args.sweep_only else sparsities):
                    k = max(1, round((1 - s) * e))
                    fs = k * (f // e)
                    sliced = [(c["wg"][:fs], c["wu"][:fs], c["wd"][:, :fs].contiguous())
                              for c in copies]
                    for t in ([] if args.sweep_only else tokens):
                        r = bench_case(copies, sliced, d, f, e, t, s, dtype, backends, gen,
                                       graphs=not args.no_graphs)
                        r["dtype"] = dname
                        rows.append(r)
                        print(json.dumps(r), flush=True)
                    del sliced
                for t in ([] if args.no_route or args.sweep_only else tokens):
                    rr = bench_route(d, e, t, dtype, backends, gen)
                    rr.update({"d": d, "E": e, "T": t, "dtype": dname})
                    routes.append(rr)
                    print(json.dumps(rr), flush=True)
                if args.sweep:
                    cases = [(int(c.split(":")[0]), float(c.split(":")[1]))
                             for c in args.sweep_cases.split(",")]
                    only = args.sweep_variants.split(",") if args.sweep_variants else None
                    for (t, sp), layout in itertools.product(cases, args.sweep_layouts.split(",")):
                        sw = sweep_triton(copies, d, f, e, t, sp, dtype, gen,
                                          packed=layout == "packed", only=only)
                        sweeps.append({"d": d, "F": f, "E": e, "T": t, "sparsity": sp,
                                       "dtype": dname, "layout": layout, "results": sw})
                        save()
                        ok = [x for x in sw if isinstance(x["ms"], float)]
                        b = min(ok, key=lambda x: x["ms"]) if ok else None
                        print(f"sweep {d}x{f} E={e} T={t} s={sp} {layout}: " + " ".join(
                            f"{x['name']}={1e3 * x['ms']:.1f}" if isinstance(x["ms"], float)
                            else f"{x['name']}=ERR" for x in sw)
                            + f" | best {b['name'] if b else None}", flush=True)
                if args.profile:
                    rp = profile_router(d, e, dtype, gen)
                    profiles.append({"d": d, "E": e, "T": 1, "router_route_lowrank_kernels_us": rp})
                    print(json.dumps(profiles[-1]), flush=True)
                    for t, sp in [(int(c.split(":")[0]), float(c.split(":")[1]))
                                  for c in args.profile_cases.split(",")]:
                        pr = profile_kernels(copies, d, f, e, t, sp, dtype, backends, gen)
                        profiles.append({"d": d, "F": f, "E": e, "T": t, "sparsity": sp,
                                         "dtype": dname, "kernels_us": pr})
                        print(json.dumps(profiles[-1]), flush=True)
            del copies
            torch.cuda.empty_cache()
            save()  # after every shape: a run cut short keeps what it measured
    save()
    print_table(rows, copy_bw, backends)
    print("\nrouting ms (CUDA graph): route from logits / fused router_route from x")
    for rr in routes:
        cells = " ".join(f"{k}={fmt(v, 6)}" for k, v in rr.items() if k.startswith("route"))
        print(f"d={rr['d']} E={rr['E']} T={rr['T']} {rr['dtype']}: {cells}")


if __name__ == "__main__":
    main()
