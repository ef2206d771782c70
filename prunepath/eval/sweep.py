"""The budget sweep: every method at every target sparsity, every suite, one run folder.

>>> from prunepath.eval.sweep import SweepConfig, run_sweep
>>> run_sweep(SweepConfig(out_dir="runs/smollm2", targets=[0.3, 0.5, 0.7, 0.9], limits={"nlu": 50}))

The run folder holds ``results.json`` (every number, the config, seed, data sha256s,
package versions; rewritten atomically after each point, so an interrupted run resumes),
``answers.jsonl`` (every generated answer), ``results.md`` (tables and target check) and
``plots.png`` (quality vs measured sparsity, a line per method, a panel per suite).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..device import resolve_device
from . import data as D
from .methods import METHODS, Setting, apply_setting, calibrate_setting, check_method, check_target
from .suites import GENERATION_SUITES, SUITES, run_suite

DEFAULT_TARGETS = (0.3, 0.5, 0.7, 0.9)


@dataclass
class SweepConfig:
    """Everything that defines a sweep (saved into results.json).

    limits: per-suite item limits (None = all): examples for the task suites, sliding windows
        for wikitext2, documents per task for nlu. ``limit`` sets every suite not in ``limits``.
    """

    out_dir: str = "eval_runs/sweep"
    model: str = "smollm2-135m-instruct"
    checkpoint: str | None = None  # a PrunePath checkpoint to load (else convert and save here)
    save_checkpoint: bool = True
    methods: list = field(default_factory=lambda: list(METHODS))
    targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    suites: list = field(default_factory=lambda: list(SUITES))
    limit: int | None = None
    limits: dict = field(default_factory=dict)
    data_dir: str | None = None
    seed: int = 0
    batch_size: int = 8
    gen_batch_size: int = 8
    window: int = 1024
    stride: int = 512
    max_new_tokens: dict = field(default_factory=lambda: {"xsum": 64, "alpaca_eval": 128, "mt_bench": 128})
    # conversion (when no checkpoint is given)
    num_experts: int = 48
    router: str = "mlp"
    router_rank: int = 64
    router_temperature: float | None = 2.0  # None: the checkpoint's; see EVAL.md "routing rules"
    train_tokens: int = 32768
    # matching
    calib_tokens: int = 4096
    calib_seq_len: int = 256
    tol: float = 0.005
    threads: int | None = None
    device: str = "cpu"  # where the model runs: cpu, cuda, cuda:N or auto (prunepath.device.resolve_device)
    # ops backend of the routed FFNs while evaluating: "torch" = the reference (dense FFN with inactive
    # neurons zeroed; same results as every backend, and the fastest for many-token forwards on CPU)
    backend: str | None = "torch"

    def validate(self) -> None:
        for m in self.methods:
            check_method(m)
        for t in self.targets:
            check_target(t)
        bad = [s for s in self.suites if s not in SUITES]
        if bad:
            raise ValueError(f"unknown suite(s) {bad}; expected some of {list(SUITES)}")
        for k, v in self.limits.items():
            if k not in SUITES:
                raise ValueError(f"limits: unknown suite {k!r}; expected one of {list(SUITES)}")
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"limits[{k!r}] must be a positive int or None, got {v!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive int or None, got {self.limit!r}")
        resolve_device(self.device)

    def limit_for(self, suite: str):
        return self.limits.get(suite, self.limit)


def settings_grid(methods, targets) -> list[tuple[str, float]]:
    """(method, target) points: dense once at 0, every other method at every target > 0."""
    pts = []
    if "dense" in methods:
        pts.append(("dense", 0.0))
    for t in targets:
        if t == 0:
            continue
        for m in methods:
            if m != "dense":
                pts.append((m, float(t)))
    return pts


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "lm-eval", "rouge-score", "tokenizers", "numpy", "prunepath"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------- model


def load_converted(cfg: SweepConfig, *, log=print):
    """The converted model and tokenizer: from ``cfg.checkpoint`` if it exists, else the named
    model converted (routers trained on the first part of WikiText-2 valid) and saved there."""
    import prunepath

    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
    if ckpt is not None and (ckpt / "prunepath_config.json").is_file():
        from transformers import AutoTokenizer

        log(f"loading PrunePath checkpoint {ckpt}")
        model = prunepath.from_pretrained(str(ckpt)).to(resolve_device(cfg.device))
        try:
            tok = AutoTokenizer.from_pretrained(str(ckpt))
        except (OSError, ValueError):
            _, tok = prunepath.models.load(cfg.model)
        return model.eval(), tok, {"checkpoint": str(ckpt), "converted_now": False}
    model, tok = prunepath.models.load(cfg.model, device=resolve_device(cfg.device))
    texts, src = D.calibration_texts(cfg.data_dir)
    pcfg = prunepath.PrunePathConfig(
        num_experts=cfg.num_experts, router=cfg.router, router_rank=cfg.router_rank, train_tokens=cfg.train_tokens,
        seed=cfg.seed,
    )
    log(f"converting {cfg.model}: E={cfg.num_experts}, router={cfg.router}, {cfg.train_tokens} training tokens")
    t0 = time.perf_counter()
    prunepath.convert(model, pcfg, calibration=texts, tokenizer=tok)
    info = {"converted_now": True, "convert_s": time.perf_counter() - t0, "calibration_source": src}
    if ckpt is not None and cfg.save_checkpoint:
        prunepath.save(model, str(ckpt), tokenizer=tok)
        info["checkpoint"] = str(ckpt)
    return model.eval(), tok, info


def calibration_ids(tokenizer, cfg: SweepConfig) -> torch.Tensor:
    """Calibration tokens for matching: the second half of WikiText-2 valid (routers train on the
    start of the same file; evaluation uses the test split)."""
    from prunepath.data import token_batches

    texts, _ = D.calibration_texts(cfg.data_dir)
    return token_batches(texts[len(texts) // 2 :], tokenizer, num_tokens=cfg.calib_tokens, seq_len=cfg.calib_seq_len)


# --------------------------------------------------------------------------- run


def suite_kwargs(cfg: SweepConfig, suite: str) -> dict:
    kw = {"data_dir": cfg.data_dir, "limit": cfg.limit_for(suite)}
    if suite == "wikitext2":
        kw.update(window=cfg.window, stride=cfg.stride, batch_size=1)
    elif suite in GENERATION_SUITES:
        kw.update(batch_size=cfg.gen_batch_size, max_new_tokens=cfg.max_new_tokens.get(suite))
    elif suite == "nlu":
        kw.update(batch_size=cfg.batch_size, seed=cfg.seed)
    else:
        kw.update(batch_size=cfg.batch_size)
    return kw


def evaluate_setting(model, tokenizer, cfg: SweepConfig, suites, dense_answers: dict, *, dense: bool = False,
                     log=print) -> dict:
    """Every suite under the model's current routing; measured sparsity per suite.

    Generation suites score fidelity to ``dense_answers[suite]`` (for the dense point itself,
    ``dense=True``: to its own answers)."""
    from prunepath.budget import measured_sparsity, reset_stats

    out = {}
    for suite in suites:
        kw = suite_kwargs(cfg, suite)
        if suite in GENERATION_SUITES:
            kw["dense_answers"] = dense_answers.get(suite, "self" if dense else None)
        reset_stats(model)
        t0 = time.perf_counter()
        r = run_suite(suite, model, tokenizer, **kw)
        r["seconds"] = time.perf_counter() - t0
        r["limit"] = kw.get("limit")
        r["measured_sparsity"] = measured_sparsity(model)
        out[suite] = r
    return out


def run_sweep(cfg: SweepConfig, *, model=None, tokenizer=None, progress: bool = True, log=print) -> dict:
    """Run (or resume) the sweep; returns the results dict also written to ``results.json``.

    ``model``/``tokenizer`` may be given (an already converted model, e.g. in tests).
    """
    from .report import write_report

    cfg.validate()
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    if results and results.get("config", {}).get("suites") not in (None, cfg.suites):
        log("note: resuming a run folder made with other suites; points are re-used per suite")
    info = {}
    if model is None:
        model, tokenizer, info = load_converted(cfg, log=log)
    elif tokenizer is None:
        raise ValueError("run_sweep: tokenizer is required when a model is given")
    if cfg.router_temperature is not None:
        import warnings

        from prunepath.budget import set_router_temperature

        with warnings.catch_warnings():  # checkpoint presets are not used here: every point calibrates
            warnings.simplefilter("ignore")
            set_router_temperature(model, cfg.router_temperature)
    if cfg.backend:
        from prunepath.budget import routed_layers

        for layer in routed_layers(model):
            layer.backend = cfg.backend
    data_dir = D.find_data_dir(cfg.data_dir)
    results.setdefault("points", {})
    results.update(
        {
            "config": dataclasses.asdict(cfg),
            "model": {
                **results.get("model", {}),
                **info,
                "name": cfg.model,
                "prunepath_config": _pp_config(model),
            },
            "data_dir": str(data_dir),
            "versions": versions(),
            "machine": machine(),
            "seed": cfg.seed,
        }
    )
    results.setdefault("started", time.strftime("%Y-%m-%d %H:%M:%S"))
    ids = calibration_ids(tokenizer, cfg)
    results["calibration"] = {"tokens": int(ids.numel()), "rows": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                              "source": "wikitext-2/valid.txt, second half"}
    answers_path = out / "answers.jsonl"
    grid = settings_grid(cfg.methods, cfg.targets)
    dense_answers = _dense_answers(results)
    bar = tqdm(grid, desc="sweep", disable=not progress)
    for method, target in bar:
        name = Setting(method, target).name
        bar.set_postfix_str(name)
        done = results["points"].get(name, {})
        todo = [s for s in cfg.suites if s not in done.get("suites", {})]
        if not todo:
            continue
        t0 = time.perf_counter()
        if "setting" in done:
            s = Setting(**{k: v for k, v in done["setting"].items() if k != "name"})
            apply_setting(model, s)
        else:
            s = calibrate_setting(model, method, target, ids, tol=cfg.tol, batch_size=4)
            s.extra["calibration_tokens"] = int(ids.numel())
        calib_s = time.perf_counter() - t0
        log(f"{name}: calibration sparsity {s.calib_sparsity if s.calib_sparsity is not None else float('nan'):.4f}")
        r = evaluate_setting(model, tokenizer, cfg, todo, dense_answers, dense=(method == "dense"), log=log)
        point = results["points"].setdefault(name, {"suites": {}})
        point["setting"] = s.to_dict()
        point.setdefault("calibrate_seconds", calib_s)
        for suite, sr in r.items():
            answers = sr.pop("answers", None)
            if answers is not None:
                _append_answers(answers_path, name, suite, answers)
                if method == "dense":
                    dense_answers[suite] = answers
                    point.setdefault("dense_answers", {})[suite] = answers
            point["suites"][suite] = sr
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        write_json_atomic(res_path, results)
        write_report(results, out)
    write_json_atomic(res_path, results)
    write_report(results, out)
    return results


def _dense_answers(results: dict) -> dict:
    return dict(results.get("points", {}).get("dense", {}).get("dense_answers", {}))


def _append_answers(path: Path, name: str, suite: str, answers: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for a in answers:
            f.write(json.dumps({"setting": name, "suite": suite, "id": a["id"], "answer": a["answer"]}) + "\n")


def _pp_config(model) -> dict | None:
    cfg = getattr(model, "prunepath_config", None)
    if cfg is None:
        return None
    d = cfg.to_dict()
    rep = d.get("router_report") or {}
    # keep the summary, drop bulky per-layer arrays
    d["router_report"] = {k: v for k, v in rep.items() if k != "per_layer"}
    return d
