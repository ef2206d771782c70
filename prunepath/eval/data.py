"""Local evaluation data: where it lives, how each file is read, and its sha256.

Everything is read from a data directory laid out like ``../shared/data`` (see its README):
``wikitext-2/test.txt``, ``lambada/lambada_openai.jsonl``, ``xsum/xsum_test_1000.jsonl`` ...
The directory is, in order: the ``data_dir`` argument, ``$PRUNEPATH_DATA``, ``../shared/data``
relative to the working directory, ``../shared/data`` beside the source checkout.
Nothing is ever downloaded.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "PRUNEPATH_DATA"

# suite/file name -> path inside the data dir
FILES = {
    "wikitext2_test": "wikitext-2/test.txt",
    "wikitext2_valid": "wikitext-2/valid.txt",
    "lambada": "lambada/lambada_openai.jsonl",
    "piqa": "piqa/piqa.jsonl",
    "winogrande": "winogrande/winogrande.jsonl",
    "boolq": "boolq/boolq.jsonl",
    "hellaswag": "hellaswag/hellaswag_val_full.txt",
    "arc_easy": "arc_easy/arc_easy.jsonl",
    "copa": "copa/copa.jsonl",
    "rte": "rte/dev.tsv",
    "sst2": "sst2/dev.tsv",
    "xsum": "xsum/xsum_test_1000.jsonl",
    "story_cloze": "story_cloze/storycloze_val_1571.csv",
    "alpaca_eval": "alpaca_eval/alpaca_eval_text_davinci_003.json",
    "mt_bench": "mt_bench/question.jsonl",
    "calibration_shakespeare": "calibration/tinyshakespeare_input.txt",
}


class DataNotFound(FileNotFoundError):
    """The evaluation data directory or one of its files is missing."""


def candidate_data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories tried, in order, to find the evaluation data."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    out = []
    if os.environ.get(ENV_VAR):
        out.append(Path(os.environ[ENV_VAR]).expanduser())
    out.append(Path.cwd() / ".." / "shared" / "data")
    out.append(Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
    return out


def find_data_dir(data_dir: str | os.PathLike | None = None, *, required: bool = True) -> Path | None:
    """The first existing data directory (see module doc); ``None`` or an error when none exists."""
    tried = candidate_data_dirs(data_dir)
    for d in tried:
        if d.is_dir():
            return d.resolve()
    if not required:
        return None
    raise DataNotFound(
        "evaluation data directory not found; tried "
        + ", ".join(str(d) for d in tried)
        + f". Pass --data-dir (data_dir=...) or set ${ENV_VAR} to a folder laid out like ../shared/data."
    )


def data_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of data file ``name`` (a key of :data:`FILES`), checked to exist."""
    if name not in FILES:
        raise ValueError(f"unknown data file {name!r}; expected one of {sorted(FILES)}")
    path = find_data_dir(data_dir) / FILES[name]
    if not path.is_file():
        raise DataNotFound(f"data file {name!r} not found at {path}")
    return path


_SHA_CACHE: dict[tuple[str, float, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (memoized on path, mtime and size)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime, st.st_size)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _limit(rows: list, limit: int | None) -> list:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return rows if limit is None else rows[:limit]


# --------------------------------------------------------------------------- text


def read_wikitext(path: str | os.PathLike) -> str:
    """The whole WikiText file as one string (lines joined as in the file)."""
    return Path(path).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- lambada


@dataclass(frozen=True)
class ContinuationItem:
    """A context and the continuation to be scored after it (continuation keeps its leading space)."""

    context: str
    continuation: str


def load_lambada(path, limit: int | None = None) -> list[ContinuationItem]:
    """LAMBADA (llm-foundry form): context + " " + target word(s)."""
    rows = _limit(read_jsonl(path), limit)
    return [ContinuationItem(r["context"].rstrip(), " " + r["continuation"].strip()) for r in rows]


# --------------------------------------------------------------------------- story cloze


@dataclass(frozen=True)
class StoryClozeItem:
    story: str  # the four sentences, space-joined
    endings: tuple[str, str]
    gold: int  # 0 or 1


def load_story_cloze(path, limit: int | None = None) -> list[StoryClozeItem]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in _limit(rows, limit):
        story = " ".join(r[f"InputSentence{i}"].strip() for i in range(1, 5))
        endings = (r["RandomFifthSentenceQuiz1"].strip(), r["RandomFifthSentenceQuiz2"].strip())
        out.append(StoryClozeItem(story, endings, int(r["AnswerRightEnding"]) - 1))
    return out


# --------------------------------------------------------------------------- generation suites


@dataclass(frozen=True)
class PromptItem:
    """One generation prompt: an id, the user message and (optionally) a reference answer."""

    id: str
    prompt: str
    reference: str | None = None
    category: str | None = None


XSUM_INSTRUCTION = "Summarize the following article in one sentence.\n\n"


def load_xsum(path, limit: int | None = None) -> list[PromptItem]:
    rows = _limit(read_jsonl(path), limit)
    return [PromptItem(str(r["id"]), XSUM_INSTRUCTION + r["document"].strip(), r["summary"].strip()) for r in rows]


def load_alpaca_eval(path, limit: int | None = None) -> list[PromptItem]:
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    return [
        PromptItem(f"alpaca-{i}", r["instruction"], r.get("output"), r.get("dataset"))
        for i, r in enumerate(_limit(rows, limit))
    ]


def load_mt_bench(path, limit: int | None = None) -> list[PromptItem]:
    """MT-Bench first turns only."""
    rows = _limit(read_jsonl(path), limit)
    return [PromptItem(f"mtbench-{r['question_id']}", r["turns"][0], None, r.get("category")) for r in rows]


# --------------------------------------------------------------------------- calibration text


def calibration_texts(
    data_dir: str | os.PathLike | None = None, *, max_chars: int | None = None, fallback_bundled: bool = True
) -> tuple[list[str], str]:
    """Calibration paragraphs (WikiText-2 valid; never test) and where they came from.

    Falls back to the calibration sample bundled in ``prunepath/data`` when the data dir is
    absent and ``fallback_bundled`` is true.
    """
    d = find_data_dir(data_dir, required=not fallback_bundled)
    if d is not None and (d / FILES["wikitext2_valid"]).is_file():
        path = d / FILES["wikitext2_valid"]
    else:
        path = bundled_calibration_file()
        if path is None:
            raise DataNotFound(
                "no calibration text: neither the data dir (wikitext-2/valid.txt) nor the "
                "sample bundled in prunepath/data was found"
            )
    text = Path(path).read_text(encoding="utf-8")
    if max_chars is not None:
        text = text[:max_chars]
    paras = [p.strip() for p in text.split("\n") if len(p.strip()) > 0]
    return paras, str(path)


def bundled_calibration_file() -> Path | None:
    """The WikiText-2 validation sample shipped inside the package (``prunepath/data``), if present."""
    try:
        from prunepath.data import calibration_text_path
    except ImportError:  # pragma: no cover - partial install
        return None
    p = Path(calibration_text_path())
    return p if p.is_file() else None
