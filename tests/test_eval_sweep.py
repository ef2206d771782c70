"""Matched-sparsity logic, suites and the sweep on a tiny converted model (no downloads)."""

import json

import pytest
import torch

import prunepath
from prunepath.eval import methods, report, suites, sweep
from tests.eval_tiny import tiny_llama, tiny_tokenizer, write_data_dir

E = 8  # tiny FFN width 64 -> 8 neurons per expert


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data_dir(tmp_path_factory.mktemp("data"), n=4)


@pytest.fixture(scope="module")
def converted(data_dir):
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=3)
    texts = (data_dir / "wikitext-2" / "valid.txt").read_text().splitlines()
    cfg = prunepath.PrunePathConfig(num_experts=E, router="mlp", router_rank=8, train_tokens=2048,
                                    train_seq_len=64, train_epochs=2, kmeans_iters=3)
    prunepath.convert(model, cfg, calibration=texts, tokenizer=tok, progress=False)
    return model, tok


@pytest.fixture(scope="module")
def calib_ids(converted, data_dir):
    _, tok = converted
    return sweep.calibration_ids(tok, sweep.SweepConfig(data_dir=str(data_dir), calib_tokens=1024, calib_seq_len=64))


def test_nearest_count_and_grid():
    assert methods.nearest_count(0.5, 48) == 24
    assert methods.nearest_count(0.7, 48) == 14  # 1 - 14/48 = 0.708, nearest
    assert methods.nearest_count(0.9, 48) == 5
    assert methods.nearest_count(0.99, 8) == 1  # never below one expert
    for t in (0.3, 0.5, 0.7, 0.9):
        k = methods.nearest_count(t, 48)
        assert abs(methods.sparsity_of_count(k, 48) - t) <= 0.5 / 48 + 1e-12
    grid = sweep.settings_grid(list(methods.METHODS), [0.0, 0.5, 0.7])
    assert grid[0] == ("dense", 0.0)
    assert len(grid) == 1 + 2 * 5 and ("pp_layer", 0.7) in grid
    with pytest.raises(ValueError, match="target sparsity"):
        methods.nearest_count(1.0, 8)
    with pytest.raises(ValueError, match="unknown method"):
        methods.check_method("magnitude")


def test_unmatched_flags_points_off_target():
    s = [methods.Setting("topk", 0.5, 4, 0.5), methods.Setting("threshold", 0.5, 0.3, 0.47),
         methods.Setting("dense", 0.0, None, 0.0), methods.Setting("pp_global", 0.7, 0.5, None)]
    bad = methods.unmatched(s, tol=0.01)
    assert [x.method for x in bad] == ["threshold", "pp_global"]


@pytest.mark.parametrize("method", ["static", "topk", "threshold", "pp_global", "pp_layer", "pp_oracle"])
def test_every_method_calibrates_to_the_target(converted, calib_ids, method):
    model, _ = converted
    s = methods.calibrate_setting(model, method, 0.5, calib_ids, tol=0.01)
    assert s.method == method and s.knob is not None
    if method in ("static", "topk"):
        assert s.calib_sparsity == pytest.approx(0.5, abs=1e-6)  # 4 of 8 experts, exactly
    elif method == "pp_layer":
        # two tiny layers: per-layer budgets move sparsity in coarse steps
        assert abs(s.calib_sparsity - 0.5) <= 0.08
    else:
        assert abs(s.calib_sparsity - 0.5) <= 0.02
    # the recorded knob reproduces the same sparsity when applied again
    methods.apply_setting(model, methods.Setting(**{k: v for k, v in s.to_dict().items() if k != "name"}))
    assert methods.measure_sparsity(model, calib_ids) == pytest.approx(s.calib_sparsity, abs=1e-9)
    json.dumps(s.to_dict())  # JSON-able
    methods.apply_setting(model, methods.Setting("dense", 0.0))  # also puts trained routers back


def test_oracle_router_is_swapped_in_and_back(converted, calib_ids):
    from prunepath.budget import routed_layers
    from prunepath.routers import OracleRouter

    model, _ = converted
    trained = [layer.router for layer in routed_layers(model)]
    methods.apply_setting(model, methods.Setting("pp_oracle", 0.5, 0.6))
    assert all(isinstance(layer.router, OracleRouter) for layer in routed_layers(model))
    methods.apply_setting(model, methods.Setting("pp_global", 0.5, 0.6))
    assert [layer.router for layer in routed_layers(model)] == trained
    assert not any(isinstance(m, OracleRouter) for m in model.modules())
    prunepath.set_routing(model, "dense")


def test_dense_setting_is_exactly_dense(converted, calib_ids):
    model, _ = converted
    s = methods.calibrate_setting(model, "dense", 0.0, calib_ids)
    assert s.calib_sparsity == 0.0
    for m in ("pp_global", "topk", "static", "threshold"):
        s = methods.calibrate_setting(model, m, 0.0, calib_ids)
        assert s.calib_sparsity == pytest.approx(0.0, abs=1e-9), m
    prunepath.set_routing(model, "dense")


