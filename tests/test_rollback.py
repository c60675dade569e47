"""The copies a prune keeps to put weights back (its undo copy, the λ/M search's dense weights and best candidate):
large ones live in a temporary file (a large model is not held two or three times in host memory), small ones in
memory; either way every bit comes back, and nothing is left behind."""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows
from transformers.testing_utils import CaptureLogger

from optimum_mosaic import PrunedConfig, Pruner, copies
from optimum_mosaic.copies import FileCopy
from optimum_mosaic.rollback import ModelSnapshot

X = token_windows(12, 32)
SMALL = dict(nsamples=8, seqlen=32, block_size=32)


class Boom(RuntimeError):
    pass


@pytest.fixture
def tmp_tempdir(tmp_path, monkeypatch):
    """``tempfile``'s directory for the test: where a rollback file would be."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def mixed_dtype_model():
    model = tiny_llama()
    model.model.layers[1].to(torch.bfloat16)
    model.model.layers[2].mlp.to(torch.float16)
    return model


def layer_state(model) -> dict:
    return {k: v.clone() for k, v in model.model.layers.state_dict().items()}


def scribble(model) -> None:
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32).to(p.dtype))


@pytest.mark.parametrize("in_file", [True, False])
def test_a_snapshot_restores_every_bit_of_every_dtype(tmp_tempdir, in_file):
    model = mixed_dtype_model()
    before = layer_state(model)
    nbytes = sum(v.numel() * v.element_size() for v in model.model.layers.parameters())
    snapshot = ModelSnapshot(model, in_memory_bytes=0 if in_file else nbytes)
    files = list(tmp_tempdir.glob("mosaic-copy-*/tensors.bin"))
    if in_file:
        assert isinstance(snapshot.values, FileCopy) and len(files) == 1
        assert files[0].stat().st_size == nbytes  # each tensor once, no header: the bytes of the layers
    else:
        assert isinstance(snapshot.values, dict) and not files
    scribble(model)
    assert not torch.equal(model.model.layers[1].mlp.up_proj.weight, before["1.mlp.up_proj.weight"])
    snapshot.restore()
    after = layer_state(model)
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
    snapshot.close()
    assert not list(tmp_tempdir.iterdir())


def test_a_file_copy_holds_no_tensor_in_memory(tmp_tempdir):
    model = tiny_llama()
    tensors = list(model.model.layers.parameters())
    copy = FileCopy({id(t): t for t in tensors}, str(tmp_tempdir))
    assert not any(isinstance(v, torch.Tensor) for v in vars(copy).values())  # offsets, dtypes, shapes only
    assert all(isinstance(offset, int) for offset, _, _ in copy.index.values())
    assert torch.equal(copy[id(tensors[5])], tensors[5]) and id(torch.zeros(1)) not in copy
    copy.close()


def test_a_truncated_file_copy_fails_loudly(tmp_tempdir):
    weight = torch.randn(8, 8)
    copy = FileCopy({id(weight): weight}, str(tmp_tempdir))
    with open(copy.path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(OSError, match=r"ends before the copy of a \(8, 8\) tensor"):
        copy[id(weight)]
    copy.close()


@pytest.mark.parametrize("fails", [True, False])
def test_a_prune_leaves_no_rollback_file_and_a_failure_restores_from_it(tmp_tempdir, monkeypatch, fails):
    import optimum_mosaic.pruner as pruner_module

    monkeypatch.setattr(copies, "IN_MEMORY_BYTES", 0)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def finish(m, spec, real=pruner_module.remove_empty_units):
        seen["files"] = sorted(p.name for p in tmp_tempdir.glob("mosaic-copy-*/*"))
        seen["zeros"] = int((m.model.layers[0].mlp.up_proj.weight == 0).sum())
        if fails:
            raise Boom("late failure")
        return real(m, spec)

    monkeypatch.setattr(pruner_module, "remove_empty_units", finish)
    config = PrunedConfig(sparsity=0.5, allocation="uniform", pruner="sparsegpt", **SMALL)
    if fails:
        with pytest.raises(Boom):
            Pruner(model, char_tokenizer()).prune(config, calibration_dataset=X)
    else:
        Pruner(model, char_tokenizer()).prune(config, calibration_dataset=X)
    assert seen["files"] == ["tensors.bin"] and seen["zeros"] == 128 * 64 // 2  # the copy was on disk mid-prune
    assert not list(tmp_tempdir.iterdir())
    for name, value in before.items():
        pruned = "_proj.weight" in name  # a success prunes every projection; a failure leaves nothing changed
        assert torch.equal(model.state_dict()[name], value) == (fails or not pruned), name


def test_a_copy_the_temporary_directory_cannot_hold_stays_in_memory_with_a_warning(tmp_tempdir, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    model = tiny_llama()
    with CaptureLogger(copies.logger) as captured:
        snapshot = ModelSnapshot(model, in_memory_bytes=0)
    assert isinstance(snapshot.values, dict) and not list(Path(tmp_tempdir).iterdir())
    assert "the rollback copy of the decoder layers" in captured.out and "does not fit in" in captured.out
    assert "set TMPDIR" in captured.out


@pytest.mark.parametrize("in_file", [True, False])
def test_the_lamda_search_keeps_its_copies_in_files_and_prunes_the_same_weights(tmp_tempdir, monkeypatch, in_file):
    """An 'auto' λ/M search keeps the dense weights and its best candidate's: in files beyond the limit (two at once
    while it scores), deleted once the prune is done, and the pruned model is the in-memory search's, bit for bit."""
    import optimum_mosaic.pruner as pruner_module

    config = PrunedConfig(sparsity=0.5, allocation="projection", pruner="sparsegpt", search_samples=4, **SMALL)
    assert config.search_grid
    reference = tiny_llama()
    Pruner(reference, char_tokenizer()).prune(config, calibration_dataset=X, restore_on_error=False)

    if in_file:
        monkeypatch.setattr(copies, "IN_MEMORY_BYTES", 0)
    files, original = [], pruner_module.mean_nll

    def scored(*args, **kwargs):
        files.append(len(list(tmp_tempdir.glob("mosaic-copy-*/tensors.bin"))))
        return original(*args, **kwargs)

    monkeypatch.setattr(pruner_module, "mean_nll", scored)
    model = tiny_llama()
    Pruner(model, char_tokenizer()).prune(config, calibration_dataset=X, restore_on_error=False)
    assert len(files) >= 3 and files[0] == (1 if in_file else 0) and max(files) == (2 if in_file else 0)
    assert not list(tmp_tempdir.iterdir())
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("failure", ["mkdtemp", "write"])
def test_a_temporary_directory_that_cannot_be_written_keeps_the_copy_in_memory(tmp_tempdir, monkeypatch, failure):
    """Not writable, or full by the time the copy is written: a warning, the copy in host memory, no file left, and
    the prune goes on (it restores every bit after a failure as before)."""
    import builtins
    import errno
    import tempfile

    if failure == "mkdtemp":
        monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: (_ for _ in ()).throw(PermissionError(13, "denied")))
    else:
        real_open = builtins.open

        def full_open(path, mode="r", *args, **kwargs):
            handle = real_open(path, mode, *args, **kwargs)
            if "w" in mode and str(path).endswith("tensors.bin"):
                handle.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
            return handle

        monkeypatch.setattr(builtins, "open", full_open)
    model = mixed_dtype_model()
    before = layer_state(model)
    with CaptureLogger(copies.logger) as captured:
        snapshot = ModelSnapshot(model, in_memory_bytes=0)
    assert isinstance(snapshot.values, dict) and not list(Path(tmp_tempdir).iterdir())
    assert "could not be written to" in captured.out and "kept in host memory" in captured.out
    scribble(model)
    snapshot.restore()
    after = layer_state(model)
    assert all(torch.equal(after[name], value) for name, value in before.items())


