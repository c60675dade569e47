"""Offloaded pruning (one decoder layer resident): same weights as in memory, a complete checkpoint, clear errors."""

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows
from safetensors import safe_open

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner
from optimum_mosaic.offload import INDEX_FILE

CONFIGS = {
    "projection-sparsegpt": dict(allocation="projection", pruner="sparsegpt", lamda=0.08, outlier_threshold=5.0),
    "uniform-wanda-layer": dict(allocation="uniform", pruner="wanda", sequential="layer"),
    "owl-magnitude": dict(allocation="layer", pruner="magnitude"),
    "projection-sparsegpt, λ/M search": dict(allocation="projection", pruner="sparsegpt", search_samples=4),
    "projection-wanda, λ/M search by sparsegpt": dict(
        allocation="projection", pruner="wanda", search_pruner="sparsegpt", search_samples=4
    ),  # fmt: skip
    "composite (default pruner)": dict(structured_sparsity=0.2),
    "dense target, λ/M search": dict(allocation="projection", dense_target=True, search_samples=4),
    "composite, heads only, sparsegpt layer walk": dict(
        structured_sparsity=0.25, structured_units=["attention"], pruner="sparsegpt", sequential="layer"
    ),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp("dense")
    tiny_llama(seed=3, num_hidden_layers=3).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _config(**kw):
    return PrunedConfig(sparsity=0.5, nsamples=8, seqlen=32, **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_offloaded_prune_equals_in_memory_prune(checkpoint, tmp_path, name):
    windows = token_windows(n=12, seqlen=32)  # 8 to calibrate, 4 held out for the λ/M search
    resident = Pruner.from_pretrained(str(checkpoint))
    resident.prune(_config(**CONFIGS[name]), calibration_dataset=windows, save_directory=tmp_path / "a")
    offloaded = Pruner.from_pretrained(str(checkpoint), offload=True)
    assert all(p.is_meta for p in offloaded.model.model.layers.parameters())
    offloaded.prune(_config(**CONFIGS[name]), calibration_dataset=windows, save_directory=tmp_path / "b")

    a = PrunedModelForCausalLM.from_pretrained(tmp_path / "a")
    b = PrunedModelForCausalLM.from_pretrained(tmp_path / "b")  # checks shapes and zeros against the sidecar
    for (name_a, pa), (name_b, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert name_a == name_b and torch.equal(pa, pb), name_a
    assert offloaded.report.achieved_sparsity == resident.report.achieved_sparsity
    assert offloaded.report.per_projection == resident.report.per_projection
    assert offloaded.report.structured_sparsity == resident.report.structured_sparsity
    assert offloaded.report.search == resident.report.search and offloaded.report.lamda == resident.report.lamda
    assert len(offloaded.report.search) > 1 or "search" not in name  # several candidates were scored
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".candidate")]
    config_a, config_b = ({k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"} for m in (a, b))
    assert config_a == config_b  # per-layer shapes of a composite prune included
    code = {"configuration_mosaic.py", "modeling_mosaic.py"}  # shipped for trust_remote_code when shapes differ
    assert code & {p.name for p in (tmp_path / "a").iterdir()} == code & {p.name for p in (tmp_path / "b").iterdir()}
    x = windows[:2]
    assert torch.equal(a(x).logits, b(x).logits)


def test_checkpoint_is_one_shard_per_layer_plus_the_rest(checkpoint, tmp_path):
    pruner = Pruner.from_pretrained(str(checkpoint), offload=True)
    pruner.prune(
        _config(**CONFIGS["owl-magnitude"]), calibration_dataset=token_windows(), save_directory=tmp_path / "o"
    )
    index = json.loads((tmp_path / "o" / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"layer-{i:05d}.safetensors" for i in range(3)] + ["model-outside-layers.safetensors"]
    with safe_open(tmp_path / "o" / "layer-00001.safetensors", framework="pt") as f:
        assert all(k.startswith("model.layers.1.") for k in f.keys())
    sidecar = json.loads((tmp_path / "o" / "mosaic_config.json").read_text())
    assert len(sidecar["zeros"]) == 3 * 7
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no staging directory left behind


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(allocation="sensitivity_hutchinson"), "sensitivity_hutchinson"),
    ],
)
def test_unsupported_options_fail_before_any_work(checkpoint, tmp_path, kw, message):
    pruner = Pruner.from_pretrained(str(checkpoint), offload=True)
    with pytest.raises(ValueError, match=message):
        pruner.prune(_config(**kw), calibration_dataset=token_windows(), save_directory=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_save_directory_is_required(checkpoint):
    with pytest.raises(ValueError, match="save_directory"):
        Pruner.from_pretrained(str(checkpoint), offload=True).prune(_config(allocation="uniform"))


def test_failure_leaves_nothing_half_written(checkpoint, tmp_path, monkeypatch):
    pruner = Pruner.from_pretrained(str(checkpoint), offload=True)
    monkeypatch.setattr(pruner.store, "save", lambda directory: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        pruner.prune(
            _config(allocation="uniform", pruner="wanda"),
            calibration_dataset=token_windows(),
            save_directory=tmp_path / "y",
        )
    assert list(tmp_path.iterdir()) == []


def test_cli_offload_writes_the_checkpoint(checkpoint, tmp_path, capsys):
    from optimum_mosaic.commands import main

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    argv = ["prune", "--model", str(checkpoint), "--output", str(tmp_path / "o"), "--offload"]
    argv += ["--calibration-text", str(text), "--allocation", "uniform", "--pruner", "wanda", "--nsamples", "4"]
    assert main(argv + ["--seqlen", "32"]) == 0
    assert "offloaded: sparsity 0.5" in capsys.readouterr().out
    model = PrunedModelForCausalLM.from_pretrained(tmp_path / "o")
    assert model.mosaic_report.achieved_sparsity == 0.5
    assert main(["prune", "--model", str(checkpoint), "--offload", "--seqlen", "32"]) == 2  # no --output
