"""The `mpo-fast` command (mpo_fast/cli.py) and the benchmark CLI it forwards to.

The command must answer --help and list its subcommands, `info` must say which backends
would run, and the console script in setup.py must point at a function that exists. The
benchmarks must write outside tracked files unless told otherwise.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mpo_fast
from mpo_fast import cli

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "mpo_fast", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("info", "version", "train", "pairs", "bench"):
        assert re.search(rf"^\s+{name}\s", proc.stdout, re.M), proc.stdout


def test_no_arguments_prints_help(capsys):
    assert cli.main([]) == 0
    assert "usage: mpo-fast" in capsys.readouterr().out


def test_version(capsys):
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"mpo-fast {mpo_fast.__version__}"


def test_info_names_versions_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch         {torch.__version__}" in out
    assert f"packing       backend: {mpo_fast.packing.backend()}" in out
    assert "logprobs      backend on cpu: torch" in out or "MPO_FAST_BACKEND=triton" in out


def test_info_names_every_version_a_bug_report_needs(capsys):
    from importlib import metadata

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("triton", "transformers", "trl", "peft", "datasets", "accelerate",
                 "flash-attn", "liger-kernel", "kernels"):
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        try:
            assert metadata.version(name) in line
        except metadata.PackageNotFoundError:
            assert "not installed" in line
    assert re.search(r"^python +\d+\.\d+", out, re.M)
    assert re.search(r"^gpu +", out, re.M)
    assert "extension mpo_fast._C" in out


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bench_forwards_its_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "mpo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "python -m bench mpo" in out and "--quick" in out and "--out" in out


def test_train_forwards_its_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mpo-fast train" in out and "--loss-weights" in out and "--config" in out


def test_console_script_points_at_main():
    tree = ast.parse((ROOT / "setup.py").read_text())
    scripts = [ast.literal_eval(kw.value) for node in ast.walk(tree)
               if isinstance(node, ast.Call) for kw in node.keywords
               if kw.arg == "entry_points"]
    assert scripts == [{"console_scripts": ["mpo-fast=mpo_fast.cli:main"]}]
    assert callable(cli.main)


def test_bench_suites_share_one_parser():
    from bench.__main__ import SUITES, build_parser

    parser = build_parser()
    for suite in (*SUITES, "all"):
        args = parser.parse_args([suite, "--quick", "--device", "cpu"])
        assert args.suite == suite and args.quick and args.out is None
    assert "accuracy" in SUITES  # bench/loss_accuracy.py is wired in
    assert parser.parse_args(["packing", "--seed", "3"]).seed == 3
    assert parser.parse_args(["accuracy", "--backend", "triton"]).backend == "triton"


def test_bench_writes_outside_tracked_files(tmp_path, monkeypatch):
    """The default results folder is ./runs/<device>-<date>/, which git ignores; bench/results
    is written only when named."""
    from bench import report

    default = report.default_dir(torch.device("cpu"))
    assert default.parts[0] == "runs"
    probe = default / "mpo.md"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=ROOT)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, f"{probe} would be tracked by git"
    monkeypatch.chdir(tmp_path)
    assert report.results_dir(torch.device("cpu")).resolve() == (tmp_path / default).resolve()
    named = report.results_dir(torch.device("cpu"), tmp_path / "named")
    assert named == tmp_path / "named" and named.is_dir()


@pytest.mark.parametrize("suite,says", [("packing", "identical plans: True"),
                                         ("accuracy", "sigmoid")])
def test_bench_suite_runs_on_the_current_api(suite, says, tmp_path):
    """The scoreboards call the library as it is today (packing once kept `impl=`, accuracy
    once called preference_loss without a BCO state)."""
    proc = subprocess.run([sys.executable, "-m", "bench", suite, "--quick", "--device", "cpu",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert says in proc.stdout
    assert any(tmp_path.iterdir())


def test_a_users_error_is_one_line_and_exit_status_1(capsys):
    from mpo_fast.console import run_command

    def bad_value(argv):
        raise ValueError("lr must be > 0,\n  got -1")

    assert run_command("prog", bad_value, ["--x"]) == 1
    err = capsys.readouterr().err
    assert err == "prog: error: lr must be > 0, got -1 (--debug shows the traceback)\n"
    with pytest.raises(ValueError):  # --debug keeps the traceback
        run_command("prog", bad_value, ["--debug"])

    def bug(argv):
        raise AttributeError("'NoneType' object has no attribute 'double'")

    with pytest.raises(AttributeError):  # a bug is never dressed up as a user's error
        run_command("prog", bug, [])


def test_train_reports_a_missing_data_file_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpo_fast", "train", "--model", "tiny",
                           "--data", str(tmp_path / "missing.jsonl"), "--output-dir",
                           str(tmp_path / "run"), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpo-fast train: error: "), proc.stderr
    assert "missing.jsonl" in lines[0] and "Traceback" not in proc.stderr


def test_train_help_shows_what_the_tiny_preset_sets_and_flags_win():
    from mpo_fast.train.cli import build_parser
    from mpo_fast.train.config import PRESETS, resolve

    text = " ".join(build_parser().format_help().split())
    assert "default: 1; --model tiny: 10" in text  # log_every
    for field, value in PRESETS["tiny"].items():
        assert f"{field}={value}" in text
    assert resolve({"model": "tiny", "log_every": 1, "max_length": 128}).log_every == 1
    assert resolve({"model": "tiny", "max_length": 128}).max_length == 128
    assert resolve({"model": "tiny"}).log_every == PRESETS["tiny"]["log_every"]


def test_train_without_a_bar_prints_one_line_per_record(tmp_path):
    rows = [{"prompt": "largest of 3 9 4", "chosen": "9", "rejected": "3"},
            {"prompt": "smallest of 12 5 40", "chosen": "5", "rejected": "40"}]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    proc = subprocess.run([sys.executable, "-m", "mpo_fast", "train", "--model", "tiny",
                           "--data", str(data), "--output-dir", str(tmp_path / "run"),
                           "--max-steps", "4", "--log-every", "2", "--pairs-per-step", "4",
                           "--loss-types", "sft", "--loss-weights", "1", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sft step ")]
    assert [line.split(":")[0] for line in lines] == ["sft step 2/4", "sft step 4/4"], proc.stdout
    assert "loss " in lines[0] and proc.stdout.rstrip().splitlines()[-1].startswith("done: 4")
