"""Dataset loaders for the PrunePath lm-evaluation-harness tasks (``pp_*.yaml`` beside this file).

Each task's ``custom_dataset`` points here. lm-eval calls it with the task metadata, into which
:func:`prunepath.eval.nlu.run_nlu` puts ``data_dir`` (the local data folder). Every loader
reads one local file and returns ``DatasetDict({"validation": ...})`` of normalised documents:
``{"query": prompt, "choices": [...], "gold": int}`` (Winogrande: ``context_options`` and
``continuation`` for partial scoring). The prompts follow lm-eval's own tasks of the same names.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from prunepath.eval.data import FILES, find_data_dir


def _path(name: str, data_dir) -> Path:
    path = find_data_dir(data_dir) / FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"{name}: data file not found at {path}")
    return path


def _jsonl(name, data_dir) -> list[dict]:
    with open(_path(name, data_dir), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _tsv(name, data_dir) -> list[dict]:
    with open(_path(name, data_dir), encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def _mc(query: str, choices, gold) -> dict:
    return {"query": query, "choices": [str(c) for c in choices], "gold": int(gold)}


def piqa(data_dir=None, **_):
    """Query "Question: <goal>\\n" -> "Question: <goal>\\nAnswer:" (lm-eval piqa prompt)."""
    rows = _jsonl("piqa", data_dir)
    return _dataset([_mc(r["query"].rstrip() + "\nAnswer:", r["choices"], r["gold"]) for r in rows])


def boolq(data_dir=None, **_):
    rows = _jsonl("boolq", data_dir)
    return _dataset([_mc(r["query"].rstrip() + "\nAnswer:", r["choices"], r["gold"]) for r in rows])


def arc_easy(data_dir=None, **_):
    rows = _jsonl("arc_easy", data_dir)
    return _dataset([_mc(r["query"].rstrip() + "\nAnswer:", r["choices"], r["gold"]) for r in rows])


def copa(data_dir=None, **_):
    """Premise with its connective ("..., therefore") and the two lower-cased alternatives."""
    rows = _jsonl("copa", data_dir)
    return _dataset([_mc(r["query"].rstrip(), r["choices"], r["gold"]) for r in rows])


def winogrande(data_dir=None, **_):
    rows = _jsonl("winogrande", data_dir)
    return _dataset(
        [
            {"context_options": list(r["context_options"]), "continuation": r["continuation"], "gold": int(r["gold"])}
            for r in rows
        ]
    )


def winogrande_gold(doc) -> int:
    """Partial scoring: the 'text' is the index of the right context (lm-eval's winogrande)."""
    return int(doc["gold"])


def rte(data_dir=None, **_):
    """Label 0 = entailment -> "True" (choice 0), 1 -> "False"."""
    rows = _tsv("rte", data_dir)
    return _dataset(
        [
            _mc(f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:", ["True", "False"], r["label"])
            for r in rows
        ]
    )


def sst2(data_dir=None, **_):
    rows = _tsv("sst2", data_dir)
    return _dataset(
        [
            _mc(
                f"{r['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                ["negative", "positive"],
                r["label"],
            )
            for r in rows
        ]
    )


def _hellaswag_clean(text: str) -> str:
    # as lm-eval's hellaswag: WikiHow "[title]" artifacts and bracketed tags removed
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def parse_hellaswag(lines: list[str]) -> list[dict]:
    """llama.cpp format: 6 lines per item (context, gold index, 4 endings)."""
    lines = [ln.rstrip("\n") for ln in lines]
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"hellaswag: expected a multiple of 6 lines, got {len(lines)}")
    out = []
    for i in range(0, len(lines), 6):
        ctx, gold, *ends = lines[i : i + 6]
        out.append(_mc(_hellaswag_clean(ctx), [_hellaswag_clean(e) for e in ends], int(gold)))
    return out


def hellaswag(data_dir=None, **_):
    with open(_path("hellaswag", data_dir), encoding="utf-8") as f:
        return _dataset(parse_hellaswag(f.readlines()))
