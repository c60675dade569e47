"""Composite pruning and checkpoints with per-layer shapes that reload through from_pretrained."""

import subprocess
import sys

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows
from transformers import AutoModelForCausalLM

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner

SMALL = dict(nsamples=8, seqlen=32, search_samples=4, block_size=32)
X = token_windows(2, 20, seed=7)


def composite(**kwargs):
    model = tiny_llama(num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    config = PrunedConfig(**{**SMALL, "sparsity": 0.5, "structured_sparsity": 0.25, **kwargs})
    Pruner(model, char_tokenizer()).prune(config, calibration_dataset=token_windows(12, 32), batch_size=4)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = composite(allocation="layer", lamda=0.2)
    path = tmp_path_factory.mktemp("composite") / "ckpt"
    from optimum_mosaic.serialization import save_pruned

    save_pruned(model, char_tokenizer(), path, model.mosaic_config, model.mosaic_report)
    return model, path


def test_composite_meets_both_targets(saved):
    model, _ = saved
    report = model.mosaic_report
    assert report.achieved_sparsity == pytest.approx(0.5, abs=2e-3)
    assert report.structured_sparsity == pytest.approx(0.25, abs=0.05)
    assert model.config.model_type == "mosaic_llama"  # the layers differ
    assert len({tuple(s.values()) for s in report.layer_shapes}) > 1


def _assert_same(model, other):
    assert model.state_dict().keys() == other.state_dict().keys()
    for name, a in model.state_dict().items():
        assert torch.equal(a, other.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(model(X).logits, other(X).logits)
    out = other.generate(X[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_reload_with_pruned_model_class(saved):
    _assert_same(saved[0], PrunedModelForCausalLM.from_pretrained(saved[1]))


def test_reload_with_auto_class(saved):
    _assert_same(saved[0], AutoModelForCausalLM.from_pretrained(saved[1]))


def test_reload_with_remote_code_and_without_optimum_mosaic(saved):
    model, path = saved
    script = f"""
import sys, torch
sys.modules["optimum_mosaic"] = None  # importing it would fail: the checkpoint must carry its own code
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)
x = torch.tensor({X.tolist()})
with torch.no_grad():
    torch.save(m(x).logits, {str(path / "logits.pt")!r})
print(type(m).__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=path.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("MosaicLlamaForCausalLM")
    with torch.no_grad():
        assert torch.equal(torch.load(path / "logits.pt"), model(X).logits)
    assert (path / "modeling_mosaic.py").is_file() and (path / "configuration_mosaic.py").is_file()


def test_uniform_shapes_keep_the_plain_config(tmp_path):
    from optimum_mosaic.architectures import get_arch_spec
    from optimum_mosaic.models import fit_config_to_shapes
    from optimum_mosaic.structured import apply_cuts

    model = tiny_llama(num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    for layer in model.model.layers:  # the same MLP width everywhere
        keep = {"channels": torch.arange(0, 128, 2), "heads": torch.arange(6), "groups": torch.arange(3)}
        apply_cuts(layer, get_arch_spec(model), keep)
    assert fit_config_to_shapes(model) is False
    assert model.config.model_type == "llama" and model.config.intermediate_size == 64
    model.save_pretrained(tmp_path / "plain")
    _assert_same(model, AutoModelForCausalLM.from_pretrained(tmp_path / "plain"))


def test_structured_only_removes_parameters():
    model = composite(sparsity=0.3, structured_sparsity=0.3)
    dense = sum(
        p.numel()
        for p in tiny_llama(
            num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3, hidden_size=96
        ).model.layers.parameters()
    )
    assert sum(p.numel() for p in model.model.layers.parameters()) < 0.8 * dense
    assert model.mosaic_report.achieved_sparsity == pytest.approx(0.3, abs=2e-3)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_families_round_trip(family, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        family,
        vocab_size=96,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=256,
        head_dim=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    pruned = PrunedConfig(
        **{**SMALL, "sparsity": 0.5, "structured_sparsity": 0.25, "allocation": "layer", "lamda": 0.2}
    )
    Pruner(model).prune(pruned, calibration_dataset=token_windows(12, 32), batch_size=4, save_directory=tmp_path / "m")
    assert model.mosaic_report.achieved_sparsity == pytest.approx(0.5, abs=2e-3)
    assert model.config.model_type in (family, f"mosaic_{family}")
    _assert_same(model, AutoModelForCausalLM.from_pretrained(tmp_path / "m"))
