"""Every family in the architecture table: prune → save → reload on a tiny random model, unstructured and
composite; Phi-3's fused projections pruned block by block; clear errors for what a family cannot do."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner
from optimum_mosaic.allocation.sensitivity import hutchinson_traces
from optimum_mosaic.architectures import ARCHITECTURES, get_arch_spec, layer_projections, named_projections
from optimum_mosaic.exceptions import UnsupportedArchitectureError

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 100
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per key/value head
    max_position_embeddings=128,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
GEMMA = dict(BASE, head_dim=16, tie_word_embeddings=True)
SOFTCAP = dict(GEMMA, sliding_window=16, query_pre_attn_scalar=16, attn_logit_softcapping=50.0)
CONFIGS = {
    "llama": BASE,
    "mistral": dict(BASE, sliding_window=16),
    "qwen2": BASE,
    "qwen3": dict(BASE, head_dim=16),  # q_norm / k_norm
    "gemma": GEMMA,
    "gemma2": dict(SOFTCAP, final_logit_softcapping=30.0),
    "gemma3_text": dict(SOFTCAP, layer_types=["sliding_attention", "full_attention"]),  # q_norm / k_norm
    "phi3": BASE,  # fused qkv_proj and gate_up_proj
    "opt": dict(  # no gate, biases, LayerNorm, learned positions, no GQA
        {k: v for k, v in BASE.items() if k not in ("intermediate_size", "num_key_value_heads")},
        ffn_dim=96,
        word_embed_proj_dim=64,
    ),
}
# units structured pruning removes in each family (None: structured pruning raises)
UNITS = {name: ["mlp", "attention"] for name in CONFIGS} | {"opt": ["mlp"], "phi3": None}
SMALL = dict(nsamples=8, seqlen=32, lamda=0.05, outlier_threshold=5.0, block_size=32)
X = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))


def tiny(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **CONFIGS[model_type])).eval()


def zeros_and_numel(model) -> tuple[int, int]:
    weights = [lin.weight for lin in named_projections(model).values()]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


def decoder_layers(model):
    return model.get_submodule(get_arch_spec(model).layers)


def reload_and_compare(model, path) -> None:
    """The checkpoint reloads to the same logits and the same zero counts."""
    loaded = PrunedModelForCausalLM.from_pretrained(path)
    assert type(loaded) is type(model) and loaded.config.model_type == model.config.model_type
    assert zeros_and_numel(loaded) == zeros_and_numel(model)
    with torch.no_grad():
        assert torch.equal(loaded(X[:2]).logits, model(X[:2]).logits)


def test_table_covers_the_families():
    assert set(CONFIGS) <= set(ARCHITECTURES)
    assert {f"mosaic_{n}" for n, units in UNITS.items() if units} <= set(ARCHITECTURES)
    assert get_arch_spec(tiny("opt")).keys == ("q", "k", "v", "o", "up", "down")


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_unstructured_prune_save_reload(model_type, tmp_path):
    model = tiny(model_type)
    zeros, numel = zeros_and_numel(model)
    assert zeros == 0
    Pruner(model).prune(PrunedConfig(sparsity=0.5, **SMALL), calibration_dataset=X, save_directory=tmp_path)
    report = model.mosaic_report
    zeros, after = zeros_and_numel(model)
    assert after == numel and zeros == numel // 2  # every fused block and every projection at exactly 50 %
    assert report.achieved_sparsity == 0.5
    assert set(report.per_type) == set(get_arch_spec(model).keys)
    reload_and_compare(model, tmp_path)


@pytest.mark.parametrize("model_type", sorted(n for n, units in UNITS.items() if units))
def test_composite_shrinks_and_reloads(model_type, tmp_path):
    model = tiny(model_type)
    _, dense = zeros_and_numel(model)
    dense_layers = sum(p.numel() for p in decoder_layers(model).parameters())
    config = PrunedConfig(sparsity=0.5, structured_sparsity=0.2, structured_units=UNITS[model_type], **SMALL)
    Pruner(model).prune(config, calibration_dataset=X, save_directory=tmp_path)
    report = model.mosaic_report
    zeros, kept = zeros_and_numel(model)
    assert sum(p.numel() for p in decoder_layers(model).parameters()) < dense_layers
    assert report.structured_sparsity == round((dense - kept) / dense, 6) == pytest.approx(0.2, abs=0.02)
    assert report.achieved_sparsity == round((zeros + dense - kept) / dense, 6) == pytest.approx(0.5, abs=1e-3)
    assert model.config.model_type == f"mosaic_{model_type}"  # the two layers keep different MLP widths
    assert len({tuple(s.values()) for s in report.layer_shapes}) == 2
    reload_and_compare(model, tmp_path)


def test_phi3_structured_pruning_is_a_clear_error():
    config = PrunedConfig(sparsity=0.5, structured_sparsity=0.2, **SMALL)
    with pytest.raises(UnsupportedArchitectureError, match="'phi3'.*structured_sparsity=0"):
        Pruner(tiny("phi3")).prune(config, calibration_dataset=None)  # fails before it needs any data


def test_opt_attention_units_are_a_clear_error():
    config = PrunedConfig(sparsity=0.5, structured_sparsity=0.2, structured_units=["mlp", "attention"], **SMALL)
    with pytest.raises(UnsupportedArchitectureError, match=r"\['attention'\].*structured_units=\['mlp'\]"):
        Pruner(tiny("opt")).prune(config, calibration_dataset=None)


def test_opt_has_no_gate():
    model = tiny("opt")
    with pytest.raises(UnsupportedArchitectureError, match=r"no \['gate'\] projection"):
        Pruner(model).prune(PrunedConfig(sparsity=0.5, targets=["gate", "up"], **SMALL), calibration_dataset=X)
    Pruner(model).prune(PrunedConfig(sparsity=0.5, targets=["up", "down"], **SMALL), calibration_dataset=X)
    assert set(model.mosaic_report.per_type) == {"up", "down"}


def phi3_twin(seed: int = 0):
    """A Llama and a Phi-3 that compute the same function: Phi-3's fused weights stack Llama's q|k|v, gate|up."""
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(**BASE, rms_norm_eps=1e-5)).eval()
    phi3 = Phi3ForCausalLM(Phi3Config(**BASE, rms_norm_eps=1e-5)).eval()
    state = dict(llama.state_dict())
    for i, layer in enumerate(llama.model.layers):
        a, m = layer.self_attn, layer.mlp
        state[f"model.layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
            [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]
        )
        state[f"model.layers.{i}.mlp.gate_up_proj.weight"] = torch.cat([m.gate_proj.weight, m.up_proj.weight])
    phi3.load_state_dict({k: v for k, v in state.items() if k in phi3.state_dict()}, strict=True)
    return llama, phi3


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_phi3_fused_blocks_prune_like_separate_projections(pruner):
    """Wanda is per row and SparseGPT's rows are independent given H, so pruning each row block of a fused
    weight with the block's own sparsity gives the Llama twin's masks."""
    llama, phi3 = phi3_twin()
    with torch.no_grad():
        torch.testing.assert_close(phi3(X).logits, llama(X).logits, atol=1e-5, rtol=0)
    config = PrunedConfig(sparsity=0.5, pruner=pruner, **SMALL)
    for model in (llama, phi3):
        Pruner(model).prune(config, calibration_dataset=X)
    assert phi3.mosaic_report.plan == llama.mosaic_report.plan
    for i in range(2):
        fused = layer_projections(phi3.model.layers[i], get_arch_spec(phi3))
        for key, lin in layer_projections(llama.model.layers[i], get_arch_spec(llama)).items():
            if i == 0:  # identical inputs: identical pruned weights
                assert torch.equal(fused[key].weight, lin.weight), key
            agree = ((fused[key].weight == 0) == (lin.weight == 0)).float().mean().item()
            assert agree >= 0.99, (i, key, agree)  # later inputs may differ by float rounding (1.0 on CPU)


def test_row_blocks_write_into_the_fused_weight():
    layer = tiny("phi3").model.layers[0]
    blocks = layer_projections(layer, ARCHITECTURES["phi3"])
    assert [(b.start, b.stop) for b in (blocks["q"], blocks["k"], blocks["v"])] == [(0, 64), (64, 96), (96, 128)]
    assert [(b.start, b.stop) for b in (blocks["gate"], blocks["up"])] == [(0, 96), (96, 192)]
    with torch.no_grad():
        blocks["up"].weight.data.zero_()
    assert (layer.mlp.gate_up_proj.weight[96:] == 0).all() and (layer.mlp.gate_up_proj.weight[:96] != 0).all()


def test_hutchinson_traces_of_row_blocks_add_up_to_the_fused_trace():
    model = tiny("phi3")
    fused = model.model.layers[1].self_attn.qkv_proj.weight
    blocks = layer_projections(model.model.layers[1], get_arch_spec(model), ["q", "k", "v"])
    whole = hutchinson_traces(model, X[:2], {"qkv": fused}, seed=3)["qkv"] * fused.numel()
    parts = hutchinson_traces(model, X[:2], {k: b.weight for k, b in blocks.items()}, seed=3)
    assert sum(parts[k] * blocks[k].weight.numel() for k in parts) == pytest.approx(whole, rel=1e-5)
    assert all(p.requires_grad for p in model.parameters())


def test_mosaic_opt_checkpoint_loads_without_optimum_mosaic(tmp_path):
    """The copied modeling_mosaic.py rebuilds OPT's fc1/fc2 at the per-layer widths on its own."""
    model = tiny("opt")
    config = PrunedConfig(sparsity=0.5, structured_sparsity=0.2, structured_units=["mlp"], **SMALL)
    Pruner(model).prune(config, calibration_dataset=X, save_directory=tmp_path / "ckpt")
    script = f"""
import sys, torch
sys.modules["optimum_mosaic"] = None
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
with torch.no_grad():
    torch.save(m(torch.tensor({X[:2].tolist()})).logits, {str(tmp_path / "logits.pt")!r})
print(type(m).__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("MosaicOPTForCausalLM")
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(X[:2]).logits)


@pytest.mark.parametrize("model_type", ["gemma3_text", "opt"])
def test_uniform_composite_keeps_the_plain_config(model_type, tmp_path):
    """Equal MLP widths in every layer are written into the family's own config key (ffn_dim for OPT)."""
    from optimum_mosaic.structured import apply_cuts, layer_shape

    model = tiny(model_type)
    spec = get_arch_spec(model)
    for layer in decoder_layers(model):  # the same MLP width in every layer, then an unstructured prune
        shape = layer_shape(layer, spec)
        keep = {"channels": torch.arange(0, shape.intermediate, 2), "heads": torch.arange(shape.heads)}
        apply_cuts(layer, spec, {**keep, "groups": torch.arange(shape.kv_heads)})
    config = PrunedConfig(sparsity=0.5, allocation="uniform", **SMALL)
    Pruner(model).prune(config, calibration_dataset=X, save_directory=tmp_path)
    width = {"gemma3_text": "intermediate_size", "opt": "ffn_dim"}[model_type]
    assert model.config.model_type == model_type
    assert (
        getattr(model.config, width)
        == decoder_layers(model)[1].get_submodule(get_arch_spec(model).projections["down"]).in_features
        < 96
    )
    reload_and_compare(model, tmp_path)


def test_loss_hessian_allocation_on_fused_blocks():
    model = tiny("phi3")
    config = PrunedConfig(sparsity=0.5, allocation="sensitivity_hutchinson", hessian_samples=2, **SMALL)
    Pruner(model).prune(config, calibration_dataset=X)
    plan = model.mosaic_report.plan["1"]
    assert len({plan[k] for k in ("q", "k", "v")}) == 3  # each row block has its own trace, hence its own rank
    zeros, numel = zeros_and_numel(model)
    assert model.mosaic_report.achieved_sparsity == round(zeros / numel, 6) == pytest.approx(0.5, abs=1e-4)
