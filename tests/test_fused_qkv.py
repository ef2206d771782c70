"""prunepath.decode.fused_qkv: q/k/v weights in one storage, and the lean decode step's one product."""

import pytest
import torch

import prunepath
from prunepath.decode import fused_qkv
from prunepath.decode import Decoder

from .test_decode import NEW, hf_greedy, prompts, routed
from .tiny_models import tiny_model


def storages(model):
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # qwen2: q/k/v biases
def test_fuse_keeps_values_parameters_and_memory_and_unfuse_undoes_it(family):
    model = tiny_model(family, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    n_storages = len(storages(model))
    attentions = len(model.model.layers)
    assert fused_qkv.fuse(model) == attentions and fused_qkv.fused(model) == attentions
    assert fused_qkv.fuse(model) == 0  # already fused
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    per_layer = 2 if family == "qwen2" else 1  # weights (and biases) each now share one storage
    assert len(storages(model)) == n_storages - attentions * (3 - 1) * per_layer
    w, b = fused_qkv.qkv_view(model.model.layers[0].self_attn)
    attn = model.model.layers[0].self_attn
    assert torch.equal(w, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert (b is None) == (family != "qwen2")
    assert fused_qkv.unfuse(model) == attentions and fused_qkv.fused(model) == 0
    assert len(storages(model)) == n_storages
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("budget", [None, 0.5])
def test_lean_decode_with_fused_qkv_matches_hf(family, budget):
    model = tiny_model(family, seed=2) if budget is None else routed(family, seed=2)
    if budget is not None:
        prunepath.set_budget(model, budget)
    ids, mask = prompts(3, 6, seed=3, padded=True)
    ref = hf_greedy(model, ids, attention_mask=mask)
    dec = Decoder(model, 3, 6 + NEW, fuse_qkv=True)
    assert dec.step_kind == "lean" and all(wb is not None for wb in dec.lean.qkv)
    assert torch.equal(dec.generate(ids, NEW, attention_mask=mask, eos_token_id=[]), ref)
    assert torch.equal(hf_greedy(model, ids, attention_mask=mask), ref)  # HF's forward too


def test_fused_model_saves_and_loads_normally(tmp_path):
    model = tiny_model("llama", seed=4)
    ids, _ = prompts(1, 5, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
    fused_qkv.fuse(model)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert fused_qkv.fused(loaded) == 0  # a checkpoint holds nn.Linear's usual layout
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref)


def test_moving_a_fused_model_falls_back_to_three_products():
    model = tiny_model("llama", seed=6)
    fused_qkv.fuse(model)
    model.to(torch.float64)  # new tensors per parameter: the shared storage is gone
    assert fused_qkv.fused(model) == 0
    ids, _ = prompts(2, 5, seed=7)
    dec = Decoder(model, 2, 5 + NEW, step="lean", fuse_qkv=False)  # (the default would re-fuse)
    assert all(wb is None for wb in dec.lean.qkv)
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), hf_greedy(model, ids))


def test_decoder_fuses_by_default_unless_told_not_to():
    model = tiny_model("llama", seed=10)
    dec = Decoder(model, 1, 8, fuse_qkv=False)
    assert dec.step_kind == "lean" and fused_qkv.fused(model) == 0
    assert all(wb is None for wb in dec.lean.qkv)
    dec = Decoder(model, 1, 8)  # the default, on a CPU too
    assert fused_qkv.fused(model) > 0 and all(wb is not None for wb in dec.lean.qkv)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_fused_qkv_graph_and_compiled_match_hf_gpu(mode):
    model = routed(seed=8, device="cuda")
    prunepath.set_budget(model, 0.5)
    ids, mask = prompts(3, 6, seed=9, padded=True, device="cuda")
    ref = hf_greedy(model, ids, attention_mask=mask)
    dec = Decoder(model, 3, 6 + NEW, mode=mode, ffn_path="sparse")  # fused by default on a GPU
    assert fused_qkv.fused(model) > 0 and all(wb is not None for wb in dec.lean.qkv)
    assert torch.equal(dec.generate(ids, NEW, attention_mask=mask, eos_token_id=[]), ref)
