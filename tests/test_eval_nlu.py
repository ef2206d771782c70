"""The lm-evaluation-harness adapter on tiny local task files (no downloads)."""

import math

import pytest

pytest.importorskip("lm_eval")

from prunepath.eval import nlu  # noqa: E402
from prunepath.eval.scoring import score_continuations  # noqa: E402
from prunepath.eval.tasks import loaders  # noqa: E402
from tests.eval_tiny import tiny_llama, tiny_tokenizer, write_data_dir  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_llama(tok), tok


def test_every_task_runs_on_a_five_example_local_data_dir(tmp_path, tiny):
    model, tok = tiny
    d = write_data_dir(tmp_path / "data", n=5)
    r = nlu.run_nlu(model, tok, data_dir=d, batch_size=4)
    assert set(r["tasks"]) == set(nlu.NLU_TASKS)
    for name, t in r["tasks"].items():
        assert t["n"] == 5, name
        # accuracies of 5 items are multiples of 0.2, with a finite stderr
        for key in ("acc", "acc_norm"):
            assert 0.0 <= t[key] <= 1.0 and math.isclose(t[key] * 5, round(t[key] * 5), abs_tol=1e-9)
        assert t["acc_stderr"] is not None and t["acc_stderr"] >= 0
    assert r["mean_acc"] == pytest.approx(sum(t["acc"] for t in r["tasks"].values()) / 8)
    assert all(len(v["sha256"]) == 64 for v in r["data"].values())


def test_lm_eval_accuracy_matches_our_own_scorer(tmp_path, tiny):
    """lm-eval's acc on COPA and PIQA equals argmax of our summed log-probs (same prompts)."""
    model, tok = tiny
    d = write_data_dir(tmp_path / "data", n=5)
    r = nlu.run_nlu(model, tok, tasks=["copa", "piqa"], data_dir=d, batch_size=2)
    for task, load in (("copa", loaders.copa), ("piqa", loaders.piqa)):
        docs = load(data_dir=d)["validation"]
        right = []
        for doc in docs:
            sc = score_continuations(model, tok, [(doc["query"], " " + c) for c in doc["choices"]], progress=False)
            lp = [s.logprob for s in sc]
            right.append(lp.index(max(lp)) == doc["gold"])
        assert r["tasks"][task]["acc"] == pytest.approx(sum(right) / len(right)), task


def test_limit_and_unknown_task(tmp_path, tiny):
    model, tok = tiny
    d = write_data_dir(tmp_path / "data", n=5)
    r = nlu.run_nlu(model, tok, tasks=["rte"], data_dir=d, limit=3, batch_size=2)
    assert r["tasks"]["rte"]["n"] == 3
    with pytest.raises(ValueError, match="unknown NLU task"):
        nlu.run_nlu(model, tok, tasks=["mmlu"], data_dir=d)


def test_loaders_normalise_prompts(tmp_path):
    d = write_data_dir(tmp_path / "data", n=5)
    piqa = loaders.piqa(data_dir=d)["validation"][0]
    assert piqa["query"].endswith("?\nAnswer:") and piqa["choices"] == ["use a cat", "use a dog"]
    rte = loaders.rte(data_dir=d)["validation"]
    assert rte[0]["choices"] == ["True", "False"] and rte[0]["gold"] == 0 and rte[1]["gold"] == 1
    assert rte[0]["query"] == "The cat sat 0.\nQuestion: A cat sat. True or False?\nAnswer:"
    sst = loaders.sst2(data_dir=d)["validation"][1]
    assert sst["choices"] == ["negative", "positive"] and sst["gold"] == 1
    hs = loaders.hellaswag(data_dir=d)["validation"]
    assert len(hs) == 5 and hs[2]["gold"] == 2 and hs[0]["choices"][2] == "sat on the mat."
    wg = loaders.winogrande(data_dir=d)["validation"][1]
    assert loaders.winogrande_gold(wg) == 1 and wg["continuation"] == "was tired ."


def test_hellaswag_parser_rejects_truncated_file():
    with pytest.raises(ValueError, match="multiple of 6"):
        loaders.parse_hellaswag(["ctx", "0", "a", "b", "c"])


def test_missing_data_dir_names_what_was_tried(tmp_path, tiny):
    model, tok = tiny
    with pytest.raises(FileNotFoundError, match="PRUNEPATH_DATA"):
        nlu.run_nlu(model, tok, tasks=["copa"], data_dir=tmp_path / "nope")
