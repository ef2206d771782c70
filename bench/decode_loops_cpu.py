"""Per-token time of the three ways to run a compiled CPU decoder's steps.

    python -m bench.decode_loops_cpu [--checkpoint runs/qs_e96] [--preset s50] [--json out.json]

``Decoder.decode(n)`` (the loop inside, one host sync per ``check_every`` steps),
``Decoder.stream(n)`` (a token per iteration: one host sync per token) and a loop of
``Decoder.step()`` calls reading each token (each call finds the step anew: on a compiled CPU
decoder that reads the model's key). The converted SmolLM2 (bench.common.smollm2_routed),
batch 1, the three interleaved for ``--rounds`` rounds; medians printed as a table and
written as JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .common import (CPU_DTYPES, SMOLLM2_CHECKPOINT, atomic_write_json, environment, log,
                     smollm2_routed, text_prompt)


def main(argv=None) -> int:
    import prunepath

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(SMOLLM2_CHECKPOINT))
    p.add_argument("--preset", default="s50")
    p.add_argument("--dtype", default="fp32", choices=tuple(CPU_DTYPES))
    p.add_argument("--tokens", type=int, default=40, help="timed steps per loop")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tok = smollm2_routed(Path(args.checkpoint), args.dtype)
    prunepath.set_budget(model, args.preset)
    prompt = text_prompt(tok, args.prompt)
    dec = prunepath.Decoder(model, 1, args.prompt + args.tokens + 8, mode="compile")
    n = args.tokens

    def run_decode():
        dec.decode(n + 1)  # the prefill's token counts

    def run_stream():
        for _ in dec.stream(n + 1):
            pass

    def run_step():
        for i in range(n):
            dec.step()
            int(dec._out[0, i + 1])  # the token, on the host (what a caller of step() reads)

    loops = {"decode": run_decode, "stream": run_stream, "step() loop": run_step}
    ms = {name: [] for name in loops}
    for r in range(args.rounds + 1):  # round 0 compiles and warms up
        for name, fn in loops.items():
            dec.prefill(prompt, eos_token_id=[])
            t0 = time.perf_counter()
            fn()
            if r:
                ms[name].append((time.perf_counter() - t0) * 1e3 / n)
    rows = [{"loop": name, "ms_per_token": statistics.median(v), "all_ms": v}
            for name, v in ms.items()]
    log(f"\nSmolLM2-135M {args.dtype} {args.preset}, compiled CPU decoder, {args.threads} threads, "
           f"batch 1, medians of {args.rounds} rounds of {n} tokens")
    log("loop | ms/token | x decode")
    for r in rows:
        log(f"{r['loop']} | {r['ms_per_token']:.2f} | {r['ms_per_token'] / rows[0]['ms_per_token']:.2f}")
    if args.json:
        atomic_write_json(Path(args.json), {"env": environment(torch.device("cpu")),
                                            "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
