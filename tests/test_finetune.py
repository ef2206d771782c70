"""Fine-tuning with routing in the loop (prunepath.finetune): distillation loss, what is trained,
state restored, the sparse model moving towards the dense one, the checkpoint record, the CLI."""

import math

import pytest
import torch
import torch.nn.functional as F

import prunepath
from prunepath.budget import routed_layers
from prunepath.finetune import FinetuneConfig, distillation_loss, finetune, trainable_parameters
from tests.tiny_models import random_ids, tiny_model

pytest.importorskip("transformers")

E = 8


def _converted(seed=3):
    model = tiny_model("llama", seed=seed)
    cfg = prunepath.PrunePathConfig(num_experts=E, router="mlp", router_rank=16, train_tokens=512,
                                    train_seq_len=32, train_epochs=3, train_batch_tokens=128,
                                    kmeans_iters=5, presets={"s50": 0.5})
    prunepath.convert(model, cfg, calibration=random_ids(16, 32, seed=7), progress=False)
    return model


def _kl_to_dense(model, ids, budget):
    with torch.no_grad():
        with prunepath.budget(model, 1.0):
            dense = model(ids).logits
        with prunepath.budget(model, budget):
            sparse = model(ids).logits
    return float(distillation_loss(sparse, dense))


def test_distillation_loss_by_hand():
    t = torch.tensor([[[0.0, math.log(3.0)]]])  # teacher probabilities (1/4, 3/4)
    s = torch.tensor([[[0.0, 0.0]]])  # student (1/2, 1/2)
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(distillation_loss(s, t)) == pytest.approx(want, rel=1e-6)
    x = torch.randn(2, 5, 11)
    assert float(distillation_loss(x, x)) == pytest.approx(0.0, abs=1e-7)
    y = torch.flip(x, dims=[-1])
    ref = F.kl_div(F.log_softmax(y, -1), F.log_softmax(x, -1), log_target=True, reduction="sum") / 10
    assert float(distillation_loss(y, x)) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("kw, field", [
    (dict(steps=0), "steps"), (dict(lr=0.0), "lr"), (dict(budget_min=1.5), "budget_min"),
    (dict(budget_min=0.6, budget_max=0.5), "budget_max"), (dict(dense_fraction=-0.1), "dense_fraction"),
    (dict(params="attn"), "params"), (dict(seq_len=True), "seq_len"),
])
def test_config_rejects_bad_values(kw, field):
    with pytest.raises(ValueError, match=f"FinetuneConfig.{field}"):
        FinetuneConfig(**kw)


def test_needs_a_converted_model_and_token_ids():
    with pytest.raises(ValueError, match="no PrunePath routed FFNs"):
        finetune(tiny_model("llama"), random_ids(4, 32), FinetuneConfig(steps=1, seq_len=16), progress=False)
    model = _converted()
    with pytest.raises(ValueError, match="input_ids"):
        finetune(model, torch.randn(4, 32), FinetuneConfig(steps=1, seq_len=16), progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        finetune(model, random_ids(4, 8), FinetuneConfig(steps=1, seq_len=16), progress=False)


def test_dense_steps_keep_the_dense_model():
    """At budget 1 the student is the teacher: the loss is zero (to rounding) and the dense
    model's outputs stay where they were (Adam turns rounding-level gradients into steps of
    about lr, so the weights may move by that much, not more)."""
    model = _converted()
    ids = random_ids(2, 24, seed=9)
    with torch.no_grad():
        want = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(steps=3, batch_size=2, seq_len=16, dense_fraction=1.0)
    rep = finetune(model, random_ids(8, 32, seed=5), cfg, progress=False, log_every=1)
    assert [h["budget"] for h in rep["history"]] == [1.0, 1.0, 1.0]
    assert all(h["kl"] == pytest.approx(0.0, abs=1e-6) for h in rep["history"])
    for k, v in model.state_dict().items():
        assert (v - before[k]).abs().max() <= 3 * cfg.lr * 1.01, k
    with torch.no_grad():
        assert float(distillation_loss(model(ids).logits, want)) < 1e-5


def test_trains_only_ffn_and_restores_routing_state():
    model = _converted()
    prunepath.set_budget(model, 0.7)
    prunepath.budget.set_prefill(model, "dense")
    ffn_ids = {id(p) for p in trainable_parameters(model, "ffn")}
    assert len(ffn_ids) == 3 * len(routed_layers(model))  # gate, up, down per layer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    rep = finetune(model, random_ids(8, 32, seed=5), FinetuneConfig(steps=4, batch_size=2, seq_len=16, lr=1e-2,
                   budget_min=0.2, budget_max=0.6, dense_fraction=0.0), progress=False, log_every=2)
    assert len(rep["history"]) == 2 and rep["tokens_seen"] == 4 * 2 * 16
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (id(p) in ffn_ids), n
        assert p.requires_grad == grads[n], n
    for layer in routed_layers(model):
        assert layer.policy == "budget" and float(layer.budget) == pytest.approx(0.7)
        assert layer.prefill == "dense"
    cfg = model.prunepath_config
    assert cfg.presets == {}  # calibrated before training: dropped
    assert cfg.finetune["config"]["steps"] == 4 and cfg.finetune["final_kl"] >= 0


