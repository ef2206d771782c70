"""One checkpoint: save / from_pretrained round trip, plain HF loading, clear errors, atomic writes."""

import json
import os

import pytest
import torch

import prunepath
from prunepath.budget import routed_layers
from prunepath.checkpoint import CONFIG_NAME, ROUTERS_NAME, CheckpointError
from tests.tiny_models import random_ids, tiny_model

pytest.importorskip("transformers")


def _converted(family="llama", seed=5, router="mlp"):
    model = tiny_model(family, seed=seed)
    ids = random_ids(2, 12)
    with torch.no_grad():
        ref = model(ids).logits
    cfg = prunepath.PrunePathConfig(num_experts=8, router=router, router_rank=8, train_tokens=256,
                                    train_seq_len=16, train_epochs=1, train_batch_tokens=64,
                                    kmeans_iters=5)
    prunepath.convert(model, cfg, calibration=random_ids(16, 16, seed=3), progress=False)
    model.prunepath_config.presets.update({"s50": 0.55, "mixed": [0.9, 0.4]})
    return model, ids, ref


def _listing(path):
    return sorted(os.listdir(path))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_round_trip_is_bit_exact(tmp_path, family):
    model, ids, ref = _converted(family)
    out = tmp_path / "ckpt"
    model.save_pretrained(out)  # the save hook of a converted model
    assert {CONFIG_NAME, ROUTERS_NAME, "config.json", "model.safetensors"} <= set(_listing(out))
    assert not [p for p in _listing(tmp_path) if p != "ckpt"]  # no temp dirs left
    loaded = prunepath.from_pretrained(out)
    assert loaded.prunepath_config == model.prunepath_config
    a, b = routed_layers(model), routed_layers(loaded)
    for ra, rb in zip(a, b):
        for (ka, va), (kb, vb) in zip(ra.router.state_dict().items(), rb.router.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
        wa, wb = ra.weights(), rb.weights()
        assert torch.equal(wa.w_up, wb.w_up) and torch.equal(wa.w_down, wb.w_down)  # permutation kept
    for budget in (1.0, 0.5, "s50", "mixed"):
        prunepath.set_budget(model, budget)
        prunepath.set_budget(loaded, budget)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits), budget
    loaded_at = prunepath.from_pretrained(out, budget="s50")
    assert routed_layers(loaded_at)[0].budget.item() == pytest.approx(0.55)
    with torch.no_grad():
        torch.testing.assert_close(prunepath.from_pretrained(out)(ids).logits, ref, atol=1e-5, rtol=0)


def test_plain_transformers_loads_the_dense_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model, ids, ref = _converted()
    prunepath.save(model, tmp_path / "ckpt")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert not any(isinstance(m, prunepath.layers.RoutedFFN) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ref, atol=1e-5, rtol=0)
    # the converted model still works after saving (FFNs re-wrapped)
    assert len(routed_layers(model)) == 2


def test_oracle_router_checkpoint(tmp_path):
    model, ids, ref = _converted(router="oracle")
    prunepath.save(model, tmp_path / "ckpt")
    loaded = prunepath.from_pretrained(tmp_path / "ckpt", budget=0.5)
    prunepath.set_budget(model, 0.5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_overwrite_replaces_and_refuses_when_asked(tmp_path):
    model, _, _ = _converted()
    out = tmp_path / "ckpt"
    prunepath.save(model, out)
    model.prunepath_config.presets["new"] = 0.3
    prunepath.save(model, out)
    assert prunepath.checkpoint.read_config(out).presets["new"] == 0.3
    with pytest.raises(CheckpointError, match="already exists"):
        prunepath.save(model, out, overwrite=False)
    assert _listing(tmp_path) == ["ckpt"]


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    model, _, _ = _converted()
    out = tmp_path / "ckpt"
    prunepath.save(model, out)
    before = {p: (out / p).read_bytes() for p in _listing(out)}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        prunepath.save(model, out)  # replacing an existing checkpoint
    with pytest.raises(OSError, match="disk full"):
        prunepath.save(model, tmp_path / "fresh")
    assert _listing(tmp_path) == ["ckpt"]  # no temp dir, no partial "fresh"
    assert {p: (out / p).read_bytes() for p in _listing(out)} == before
    assert len(routed_layers(model)) == 2  # still converted


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, _, _ = _converted()
    out = tmp_path_factory.mktemp("saved") / "ckpt"
    prunepath.save(model, out)
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("missing", [CONFIG_NAME, ROUTERS_NAME, "model.safetensors", "config.json"])
def test_partial_checkpoint_is_a_clear_error(tmp_path, saved, missing):
    d = _copy(saved, tmp_path / "c")
    os.remove(d / missing)
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        prunepath.from_pretrained(d)


def test_corrupt_router_file(tmp_path, saved):
    d = _copy(saved, tmp_path / "c")
    data = (d / ROUTERS_NAME).read_bytes()
    (d / ROUTERS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="sha256 differs"):
        prunepath.from_pretrained(d)
    # without the checksum, the truncated file itself is reported
    cfg = json.loads((d / CONFIG_NAME).read_text())
    del cfg["routers_sha256"]
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="corrupt"):
        prunepath.from_pretrained(d)


def test_router_file_from_another_config(tmp_path, saved):
    d = _copy(saved, tmp_path / "c")
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["num_experts"] = 4
    del cfg["routers_sha256"]
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match.*num_experts"):
        prunepath.from_pretrained(d)


def test_router_tensor_shape_mismatch(tmp_path, saved):
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = _copy(saved, tmp_path / "c")
    with safe_open(str(d / ROUTERS_NAME), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("fc1.weight"))
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, str(d / ROUTERS_NAME), metadata=meta)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    del cfg["routers_sha256"]
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape"):
        prunepath.from_pretrained(d)


def test_version_and_garbage_config(tmp_path, saved):
    d = _copy(saved, tmp_path / "c")
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["format_version"] = 99
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format_version 99"):
        prunepath.from_pretrained(d)
    (d / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        prunepath.from_pretrained(d)
    with pytest.raises(CheckpointError, match="not a directory"):
        prunepath.from_pretrained(tmp_path / "nowhere")


def test_model_type_mismatch(tmp_path, saved):
    d = _copy(saved, tmp_path / "c")
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["model_type"] = "gpt2"
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'llama' but .* says 'gpt2'"):
        prunepath.from_pretrained(d)


def test_no_pickle_files(saved):
    assert not [p for p in _listing(saved) if p.endswith((".bin", ".pt", ".pkl", ".pth"))]


def test_router_temperature_round_trips(tmp_path):
    model, ids, _ = _converted("llama", seed=7)
    with pytest.warns(UserWarning):
        prunepath.set_router_temperature(model, 2.5)
    model.save_pretrained(tmp_path / "ck")
    loaded = prunepath.from_pretrained(tmp_path / "ck", budget=0.5)
    assert loaded.prunepath_config.router_temperature == 2.5
    assert all(layer.temperature == 2.5 for layer in routed_layers(loaded))
    prunepath.set_budget(model, 0.5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
