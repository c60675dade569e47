"""Saves never delete what optimum-mosaic did not write, refuse unusable locations before any work, and clean up
after saves that were killed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner
from optimum_mosaic.commands import main
from optimum_mosaic.exceptions import OutputDirectoryError
from optimum_mosaic.serialization import STAGING_MARKER, atomic_directory, clean_stale_staging, save_pruned

CONFIG = PrunedConfig(sparsity=0.5, allocation="uniform", pruner="wanda", nsamples=4, seqlen=32)
X = token_windows(4, 32)


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(model, before: dict) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


def foreign_folder(path):
    path.mkdir()
    (path / "notes.txt").write_text("my notes")
    (path / "data").mkdir()
    (path / "data" / "table.csv").write_text("a,b\n1,2\n")
    return path


def listing(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def test_unrelated_files_survive_a_refused_save(tmp_path):
    folder = foreign_folder(tmp_path / "mine")
    before_files, model = listing(folder), tiny_llama()
    before = weights(model)
    with pytest.raises(OutputDirectoryError, match="not empty and is not an optimum-mosaic checkpoint.*overwrite=True"):
        Pruner(model).prune(CONFIG, calibration_dataset=X, save_directory=folder)
    assert listing(folder) == before_files  # nothing deleted, nothing added
    assert same_weights(model, before)  # refused before pruning
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder left
    Pruner(model).prune(CONFIG, calibration_dataset=X, save_directory=folder, overwrite=True)
    assert (folder / "mosaic_config.json").is_file()  # written beside the user's files, which all stay
    assert {k: v for k, v in listing(folder).items() if k in before_files} == before_files
    PrunedModelForCausalLM.from_pretrained(folder)


def test_an_earlier_checkpoint_is_replaced_without_a_flag(tmp_path):
    model = tiny_llama()
    Pruner(model).prune(CONFIG, calibration_dataset=X, save_directory=tmp_path / "ckpt")
    other = tiny_llama(seed=1)
    Pruner(other).prune(CONFIG, calibration_dataset=X, save_directory=tmp_path / "ckpt")
    loaded = PrunedModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, other.model.layers[0].mlp.up_proj.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("target", [".", "..", "", "./"])
def test_the_current_directory_is_refused_before_pruning(target, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model = tiny_llama()
    before = weights(model)
    with pytest.raises(OutputDirectoryError, match="current directory|expected a directory path"):
        Pruner(model).prune(CONFIG, calibration_dataset=X, save_directory=target)
    assert (
        same_weights(model, before) and list(work.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["work"]
    )


def test_unwritable_locations_are_refused_before_pruning(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    model = tiny_llama()
    before = weights(model)
    for target, message in [
        (tmp_path / "file.txt", "is an existing file"),
        (tmp_path / "file.txt" / "out", "is not a directory"),
        ("/proc/mosaic-out", "cannot be written"),
    ]:
        with pytest.raises(OutputDirectoryError, match=message):
            Pruner(model).prune(CONFIG, calibration_dataset=X, save_directory=target)
    assert same_weights(model, before)


def _killed_save(target) -> None:
    """A process that dies (SIGKILL) in the middle of writing ``target``."""
    code = f"""
import os, signal
from optimum_mosaic.serialization import atomic_directory
with atomic_directory({str(target)!r}) as staging:
    (staging / "model.safetensors").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert done.returncode == -signal.SIGKILL


def test_a_killed_saves_staging_folder_is_gone_after_the_next_save(tmp_path):
    target = tmp_path / "ckpt"
    _killed_save(target)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]
    assert len(stale) == 1 and (stale[0] / STAGING_MARKER).is_file() and not target.exists()
    foreign = tmp_path / ".ckpt.tmp-notours"  # same name pattern, no marker: not ours, never touched
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")
    model = tiny_llama()
    Pruner(model, char_tokenizer()).prune(CONFIG, calibration_dataset=X)
    save_pruned(model, None, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.tmp-notours", "ckpt"]
    assert (foreign / "keep.txt").read_text() == "keep"
    assert not (target / STAGING_MARKER).exists()
    PrunedModelForCausalLM.from_pretrained(target)


def test_a_staging_folder_of_a_running_save_is_kept(tmp_path):
    target = tmp_path / "ckpt"
    live = tmp_path / ".ckpt.tmp-live"
    live.mkdir()
    (live / STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("a")
    assert live.is_dir() and (target / "a.txt").read_text() == "a"


def test_an_interrupted_replacement_is_rolled_back(tmp_path):
    """Killed after the old checkpoint was moved aside and before the new one arrived: the old one comes back."""
    target = tmp_path / "ckpt"
    backup = tmp_path / ".ckpt.old-abc123"
    backup.mkdir()
    (backup / "mosaic_config.json").write_text("{}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (backup / STAGING_MARKER).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    assert clean_stale_staging(target) == []
    assert (target / "mosaic_config.json").read_text() == "{}" and not backup.exists()
    assert not (target / STAGING_MARKER).exists()


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "tiny"
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    text = tmp_path / "calib.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in want of a wife. " * 20)
    return path, text


def test_cli_refuses_before_loading_the_model(checkpoint, tmp_path, capsys, monkeypatch):
    path, text = checkpoint
    folder = foreign_folder(tmp_path / "mine")
    common = ["prune", "--model", str(path), "--calibration-text", str(text), "--nsamples", "4", "--seqlen", "32"]
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    for output, message in [
        (str(folder), "not empty and is not an optimum-mosaic checkpoint"),
        (".", "is the current directory"),
    ]:
        assert main([*common, "--output", output]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
    assert main(common) == 2  # neither --output nor --no-save
    assert "give --output DIR" in capsys.readouterr().err
    assert time.perf_counter() - start < 10  # no model was loaded, nothing pruned
    assert listing(folder)["notes.txt"] == b"my notes"
    assert main([*common, "--output", str(folder), "--overwrite", "--allocation", "uniform", "--pruner", "wanda"]) == 0
    assert (folder / "mosaic_config.json").is_file() and (folder / "notes.txt").read_text() == "my notes"
