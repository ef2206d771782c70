"""MoEfication: families, clustering, permutation, exactness at budget 1.0, bad inputs."""

import warnings

import pytest
import torch

import prunepath
from prunepath import moefy
from prunepath.convert import is_converted
from prunepath.families import FAMILIES as FAMILY_TABLE
from prunepath.families import UnsupportedModelError
from tests.tiny_models import FAMILIES, VOCAB, random_ids, tiny_model

pytest.importorskip("transformers")

# several tests convert without calibration on purpose (untrained routers are irrelevant there)
pytestmark = pytest.mark.filterwarnings("ignore:prunepath.convert. no calibration text")


def _cfg(**kw):
    base = dict(num_experts=4, clustering="balanced_kmeans", router="mlp", router_rank=8,
                train_tokens=128, train_seq_len=16, train_epochs=1, train_batch_tokens=64,
                kmeans_iters=5)
    base.update(kw)
    return prunepath.PrunePathConfig(**base)


def test_every_family_is_in_the_table():
    assert set(FAMILIES) <= set(FAMILY_TABLE)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("clustering", ["balanced_kmeans", "coactivation"])
def test_exact_at_budget_one(family, clustering):
    model = tiny_model(family)
    ids = random_ids(2, 10)
    with torch.no_grad():
        ref = model(ids).logits
    calib = random_ids(4, 16, seed=5) if clustering == "coactivation" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained routers: irrelevant at budget 1.0
        prunepath.convert(model, _cfg(clustering=clustering, router="linear"), calibration=calib,
                          progress=False)
    with torch.no_grad():
        dense_path = model(ids).logits  # budget 1.0: the wrapped original FFN
        # a [B] budget tensor of ones forces the routed ops path with an all-true mask
        prunepath.set_budget(model, torch.ones(2))
        routed_path = model(ids).logits
    torch.testing.assert_close(dense_path, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(routed_path, ref, atol=1e-5, rtol=0)
    assert prunepath.stats(model)["sparsity"] == 0.0
    with torch.no_grad():
        prunepath.set_budget(model, 0.3)
        sparse = model(ids).logits
    assert prunepath.stats(model)["sparsity"] > 0.0
    assert not torch.allclose(sparse, ref, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_permutation_is_applied_in_place_and_unload_restores_modules(family):
    model = tiny_model(family)
    fam = FAMILY_TABLE[family]
    layers = prunepath.families.decoder_layers(model, fam)
    owner = prunepath.families.ffn_owner(layers[0], fam)
    gate, up, down = prunepath.families.projections(owner, fam)
    up_param, before = up.weight, up.weight.detach().clone()
    ids = random_ids(2, 8)
    with torch.no_grad():
        ref = model(ids).logits
    prunepath.convert(model, _cfg(num_experts=8), progress=False)
    assert up.weight is up_param  # same Parameter, permuted in place
    w_before = before.t() if fam.conv1d else before
    w_after = up.weight.detach().t() if fam.conv1d else up.weight.detach()
    # every neuron row still exists exactly once (a permutation, not a copy or a change)
    assert not torch.equal(w_after, w_before)
    match = (w_after.unsqueeze(1) == w_before.unsqueeze(0)).all(-1)
    assert match.sum(1).eq(1).all() and match.sum(0).eq(1).all()
    routed = prunepath.budget.routed_layers(model)
    assert len(routed) == len(layers)
    # the wrapper computes with the original parameter's storage (no copy)
    assert routed[0].weights().w_up.data_ptr() == up.weight.data_ptr()
    dense = prunepath.unload(model)
    assert dense is model
    assert not is_converted(model)
    assert prunepath.families.projections(prunepath.families.ffn_owner(layers[0], fam), fam)[1] is up
    assert "save_pretrained" not in model.__dict__ and not hasattr(model, "prunepath_config")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)


def test_balanced_assign_gives_equal_sizes():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(60, 6, generator=g)
    sim[:, 0] += 10  # everyone prefers cluster 0
    assign = moefy.balanced_assign(sim, 10)
    assert torch.bincount(assign, minlength=6).eq(10).all()
    perm = moefy.assignment_to_permutation(assign, 6)
    assert torch.equal(perm.sort().values, torch.arange(60))
    assert torch.equal(assign[perm], torch.arange(6).repeat_interleave(10))


def test_balanced_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    e, n, d = 6, 8, 24
    centres = torch.nn.functional.normalize(torch.randn(e, d, generator=g), dim=1) * 3
    truth = torch.arange(e).repeat_interleave(n)
    x = centres[truth] + 0.3 * torch.randn(e * n, d, generator=g)
    shuffle = torch.randperm(e * n, generator=g)
    assign = moefy.balanced_kmeans(x[shuffle], e, iters=20, seed=1)
    assert torch.bincount(assign, minlength=e).eq(n).all()
    # each found cluster is exactly one planted cluster
    t = truth[shuffle]
    for c in range(e):
        assert t[assign == c].unique().numel() == 1


def test_kernel_kmeans_recovers_coactivation_groups():
    g = torch.Generator().manual_seed(0)
    e, n, tokens = 4, 6, 400
    # neurons of one group fire on the same tokens
    fire = (torch.rand(tokens, e, generator=g) < 0.3).double()
    act = fire.repeat_interleave(n, dim=1) * torch.rand(tokens, e * n, generator=g).double()
    gram = act.T @ act
    dg = gram.diagonal().sqrt()
    assign = moefy.balanced_kernel_kmeans(gram / dg / dg.unsqueeze(1), e, iters=20, seed=0)
    truth = torch.arange(e).repeat_interleave(n)
    for c in range(e):
        assert truth[assign == c].unique().numel() == 1


def test_unsupported_model_type_lists_supported():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, vocab_size=VOCAB))
    with pytest.raises(UnsupportedModelError, match="supported model types: .*llama"):
        prunepath.convert(model, _cfg(), progress=False)
    with pytest.raises(UnsupportedModelError):
        prunepath.convert(torch.nn.Linear(2, 2), _cfg(), progress=False)


