"""LoRA on pruned models: a plain merge densifies, merge-then-remask keeps the exact zeros."""

import copy

import pytest
import torch
from conftest import VOCAB, char_tokenizer, tiny_llama, token_windows

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner
from optimum_mosaic.adapters import merge_and_remask, prepare_lora, pruning_masks
from optimum_mosaic.serialization import linear_summary, save_pruned

pytest.importorskip("peft")


def _pruned(**kwargs):
    model = tiny_llama(**kwargs.pop("shape", {}))
    config = PrunedConfig(**{"sparsity": 0.5, "allocation": "layer", "nsamples": 8, "seqlen": 32, **kwargs})
    Pruner(model, char_tokenizer()).prune(config, calibration_dataset=token_windows(8, 32))
    return model


def _train(peft_model, steps: int = 3) -> None:
    """A few AdamW steps on random tokens so the adapter's B·A is non-zero."""
    torch.manual_seed(0)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (4, 24))
        peft_model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_plain_merge_loses_the_zeros_and_remask_keeps_them():
    model = _pruned(pruner="wanda")
    before = copy.deepcopy(model)
    _, zeros = linear_summary(model)
    peft_model = prepare_lora(model, r=4, lora_alpha=8)
    _train(peft_model)
    plain = copy.deepcopy(peft_model).merge_and_unload()
    _, plain_zeros = linear_summary(plain)
    assert sum(plain_zeros.values()) < 0.01 * sum(zeros.values())  # B·A is dense
    merged = merge_and_remask(peft_model)
    _, merged_zeros = linear_summary(merged)
    assert merged_zeros == zeros  # exactly the pruned model's zeros, module by module
    assert merged.mosaic_cleared == sum(zeros.values()) - sum(plain_zeros.values())
    for name, mask in pruning_masks(merged).items():  # kept positions carry the full adapter update
        assert torch.equal(merged.get_submodule(name).weight[mask], plain.get_submodule(name).weight[mask]), name
    assert all(not torch.equal(merged.get_submodule(n).weight, before.get_submodule(n).weight) for n in zeros)


def test_merged_model_saves_and_reloads_with_its_sparsity_checked(tmp_path):
    model = _pruned()
    _, zeros = linear_summary(model)
    peft_model = prepare_lora(model, r=4)
    _train(peft_model, steps=2)
    merged = merge_and_remask(peft_model)
    save_pruned(merged, char_tokenizer(), tmp_path / "lora", merged.mosaic_config, merged.mosaic_report)
    reloaded = PrunedModelForCausalLM.from_pretrained(tmp_path / "lora")  # checks zeros against the sidecar
    x = token_windows(2, 16, seed=4)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, merged(x).logits)
    assert reloaded.mosaic_sidecar["zeros"] == zeros


def test_lora_on_a_shape_reduced_model_merges_into_the_smaller_weights():
    shape = dict(num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    model = _pruned(shape=shape, structured_sparsity=0.25, lamda=0.2, block_size=32)
    shapes, zeros = linear_summary(model)
    peft_model = prepare_lora(model, r=2)
    _train(peft_model, steps=2)
    merged = merge_and_remask(peft_model)
    assert linear_summary(merged) == (shapes, zeros)


def test_remask_needs_masks_recorded_before_the_adapter():
    from peft import LoraConfig, get_peft_model

    model = _pruned()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["up_proj"]))
    with pytest.raises(ValueError, match="prepare_lora"):
        merge_and_remask(peft_model)
