"""GPU benchmark of a decode step's dense projections: ``prunepath.ops.linear`` (Triton) vs
``torch.nn.functional.linear`` (cuBLAS), per shape and token count, under CUDA graphs.

Shapes are a Llama-3-8B / Llama-2-7B layer's projections (q/o, k/v, q+k+v fused, gate/up,
down, lm_head). Each timing is one CUDA graph of back-to-back calls cycling enough weight
copies (>= 256 MB) that L2 never holds them; the median of 7 replays. ``--sweep`` also times
every tile config in ``--configs`` and reports the fastest. ``--chain`` times 32 layers of
q, k, v, o (and fused qkv, o) in one graph with a small elementwise kernel between products,
as a decode step runs them, for each implementation.

    python bench/linear_gpu.py --json bench/results/linear_gpu.json [--sweep] [--chain]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ops_gpu import copy_bandwidth_gbs, time_graph  # noqa: E402

from prunepath.triton_kernels import launch  # noqa: E402

SHAPES = {  # name: (N, K)
    "q/o 4096": (4096, 4096),
    "k/v 1024": (1024, 4096),
    "qkv 6144": (6144, 4096),
    "qkv 12288 (L2-7B)": (12288, 4096),
    "gate 14336": (14336, 4096),
    "down 4096x14336": (4096, 14336),
    "lm_head 128256": (128256, 4096),
}
ROTATE_BYTES = 256 << 20


def _configs(spec: str):
    out = []
    for bn, bk, dot, warps, stages, pdl in itertools.product(
            (16, 32, 64), (128, 256, 512), (True, False), (4, 8), (3, 4), (True,)):
        out.append(launch.LinearConfig(bn, bk, dot, warps, stages, pdl))
    if spec == "small":
        out = [c for c in out if c.num_warps == 4 and c.num_stages in (3, 4)]
    return out


def bench_shape(n, k, t, dtype, configs):
    elem = torch.finfo(dtype).bits // 8
    copies = max(2, math.ceil(ROTATE_BYTES / (n * k * elem)))
    gen = torch.Generator(device="cuda").manual_seed(n * 7 + k + t)
    ws = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) / k**0.5
          for _ in range(copies)]
    x = torch.randn(t, k, device="cuda", dtype=dtype, generator=gen)
    ref = F.linear(x.double(), ws[0].double())
    res = {"torch": time_graph(lambda i: F.linear(x, ws[i]), copies)}
    y = launch.linear(x, ws[0], None)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    res["triton_default"] = time_graph(lambda i: launch.linear(x, ws[i], None), copies)
    best = None
    for cfg in configs:
        if not cfg.use_dot and t > 1:
            continue
        try:
            ms = time_graph(lambda i: launch.linear(x, ws[i], None, config=cfg), copies)
        except Exception as exc:  # e.g. out of shared memory
            print(f"   {cfg}: {exc!r}"[:200])
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    del ws
    torch.cuda.empty_cache()
    return res, best, err


def bench_chain(dtype, layers=32, t=1):
    """32 layers of (q, k, v | qkv) -> elementwise -> o -> elementwise, one graph."""
    d, kv = 4096, 1024
    gen = torch.Generator(device="cuda").manual_seed(1)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=gen) / s[-1] ** 0.5  # noqa: E731
    qkv = [r(d + 2 * kv, d) for _ in range(layers)]
    wo = [r(d, d) for _ in range(layers)]
    x = torch.randn(t, d, device="cuda", dtype=dtype, generator=gen)
    impls = {
        "torch": F.linear,
        "triton": lambda a, w: launch.linear(a, w, None),
        "triton_nopdl": lambda a, w: launch.linear(
            a, w, None, config=dataclasses.replace(
                launch.default_linear_config(t, w.shape[0], w.shape[1], 132, False), pdl=False)),
    }
    out = {}
    for name, lin in impls.items():
        for fused in (False, True):
            def step(_i, lin=lin, fused=fused):
                h = x
                for i in range(layers):
                    w = qkv[i]
                    if fused:
                        y = lin(h, w)
                        q = y[:, :d]
                    else:
                        q = lin(h, w[:d])
                        lin(h, w[d:d + kv])
                        lin(h, w[d + kv:])
                    h = lin(q * 0.5, wo[i]) + h
                return h
            out[f"{name}{'_fused' if fused else ''}"] = 1e3 * time_graph(step, 1, reps=1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,2,4,8")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--configs", default="small", choices=("small", "all"))
    ap.add_argument("--chain", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    copy_bw = copy_bandwidth_gbs()
    configs = _configs(args.configs) if args.sweep else []
    rows = []
    print(f"# {torch.cuda.get_device_name()}  copy {copy_bw:.0f} GB/s  {args.dtype}")
    print(f"{'shape':<20} {'T':>2} {'torch us':>9} {'triton us':>9} {'best us':>8} "
          f"{'x torch':>7} {'GB/s':>6} {'rel err':>8}  best config")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        for t in map(int, args.tokens.split(",")):
            t0 = time.perf_counter()
            res, best, err = bench_shape(n, k, t, dtype, configs)
            fastest = min([res["triton_default"]] + ([best[0]] if best else []))
            gbs = n * k * 2 / (fastest * 1e-3) / 1e9
            row = {"shape": name, "n": n, "k": k, "t": t, "torch_us": 1e3 * res["torch"],
                   "triton_default_us": 1e3 * res["triton_default"],
                   "best_us": 1e3 * best[0] if best else None,
                   "best_config": dataclasses.asdict(best[1]) if best else None,
                   "GBps": gbs, "rel_err": err}
            rows.append(row)
            print(f"{name:<20} {t:>2} {row['torch_us']:>9.1f} {row['triton_default_us']:>9.1f} "
                  f"{row['best_us'] or float('nan'):>8.1f} {res['torch'] / fastest:>7.2f} "
                  f"{gbs:>6.0f} {err:>8.1e}  {best[1] if best else ''}"
                  f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    chain = None
    if args.chain:
        chain = {str(t): bench_chain(dtype, t=t) for t in (1, 4)}
        for t, c in chain.items():
            print(f"chain T={t} (32 layers q,k,v,o; us): " +
                  "  ".join(f"{k}={v:.0f}" for k, v in c.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "copy_bandwidth_GBps": copy_bw,
            "torch": torch.__version__, "dtype": args.dtype, "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["python bench/linear_gpu.py"] + sys.argv[1:]),
            "rows": rows, "chain_us": chain}, indent=1))


if __name__ == "__main__":
    main()
