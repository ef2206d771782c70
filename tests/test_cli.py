"""The ``prunepath`` command line: help, argument errors, report-only mode (no model runs)."""

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


def test_stride_larger_than_window_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="stride"):
        cli.main(["eval", "--out", str(tmp_path), "--window", "64", "--stride", "128"])


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
    with pytest.raises(SystemExit, match="not found"):
        cli.main(["eval", "--out", str(tmp_path / "empty"), "--report-only"])