def test_suites_on_tiny_model(converted, data_dir):
    model, tok = converted
    prunepath.set_routing(model, "dense")
    w = suites.wikitext2(model, tok, data_dir=data_dir, limit=3, window=32, stride=16, progress=False)
    assert w["tokens_scored"] == 31 + 2 * 16 and w["ppl"] > 1 and len(w["data"]["sha256"]) == 64
    lam = suites.lambada(model, tok, data_dir=data_dir, progress=False)
    assert lam["n"] == 4 and 0 <= lam["acc"] <= 1 and lam["ppl"] > 1
    sc = suites.story_cloze(model, tok, data_dir=data_dir, progress=False)
    assert sc["n"] == 4 and sc["right_ending_ppl"] > 1
    dense = suites.generation_suite("mt_bench", model, tok, data_dir=data_dir, max_new_tokens=6,
                                    dense_answers="self", progress=False)
    assert dense["fidelity_rougeL"] == pytest.approx(1.0) and dense["identical_to_dense"] == 1.0
    # batched left-padded generation equals one-at-a-time generation
    one = suites.generation_suite("mt_bench", model, tok, data_dir=data_dir, max_new_tokens=6, batch_size=1,
                                  progress=False)
    assert [a["answer_ids"] for a in one["answers"]] == [a["answer_ids"] for a in dense["answers"]]
    prunepath.set_routing(model, "topk", k=1)
    sparse = suites.generation_suite("mt_bench", model, tok, data_dir=data_dir, max_new_tokens=6,
                                     dense_answers=dense["answers"], progress=False)
    assert sparse["dense_answer_nll_per_token"] >= 0
    prunepath.set_routing(model, "dense")
    x = suites.generation_suite("xsum", model, tok, data_dir=data_dir, limit=2, max_new_tokens=4, progress=False)
    assert x["n"] == 2 and 0 <= x["rougeL"] <= 1


def test_sweep_writes_results_and_resumes(converted, data_dir, tmp_path, monkeypatch):
    model, tok = converted
    cfg = sweep.SweepConfig(
        out_dir=str(tmp_path / "run"), methods=list(methods.METHODS), targets=[0.5],
        suites=["wikitext2", "story_cloze", "alpaca_eval"], limit=2, data_dir=str(data_dir), window=32, stride=16,
        max_new_tokens={"alpaca_eval": 4}, calib_tokens=512, calib_seq_len=64, tol=0.02,
    )
    res = sweep.run_sweep(cfg, model=model, tokenizer=tok, progress=False, log=lambda *a: None)
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["points"]) == {"dense", "static@50", "topk@50", "threshold@50", "pp_global@50", "pp_layer@50"}
    assert saved["points"]["dense"]["suites"]["wikitext2"]["measured_sparsity"] == 0.0
    assert saved["points"]["topk@50"]["suites"]["wikitext2"]["measured_sparsity"] == pytest.approx(0.5)
    assert saved["points"]["dense"]["suites"]["alpaca_eval"]["fidelity_rougeL"] == pytest.approx(1.0)
    assert "fidelity_rougeL" in saved["points"]["pp_global@50"]["suites"]["alpaca_eval"]
    assert saved["versions"]["torch"] == torch.__version__
    assert len(saved["points"]["dense"]["suites"]["wikitext2"]["data"]["sha256"]) == 64
    md = (out / "results.md").read_text()
    assert "PrunePath global p" in md and "## Targets" in md
    assert (out / "plots.png").stat().st_size > 1000
    answers = (out / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 6 * 2
    # resume: nothing is recomputed
    monkeypatch.setattr(sweep, "run_suite", lambda *a, **k: pytest.fail("resumed sweep recomputed a suite"))
    again = sweep.run_sweep(cfg, model=model, tokenizer=tok, progress=False, log=lambda *a: None)
    assert again["points"].keys() == res["points"].keys()


def test_target_check_logic():
    def pt(method, target, ppl, acc):
        return {"setting": {"method": method, "target": target},
                "suites": {"wikitext2": {"ppl": ppl, "measured_sparsity": target},
                           "nlu": {"mean_acc": acc, "measured_sparsity": target}}}

    res = {"points": {
        "dense": pt("dense", 0.0, 10.0, 0.60),
        "pp_global@50": pt("pp_global", 0.5, 10.4, 0.595),   # +4%, -0.5 pt: meets
        "pp_layer@50": pt("pp_layer", 0.5, 10.6, 0.58),      # +6%, -2 pt: misses
        "topk@50": pt("topk", 0.5, 10.5, 0.59),
        "pp_global@70": pt("pp_global", 0.7, 12.0, 0.57),    # -3 pt: misses 2-pt target
        "static@70": pt("static", 0.7, 11.0, 0.50),
    }}
    chk = report.check_targets(res)
    q = {(r["method"], r["target"]): r for r in chk["quality"]}
    assert q[("pp_global", 0.5)]["ppl_ok"] and q[("pp_global", 0.5)]["nlu_ok"]
    assert q[("pp_global", 0.5)]["ppl_increase_pct"] == pytest.approx(4.0)
    assert not q[("pp_layer", 0.5)]["ppl_ok"] and not q[("pp_layer", 0.5)]["nlu_ok"]
    assert not q[("pp_global", 0.7)]["nlu_ok"]
    vb = {(r["target"], r["suite"]): r for r in chk["vs_baselines"]}
    assert vb[(0.5, "wikitext2")]["win"] and vb[(0.5, "wikitext2")]["best_prunepath"] == "pp_global"
    assert not vb[(0.7, "wikitext2")]["win"]  # static 11.0 beats 12.0
    assert vb[(0.7, "nlu")]["win"]
    assert "NO" in report.targets_markdown(chk)
