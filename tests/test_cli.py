"""The ``prunepath`` command line: help, argument errors, report-only mode, the default recipe,
and that every argument is checked before any long work (no model runs: the long work is
replaced by a function that fails the test if reached)."""

import json
import subprocess
import sys

import pytest

from prunepath import cli


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


def fails_at_once(argv, capsys, *, match):
    """``prunepath argv`` exits with code 2 and one line ``prunepath: error: ...`` on stderr
    naming ``match``; returns that line."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out = capsys.readouterr()
    assert e.value.code == 2, out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunepath: error: "), out.err
    assert match in lines[0]
    return lines[0]


class LongWorkReached(AssertionError):
    pass


@pytest.fixture
def no_long_work(monkeypatch):
    """Loading a model, converting, evaluating or running the quickstart fails the test."""
    import prunepath
    from prunepath.eval import quickstart, sweep

    def reached(*a, **k):
        raise LongWorkReached("the long work started before the arguments were checked")

    monkeypatch.setattr(prunepath.models, "load", reached)
    monkeypatch.setattr(prunepath, "convert", reached)
    monkeypatch.setattr(prunepath, "from_pretrained", reached)
    monkeypatch.setattr(sweep, "run_sweep", reached)
    monkeypatch.setattr(quickstart, "run_quickstart", reached)


def test_help_lists_subcommands(capsys):
    code, text = run(["--help"], capsys)
    assert code == 0
    for name in ("quickstart", "convert", "eval"):
        assert name in text


def test_help_as_a_program():
    r = subprocess.run([sys.executable, "-m", "prunepath.cli", "eval", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--limit" in r.stdout and "--methods" in r.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "quickstart" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval"], "--out"),
        (["eval", "--out", "x", "--targets", "1.5"], "[0, 1)"),
        (["eval", "--out", "x", "--targets", "a,b"], "comma-separated numbers"),
        (["eval", "--out", "x", "--methods", "dense,magnitude"], "magnitude"),
        (["eval", "--out", "x", "--suites", "mmlu"], "mmlu"),
        (["eval", "--out", "x", "--limit", "0"], "positive integer"),
        (["eval", "--out", "x", "--limits", "nlu"], "suite=N"),
        (["eval", "--out", "x", "--limits", "squad=3"], "squad"),
        (["quickstart", "--experts", "-3"], "positive integer"),
        (["convert"], "--out"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_argument_errors_exit_2_with_a_message(argv, message, capsys):
    code, text = run(argv, capsys)
    assert code == 2
    assert message in text


def test_argument_errors_are_one_line(capsys):
    fails_at_once(["convert"], capsys, match="convert: the following arguments are required: --out")
    fails_at_once(["eval", "--out", "x", "--targets", "1.5"], capsys, match="[0, 1)")


def test_stride_larger_than_window_is_refused(tmp_path, capsys):
    fails_at_once(["eval", "--out", str(tmp_path), "--window", "64", "--stride", "128"], capsys, match="stride")


def test_limits_parse():
    assert cli._limits("nlu=50,wikitext2=none,xsum=8") == {"nlu": 50, "wikitext2": None, "xsum": 8}


def test_report_only_rewrites_markdown_and_plot(tmp_path, capsys):
    res = {
        "config": {"model": "tiny", "suites": ["wikitext2"], "limits": {}, "limit": 2, "window": 32, "stride": 16},
        "points": {
            "dense": {"setting": {"method": "dense", "target": 0.0, "calib_sparsity": 0.0},
                      "suites": {"wikitext2": {"ppl": 10.0, "measured_sparsity": 0.0}}},
            "pp_global@50": {"setting": {"method": "pp_global", "target": 0.5, "calib_sparsity": 0.5},
                             "suites": {"wikitext2": {"ppl": 10.3, "measured_sparsity": 0.51}}},
            "topk@50": {"setting": {"method": "topk", "target": 0.5, "calib_sparsity": 0.5},
                        "suites": {"wikitext2": {"ppl": 11.0, "measured_sparsity": 0.5}}},
        },
    }
    (tmp_path / "results.json").write_text(json.dumps(res))
    assert cli.main(["eval", "--out", str(tmp_path), "--report-only"]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "| pp_global@50 |" in md and "10.30" in md
    assert (tmp_path / "plots.png").stat().st_size > 1000
    capsys.readouterr()
    fails_at_once(["eval", "--out", str(tmp_path / "empty"), "--report-only"], capsys, match="not found")


# --------------------------------------------------------------------------- checked before any work


def _checkpoint_like(path):
    path.mkdir(parents=True)
    (path / "prunepath_config.json").write_text("{}")
    return path


def test_unknown_model_is_one_line_before_loading(tmp_path, capsys, no_long_work):
    fails_at_once(["convert", "--out", str(tmp_path / "o"), "--model", "gpt-5"], capsys, match="unknown model 'gpt-5'")
    fails_at_once(["quickstart", "--out", str(tmp_path / "o"), "--model", "gpt-5"], capsys, match="gpt-5")
    assert not (tmp_path / "o").exists()


def test_unknown_model_as_a_program_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "prunepath.cli", "convert", "--out", str(tmp_path / "o"),
                        "--model", "gpt-5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "prunepath: error: --model: unknown model 'gpt-5'; known models: smollm2-135m-instruct"]


def test_convert_refuses_a_folder_with_files_before_converting(tmp_path, capsys, no_long_work):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    fails_at_once(["convert", "--out", str(tmp_path / "o")], capsys, match="is not empty")
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"
    fails_at_once(["convert", "--out", str(tmp_path / "o"), "--overwrite"], capsys, match="is not empty")


def test_convert_replaces_a_checkpoint_only_with_overwrite(tmp_path, capsys, no_long_work):
    out = _checkpoint_like(tmp_path / "o")
    fails_at_once(["convert", "--out", str(out)], capsys, match="--overwrite")
    with pytest.raises(LongWorkReached):  # accepted: the work starts
        cli.main(["convert", "--out", str(out), "--overwrite"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LongWorkReached):
        cli.main(["convert", "--out", str(tmp_path / "empty")])


def test_convert_refuses_an_out_folder_it_cannot_write(tmp_path, capsys, no_long_work):
    (tmp_path / "file").write_text("x")
    fails_at_once(["convert", "--out", str(tmp_path / "file")], capsys, match="is not a folder")
    fails_at_once(["convert", "--out", str(tmp_path / "file" / "o")], capsys, match="is not a folder")


def test_convert_refuses_a_missing_data_dir(tmp_path, capsys, no_long_work):
    fails_at_once(["convert", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "absent")], capsys,
                  match="--data-dir")
    (tmp_path / "data").mkdir()
    fails_at_once(["convert", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "data")], capsys,
                  match="wikitext-2/valid.txt")


def test_config_validation_is_a_one_line_error(tmp_path, capsys, no_long_work):
    fails_at_once(["convert", "--out", str(tmp_path / "o"), "--router-temperature", "-1"], capsys,
                  match="router_temperature")
    fails_at_once(["convert", "--out", str(tmp_path / "o"), "--device", "tpu"], capsys, match="--device")


def test_finetune_checks_its_checkpoint_first(tmp_path, capsys, no_long_work):
    out = str(tmp_path / "o")
    fails_at_once(["finetune", "--checkpoint", str(tmp_path / "absent"), "--out", out], capsys,
                  match="--checkpoint")
    (tmp_path / "plain").mkdir()
    fails_at_once(["finetune", "--checkpoint", str(tmp_path / "plain"), "--out", out], capsys,
                  match="prunepath_config.json")
    assert not (tmp_path / "o").exists()


def test_quickstart_checks_out_and_data_first(tmp_path, capsys, no_long_work):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    fails_at_once(["quickstart", "--out", str(tmp_path / "o")], capsys, match="is not empty")
    fails_at_once(["quickstart", "--out", str(tmp_path / "q"), "--data-dir", str(tmp_path / "absent")], capsys,
                  match="wikitext-2/test.txt")
    with pytest.raises(LongWorkReached):  # its own checkpoint from an earlier run is replaced
        cli.main(["quickstart", "--out", str(_checkpoint_like(tmp_path / "q"))])


def test_eval_makes_no_run_folder_without_its_data(tmp_path, capsys, no_long_work):
    run_dir = tmp_path / "run"
    fails_at_once(["eval", "--out", str(run_dir), "--data-dir", str(tmp_path / "absent")], capsys,
                  match="data directory not found")
    assert not run_dir.exists()
    (tmp_path / "data" / "wikitext-2").mkdir(parents=True)
    (tmp_path / "data" / "wikitext-2" / "test.txt").write_text("text\n")
    line = fails_at_once(["eval", "--out", str(run_dir), "--data-dir", str(tmp_path / "data"),
                          "--suites", "wikitext2,lambada"], capsys, match="lambada/lambada_openai.jsonl")
    assert "wikitext-2/test.txt" not in line
    assert not run_dir.exists()
    with pytest.raises(LongWorkReached):  # the data is there: the sweep starts
        cli.main(["eval", "--out", str(run_dir), "--data-dir", str(tmp_path / "data"), "--suites", "wikitext2"])


def test_eval_refuses_a_checkpoint_folder_that_is_not_one(tmp_path, capsys, no_long_work):
    from tests.eval_tiny import write_data_dir

    data = write_data_dir(tmp_path / "data", n=2)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    fails_at_once(["eval", "--out", str(tmp_path / "run"), "--data-dir", str(data), "--suites", "wikitext2",
                   "--checkpoint", str(tmp_path / "ck")], capsys, match="--checkpoint")
    assert not (tmp_path / "run").exists()


def test_known_errors_from_the_long_work_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys,
                                                                                    monkeypatch):
    from prunepath.eval import sweep
    from prunepath.eval.data import DataNotFound
    from tests.eval_tiny import write_data_dir

    data = write_data_dir(tmp_path / "data", n=2)
    argv = ["eval", "--out", str(tmp_path / "run"), "--data-dir", str(data), "--suites", "wikitext2"]

    def missing(*a, **k):
        raise DataNotFound("data file 'x' not found at\n/somewhere")

    monkeypatch.setattr(sweep, "run_sweep", missing)
    fails_at_once(argv, capsys, match="data file 'x' not found at /somewhere")

    def bug(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sweep, "run_sweep", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(argv)


# --------------------------------------------------------------------------- one default recipe


def test_convert_and_quickstart_take_the_recipe_from_prunepath_config(tmp_path, monkeypatch):
    import prunepath
    from prunepath.eval import quickstart

    seen = {}

    def fake_convert(model, cfg, **kw):
        seen["convert"] = cfg
        raise LongWorkReached

    monkeypatch.setattr(prunepath.models, "load", lambda *a, **k: (object(), object()))
    monkeypatch.setattr(prunepath, "convert", fake_convert)
    monkeypatch.setattr(quickstart, "run_quickstart", lambda cfg, **k: seen.setdefault("quickstart", cfg))
    with pytest.raises(LongWorkReached):
        cli.main(["convert", "--out", str(tmp_path / "o")])
    assert seen["convert"] == prunepath.PrunePathConfig()
    assert cli.main(["quickstart", "--out", str(tmp_path / "q")]) == 0
    qcfg = seen["quickstart"]
    assert qcfg.recipe == {}
    assert qcfg.prunepath_config() == prunepath.PrunePathConfig(train_tokens=qcfg.train_tokens)

    # flags replace single fields
    with pytest.raises(LongWorkReached):
        cli.main(["convert", "--out", str(tmp_path / "o"), "--experts", "96", "--router", "mlp",
                  "--router-temperature", "2", "--train-tokens", "4096"])
    assert seen["convert"] == prunepath.PrunePathConfig(num_experts=96, router="mlp", router_temperature=2.0,
                                                        train_tokens=4096)


def test_recipe_flags_show_the_config_defaults_in_help(capsys):
    import prunepath

    d = prunepath.PrunePathConfig()
    for command in ("convert", "quickstart"):
        code, text = run([command, "--help"], capsys)
        text = " ".join(text.split())
        assert code == 0
        assert f"router kind (default: {d.router})" in text
        assert f"(default: {d.router_rank})" in text and f"(default: {d.router_temperature})" in text
        args = cli.build_parser().parse_args([command, "--out", "x"])
        assert all(getattr(args, flag) is None for flag in cli._RECIPE_FLAGS)


def test_quickstart_default_folder_is_named_and_git_ignored():
    from pathlib import Path

    from prunepath.eval.quickstart import DEFAULT_OUT_DIR, QuickstartConfig

    args = cli.build_parser().parse_args(["quickstart"])
    assert args.out == QuickstartConfig().out_dir == DEFAULT_OUT_DIR == "prunepath-quickstart"
    ignored = (Path(cli.__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert f"/{DEFAULT_OUT_DIR}/" in ignored