def test_num_experts_must_divide_width_and_nothing_changes():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"num_experts=5 must divide the FFN width F=64.*\[.*4.*8"):
        prunepath.convert(model, _cfg(num_experts=5), progress=False)
    assert not any(isinstance(m, prunepath.layers.RoutedFFN) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert 4 in moefy.suggest_num_experts(64, 5) and 8 in moefy.suggest_num_experts(64, 5)


def test_convert_twice_and_unload_unconverted_are_errors():
    model = tiny_model("llama")
    prunepath.convert(model, _cfg(), progress=False)
    with pytest.raises(ValueError, match="already converted"):
        prunepath.convert(model, _cfg(), progress=False)
    prunepath.unload(model)
    with pytest.raises(ValueError, match="not a PrunePath model"):
        prunepath.unload(model)


def test_coactivation_needs_calibration():
    with pytest.raises(ValueError, match="coactivation.*calibration"):
        prunepath.convert(tiny_model("llama"), _cfg(clustering="coactivation"), progress=False)


def test_config_validation_and_json_round_trip():
    cfg = _cfg(presets={"s50": 0.6, "fast": [0.5, 0.4]})
    again = prunepath.PrunePathConfig.from_json(cfg.to_json())
    assert again == cfg
    with pytest.raises(ValueError, match="clustering"):
        _cfg(clustering="spectral")
    with pytest.raises(ValueError, match="router"):
        _cfg(router="gru")
    with pytest.raises(ValueError, match="presets"):
        _cfg(presets={"bad": 1.5})
    with pytest.raises(ValueError, match="unknown PrunePathConfig fields"):
        prunepath.PrunePathConfig.from_dict({"num_experts": 4, "colour": "red"})
    with pytest.raises(ValueError, match="format_version"):
        prunepath.PrunePathConfig.from_dict({"num_experts": 4, "format_version": 99})


def test_convert_does_not_mutate_the_callers_config():
    cfg = _cfg()
    model = prunepath.convert(tiny_model("llama"), cfg, progress=False)
    assert cfg.model_type is None and model.prunepath_config.model_type == "llama"
    assert model.prunepath_config.num_layers == 2 and model.prunepath_config.intermediate_size == 64


def test_module_and_function_names_stay_callable():
    import prunepath.budget
    import prunepath.calibrate
    import prunepath.convert  # noqa: F401  (binds the modules to the package attributes)

    model = prunepath.convert(tiny_model("llama"), _cfg(), progress=False)
    with prunepath.budget(model, 0.5):
        assert prunepath.budget.routed_layers(model)[0].budget.item() == 0.5
    assert callable(prunepath.calibrate)
