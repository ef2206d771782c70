"""Where a compiled CPU decode step's time goes, and what bounds its speedup over dense.

    python -m bench.profile_step_cpu [--checkpoint runs/qs_e96] [--dtype fp32|bf16] \
        [--presets s50,s70] [--steps 40] [--json out.json]

The converted SmolLM2 (bench.common.smollm2_routed) decodes one prompt with the default
CPU decoder (compiled lean step, packed W_down, fused q/k/v, PrunePath's GEMV for every
linear), dense and at each preset. ``--steps`` decode steps run under the torch profiler
(CPU activity, input shapes), the configurations interleaved for ``--rounds`` rounds, and
the main thread's self time is grouped per step (medians over the rounds):

* each ``prunepath::linear`` by what its weight is (q/k/v, o, gate/up, down, lm_head),
* ``prunepath::routed_ffn*`` (the routed FFN) and ``prunepath::router_route`` (routing),
* the compiled graph's own time (inductor's C++ kernels: norms, rotary, attention, adds;
  and its Python wrapper) and Dynamo's per-step work (guards, pre-graph bytecode),
* the rest.

The GEMV kernels run on every thread (OpenMP); the main thread's time in them is their wall
time. From the dense profile: F = the dense FFN's ms per step, R = everything else; a preset
at sparsity s with a routed FFN at exactly (1 - s) of F and free routing would run at
``(R + F) / (R + (1 - s) F)`` of dense ("perfect-FFN bound"), and ``target_R_ms`` is the R
that would let that bound reach ``--target``. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from .common import (CPU_DTYPES, SMOLLM2_CHECKPOINT, atomic_write_json, environment, log,
                     smollm2_routed, text_prompt)

FFN = ("gate/up", "down", "routed FFN", "routing")
GRAPH = "compiled graph (inductor kernels + wrapper)"
DYNAMO = "dynamo (guards, pre-graph)"
DYNAMO_KEYS = ("TorchDynamo Cache Lookup", "Pregraph bytecode", "AOTDispatcher",
               "Torch-Compiled Region")


def linear_role(shapes, cfg) -> str:
    """What a ``prunepath::linear`` call's weight is, from its input shapes [x, w, bias]."""
    x_cols, (n, k) = shapes[0][-1], shapes[1]
    hd = cfg.hidden_size // cfg.num_attention_heads
    if n == cfg.vocab_size:
        return "lm_head"
    if n == (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd:
        return "q/k/v"
    if x_cols == cfg.intermediate_size:
        return "down"
    if n == cfg.intermediate_size:
        return "gate/up"
    if n == cfg.hidden_size and k == cfg.hidden_size:
        return "o"
    return f"linear {n}x{k}"


def group_of(event, cfg) -> str:
    name = event.key
    if name == "prunepath::linear":
        return linear_role(event.input_shapes, cfg)
    if name.startswith("prunepath::routed_ffn"):
        return "routed FFN"
    if name == "prunepath::router_route":
        return "routing"
    if name.startswith("## Call CompiledFxGraph"):
        return GRAPH
    if any(name.startswith(k) for k in DYNAMO_KEYS):
        return DYNAMO
    return "other"


def profile_decode(dec, prompt, steps: int, cfg) -> dict:
    from torch.profiler import ProfilerActivity, profile

    dec.prefill(prompt, eos_token_id=[])
    dec.decode(4)  # compiled and warm
    dec.prefill(prompt, eos_token_id=[])
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        n = dec.decode(steps + 1)  # the first token comes from the prefill's logits
    n_steps = max(n - 1, 1)
    ms = defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        ms[group_of(e, cfg)] += e.self_cpu_time_total / 1e3 / n_steps
    return {"steps": n_steps, "ms_per_step": dict(sorted(ms.items(), key=lambda kv: -kv[1])),
            "total_ms": sum(ms.values())}


def main(argv=None) -> int:
    import prunepath
    from prunepath.budget import set_routing
    from prunepath.decode import Decoder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(SMOLLM2_CHECKPOINT))
    p.add_argument("--dtype", default="fp32", choices=tuple(CPU_DTYPES))
    p.add_argument("--presets", default="s50,s70")
    p.add_argument("--steps", type=int, default=24, help="profiled steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target", type=float, default=1.35, help="speedup the bound is set against")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tok = smollm2_routed(Path(args.checkpoint), args.dtype)
    cfg = model.config
    prompt = text_prompt(tok, args.prompt)
    dec = Decoder(model, 1, args.prompt + args.steps + 8, mode="compile")
    presets = [s for s in args.presets.split(",") if s]
    bad = [s for s in presets if s not in model.prunepath_config.presets or not s[1:].isdigit()]
    if bad:
        p.error(f"--presets: {bad} are not sNN presets of {args.checkpoint} "
                f"({sorted(model.prunepath_config.presets)})")
    runs = defaultdict(list)
    for i in range(args.rounds):  # interleaved: this VM's speed flips between two states
        for preset in [None] + presets:
            if preset is None:
                set_routing(model, "dense")
            else:
                prunepath.set_budget(model, preset)
            prof = profile_decode(dec, prompt, args.steps, cfg)
            runs[preset or "dense"].append(prof)
            log(f"round {i} {preset or 'dense'}: {prof['total_ms']:.2f} ms/step")
    rows = []
    for name, profs in runs.items():  # per group, the median over rounds
        groups = {g for pr in profs for g in pr["ms_per_step"]}
        ms = {g: statistics.median(pr["ms_per_step"].get(g, 0.0) for pr in profs) for g in groups}
        rows.append({"config": name, "ms_per_step": ms, "total_ms": sum(ms.values()),
                     "rounds": profs})

    dense = rows[0]
    ffn = sum(v for k, v in dense["ms_per_step"].items() if k in FFN)
    rest = dense["total_ms"] - ffn
    groups = sorted({g for r in rows for g in r["ms_per_step"]},
                    key=lambda g: -dense["ms_per_step"].get(g, 0.0))
    log(f"\nCPU decode step, SmolLM2-135M {args.dtype}, {args.threads} threads, compiled, "
           f"ms per step (main thread, torch profiler; medians of {args.rounds} rounds of "
           f"{args.steps} steps)")
    log("group | " + " | ".join(r["config"] for r in rows))
    for g in groups:
        log(f"{g} | " + " | ".join(f"{r['ms_per_step'].get(g, 0.0):.3f}" for r in rows))
    log("total | " + " | ".join(f"{r['total_ms']:.3f}" for r in rows))
    log(f"\ndense: FFN F = {ffn:.2f} ms, the rest R = {rest:.2f} ms (FFN share {ffn / dense['total_ms']:.2f})")
    log("config | sparsity | profiled x dense | FFN + routing, x dense FFN | perfect-FFN bound "
           f"| R for {args.target}x")
    for r in rows[1:]:
        # presets are named by the FFN sparsity they were calibrated to (s50: 0.50)
        s = int(r["config"][1:]) / 100
        sparse_ffn = sum(v for k, v in r["ms_per_step"].items() if k in FFN)
        bound = (rest + ffn) / (rest + (1 - s) * ffn)
        # (R + F) / (R + (1 - s) F) = target  ->  R = F (1 - target (1 - s)) / (target - 1)
        need = ffn * (1 - args.target * (1 - s)) / (args.target - 1)
        r.update({"sparsity": s, "speedup_profiled": dense["total_ms"] / r["total_ms"],
                  "ffn_ratio": sparse_ffn / ffn, "bound": bound, "target_R_ms": need})
        log(f"{r['config']} | {s:.2f} | {r['speedup_profiled']:.3f} | {r['ffn_ratio']:.3f} | "
               f"{bound:.3f} | {need:.2f} (now {rest:.2f})")
    out = {"env": environment(torch.device("cpu")), "args": vars(args),
           "dense_ffn_ms": ffn, "dense_rest_ms": rest, "rows": rows}
    if args.json:
        atomic_write_json(Path(args.json), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
