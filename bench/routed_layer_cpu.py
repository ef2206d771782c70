"""Per-call cost of one routed FFN layer in eager decode steps (one token), CPU.

Times, on one layer of a converted checkpoint (cache-hot: the same layer every call, so the
numbers are the Python + dispatch overhead around small kernels, not memory streaming):
the layer's general forward, the same inside ``prunepath.layers.frozen`` (bound ops), the two
public ops called directly, the bound ops, and the dense FFN (nn.Linear with fast linears).

    python bench/routed_layer_cpu.py --checkpoint ckpts/smollm2-135m-instruct-E48 --budget s50
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def bench(fn, n: int, reps: int = 5) -> float:
    """Best of ``reps`` means over ``n`` calls, in microseconds."""
    for _ in range(max(10, n // 20)):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--budget", default="s50")
    p.add_argument("--layer", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--out", default="bench/results/routed_layer_cpu.json")
    args = p.parse_args()

    import prunepath
    from prunepath import fast_linear, ops
    from prunepath.budget import routed_layers, set_backend
    from prunepath.layers import frozen

    torch.set_num_threads(args.threads)
    model = prunepath.from_pretrained(args.checkpoint, budget=args.budget).eval()
    set_backend(model, "auto")
    layers = routed_layers(model)
    layer = layers[args.layer]
    layer.record_stats = False
    d = layer.hidden_size
    x = torch.randn(1, 1, d)
    x2 = x.reshape(1, d)
    n = args.calls
    rows = {}
    with torch.no_grad():
        w = layer.weights()
        w1, b1, w2, b2, act = layer.fused_router(x.dtype)
        mask = layer.expert_mask(x2, 1)
        rows["layer forward (general path)"] = bench(lambda: layer(x), n)
        with frozen(layers):
            rows["layer forward, frozen (bound ops)"] = bench(lambda: layer(x), n)
        rows["ops.router_route + ops.routed_ffn"] = bench(lambda: ops.routed_ffn(
            x2, w.w_gate, w.w_up, w.w_down, ops.router_route(
                x2, w1, layer.budget, b_router=b1, w_router_out=w2, b_router_out=b2,
                hidden_activation=act), activation=layer.activation), n)
        router = ops.bind_router_route(w1, b_router=b1, w_router_out=w2, b_router_out=b2,
                                       hidden_activation=act)
        ffn = ops.bind_routed_ffn(w.w_gate, w.w_up, w.w_down, activation=layer.activation)
        rows["bound router + bound FFN"] = bench(lambda: ffn(x2, router(x2, layer.budget)), n)
        rows["routed FFN kernel alone (ops.routed_ffn, fixed mask)"] = bench(lambda: ops.routed_ffn(
            x2, w.w_gate, w.w_up, w.w_down, mask, activation=layer.activation), n)
        fast_linear.enable(model)
        rows["dense FFN (nn.Linear, fast linears)"] = bench(lambda: layer.base(x), n)
    sparsity = 1.0 - float(mask.float().mean())
    print(f"one routed layer, 1 token, layer {args.layer} of {args.checkpoint} at {args.budget} "
          f"(this token's sparsity {sparsity:.2f}), {args.threads} threads, cache-hot, best of 5 x {n} calls")
    print(f"{'call':<56} {'us':>8}")
    for k, v in rows.items():
        print(f"{k:<56} {v:8.1f}")
    out = {"checkpoint": args.checkpoint, "budget": args.budget, "layer": args.layer,
           "threads": args.threads, "token_sparsity": sparsity, "us": rows,
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
