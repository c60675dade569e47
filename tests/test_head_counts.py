"""Head removal that leaves a head count the hidden size is not a multiple of (the common case on real
models: Llama-3-8B 4096 hidden, 32 → 24 heads). transformers' ``LlamaConfig`` refuses such a config when
it is saved, so the checkpoint must use the registered Mosaic config; every family that can lose heads."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner
from optimum_mosaic.architectures import get_arch_spec, layer_projections
from optimum_mosaic.models import base_config_accepts

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 100
# 64 hidden, 8 query heads of 8 in 4 GQA groups: losing one group leaves 6 heads, and 64 % 6 != 0
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
GEMMA = dict(BASE, head_dim=8, tie_word_embeddings=True)
SOFTCAP = dict(GEMMA, sliding_window=16, query_pre_attn_scalar=8, attn_logit_softcapping=50.0)
FAMILIES = {
    "llama": BASE,
    "mistral": dict(BASE, sliding_window=16),
    "qwen2": BASE,
    "qwen3": dict(BASE, head_dim=8),
    "gemma": GEMMA,
    "gemma2": dict(SOFTCAP, final_logit_softcapping=30.0),
    "gemma3_text": dict(SOFTCAP, layer_types=["sliding_attention", "full_attention"]),
}
X = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
# attention only, β = 1/4 of the attention parameters; ``equal_cuts`` makes every layer give up the same groups
CONFIG = PrunedConfig(
    sparsity=0.5,
    allocation="uniform",
    structured_sparsity=0.25,
    structured_units=["attention"],
    nsamples=8,
    seqlen=32,
    block_size=32,
)


@pytest.fixture
def equal_cuts(monkeypatch):
    """Every layer keeps ``groups`` key/value groups of two query heads (the planner would spread the cut
    unevenly; these tests are about the configs that equal counts produce)."""
    import optimum_mosaic.pruner as pruner_module
    from optimum_mosaic.structured import LayerCut
    from optimum_mosaic.structured.budget import numel_after

    def pin(groups):
        def plan(options, shapes, beta, dense_numel):
            cuts = {idx: LayerCut(shapes[idx].intermediate, groups, 2) for idx, _ in options}
            return cuts, numel_after(cuts, shapes, dense_numel)

        monkeypatch.setattr(pruner_module, "plan_cuts", plan)

    return pin


def heads(model) -> list[int]:
    spec = get_arch_spec(model)
    out = []
    for layer in model.get_submodule(spec.layers):
        q = layer_projections(layer, spec)["q"]
        out.append(q.out_features // layer.get_submodule(spec.attention).head_dim)
    return out


def test_llama_config_refuses_such_head_counts():
    """The premise: the base class itself rejects 64 hidden / 6 heads (the failure this file guards against)."""
    six = {"num_attention_heads": 6, "num_key_value_heads": 3}
    config = AutoConfig.for_model("llama", **BASE)
    assert base_config_accepts(config, {"num_attention_heads": 4})
    assert not base_config_accepts(config, six)
    assert not base_config_accepts(AutoConfig.for_model("gemma2", **FAMILIES["gemma2"]), six)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_uniform_head_removal_saves_and_reloads(model_type, tmp_path, equal_cuts):
    """Families whose config class refuses 6 heads (llama, gemma2, gemma3_text with transformers 5.23–5.24) get the
    Mosaic config with ``layer_shapes``; the others keep their plain config. Either way the save works."""
    torch.manual_seed(0)
    dense = AutoConfig.for_model(model_type, **FAMILIES[model_type])
    refuses = not base_config_accepts(dense, {"num_attention_heads": 6, "num_key_value_heads": 3})
    model = AutoModelForCausalLM.from_config(dense).eval()
    equal_cuts(3)
    Pruner(model).prune(CONFIG, calibration_dataset=X, save_directory=tmp_path / "ckpt")
    assert heads(model) == [6, 6]  # every layer alike, and 64 % 6 != 0
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    if refuses:
        assert model.config.model_type == saved["model_type"] == f"mosaic_{model_type}"
        assert [s["num_attention_heads"] for s in saved["layer_shapes"]] == [6, 6]
        assert [s["num_key_value_heads"] for s in saved["layer_shapes"]] == [3, 3]
    else:
        assert saved["model_type"] == model_type and saved["num_attention_heads"] == 6
    loaded = PrunedModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert heads(loaded) == [6, 6]
    with torch.no_grad():
        assert torch.equal(loaded(X[:2]).logits, model(X[:2]).logits)


def test_divisible_head_counts_keep_the_plain_config(tmp_path, equal_cuts):
    """Where the base class accepts the new sizes (64 hidden, 8 → 4 heads) the plain config stays."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **BASE)).eval()
    config = PrunedConfig(**{**CONFIG.to_dict(), "structured_sparsity": 0.5})
    equal_cuts(2)
    Pruner(model).prune(config, calibration_dataset=X, save_directory=tmp_path / "ckpt")
    assert heads(model) == [4, 4]
    assert model.config.model_type == "llama" and model.config.num_attention_heads == 4
    loaded = PrunedModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(X[:2]).logits, model(X[:2]).logits)


def test_planned_head_counts_save_and_reload(tmp_path):
    """Without pinning, the planner's uneven counts (a different head count per layer) round-trip too."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **BASE)).eval()
    Pruner(model).prune(CONFIG, calibration_dataset=X, save_directory=tmp_path / "ckpt")
    assert sum(heads(model)) < 16
    loaded = PrunedModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert heads(loaded) == heads(model)
    with torch.no_grad():
        assert torch.equal(loaded(X[:2]).logits, model(X[:2]).logits)
