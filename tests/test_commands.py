"""The optimum-mosaic command line on a tiny checkpoint."""

import json

import pytest
from conftest import char_tokenizer, tiny_llama

from optimum_mosaic import PrunedModelForCausalLM
from optimum_mosaic.commands import main


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "tiny"
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    text = tmp_path / "calib.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in want of a wife. " * 20)
    return path, text


def test_prune_then_eval(checkpoint, tmp_path, capsys):
    path, text = checkpoint
    out = tmp_path / "pruned"
    argv = [
        "prune",
        "--model",
        str(path),
        "--output",
        str(out),
        "--calibration-text",
        str(text),
        "--sparsity",
        "0.6",
        "--allocation",
        "layer",
        "--pruner",
        "wanda",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--eval-windows",
        "2",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| pruned | 0.6" in printed and "perplexity" in printed
    model = PrunedModelForCausalLM.from_pretrained(out)
    assert model.mosaic_config.pruner == "wanda" and model.mosaic_config.sparsity == 0.6
    assert main(["eval", "--model", str(out), "--text", str(text), "--seqlen", "32", "--max-windows", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] > 1


def test_prune_compressed(checkpoint, tmp_path):
    path, text = checkpoint
    out = tmp_path / "packed"
    argv = ["prune", "--model", str(path), "--output", str(out), "--calibration-text", str(text), "--compressed"]
    argv += [
        "--sparsity",
        "0.7",
        "--allocation",
        "uniform",
        "--pruner",
        "magnitude",
        "--nsamples",
        "2",
        "--seqlen",
        "16",
    ]
    assert main(argv) == 0
    assert json.loads((out / "mosaic_config.json").read_text())["format_version"] == 2
    model = PrunedModelForCausalLM.from_pretrained(out)
    assert model.mosaic_config.format_version == 2 and abs(model.mosaic_report.achieved_sparsity - 0.7) < 1e-3


def test_bad_option_is_one_clear_line(capsys):
    assert main(["prune", "--sparsity", "1.2"]) == 2
    assert capsys.readouterr().err.strip() == "optimum-mosaic: error: sparsity: must be in (0, 1), got 1.2"
