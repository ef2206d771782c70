"""prunepath.decode.packed_down: W_down stored transposed, read in place by every path."""

import pytest
import torch

import prunepath
from prunepath import ops
from prunepath.decode import packed_down
from prunepath.decode import Decoder, routed_layers
from prunepath.layers import frozen
from prunepath.ops.checks import is_packed_down
from prunepath.ops.reference import routed_ffn_reference

from .helpers import assert_close_rel
from .test_ops import CPU_BACKENDS, backend_or_skip


def _model(backend="auto"):
    from tests.eval_tiny import tiny_llama, tiny_tokenizer

    torch.manual_seed(0)
    model = tiny_llama(tiny_tokenizer())
    cfg = prunepath.PrunePathConfig(num_experts=8, router="mlp", router_rank=8, backend=backend)
    return prunepath.convert(model, cfg, torch.randint(0, 50, (4, 32)), progress=False).eval()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3, 40])
def test_routed_ffn_reads_a_transposed_w_down(backend, dtype, t):
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(t)
    d, f, e = 29, 96, 12
    x = torch.randn(t, d, generator=gen).to(dtype)
    wg, wu = ((torch.randn(f, d, generator=gen) / d**0.5).to(dtype) for _ in range(2))
    wd = (torch.randn(d, f, generator=gen) / f**0.5).to(dtype)
    wd_packed = wd.t().contiguous().t()
    assert is_packed_down(wd_packed) and not is_packed_down(wd)
    mask = torch.rand(t, e, generator=gen) < 0.5
    out = ops.routed_ffn(x, wg, wu, wd_packed, mask, backend=backend)
    ref = routed_ffn_reference(x.double(), wg.double(), wu.double(), wd.double(), mask, "silu")
    assert_close_rel(out, ref, dtype)
    bound = ops.bind_routed_ffn(wg, wu, wd_packed, backend=backend)
    assert_close_rel(bound(x, mask), ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_reads_a_transposed_weight(dtype):
    x = torch.randn(3, 40).to(dtype)
    w = torch.randn(40, 17).to(dtype).t()  # [17, 40] view of a contiguous [40, 17]
    ref = torch.nn.functional.linear(x.double(), w.double())
    assert_close_rel(ops.linear(x, w), ref, dtype)


def test_pack_keeps_values_parameters_and_outputs_and_unpack_restores():
    model = _model()
    layers = routed_layers(model)
    params = [m.projections()[2].weight for m in layers]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 50, (2, 9))
    want = {}
    with torch.no_grad():
        for budget in (1.0, 0.5, 0.2):
            prunepath.set_budget(model, budget)
            want[budget] = model(ids).logits
        assert packed_down.pack(model) == len(layers) and packed_down.packed(model) == len(layers)
        assert packed_down.pack(model) == 0  # already packed
        assert [m.projections()[2].weight for m in layers] == params  # same Parameter objects
        assert all(is_packed_down(p) for p in params)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
        for budget, w in want.items():
            prunepath.set_budget(model, budget)
            torch.testing.assert_close(model(ids).logits, w)
            with frozen(layers):  # the bound ops take the packed layout too
                torch.testing.assert_close(model(ids).logits, w)
                if budget < 1.0:  # (budget 1 is the dense path: nothing bound)
                    assert all(m._bound[1][1] is not None for m in layers)
        assert packed_down.unpack(model) == len(layers) and packed_down.packed(model) == 0
    assert all(p.is_contiguous() for p in params)


@pytest.mark.parametrize("budget", [0.5, 1.0])  # 1.0: the dense FFN reads W_down^T in place
def test_decoder_packed_down_generates_the_same_tokens(budget):
    model = _model()
    prunepath.set_budget(model, budget)
    ids = torch.randint(3, 50, (1, 6))
    want = Decoder(model, 1, 20, mode="eager", packed_down=False).generate(
        ids, max_new_tokens=8, eos_token_id=[])
    assert packed_down.packed(model) == 0
    dec = Decoder(model, 1, 20, mode="eager")  # default on a CPU (fast linears): packed
    assert packed_down.packed(model) == len(routed_layers(model))
    got = dec.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(got, want)


def test_decoder_leaves_w_down_alone_without_fast_linears():
    model = _model()
    Decoder(model, 1, 20, mode="eager", fast_linears=False)  # F.linear would read it slowly
    assert packed_down.packed(model) == 0


def test_conv1d_families_are_left_alone():
    from tests.tiny_models import tiny_model

    model = prunepath.convert(tiny_model("gpt2"), prunepath.PrunePathConfig(num_experts=4),
                              torch.randint(0, 50, (2, 16)), progress=False)
    assert packed_down.pack(model) == 0
    # GPT-2's c_proj is [F, d] already: its nn.Linear-layout view is the packed layout
    assert all(is_packed_down(m.weights().w_down) for m in routed_layers(model))


def test_a_packed_model_saves_and_loads_the_same_weights(tmp_path):
    model = _model()
    prunepath.set_budget(model, 0.5)
    ids = torch.randint(3, 50, (1, 7))
    with torch.no_grad():
        want = model(ids).logits
    packed_down.pack(model)
    prunepath.save(model, tmp_path / "ckpt")
    assert packed_down.packed(model) == len(routed_layers(model))  # saving leaves it packed
    loaded = prunepath.from_pretrained(tmp_path / "ckpt", budget=0.5).eval()
    assert packed_down.packed(loaded) == 0  # a checkpoint holds nn.Linear's layout
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)


def test_unload_lays_a_packed_w_down_out_as_nn_linear_again():
    model = _model()
    downs = [m.projections()[2].weight for m in routed_layers(model)]
    before = [w.clone() for w in downs]
    assert packed_down.pack(model) == len(downs) and not downs[0].is_contiguous()
    prunepath.unload(model)
    assert all(w.is_contiguous() and torch.equal(w, b) for w, b in zip(downs, before))
