"""Where a routed decode step's FFN time goes when the union of the batch's experts is
(nearly) every expert (issue 6: "auto must never be slower than dense").

One FFN layer (gated, bf16), T tokens, a low-rank GELU router (rank 64, as PrunePath's
trained routers) at budget ``--budget``, times under CUDA graphs (medians, weights rotated
over copies larger than L2; bench.common's timers):

* ``dense``: the dense cuBLAS FFN (``silu(x Wg^T) * (x Wu^T)``, then ``W_down``), no routing;
* ``router``: the fused router alone (``ops.router_route``);
* ``masked_act_only``: :func:`prunepath.ops.masked_dense_ffn` on a precomputed mask (the
  masked activation instead of silu and the product);
* ``masked_serial``: routing, then the masked-dense FFN (one stream);
* ``masked_overlap``: the same with the routing on a side stream beside the up projections
  (what ``Decoder(ffn_path="dense")`` runs);
* ``sparse_triton``: routing, then ``ops.routed_ffn(backend="triton")`` on the same masks;
* ``dense_fused_act``: ``dense`` with SiLU and the product as one kernel (torch.compile'd, as
  inductor runs it in a compiled step);
* ``dense_stacked``: that with ``W_gate`` and ``W_up`` as rows of one storage (one GEMM);
* ``router_masked``: :func:`prunepath.ops.router_masked_dense_ffn` (the router's projection
  as a third up GEMM, the routing inside the masked-activation kernel);
* ``gemm_up`` / ``gemm_up_router`` / ``silu_mul`` / ``routed_act``: the pieces of the two
  stacked paths alone (the routed activation kernel on the GEMM's output);
* ``router_masked_stacked``: the same with ``W_gate``, ``W_up`` and the router's first layer
  as rows of one storage: one GEMM for all three (what ``prunepath.decode.stacked_ffn`` lays out).

    python -m bench.masked_dense_gpu --out bench/results/masked_dense_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from prunepath import ops, triton_kernels

from .common import atomic_write_json, dense_ffn, make_copies, time_graph


def case(copies, d, f, e, t, budget, gen, rank=64):
    n = len(copies)
    x = torch.randn(t, d, device="cuda", generator=gen).to(torch.bfloat16)
    w1 = (torch.randn(rank, d, device="cuda", generator=gen) / d**0.5).to(torch.bfloat16)
    b1 = torch.randn(rank, device="cuda", generator=gen) * 0.1
    w2 = torch.randn(e, rank, device="cuda", generator=gen) / rank**0.5
    b2 = torch.randn(e, device="cuda", generator=gen) * 0.1
    b = torch.tensor([budget], device="cuda").expand(t)  # one budget, as a layer passes it
    side = torch.cuda.Stream()

    def route():
        return ops.router_route(x, w1, b, b_router=b1, w_router_out=w2, b_router_out=b2,
                                hidden_activation="gelu", backend="triton")

    mask = route()
    union = float(mask.any(0).float().mean())
    k = float(mask.sum(1).float().mean())

    for c in copies:  # [W_gate; W_up; W_router] as rows of one storage
        c["joint"] = torch.cat([c["wg"], c["wu"], w1])
    silu_mul = torch.compile(lambda g, u: F.silu(g) * u)

    def rmd(i, stack):
        c = copies[i]
        wg, wu, wr = c["joint"].split([f, f, rank]) if stack else (c["wg"], c["wu"], w1)
        return ops.router_masked_dense_ffn(x, wg, wu, c["wd"], wr, b, b_router=b1,
                                           w_router_out=w2, b_router_out=b2,
                                           hidden_activation="gelu")[0]

    def dense_stacked(i):
        c = copies[i]
        g, u = F.linear(x, c["joint"][: 2 * f]).split([f, f], dim=1)
        return F.linear(silu_mul(g, u), c["wd"])

    def md(i, m, stream=None):
        c = copies[i]
        return ops.masked_dense_ffn(x, c["wg"], c["wu"], c["wd"], m, stream=stream)[0]

    fns = {
        "dense": lambda i: dense_ffn(x, copies[i]["wg"], copies[i]["wu"], copies[i]["wd"]),
        "router": lambda i: route(),
        "masked_act_only": lambda i: md(i, mask),
        "masked_serial": lambda i: md(i, route),
        "masked_overlap": lambda i: md(i, route, side),
        "sparse_triton": lambda i: ops.routed_ffn(x, copies[i]["wg"], copies[i]["wu"],
                                                  copies[i]["wd"], route(), backend="triton"),
        "dense_fused_act": lambda i: F.linear(silu_mul(F.linear(x, copies[i]["wg"]),
                                                       F.linear(x, copies[i]["wu"])), copies[i]["wd"]),
        "dense_stacked": dense_stacked,
        "router_masked": lambda i: rmd(i, False),
        "router_masked_stacked": lambda i: rmd(i, True),
        # the pieces: the stacked up GEMM without / with the router rows, the activations
        "gemm_up": lambda i: F.linear(x, copies[i]["joint"][: 2 * f]),
        "gemm_up_router": lambda i: F.linear(x, copies[i]["joint"]),
        "silu_mul": lambda i: silu_mul(gu[:, :f], gu[:, f:2 * f]),
        "routed_act": lambda i: triton_kernels.routed_act(gu[:, :f], gu[:, f:2 * f], gu[:, 2 * f:], b1, w2,
                                                          b2, "gelu", b, 1, e, "silu"),
    }
    gu = F.linear(x, copies[0]["joint"])
    ym = rmd(0, True)  # the same FFN (masks equal up to rounding at the budget)
    yr = ops.masked_dense_ffn(x, copies[0]["wg"], copies[0]["wu"], copies[0]["wd"], route)[0]
    rel = float((ym.float() - yr.float()).norm() / yr.float().norm())
    row = {"d": d, "f": f, "e": e, "t": t, "budget": budget, "union": union, "experts_per_token": k,
           "router_masked_vs_masked_rel": rel}
    for name, fn in fns.items():
        row[name + "_us"] = time_graph(fn, n) * 1e3
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096x14336")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--tokens", default="1,4,8")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--copies", type=int, default=4, help="weight copies rotated (each 3 d F bf16)")
    p.add_argument("--out", default="bench/results/masked_dense_gpu.json")
    a = p.parse_args(argv)
    d, f = (int(v) for v in a.shape.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    copies = make_copies(d, f, torch.bfloat16, a.copies, gen)
    rows = [case(copies, d, f, a.experts, int(t), a.budget, gen) for t in a.tokens.split(",")]
    cols = ["dense", "dense_fused_act", "dense_stacked", "router", "masked_act_only", "masked_serial",
            "masked_overlap", "router_masked", "router_masked_stacked", "sparse_triton", "gemm_up",
            "gemm_up_router", "silu_mul", "routed_act"]
    print(f"{torch.cuda.get_device_name()}, {a.shape} bf16, E={a.experts}, budget {a.budget}, CUDA graphs, us")
    print("| T | union | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['t']} | {r['union']:.2f} | " + " | ".join(f"{r[c + '_us']:.1f}" for c in cols) + " |")
    out = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    path = Path(a.out)
    atomic_write_json(path, out)
    print("wrote", path)


if __name__ == "__main__":
    main()
