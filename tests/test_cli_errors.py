"""Every expected CLI error is one line on stderr and exit status 2, found before the model is loaded where it can
be; the help says what goes with what; the summary prints measured values only."""

import json
import re
import shutil
import time

import huggingface_hub
import pytest
from conftest import char_tokenizer, tiny_llama
from test_hub import TEXT, hub  # noqa: F401  (the loopback Hub fixture)

from optimum_mosaic.commands import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_llama().save_pretrained(root / "tiny")
    char_tokenizer().save_pretrained(root / "tiny")
    (root / "calib.txt").write_text(TEXT * 20)
    small = ["--allocation", "uniform", "--pruner", "wanda", "--nsamples", "4", "--seqlen", "32"]
    argv = ["prune", "--model", str(root / "tiny"), "--calibration-text", str(root / "calib.txt"), *small]
    assert main([*argv, "--output", str(root / "ckpt")]) == 0
    return root, argv


def one_line_error(argv, capsys) -> str:
    """The error line; stderr holds nothing else but progress bars (transformers' 'Loading weights')."""
    assert main(argv) == 2
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip()]
    errors = [line for line in lines if line.startswith("optimum-mosaic: error: ")]
    assert len(errors) == 1 and all(line in errors or "it/s]" in line for line in lines), lines
    return errors[0]


@pytest.fixture
def no_hub(monkeypatch):
    """Any Hub download is a test failure (a missing local path used to retry the Hub for half a minute)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"Hub contacted: {args}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", refuse)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": "./missing-model"}, "model: './missing-model' does not exist. Give a local checkpoint directory"),
        ({"--model": "missing"}, "model: 'missing' does not exist"),
        ({"--calibration-text": "nope.txt"}, "--calibration-text: 'nope.txt' is not a file"),
        ({"--ignore": "["}, r"ignore: '[' is not a valid regular expression"),
        ({"--device": "gpu"}, "device: 'gpu' is not a torch device"),
        ({"--batch-size": "0"}, "--batch-size: must be an integer >= 1, got 0"),
        ({"--seqlen": "512"}, "--seqlen: 512 tokens exceed the model's 256 positions"),
        ({"--eval-text": "nope.txt", "--eval-windows": "2"}, "--eval-text: 'nope.txt' is not a file"),
        ({"--lamda": "auto", "--allocation": "layer"}, "lamda: 'auto' is searched only for allocation 'projection'"),
    ],
)
def test_prune_errors_are_one_line_before_any_loading(files, change, message, capsys, no_hub, tmp_path):
    _, argv = files
    argv = list(argv)
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    start = time.perf_counter()
    err = one_line_error([*argv, "--output", str(tmp_path / "out")], capsys)
    assert time.perf_counter() - start < 5 and message in err
    assert not (tmp_path / "out").exists()


def test_eval_uses_the_checked_loader(files, tmp_path, capsys):
    root, _ = files
    bad = shutil.copytree(root / "ckpt", tmp_path / "truncated")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "truncated or corrupted" in one_line_error(["eval", "--model", str(bad), "--seqlen", "32"], capsys)
    bad = shutil.copytree(root / "ckpt", tmp_path / "altered")
    sidecar = json.loads((bad / "mosaic_config.json").read_text())
    sidecar["zeros"]["model.layers.1.mlp.up_proj"] += 1
    (bad / "mosaic_config.json").write_text(json.dumps(sidecar))
    assert "model.layers.1.mlp.up_proj: " in one_line_error(["eval", "--model", str(bad), "--seqlen", "32"], capsys)
    (bad / "mosaic_config.json").write_text('{"format_version": 1, "config": ')
    err = one_line_error(["eval", "--model", str(bad), "--seqlen", "32"], capsys)
    assert f"{bad / 'mosaic_config.json'} is not valid JSON" in err
    assert main(["eval", "--model", str(root / "ckpt"), "--text", str(root / "calib.txt"), "--seqlen", "32"]) == 0


def test_push_without_a_token_says_how_to_log_in(files, hub, capsys):  # noqa: F811
    root, _ = files
    err = one_line_error(["push", "--model", str(root / "ckpt"), "--repo-id", "tester/x"], capsys)
    assert "401 Unauthorized" in err and "hf auth login" in err and "HF_TOKEN" in err


def test_summary_prints_measured_values_only(files, capsys, tmp_path):
    _, argv = files
    assert main([*argv, "--no-save"]) == 0
    captured = capsys.readouterr()
    assert "None" not in captured.out and " 0 x " not in captured.out and "λ=" not in captured.out
    assert "not evaluated" in captured.out and "Not saved (--no-save)." in captured.out
    assert (
        "sparsity = exact zeros among the weights of the pruned decoder projections of the dense model" in captured.out
    )
    assert "| pruned | 0.5000 |" in captured.out
    assert "--no-save: the pruned model is not saved" in captured.err


def test_help_version_and_no_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == "optimum-mosaic 0.1.0"
    assert main([]) == 2
    assert "prune     prune a model" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in [
        "packaged alias: smollm2-135m (default), gemma3-270m",
        "--pruner {alps,alps_warm,apt,magnitude,sparsegpt,sparsegpt_refit,wanda}",
        "(default: alps_warm)",
        "(default: 128)",
        "options that go together:",
        "--pattern N:M fixes --sparsity to N/M and needs --allocation uniform",
        "--offload needs --output",
    ]:
        assert expected in text, expected


def test_the_alias_list_in_the_help_is_the_packaged_one():
    from optimum_mosaic.commands import _ALIASES
    from optimum_mosaic.packaged_models import DEFAULT_MODEL, PACKAGED_MODELS

    assert _ALIASES == ", ".join(f"{a} (default)" if a == DEFAULT_MODEL else a for a in PACKAGED_MODELS)


def test_argument_errors_are_one_line(capsys):
    for argv, message in [
        (["prune", "--nsamples", "2.5"], "optimum-mosaic prune: error: argument --nsamples: invalid int value: '2.5'"),
        (["prune", "--pruner", "obc"], "optimum-mosaic prune: error: argument --pruner: invalid choice: 'obc'"),
        (["prunee"], "optimum-mosaic: error: argument COMMAND: invalid choice: 'prunee'"),
    ]:
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert done.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(message), err
