"""A prune that cannot work is refused before it starts; a prune that fails midway leaves the model as it was."""

import copy

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows

from optimum_mosaic import PrunedConfig, Pruner
from optimum_mosaic.registry import get_method

X = token_windows(12, 32)
SMALL = dict(nsamples=8, seqlen=32, search_samples=4, block_size=32)


def snapshot(model) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [
            (n, type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False))) for n, m in model.named_modules()
        ],
        "config": model.config.to_dict(),
        "class": type(model),
        "groups": [layer.self_attn.num_key_value_groups for layer in model.model.layers],
    }


def assert_untouched(model, before: dict) -> None:
    after = snapshot(model)
    assert after["class"] is before["class"] and after["config"] == before["config"]
    assert after["modules"] == before["modules"] and after["groups"] == before["groups"]
    assert after["state"].keys() == before["state"].keys()
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), name
    assert not hasattr(model, "mosaic_report") and "save_pretrained" not in vars(model)


@pytest.mark.parametrize("allocation", ["layer", "sensitivity", "sensitivity_hutchinson"])
@pytest.mark.parametrize("field", ["lamda", "outlier_threshold"])
def test_auto_with_allocations_that_cannot_search_is_refused(allocation, field):
    with pytest.raises(
        ValueError, match=rf"{field}: 'auto' is searched only for allocation 'projection'.*{allocation}"
    ):
        PrunedConfig(allocation=allocation, **{field: "auto"})


def test_a_failed_auto_lamda_combination_leaves_the_weights_untouched():
    """A config changed after construction is checked again by prune, before anything runs (it used to end in a
    ZeroDivisionError after calibration, the outlier pass and a full prune, with the model half-pruned)."""
    model = tiny_llama()
    before = snapshot(model)
    config = PrunedConfig(sparsity=0.5, allocation="layer", **SMALL)
    config.lamda = "auto"
    with pytest.raises(ValueError, match="lamda: 'auto'"):
        Pruner(model, char_tokenizer()).prune(config, calibration_dataset=X)
    assert_untouched(model, before)


class Boom(RuntimeError):
    pass


def test_a_failure_after_structured_removal_restores_the_model(monkeypatch):
    """Composite prune: heads and channels are removed (modules replaced, config re-classed), the remainder pruned,
    then the clean-up step fails. The model must come back exactly, and a retry prunes the dense model."""
    import optimum_mosaic.pruner as pruner_module

    model = tiny_llama(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    fresh = copy.deepcopy(model)
    before = snapshot(model)
    config = PrunedConfig(sparsity=0.5, structured_sparsity=0.25, allocation="layer", lamda=0.2, **SMALL)
    seen = {}

    def fail(m, spec):
        seen["shapes"] = [layer.mlp.down_proj.in_features for layer in m.model.layers]
        seen["zeros"] = int((m.model.layers[0].self_attn.q_proj.weight == 0).sum())
        raise Boom("injected failure after structured removal and unstructured pruning")

    monkeypatch.setattr(pruner_module, "remove_empty_units", fail)
    with pytest.raises(Boom):
        Pruner(model, char_tokenizer()).prune(config, calibration_dataset=X)
    assert min(seen["shapes"]) < 128 and seen["zeros"] > 0  # the failure really came mid-prune
    assert_untouched(model, before)
    monkeypatch.undo()
    Pruner(model, char_tokenizer()).prune(config, calibration_dataset=X)
    Pruner(fresh, char_tokenizer()).prune(config, calibration_dataset=X)
    assert model.mosaic_report.achieved_sparsity == fresh.mosaic_report.achieved_sparsity
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_failing_kernel_restores_the_weights(monkeypatch):
    """The fourth projection's kernel call fails during the λ search of an 'auto' prune: nothing stays pruned."""
    import optimum_mosaic.registry as registry

    model = tiny_llama()
    before = snapshot(model)
    method = get_method("unstructured", "sparsegpt")
    calls = []

    def flaky(weight, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise Boom("kernel failure")
        return method.fn(weight, *args, **kwargs)

    monkeypatch.setitem(
        registry._REGISTRY,
        ("unstructured", "sparsegpt"),
        registry.Method("sparsegpt", "unstructured", flaky, method.needs),
    )
    with pytest.raises(Boom):
        config = PrunedConfig(sparsity=0.5, allocation="projection", pruner="sparsegpt", **SMALL)
        Pruner(model, char_tokenizer()).prune(config, calibration_dataset=X)
    assert len(calls) == 4
    assert_untouched(model, before)


def test_without_restore_the_failed_model_is_left_modified(monkeypatch):
    import optimum_mosaic.pruner as pruner_module

    model = tiny_llama()
    monkeypatch.setattr(pruner_module, "remove_empty_units", lambda *a: (_ for _ in ()).throw(Boom("late")))
    config = PrunedConfig(sparsity=0.5, allocation="uniform", pruner="wanda", **SMALL)
    with pytest.raises(Boom):
        Pruner(model, char_tokenizer()).prune(config, calibration_dataset=X, restore_on_error=False)
    assert int((model.model.layers[0].mlp.up_proj.weight == 0).sum()) == 128 * 64 // 2
