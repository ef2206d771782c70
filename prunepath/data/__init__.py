"""Bundled calibration text and the tokenization helper that turns text into calibration batches.

``wikitext2_valid.txt`` is the WikiText-2 validation split (tokenized form; source and
license in ``NOTICE`` beside it). It is calibration data only: evaluate on the test split.
"""

from __future__ import annotations

from importlib import resources

import torch

CALIBRATION_FILE = "wikitext2_valid.txt"


def calibration_text_path() -> str:
    """Filesystem path of the bundled WikiText-2 validation text."""
    return str(resources.files(__name__).joinpath(CALIBRATION_FILE))


def calibration_texts(max_chars: int | None = None) -> list[str]:
    """The bundled WikiText-2 validation text as a list of paragraphs (non-empty lines).

    ``max_chars`` keeps only the first paragraphs up to about that many characters.
    """
    text = resources.files(__name__).joinpath(CALIBRATION_FILE).read_text(encoding="utf-8")
    out, total = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        out.append(line)
        total += len(line) + 1
        if max_chars is not None and total >= max_chars:
            break
    return out


def check_token_ids(ids, name: str) -> None:
    """Raise ValueError naming ``name`` unless ``ids`` is an integer tensor ``[N, S]``."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be integer token ids [N, S], got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")


def token_batches(calibration, tokenizer=None, *, num_tokens: int, seq_len: int) -> torch.Tensor:
    """Calibration input ids ``[N, seq_len]`` (``N*seq_len <= num_tokens``, at least one row).

    ``calibration``: a LongTensor ``[N, S]`` of token ids (used as is, truncated to
    ``num_tokens``), a string, or a list of strings (joined by newlines, tokenized once
    with ``tokenizer``, cut into consecutive windows of ``seq_len`` tokens).
    """
    if isinstance(calibration, torch.Tensor):
        check_token_ids(calibration, "calibration tensor")
        rows = max(1, num_tokens // calibration.shape[1])
        return calibration[:rows].long()
    if isinstance(calibration, str):
        calibration = [calibration]
    if not isinstance(calibration, (list, tuple)) or not all(isinstance(t, str) for t in calibration):
        raise ValueError("calibration must be a string, a list of strings or a token-id tensor [N, S]")
    if tokenizer is None:
        raise ValueError("calibration text needs a tokenizer: pass tokenizer=... "
                         "(or pass token ids as a LongTensor [N, S])")
    ids: list[int] = []
    # tokenize piece by piece until enough tokens are collected
    chunk: list[str] = []
    for i, text in enumerate(calibration):
        chunk.append(text)
        if len(chunk) >= 64 or i == len(calibration) - 1:
            ids.extend(tokenizer("\n".join(chunk) + "\n", add_special_tokens=False)["input_ids"])
            chunk = []
            if len(ids) >= num_tokens:
                break
    if len(ids) < seq_len:
        if not ids:
            raise ValueError("calibration text is empty")
        seq_len = len(ids)
    rows = max(1, min(len(ids) // seq_len, num_tokens // seq_len))
    return torch.tensor(ids[:rows * seq_len], dtype=torch.long).reshape(rows, seq_len)
