"""prunepath.decode.lean_step: the hand-written Llama-family forward against Hugging Face's own.

Greedy tokens of ``Decoder(step="lean")`` must equal ``model.generate`` (eager, dynamic cache)
exactly, dense and routed, with and without left padding; the prefill's logits must match the
HF forward's. GPU tests (``-m gpu``) run the lean step under CUDA graphs and compiled.
"""

import pytest
import torch

import prunepath
from prunepath.decode import Decoder, generate, no_host_sync
from prunepath.decode.lean_step import FAMILIES, LeanStep, unsupported

from .test_decode import NEW, hf_greedy, prompts, routed
from .tiny_models import tiny_config, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_greedy_matches_hf_generate_dense(family, padded):
    model = tiny_model(family, seed=1)
    ids, mask = prompts(3, 7, seed=2, padded=padded)
    ref = hf_greedy(model, ids, attention_mask=mask)
    out = generate(model, ids, NEW, attention_mask=mask, eos_token_id=[], step="lean")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("budget", [1.0, 0.6, 0.3])
@pytest.mark.parametrize("ffn_path", ["sparse", "dense"])
def test_greedy_matches_hf_generate_routed(budget, ffn_path):
    model = routed("llama", seed=3)
    prunepath.set_budget(model, budget)
    ids, mask = prompts(3, 6, seed=4, padded=True)
    ref = hf_greedy(model, ids, attention_mask=mask)
    out = generate(model, ids, NEW, attention_mask=mask, eos_token_id=[], ffn_path=ffn_path,
                   step="lean")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_logits_match_hf_forward(family, dtype):
    model = tiny_model(family, seed=5).to(dtype)
    ids, mask = prompts(2, 9, seed=6, padded=True)
    lean = LeanStep(model, 2, 16)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    key_mask = torch.ones(2, 16, dtype=torch.long)
    key_mask[:, :9] = mask
    with torch.no_grad():
        got = lean(ids, positions, key_mask)
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        # then one more token each: the cache holds what HF's forward would attend to
        nxt = got.argmax(-1, keepdim=True)
        got2 = lean(nxt, positions[:, -1:] + 1, key_mask)
        ids2, mask2 = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        want2 = model(input_ids=ids2, attention_mask=mask2,
                      position_ids=torch.cat([positions, positions[:, -1:] + 1], 1)).logits[:, -1]
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(got2.float(), want2.float(), **tol)
    assert int(lean.slot) == 10
    lean.reset()
    assert int(lean.slot) == 0


def test_lean_decode_step_has_no_host_sync():
    model = routed("llama", seed=7)
    prunepath.set_budget(model, torch.tensor([0.5, 0.7]))
    ids, mask = prompts(2, 5, seed=8, padded=True)
    dec = Decoder(model, 2, 5 + NEW, mode="eager", step="lean")
    dec.prefill(ids, mask)
    with no_host_sync(), torch.no_grad():
        dec._forward_step(dec._greedy, dec._top_k, dec._padded)


def test_unsupported_models_and_bad_step_are_named():
    with pytest.raises(ValueError, match="step='lean' supports model_type"):
        Decoder(tiny_model("gpt2"), 1, 16, step="lean")
    with pytest.raises(ValueError, match="step='lean' supports model_type"):
        Decoder(tiny_model("gemma"), 1, 16, step="lean")
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("mistral")
    cfg.sliding_window = 8
    windowed = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(ValueError, match="sliding window of 8"):
        Decoder(windowed, 1, 16, step="lean")
    Decoder(windowed, 1, 8, step="lean")  # the window covers the whole cache: same attention
    with pytest.raises(ValueError, match="step must be one of"):
        Decoder(tiny_model("llama"), 1, 16, step="fast")
    hooked = tiny_model("llama")
    hooked.model.layers[1]._hf_hook = object()  # what accelerate's device_map / offload attaches
    assert "offload hooks" in unsupported(hooked, 16)
    assert Decoder(hooked, 1, 16).step_kind == "hf"


@pytest.mark.slow
def test_compiled_lean_step_matches_hf_cpu():
    model = routed("llama", seed=9)
    prunepath.set_budget(model, 0.5)
    ids, _ = prompts(2, 5, seed=10)
    out = generate(model, ids, NEW, eos_token_id=[], mode="compile", step="lean")
    assert torch.equal(out, hf_greedy(model, ids))


# --------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# (CUDA-graph steps: tests/test_decode.py runs its graph tests with both steps)


@pytest.mark.gpu
@pytest.mark.slow
@gpu
@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_compiled_lean_step_matches_hf_gpu(budget):
    from torch._dynamo.utils import counters

    model = routed(seed=13, device="cuda")
    prunepath.set_budget(model, budget)
    ids, _ = prompts(2, 5, seed=14, device="cuda")
    counters.clear()
    out = generate(model, ids, NEW, eos_token_id=[], mode="compile", step="lean")
    assert torch.equal(out, hf_greedy(model, ids))
    # the step runs as CUDA graphs: inductor skipped none (it does when the cache it writes
    # is not a static address; then every step launches each kernel, ~3x slower)
    assert counters["inductor"]["cudagraph_skips"] == 0


def test_rope_scaling_llama3_runs_lean_and_dynamic_falls_back_to_hf():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")  # Llama-3.x's rope scaling: fixed frequencies, one table
    cfg.rope_parameters = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                           "rope_theta": 10000.0}
    torch.manual_seed(15)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # as tiny_model: weights large enough for distinct logits
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    ids, _ = prompts(2, 9, seed=16)  # positions up to 18, past the 8 the scaling starts from
    dec = Decoder(model, 2, 9 + NEW)
    assert dec.step_kind == "lean"
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), hf_greedy(model, ids))
    cfg = tiny_config("llama")  # dynamic NTK: frequencies change with the length seen
    cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert Decoder(model, 1, 16).step_kind == "hf"
    with pytest.raises(ValueError, match="fixed frequencies, got 'dynamic'"):
        Decoder(model, 1, 16, step="lean")