def test_all_params_leaves_routers_alone():
    model = _converted()
    router_ids = {id(p) for layer in routed_layers(model) for p in layer.router.parameters()}
    train = trainable_parameters(model, "all")
    assert router_ids.isdisjoint({id(p) for p in train})
    assert len({id(p) for p in train}) == len(train)  # no parameter twice (tied weights)


def test_moves_the_sparse_model_towards_dense():
    """KL(dense || budget 0.5) on held-out ids falls clearly after training with routing."""
    model = _converted(seed=4)
    held_out = random_ids(4, 32, seed=99)
    before = _kl_to_dense(model, held_out, 0.5)
    finetune(model, random_ids(32, 32, seed=5), FinetuneConfig(steps=40, batch_size=4, seq_len=32, lr=1e-2,
             budget_min=0.3, budget_max=0.8, dense_fraction=0.1, warmup_steps=2), progress=False)
    after = _kl_to_dense(model, held_out, 0.5)
    assert before > 0.01
    assert after < 0.7 * before, (before, after)


def test_record_survives_a_checkpoint(tmp_path):
    model = _converted()
    finetune(model, random_ids(8, 32, seed=5), FinetuneConfig(steps=2, batch_size=1, seq_len=16), progress=False)
    prunepath.save(model, tmp_path / "ck")
    loaded = prunepath.from_pretrained(tmp_path / "ck")
    assert loaded.prunepath_config.finetune["config"]["steps"] == 2
    ids = random_ids(2, 12, seed=8)
    with torch.no_grad():
        for p in (1.0, 0.4):
            prunepath.set_budget(model, p)
            prunepath.set_budget(loaded, p)
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_cli_finetune_writes_a_calibrated_checkpoint(tmp_path):
    from prunepath import cli
    from tests.eval_tiny import tiny_llama, tiny_tokenizer, write_data_dir

    data = write_data_dir(tmp_path / "data", n=4)
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=3)
    texts = (data / "wikitext-2" / "valid.txt").read_text().splitlines()
    cfg = prunepath.PrunePathConfig(num_experts=E, router="mlp", router_rank=8, train_tokens=1024,
                                    train_seq_len=32, train_epochs=1, kmeans_iters=2)
    prunepath.convert(model, cfg, calibration=texts, tokenizer=tok, progress=False)
    prunepath.save(model, tmp_path / "in", tokenizer=tok)
    rc = cli.main(["finetune", "--checkpoint", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                   "--steps", "2", "--batch-size", "1", "--seq-len", "32", "--presets", "0.5",
                   "--router-temperature", "2", "--data-dir", str(data), "--report", str(tmp_path / "r.json"),
                   "--teacher", str(tmp_path / "in"), "--no-progress"])
    assert rc == 0
    out = prunepath.checkpoint.read_config(tmp_path / "out")
    assert set(out.presets) == {"s50"} and out.router_temperature == 2.0
    assert out.finetune["config"]["steps"] == 2
    assert (tmp_path / "r.json").is_file()
    import json

    assert json.loads((tmp_path / "r.json").read_text())["data"]["teacher"] == str(tmp_path / "in")


def test_given_teacher_is_used_and_left_as_it_was():
    """A given teacher: the same run as the default when it is the model's dense copy; a different
    teacher trains towards its outputs; the teacher's weights, routing and flags are untouched."""
    import copy

    cfg = FinetuneConfig(steps=3, batch_size=2, seq_len=16, lr=1e-2, dense_fraction=0.0, warmup_steps=1)
    ids = random_ids(8, 32, seed=5)
    a, b = _converted(), _converted()
    teacher = copy.deepcopy(b)
    prunepath.set_budget(teacher, 0.6)  # the teacher runs dense all the same
    teacher.train()
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    rep_a = finetune(a, ids, cfg, progress=False, log_every=1)
    rep_b = finetune(b, ids, cfg, teacher=teacher, progress=False, log_every=1)
    assert [h["kl"] for h in rep_a["history"]] == pytest.approx([h["kl"] for h in rep_b["history"]], rel=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())
    assert teacher.training and float(routed_layers(teacher)[0].budget) == pytest.approx(0.6)
    # another teacher (other weights): the first step's loss differs
    other = _converted(seed=11)
    rep_c = finetune(_converted(), ids, cfg, teacher=other, progress=False, log_every=1)
    assert abs(rep_c["history"][0]["kl"] - rep_a["history"][0]["kl"]) > 1e-3


def test_teacher_is_checked():
    model = _converted()
    cfg = FinetuneConfig(steps=1, batch_size=1, seq_len=16)
    ids = random_ids(4, 32, seed=5)
    with pytest.raises(ValueError, match="another model"):
        finetune(model, ids, cfg, teacher=model, progress=False)
    other = tiny_model("llama", seed=3)
    other.config.vocab_size += 1
    with pytest.raises(ValueError, match="vocabulary"):
        finetune(model, ids, cfg, teacher=other, progress=False)
