"""The whole pipeline on one device (CPU, and the GPU where there is one): convert -> calibrate -> finetune (chat data) -> eval sweep, tiny model."""

import json

import pytest
import torch

import prunepath
from tests.eval_tiny import tiny_llama, tiny_tokenizer, write_data_dir


def missing_for(device: str) -> str | None:
    """Why the pipeline cannot run on ``device`` here (None: it can): the GPU, and lm-eval for
    the sweep's nlu suite, on every device alike."""
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        return f"the sweep's nlu suite needs lm-eval (pip install 'prunepath[eval]'): {err}"
    return None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_pipeline_on_device(tmp_path, device):
    reason = missing_for(device)
    if reason:
        pytest.skip(reason)
    from prunepath import cli
    from prunepath.eval import methods, sweep

    data = write_data_dir(tmp_path / "data", n=4)
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=3).to(device)
    texts = (data / "wikitext-2" / "valid.txt").read_text().splitlines()
    cfg = prunepath.PrunePathConfig(num_experts=8, router="mlp", router_rank=8, train_tokens=1024,
                                    train_seq_len=32, train_epochs=1, kmeans_iters=2)
    ref = tiny_llama(tok, seed=3).to(device)
    ids = torch.randint(0, len(tok), (2, 24), device=device)
    prunepath.convert(model, cfg, calibration=texts, tokenizer=tok, progress=False)
    assert all(p.device.type == device for p in model.parameters())
    with torch.no_grad():  # converted at budget 1 is the dense model
        prunepath.set_budget(model, 1.0)
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    from prunepath.calibrate import calibrate_presets
    from prunepath.data import token_batches

    presets = calibrate_presets(model, token_batches(texts, tok, num_tokens=512, seq_len=32), targets=(0.5,))
    assert set(presets) == {"s50"}
    prunepath.save(model, tmp_path / "in", tokenizer=tok)

    rc = cli.main(["finetune", "--checkpoint", str(tmp_path / "in"), "--out", str(tmp_path / "ft"),
                   "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--presets", "0.5",
                   "--chat-sequences", "4", "--chat-new-tokens", "8", "--data-dir", str(data),
                   "--report", str(tmp_path / "r.json"), "--device", device, "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "r.json").read_text())["data"]["device"].startswith(device)

    run = tmp_path / "run"
    scfg = sweep.SweepConfig(
        out_dir=str(run), checkpoint=str(tmp_path / "ft"), methods=list(methods.METHODS), targets=[0.5],
        suites=["wikitext2", "lambada", "story_cloze", "nlu", "alpaca_eval"], limit=2, data_dir=str(data),
        window=32, stride=16, max_new_tokens={"alpaca_eval": 4}, calib_tokens=512, calib_seq_len=64, tol=0.02,
        device=device,
    )
    sweep.run_sweep(scfg, progress=False, log=lambda *a: None)
    saved = json.loads((run / "results.json").read_text())
    assert saved["points"]["dense"]["suites"]["alpaca_eval"]["fidelity_rougeL"] == pytest.approx(1.0)
    assert saved["points"]["topk@50"]["suites"]["wikitext2"]["measured_sparsity"] == pytest.approx(0.5)
