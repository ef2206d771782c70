"""bench/profile_step_cpu.py: each prunepath::linear of a decode step is named by its weight,
and a profiled decode of a tiny Llama finds every linear of the step once per layer."""

import pytest
import torch

from .helpers import bench_module

transformers = pytest.importorskip("transformers")


def _bench_module():
    return bench_module("profile_step_cpu.py")


def _tiny_llama():
    # every projection a different shape, so a role is never a guess
    cfg = transformers.LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_linear_roles_from_shapes():
    bench = _bench_module()
    cfg = _tiny_llama().config
    role = bench.linear_role
    assert role([[1, 64], [211, 64], []], cfg) == "lm_head"
    assert role([[1, 64], [(4 + 2 * 2) * 16, 64], []], cfg) == "q/k/v"
    assert role([[1, 64], [96, 64], []], cfg) == "gate/up"
    assert role([[1, 96], [64, 96], []], cfg) == "down"
    assert role([[1, 64], [64, 64], []], cfg) == "o"
    assert role([[1, 64], [7, 64], []], cfg) == "linear 7x64"


def test_profiled_decode_finds_every_linear():
    from prunepath.decode import Decoder

    bench = _bench_module()
    model = _tiny_llama()
    dec = Decoder(model, 1, 24, mode="eager")
    prompt = torch.randint(0, 211, (1, 5))
    prof = bench.profile_decode(dec, prompt, 4, model.config)
    ms = prof["ms_per_step"]
    assert prof["steps"] == 4
    for role in ("q/k/v", "o", "gate/up", "down", "lm_head"):
        assert ms.get(role, 0.0) > 0.0, (role, ms)
    assert abs(prof["total_ms"] - sum(ms.values())) < 1e-9