@pytest.mark.parametrize("rows", [None, 3])  # the whole matrix at once, or three rows at a time (10 = 3 + 3 + 3 + 1)
def test_read_into_fills_any_layout_from_a_file_a_block_of_rows_at_a_time(tmp_tempdir, monkeypatch, rows):
    """``read_into`` copies a file copy into a given tensor — column-major, another dtype — the bits of
    ``out.copy_(copy[key])``, reading at most ``BLOCK_BYTES`` of rows at a time (no second whole copy)."""
    from conftest import allocations

    if rows:
        monkeypatch.setattr(copies, "BLOCK_BYTES", rows * 700 * 4)
    A = torch.randn(10, 700)
    copy = FileCopy({"A": A, "b": torch.arange(5.0)}, str(tmp_tempdir))
    column_major = torch.empty_strided((10, 700), (1, 10))
    largest = allocations(lambda: copies.read_into(copy, "A", column_major))
    assert torch.equal(column_major, A)
    assert max(largest, default=0) <= (rows or 10) * 700 * 4
    assert torch.equal(copies.read_into(copy, "A", torch.empty(10, 700, dtype=torch.float64)), A.double())
    assert torch.equal(copies.read_into(copy, "b", torch.empty(5)), torch.arange(5.0))
    assert torch.equal(copies.read_into({"A": A}, "A", torch.empty(10, 700)), A)
    with pytest.raises(ValueError, match=r"is \(10, 700\), not \(700, 10\)"):
        copies.read_into(copy, "A", torch.empty(700, 10))
    copy.close()
