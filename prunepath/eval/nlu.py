"""Zero-shot NLU through lm-evaluation-harness's public API, on local task files.

The task YAMLs live in ``prunepath/eval/tasks`` (``pp_piqa``, ``pp_winogrande`` ...); they read
the local data folder given here (never the Hub). The model is wrapped with
``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tok)`` and evaluated with
``lm_eval.simple_evaluate``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .data import FILES, find_data_dir, sha256_file

TASK_DIR = Path(__file__).resolve().parent / "tasks"

# our task name -> (lm-eval task name, data file key)
NLU_TASKS = {
    "piqa": "pp_piqa",
    "winogrande": "pp_winogrande",
    "boolq": "pp_boolq",
    "hellaswag": "pp_hellaswag",
    "arc_easy": "pp_arc_easy",
    "copa": "pp_copa",
    "rte": "pp_rte",
    "sst2": "pp_sst2",
}


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "zero-shot NLU needs lm-evaluation-harness: pip install 'prunepath[eval]' (or pip install lm-eval)"
        ) from e


def task_manager(data_dir=None, include_path: str | os.PathLike | None = None):
    """An lm-eval TaskManager that sees only the PrunePath tasks (or ``include_path``) and the data dir."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    d = find_data_dir(data_dir)
    return TaskManager(
        include_path=str(include_path or TASK_DIR), include_defaults=False, metadata={"data_dir": str(d)}
    )


def wrap_model(model, tokenizer, *, batch_size: int = 8, max_length: int | None = None):
    """``HFLM`` around an already-loaded (possibly PrunePath-converted) model."""
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    kw = {"max_length": max_length} if max_length else {}
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kw)


def run_nlu(
    model,
    tokenizer,
    *,
    tasks: list[str] | None = None,
    data_dir=None,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 1234,
    include_path=None,
    lm=None,
) -> dict:
    """Zero-shot accuracy on the local NLU tasks.

    Args:
        tasks: keys of :data:`NLU_TASKS` (default all), or raw lm-eval task names when
            ``include_path`` points at other YAMLs.
        limit: first N documents of each task (None = all).
        lm: an existing HFLM to reuse (else one is built from model/tokenizer).

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}},
    "mean_acc", "mean_acc_norm", "data": {name: {"file", "sha256"}}}``. ``acc_norm`` is the
    length-normalised accuracy where the task defines it, else equal to ``acc`` (Winogrande),
    as the mean over tasks is usually reported.
    """
    _require_lm_eval()
    import lm_eval

    names = list(tasks or NLU_TASKS)
    if include_path is None:
        bad = [t for t in names if t not in NLU_TASKS]
        if bad:
            raise ValueError(f"unknown NLU task(s) {bad}; expected some of {list(NLU_TASKS)}")
    lm_names = [NLU_TASKS.get(t, t) for t in names]
    lm = lm or wrap_model(model, tokenizer, batch_size=batch_size, max_length=max_length)
    tm = task_manager(data_dir, include_path)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=lm_names,
        task_manager=tm,
        limit=limit,
        log_samples=False,
        bootstrap_iters=1000,  # stderr of acc is closed-form (mean); no bootstrap is run for it
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    out_tasks = {}
    for name, lm_name in zip(names, lm_names):
        r = res["results"][lm_name]
        acc = r["acc,none"]
        row = {
            "acc": acc,
            "acc_stderr": r.get("acc_stderr,none"),
            "acc_norm": r.get("acc_norm,none", acc),
            "acc_norm_stderr": r.get("acc_norm_stderr,none", r.get("acc_stderr,none")),
            "n": int(res.get("n-samples", {}).get(lm_name, {}).get("effective", 0)),
        }
        out_tasks[name] = row
    d = find_data_dir(data_dir)
    data = {}
    for name in names:
        if name in FILES and (d / FILES[name]).is_file():
            data[name] = {"file": FILES[name], "sha256": sha256_file(d / FILES[name])}
    return {
        "tasks": out_tasks,
        "mean_acc": sum(t["acc"] for t in out_tasks.values()) / len(out_tasks),
        "mean_acc_norm": sum(t["acc_norm"] for t in out_tasks.values()) / len(out_tasks),
        "data": data,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
