"""``optimum-cli mosaic ...``: the plug-in file is found by optimum-cli and runs the same commands."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import char_tokenizer, tiny_llama  # noqa: E402

CLI = shutil.which("optimum-cli", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(CLI is None, reason="optimum-cli is not installed next to this interpreter")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)


def options(help_text: str) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z-]*)", help_text))


def test_optimum_cli_lists_mosaic_without_importing_torch():
    done = cli("--help")
    assert done.returncode == 0 and "mosaic" in done.stdout
    # the plug-in file itself must stay light: importing it does not import torch
    code = "import sys, optimum.commands.register.register_mosaic as m; print('torch' in sys.modules, m.MosaicCommand.SUBCOMMANDS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "()"]


@pytest.mark.parametrize("command", ["prune", "eval", "push"])
def test_same_options_as_the_console_script(command):
    from optimum_mosaic.commands import SUBCOMMANDS

    if command not in SUBCOMMANDS:
        pytest.skip(f"no {command} sub-command")
    theirs = cli("mosaic", command, "--help")
    assert theirs.returncode == 0, theirs.stderr
    ours = subprocess.run(
        [sys.executable, "-m", "optimum_mosaic.commands", command, "--help"], capture_output=True, text=True
    )
    assert options(theirs.stdout) == options(ours.stdout)
    if command == "prune":
        assert {"--sparsity", "--allocation", "--pruner", "--structured-sparsity", "--lamda"} <= options(theirs.stdout)


def test_prune_and_eval_through_optimum_cli(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "tiny")
    char_tokenizer().save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in want of a wife. " * 20)
    prune = cli(
        "mosaic", "prune", "--model", str(tmp_path / "tiny"), "--output", str(tmp_path / "out"),
        "--calibration-text", str(text), "--sparsity", "0.5", "--allocation", "uniform", "--pruner", "wanda",
        "--nsamples", "4", "--seqlen", "32",
    )  # fmt: skip
    assert prune.returncode == 0, prune.stderr
    sidecar = json.loads((tmp_path / "out" / "mosaic_config.json").read_text())
    assert sidecar["report"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)
    evaluation = cli("mosaic", "eval", "--model", str(tmp_path / "out"), "--text", str(text), "--seqlen", "32")
    assert evaluation.returncode == 0, evaluation.stderr
    assert json.loads(evaluation.stdout.strip().splitlines()[-1])["perplexity"] > 1


def test_bad_option_exits_2_with_one_line():
    done = cli("mosaic", "prune", "--sparsity", "1.5")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "optimum-mosaic: error: sparsity: must be in (0, 1), got 1.5"


def test_mosaic_without_a_sub_command_shows_its_help():
    done = cli("mosaic")
    assert done.returncode == 0, done.stderr
    assert "usage: optimum-cli mosaic" in done.stdout and "prune a model and save it" in done.stdout
