"""What several benchmarks share: machine info, JSON writing, timing, model builders and the
synthetic expert masks of the GPU decode benchmarks.

Imported by the scripts of this folder (``from .common import ...``); not a script itself.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "prunepath" / "data" / "wikitext2_valid.txt"
SMOLLM2_CHECKPOINT = Path(os.environ.get("PRUNEPATH_SMOLLM2_CKPT", "runs/smollm2_e48"))
CPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Real shapes (from the models' published configs); weights are random.
LLAMA_SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
    # for checking the scripts on a CPU
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                 max_position_embeddings=1024),
}


# --------------------------------------------------------------------------- output


def log(*args):
    print(*args, flush=True)


def atomic_write_json(path: Path, data) -> None:
    """Write ``data`` as JSON to ``path`` (parents created) through a temporary file, so a
    run cut short never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def environment(device) -> dict:
    """Date, versions, command line and the CPU or GPU of a run (the ``env`` of result files)."""
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "python": platform.python_version(), "argv": sys.argv,
           "cpu_threads": torch.get_num_threads()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


# --------------------------------------------------------------------------- timing


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(dec, prompt: torch.Tensor, new_tokens: int, repeats: int = 1) -> dict:
    """Prefill then decode ``new_tokens`` (no EOS); median ms per decode step and prefill ms."""
    dec.prefill(prompt, eos_token_id=[])  # warm-up: captures/compiles, times the FFN paths
    dec.decode(4)
    per_step, prefill = [], []
    for _ in range(repeats):
        sync(dec.device)
        t0 = time.perf_counter()
        dec.prefill(prompt, eos_token_id=[])
        sync(dec.device)
        t1 = time.perf_counter()
        n = dec.decode(new_tokens)
        sync(dec.device)
        t2 = time.perf_counter()
        prefill.append((t1 - t0) * 1e3)
        per_step.append((t2 - t1) * 1e3 / max(n - 1, 1))
    return {"ms_per_step": statistics.median(per_step), "prefill_ms": statistics.median(prefill),
            "all_ms_per_step": per_step}


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def time_eager(fn, ncopies, reps=10, batches=7):
    """Median ms per call of ``fn(i)`` over back-to-back batches cycling the copies (GPU)."""
    for i in range(2 * ncopies):
        fn(i % ncopies)
    torch.cuda.synchronize()
    out = []
    for b in range(batches):
        s, e = _events()
        s.record()
        for i in range(reps):
            fn((b * reps + i) % ncopies)
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) / reps)
    return statistics.median(out)


def time_graph(fn, ncopies, reps=None, batches=7):
    """Median ms per call of ``fn(i)`` captured in one CUDA graph (the copies cycled)."""
    reps = reps or max(ncopies, 10)
    reps = math.ceil(reps / ncopies) * ncopies
    for i in range(ncopies):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(g, stream=stream):
            for i in range(reps):
                fn(i % ncopies)
    torch.cuda.current_stream().wait_stream(stream)
    g.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(batches):
        s, e = _events()
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) / reps)
    del g
    return statistics.median(out)


# --------------------------------------------------------------------------- FFN weights (GPU)


def make_copies(d, f, dtype, ncopies, gen):
    """``ncopies`` random FFN weight sets on the GPU: wg, wu [f, d], wd [d, f] and wdt = wd^T
    (contiguous, the packed layout); rotated through so that no call finds them in L2."""
    copies = []
    for _ in range(ncopies):
        w = lambda *s: (torch.randn(*s, device="cuda", generator=gen) / s[-1] ** 0.5).to(dtype)  # noqa: E731
        wg, wu, wd = w(f, d), w(f, d), w(d, f)
        copies.append({"wg": wg, "wu": wu, "wd": wd, "wdt": wd.t().contiguous()})
    return copies


def dense_ffn(x, wg, wu, wd):
    """The dense gated SiLU FFN as cuBLAS runs it (three ``F.linear``)."""
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


# --------------------------------------------------------------------------- models


