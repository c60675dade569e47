"""Save → reload: exact round trips, atomic writes, clear errors on mismatched checkpoints."""

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner
from optimum_mosaic.exceptions import CheckpointMismatchError
from optimum_mosaic.serialization import atomic_directory

CONFIG = PrunedConfig(sparsity=0.6, allocation="layer", nsamples=8, seqlen=32, block_size=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "pruned"
    model = tiny_llama()
    Pruner(model, char_tokenizer()).prune(CONFIG, calibration_dataset=token_windows(8, 32), save_directory=path)
    return model, path


def test_reload_is_exact(saved):
    model, path = saved
    reloaded = PrunedModelForCausalLM.from_pretrained(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = token_windows(2, 16, seed=9)
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)
    assert reloaded.mosaic_config == CONFIG
    assert reloaded.mosaic_sidecar["report"]["achieved_sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_sidecar_records_plan_shapes_and_versions(saved):
    _, path = saved
    sidecar = json.loads((path / "mosaic_config.json").read_text())
    assert sidecar["format_version"] == 1
    assert sidecar["shapes"]["model.layers.0.mlp.down_proj"] == [64, 128]
    assert set(sidecar["report"]["per_projection"]["0"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert {"torch", "transformers", "optimum_mosaic"} <= set(sidecar["versions"])
    assert "quantization_config" not in json.loads((path / "config.json").read_text())


def _copy(path, tmp_path):
    import shutil

    return shutil.copytree(path, tmp_path / "copy")


def test_mismatched_shapes_name_the_file(saved, tmp_path):
    bad = _copy(saved[1], tmp_path)
    sidecar = json.loads((bad / "mosaic_config.json").read_text())
    sidecar["shapes"]["model.layers.1.mlp.up_proj"] = [100, 64]
    (bad / "mosaic_config.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointMismatchError, match="mosaic_config.json records model.layers.1.mlp.up_proj"):
        PrunedModelForCausalLM.from_pretrained(bad)


def test_changed_weights_are_detected(saved, tmp_path):
    bad = _copy(saved[1], tmp_path)
    sidecar = json.loads((bad / "mosaic_config.json").read_text())
    sidecar["zeros"]["model.layers.2.self_attn.v_proj"] -= 1
    (bad / "mosaic_config.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointMismatchError, match="model.layers.2.self_attn.v_proj: .* records"):
        PrunedModelForCausalLM.from_pretrained(bad)


def test_unknown_format_version_and_missing_sidecar(saved, tmp_path):
    bad = _copy(saved[1], tmp_path)
    sidecar = json.loads((bad / "mosaic_config.json").read_text())
    (bad / "mosaic_config.json").write_text(json.dumps({**sidecar, "format_version": 7}))
    with pytest.raises(CheckpointMismatchError, match="format_version 7.*Upgrade"):
        PrunedModelForCausalLM.from_pretrained(bad)
    (bad / "mosaic_config.json").unlink()
    with pytest.raises(CheckpointMismatchError, match="not an optimum-mosaic checkpoint"):
        PrunedModelForCausalLM.from_pretrained(bad)


def test_missing_weights_file(saved, tmp_path):
    bad = _copy(saved[1], tmp_path)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointMismatchError, match=r"lacks the weight file\(s\) \['model.safetensors'\]"):
        PrunedModelForCausalLM.from_pretrained(bad)


def test_truncated_weights_file(saved, tmp_path):
    bad = _copy(saved[1], tmp_path)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointMismatchError, match="truncated or corrupted"):
        PrunedModelForCausalLM.from_pretrained(bad)


def test_a_failed_save_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-save")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
