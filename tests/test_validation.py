"""Inputs are checked before any model is loaded or any window runs; every error names the option."""

import pathlib

import pytest
import torch
from conftest import VOCAB, char_tokenizer, tiny_llama, token_windows

from optimum_mosaic import PrunedConfig, Pruner
from optimum_mosaic.exceptions import MosaicError
from optimum_mosaic.validation import check_device, check_model_path

TEXT = "It is a truth universally acknowledged, that a single man in want of a wife. " * 20
SMALL = dict(sparsity=0.5, allocation="uniform", pruner="wanda", nsamples=4, seqlen=32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity="0.5"), r"sparsity: must be a number, got '0.5' \(str\)"),
        (dict(nsamples=2.7), r"nsamples: must be an integer, got 2.7 \(float\)"),
        (dict(seqlen=True), r"seqlen: must be an integer, got True \(bool\)"),
        (dict(lamda="0.1", allocation="layer"), r"lamda: must be a number or 'auto', got '0.1'"),
        (dict(dampening=None), "dampening: must be a number"),
        (dict(ignore=["["]), r"ignore: '\[' is not a valid regular expression"),
        (dict(ignore=[3]), "ignore: must be a list of str"),
        (dict(pruner=3), "pruner: must be a str"),
    ],
)
def test_field_types_are_checked_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrunedConfig(**kwargs)


def test_a_lone_string_is_one_entry():
    config = PrunedConfig(ignore="mlp", targets="down", structured_units="mlp")
    assert (config.ignore, config.targets, config.structured_units) == (["mlp"], ["down"], ["mlp"])
    model = tiny_llama()
    Pruner(model, char_tokenizer()).prune(PrunedConfig(**SMALL, ignore="mlp"), calibration_dataset=TEXT)
    per_projection = model.mosaic_report.per_projection["0"]
    assert set(per_projection) == {"q", "k", "v", "o"}  # the MLP is left dense, the attention is pruned
    assert int((model.model.layers[0].mlp.up_proj.weight == 0).sum()) == 0


@pytest.mark.parametrize(
    "device, message",
    [("gpu", "device: 'gpu' is not a torch device; use 'cpu', 'cuda'"), ("tpu:0", "is not a torch device")],
)
def test_unknown_devices(device, message):
    with pytest.raises(ValueError, match=message):
        check_device(device)
    with pytest.raises(ValueError, match=message):
        Pruner(tiny_llama(), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda():
    with pytest.raises(ValueError, match="device: 'cuda' asked for, but CUDA is not available"):
        Pruner(tiny_llama(), device="cuda")


def test_batch_size_and_seqlen_are_checked_before_any_work():
    model = tiny_llama()  # 256 positions
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = Pruner(model, char_tokenizer())
    for kwargs, config, message in [
        (dict(batch_size=0), PrunedConfig(**SMALL), r"batch_size: must be an integer >= 1, got 0"),
        (dict(batch_size=2.5), PrunedConfig(**SMALL), r"batch_size: must be an integer >= 1, got 2.5"),
        ({}, PrunedConfig(**{**SMALL, "seqlen": 512}), r"seqlen: 512 tokens exceed the model's 256 positions"),
    ]:
        with pytest.raises(ValueError, match=message):
            pruner.prune(config, calibration_dataset=TEXT * 10, **kwargs)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_path_object_is_read_as_a_text_file(tmp_path):
    (tmp_path / "calib.txt").write_text(TEXT)
    by_path, by_text = tiny_llama(), tiny_llama()
    Pruner(by_path, char_tokenizer()).prune(PrunedConfig(**SMALL), calibration_dataset=tmp_path / "calib.txt")
    Pruner(by_text, char_tokenizer()).prune(PrunedConfig(**SMALL), calibration_dataset=TEXT)
    for (name, a), (_, b) in zip(by_path.state_dict().items(), by_text.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "make_data, message",
    [
        (lambda p: str(p), r"the string '.*calib.txt' names a file; .*pathlib.Path\("),
        (lambda p: pathlib.Path(p.parent / "missing.txt"), r"calibration_dataset: '.*missing.txt' is not a file"),
        (lambda p: {"text": TEXT}, "a dict is not accepted; accepted: None"),
        (lambda p: [1, 2, 3], r"a list must hold str only, found int 1; token ids go in a torch.Tensor"),
        (lambda p: torch.full((4, 32), VOCAB + 5), rf"token ids must be in \[0, {VOCAB}\) .* found {VOCAB + 5}"),
        (lambda p: torch.rand(4, 32), "token ids must be an integer tensor, got torch.float32"),
        (lambda p: 42, "int is not accepted; accepted: None"),
    ],
)
def test_ambiguous_calibration_data_is_refused(make_data, message, tmp_path):
    (tmp_path / "calib.txt").write_text(TEXT)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as error:
        Pruner(model, char_tokenizer()).prune(
            PrunedConfig(**SMALL), calibration_dataset=make_data(tmp_path / "calib.txt")
        )
    assert isinstance(error.value, MosaicError)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_token_ids_in_range_are_accepted():
    model = tiny_llama()
    Pruner(model).prune(PrunedConfig(**SMALL), calibration_dataset=token_windows(4, 32))
    assert model.mosaic_report.achieved_sparsity == 0.5


def test_model_paths(tmp_path, monkeypatch):
    assert check_model_path("smollm2-135m") == "smollm2-135m"  # an alias is not looked up yet
    assert check_model_path("owner/name") == "owner/name"  # a Hub id
    for missing in ("./nope", str(tmp_path / "nope"), "nope", "~/nope", "a/b/c"):
        with pytest.raises(ValueError, match="does not exist. Give a local checkpoint directory"):
            check_model_path(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json in it"):
        check_model_path(str(tmp_path / "empty"))
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):  # 'models/tiny' with a local models/ folder: a path
        check_model_path("models/tiny")
    assert check_model_path("owner/tiny") == "owner/tiny"