def build_llama(name: str, device, dtype, seed: int = 0):
    """A Llama of :data:`LLAMA_SHAPES` ``name`` with random weights, built on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**LLAMA_SHAPES[name], tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    with torch.no_grad():  # defined values everywhere (never time uninitialised memory)
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
    return model.eval()


def smollm2_routed(checkpoint: Path, dtype: str = "fp32"):
    """The converted SmolLM2 (trained routers, calibrated presets) in ``dtype`` (a
    :data:`CPU_DTYPES` name; the checkpoint's weights are fp32, dequantized from the GGUF)
    and its tokenizer; converted with ``prunepath convert --out checkpoint`` on first use."""
    import prunepath
    from transformers import AutoTokenizer

    checkpoint = Path(checkpoint)
    if not (checkpoint / "prunepath_config.json").exists():
        log(f"[no checkpoint at {checkpoint}: running `prunepath convert --out {checkpoint}`]")
        from prunepath.cli import main as cli_main

        cli_main(["convert", "--out", str(checkpoint)])
    model = prunepath.from_pretrained(checkpoint).eval().to(CPU_DTYPES[dtype])
    return model, AutoTokenizer.from_pretrained(checkpoint)


def text_prompt(tok, length: int, offset: int = 0) -> torch.Tensor:
    """``[1, length]`` token ids of WikiText-2 validation text from character ``offset``."""
    text = WIKITEXT.read_text(encoding="utf-8")
    ids = tok(text[offset: offset + 20 * length], return_tensors="pt").input_ids[:, :length]
    return ids


# --------------------------------------------------------------------------- synthetic masks


class MaskInjector:
    """Replaces one RoutedFFN's ``expert_mask``: the layer's own routing runs unchanged (the
    fused ``ops.router_route`` on the real MLP router's folded weights: same kernels and
    bytes as a converted model), then the precomputed mask of the current step is used
    instead (``torch.where`` on a device flag that is always False, so neither CUDA graphs
    nor ``torch.compile`` can drop the routing work).

    The bank ``[S, L, B, E]`` (bool) holds per-step expert sets with exactly k experts per
    token; the budget is ``1 - 0.5/k``. Layer 0 gathers the step's rows for every layer
    (one ``index_select``), each layer adds one ``where``; the last layer advances the
    shared ``step`` counter ``[1]``. ``route=False`` ("norouter" variant): no routing work
    at all, the bank's mask goes straight to the routed FFN (measures what routing costs).
    """

    def __init__(self, layer, index: int, bank: torch.Tensor, cur: torch.Tensor,
                 step: torch.Tensor, flag: torch.Tensor, advance: bool, route: bool = True):
        self.layer, self.index, self.bank, self.cur = layer, index, bank, cur
        self.step, self.flag, self.advance, self.route = step, flag, advance, route

    def __call__(self, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        from prunepath.layers import RoutedFFN

        if self.index == 0:
            torch.index_select(self.bank, 0, self.step, out=self.cur)
        rows = self.cur[0, self.index]  # [B, E]
        if x.shape[0] != rows.shape[0]:  # a prompt (T = B * S): one mask per sequence
            rows = rows.repeat_interleave(x.shape[0] // rows.shape[0], dim=0)
        if self.route:
            rows = torch.where(self.flag, RoutedFFN.expert_mask(self.layer, x, batch), rows)
        if self.advance:
            self.step.add_(1).remainder_(self.bank.shape[0])
        return rows


def make_bank(num_layers, steps, batch, num_experts, k, popularity=None, seed=0):
    """Per-step expert sets ``[L, S, B, E]`` (bool) with exactly k experts per token."""
    gen = torch.Generator().manual_seed(seed)
    g = -torch.empty(num_layers, steps, batch, num_experts).exponential_(generator=gen).log()
    if popularity is not None:  # [L, E] logits, a random expert order per layer
        perm = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(num_layers)])
        g = g + torch.gather(popularity, 1, perm)[:, None, None, :]
    idx = g.topk(k, dim=-1).indices
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)


def install_masks(model, chosen: torch.Tensor, project: bool = True) -> None:
    """Give every RoutedFFN a :class:`MaskInjector` over ``chosen`` [L, S, B, E]; budget
    1 - 0.5/k. ``project=False``: no routing work (variant "norouter").

    Injectors already installed with the same bank shape and ``project`` are refilled in
    place (same tensors), so a decoder's captured CUDA graphs stay valid and are reused."""
    import prunepath
    from prunepath.budget import routed_layers

    layers = routed_layers(model)
    dev = layers[0].budget.device
    bank = chosen.permute(1, 0, 2, 3).contiguous().to(dev)  # [S, L, B, E]
    old = [layer.__dict__.get("expert_mask") for layer in layers]
    reuse = all(isinstance(o, MaskInjector) and o.route == project
                and tuple(o.bank.shape) == tuple(bank.shape) for o in old)
    if reuse:
        old[0].bank.copy_(bank)
        old[0].step.zero_()
    else:
        step = torch.zeros(1, dtype=torch.long, device=dev)
        cur = torch.empty((1,) + tuple(bank.shape[1:]), dtype=torch.bool, device=dev)
        flag = torch.zeros((), dtype=torch.bool, device=dev)
        for t in (bank, cur, step, flag):  # compiled steps read/write them in place
            torch._dynamo.mark_static_address(t)
        for i, layer in enumerate(layers):
            layer.expert_mask = MaskInjector(layer, i, bank, cur, step, flag,
                                             advance=i == len(layers) - 1, route=project)
    k = int(chosen[0, 0, 0].sum())
    prunepath.set_budget(model, 1.0 - 0.5 / k)
