"""A pruned model's own ``save_pretrained`` writes a checked checkpoint; ``quantization_config`` in every form
transformers accepts is normalised or refused, and the zero-count check and the CPU 4-bit guard always apply."""

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner
from optimum_mosaic.exceptions import CheckpointMismatchError

X = token_windows(2, 16, seed=3)
CONFIG = PrunedConfig(sparsity=0.5, allocation="uniform", pruner="wanda", nsamples=4, seqlen=32)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    model = Pruner(tiny_llama(), char_tokenizer()).prune(CONFIG, calibration_dataset=token_windows(4, 32))
    path = tmp_path_factory.mktemp("io") / "ckpt"
    model.save_pretrained(path)  # what a transformers user types
    return model, path


def test_save_pretrained_writes_a_checkpoint_the_checked_loader_accepts(pruned):
    model, path = pruned
    sidecar = json.loads((path / "mosaic_config.json").read_text())
    assert sidecar["report"]["achieved_sparsity"] == 0.5 and sidecar["config"]["pruner"] == "wanda"
    loaded = PrunedModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(loaded(X).logits, model(X).logits)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]  # written through a staging folder, renamed


def test_save_pretrained_rejects_unknown_options(pruned, tmp_path):
    model, _ = pruned
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['safe_serialisation'\]; it accepts .*max_shard_size"):
        model.save_pretrained(tmp_path / "x", safe_serialisation=True)
    with pytest.raises(TypeError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)
    assert list(tmp_path.iterdir()) == []
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")  # transformers' own options pass through
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    PrunedModelForCausalLM.from_pretrained(tmp_path / "sharded")


def test_save_pretrained_into_a_trainer_output_dir_keeps_its_files(pruned, tmp_path):
    """Trainer.save_model() writes into output_dir, which holds checkpoint-N folders: they must stay."""
    model, _ = pruned
    out = tmp_path / "run"
    (out / "checkpoint-10").mkdir(parents=True)
    (out / "checkpoint-10" / "optimizer.pt").write_bytes(b"state")
    (out / "trainer_state.json").write_text("{}")
    model.save_pretrained(out, state_dict=model.state_dict(), is_main_process=True)
    assert (out / "checkpoint-10" / "optimizer.pt").read_bytes() == b"state" and (out / "trainer_state.json").is_file()
    PrunedModelForCausalLM.from_pretrained(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_save_pretrained_keeps_the_previous_checkpoint(pruned, tmp_path, monkeypatch):
    import optimum_mosaic.serialization as serialization

    model, path = pruned
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    monkeypatch.setattr(serialization, "write_record", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize(
    "form",
    [
        {"load_in_4bit": True},
        {"load_in_8bit": True, "quant_method": "bitsandbytes"},
    ],
)
def test_dict_quantization_config_gets_the_checks(pruned, form, tmp_path, monkeypatch):
    import optimum_mosaic.quantization as quantization

    _, path = pruned
    guarded = []
    guard = quantization.guard_cpu_4bit_packing
    monkeypatch.setattr(quantization, "guard_cpu_4bit_packing", lambda m: guarded.append(m) or guard(m))
    model = PrunedModelForCausalLM.from_pretrained(path, quantization_config=dict(form))
    report = model.mosaic_quantization
    assert guarded == [model]  # the CPU 4-bit guard ran
    assert report.masks_intact and report.zeros_before == report.numel // 2
    assert report.method == ("bnb-4bit-fp4" if "load_in_4bit" in form else "bnb-8bit")  # fp4: bnb's own default
    with torch.no_grad():
        assert torch.isfinite(model(X).logits).all()
    import shutil

    bad = shutil.copytree(path, tmp_path / "bad")
    sidecar = json.loads((bad / "mosaic_config.json").read_text())
    sidecar["zeros"]["model.layers.0.mlp.up_proj"] -= 1
    (bad / "mosaic_config.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointMismatchError, match="zero weights but"):
        PrunedModelForCausalLM.from_pretrained(bad, quantization_config=dict(form))


@pytest.mark.parametrize(
    "form, message",
    [
        ("BitsAndBytesConfig()", "enables nothing; pass load_in_8bit=True or load_in_4bit=True"),
        ("4bit", "expected a transformers.BitsAndBytesConfig.*got str"),
        (4, "expected a transformers.BitsAndBytesConfig.*got int"),
        ({"load_in_4bit": True, "bnb_4bit_quant": "nf4"}, r"unknown BitsAndBytesConfig keys \['bnb_4bit_quant'\]"),
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
    ],
)
def test_other_forms_are_refused_with_what_is_accepted(pruned, form, message):
    from transformers import BitsAndBytesConfig

    _, path = pruned
    form = BitsAndBytesConfig() if form == "BitsAndBytesConfig()" else form
    with pytest.raises(ValueError, match=f"quantization_config: .*{message}"):
        PrunedModelForCausalLM.from_pretrained(path, quantization_config=form)
