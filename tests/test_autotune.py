"""backend="auto" bookkeeping that runs anywhere: token buckets, the static CPU choice, and
the on-disk cache (atomic JSON, merged entries, corrupt files ignored)."""

import json

import pytest

import torch

from prunepath import ops
from prunepath.ops import autotune


def test_token_buckets():
    assert [autotune.token_bucket(t) for t in (1, 2, 3, 4, 5, 16, 17, 64, 65, 1000)] == [
        1, 2, 4, 4, 8, 16, 32, 64, 128, 128]


def test_cpu_uses_static_preference_without_measuring(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEPATH_CACHE_DIR", str(tmp_path))
    autotune.clear()
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    name = autotune.choose("routed_ffn", torch.device("cpu"),
                           (torch.float32, 8, 16, 4, True, 3))
    assert name == ("cpu" if "cpu" in ops.available_backends("cpu") else "torch")
    assert not (tmp_path / "autotune.json").exists()
    autotune.clear()


def test_disk_cache_is_merged_and_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEPATH_CACHE_DIR", str(tmp_path / "sub"))
    autotune.clear()
    autotune._store_disk("a", {"choice": "triton", "ms": {"triton": 1.0}})
    autotune._store_disk("b", {"choice": "cuda", "ms": {"cuda": 2.0}})
    data = json.loads((tmp_path / "sub" / "autotune.json").read_text())
    assert data == {"a": {"choice": "triton", "ms": {"triton": 1.0}},
                    "b": {"choice": "cuda", "ms": {"cuda": 2.0}}}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["autotune.json"]  # no temp left
    autotune.clear()
    assert autotune._disk()["b"]["choice"] == "cuda"
    autotune.clear()


def test_corrupt_cache_file_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEPATH_CACHE_DIR", str(tmp_path))
    (tmp_path / "autotune.json").write_text("{not json")
    autotune.clear()
    assert autotune._disk() == {}
    autotune._store_disk("k", {"choice": "torch"})
    assert json.loads((tmp_path / "autotune.json").read_text()) == {"k": {"choice": "torch"}}
    autotune.clear()


def test_bucketed_keys():
    k1 = autotune._bucket_key("routed_ffn", (torch.bfloat16, 64, 128, 8, True, 3))
    k2 = autotune._bucket_key("routed_ffn", (torch.bfloat16, 64, 128, 8, True, 4))
    k3 = autotune._bucket_key("routed_ffn", (torch.bfloat16, 64, 128, 8, True, 5))
    assert k1 == k2 != k3


def test_measuring_flow_on_cpu(monkeypatch, tmp_path):
    """The measured path (normally CUDA only) run on CPU backends: measures once per bucket,
    stores the winner on disk, answers later calls from memory, then from disk."""
    cands = [b for b in ("cpu", "torch") if b in ops.available_backends("cpu")]
    if len(cands) < 2:
        import pytest

        pytest.skip("needs the cpu extension and torch")
    monkeypatch.setenv("PRUNEPATH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_MEASURED_DEVICES", ("cuda", "cpu"))
    autotune.clear()
    calls = []
    real = autotune.measure
    monkeypatch.setattr(autotune, "measure",
                        lambda *a, **k: calls.append(a[0]) or real(*a, repeats=3))
    x = torch.randn(3, 16)
    w = torch.randn(32, 16)
    wd = torch.randn(16, 32)
    mask = torch.rand(3, 4) < 0.5
    out = ops.routed_ffn(x, w, w, wd, mask)
    torch.testing.assert_close(out, ops.routed_ffn(x, w, w, wd, mask, backend="torch"),
                               rtol=1e-4, atol=1e-4)
    ops.routed_ffn(torch.randn(4, 16), w, w, wd, torch.rand(4, 4) < 0.5)  # same bucket
    assert calls == ["routed_ffn"]
    stored = json.loads((tmp_path / "autotune.json").read_text())
    (entry,) = stored.values()
    assert entry["choice"] in cands and set(entry["ms"]) == set(cands)
    autotune.clear()
    assert ops.routed_ffn(x, w, w, wd, mask).shape == (3, 16)
    assert calls == ["routed_ffn"]  # answered from the disk cache
    ops.route(torch.randn(3, 4), 0.5)
    assert calls == ["routed_ffn", "route"]
    autotune.clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_candidates_are_timed_as_graph_replays():
    dev = torch.device("cuda")
    x = torch.randn(256, 256, device=dev)
    timer = autotune._graph_timer(lambda: x @ x, dev)
    assert timer is not None and 0 < timer() < 50
    assert autotune._graph_timer(lambda: (x.sum().item(), x)[1], dev) is None  # host sync: not capturable
    times = autotune.measure("routed_ffn", dev, (torch.bfloat16, 256, 1024, 8, True, 1),
                             ops.available_backends("cuda"))
    assert set(times) == set(ops.available_backends("cuda")) and all(0 < v < 50 for v in times.values())
