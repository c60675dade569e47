"""bitsandbytes 8-bit / 4-bit on top of pruned and shape-reduced checkpoints (CPU; CUDA where present)."""

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner
from optimum_mosaic.exceptions import CheckpointMismatchError
from optimum_mosaic.quantization import dequantized_weight

bnb = pytest.importorskip("bitsandbytes")
from transformers import BitsAndBytesConfig  # noqa: E402

X = token_windows(2, 16, seed=3)
CONFIGS = {
    "4bit-nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "4bit-fp4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
}
LINEAR = {"4bit-nf4": bnb.nn.Linear4bit, "4bit-fp4": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}


def _prune(path, model, **kwargs):
    config = PrunedConfig(**{"sparsity": 0.5, "allocation": "layer", "nsamples": 8, "seqlen": 32, **kwargs})
    Pruner(model, char_tokenizer()).prune(config, calibration_dataset=token_windows(8, 32), save_directory=path)
    return model


@pytest.fixture(scope="module")
def unstructured(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "unstructured"
    return _prune(path, tiny_llama(), pruner="wanda"), path


@pytest.fixture(scope="module")
def composite(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "composite"
    model = tiny_llama(num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    return _prune(path, model, structured_sparsity=0.25, lamda=0.2, block_size=32), path


def _relative_error(model, quantized) -> float:
    with torch.no_grad():
        a, b = model(X).logits, quantized(X).logits.float()
    return float((a - b).norm() / a.norm())


def _same_as_dequantized(model, quantized) -> None:
    """The quantized model computes what an fp32 model holding the de-quantized weights computes."""
    import copy

    reference = copy.deepcopy(model)
    for module, original in zip(quantized.modules(), reference.modules(), strict=True):
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            original.weight.data.copy_(dequantized_weight(module))
    assert _relative_error(reference, quantized) < 0.05  # bnb's CPU 4-bit kernel computes in bf16


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_quantized_pruned_model_keeps_every_pruned_zero(unstructured, kind):
    model, path = unstructured
    quantized = PrunedModelForCausalLM.from_pretrained(path, quantization_config=CONFIGS[kind]())
    report = quantized.mosaic_quantization
    sidecar = json.loads((path / "mosaic_config.json").read_text())
    assert isinstance(quantized.model.layers[0].mlp.up_proj, LINEAR[kind])
    assert report.zeros_before == sum(sidecar["zeros"].values())
    assert report.sparsity_before == pytest.approx(0.5, abs=1e-3)
    assert report.masks_intact  # 0 is exactly representable in NF4, FP4 and int8
    assert report.sparsity_after >= report.sparsity_before
    assert report.pruned_zeros_kept + report.extra_zeros <= report.numel
    assert _relative_error(model, quantized) < (0.05 if kind == "8bit" else 0.35)
    _same_as_dequantized(model, quantized)
    assert quantized.generate(X[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_report_counts_match_an_independent_dequantization(unstructured):
    model, path = unstructured
    quantized = PrunedModelForCausalLM.from_pretrained(path, quantization_config=CONFIGS["4bit-nf4"]())
    name = "model.layers.1.mlp.down_proj"
    counts = quantized.mosaic_quantization.per_projection[name]
    original = model.model.layers[1].mlp.down_proj.weight
    deq = dequantized_weight(quantized.model.layers[1].mlp.down_proj)
    assert counts["zeros_before"] == int((original == 0).sum())
    assert counts["extra_zeros"] == int(((original != 0) & (deq == 0)).sum())
    assert (deq[original == 0] == 0).all()


@pytest.mark.parametrize("kind", ["4bit-nf4", "8bit"])
def test_quantized_composite_keeps_reduced_shapes(composite, kind):
    model, path = composite
    assert model.config.model_type == "mosaic_llama"
    quantized = PrunedModelForCausalLM.from_pretrained(path, quantization_config=CONFIGS[kind]())
    for layer, original in zip(quantized.model.layers, model.model.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            a, b = getattr(layer.self_attn, name), getattr(original.self_attn, name)
            assert (a.out_features, a.in_features) == (b.out_features, b.in_features)
        assert layer.mlp.up_proj.out_features == original.mlp.up_proj.out_features
    assert quantized.mosaic_quantization.masks_intact
    assert _relative_error(model, quantized) < (0.05 if kind == "8bit" else 0.6)  # 4 random layers: error compounds
    _same_as_dequantized(model, quantized)
    assert quantized.generate(X[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_memory_footprint_orders_fp32_8bit_4bit(unstructured):
    _, path = unstructured
    full = PrunedModelForCausalLM.from_pretrained(path).get_memory_footprint()
    eight = PrunedModelForCausalLM.from_pretrained(path, quantization_config=CONFIGS["8bit"]())
    four = PrunedModelForCausalLM.from_pretrained(path, quantization_config=CONFIGS["4bit-nf4"]())
    assert four.mosaic_quantization.memory_footprint_bytes < eight.mosaic_quantization.memory_footprint_bytes < full


def test_quantized_load_still_detects_a_modified_checkpoint(unstructured, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, path = unstructured
    copy = tmp_path / "modified"
    shutil.copytree(path, copy)
    weights = load_file(copy / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"].fill_(1.0)
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="zero weights"):
        PrunedModelForCausalLM.from_pretrained(copy, quantization_config=CONFIGS["4bit-nf4"]())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["4bit-nf4", "8bit"])
def test_quantized_on_cuda(unstructured, kind):
    model, path = unstructured
    quantized = PrunedModelForCausalLM.from_pretrained(path, quantization_config=CONFIGS[kind](), device_map="cuda")
    assert quantized.mosaic_quantization.masks_intact
    with torch.no_grad():
        logits = quantized(X.cuda()).logits.float().cpu()
        reference = model(X).logits
    assert float((logits - reference).norm() / reference.norm()) < 0.35
