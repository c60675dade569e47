"""The pruning walk in several batches (``batch_size``): the weights of the one-batch walk, bit for bit, for every
family, with activations of one batch; the default batch size keeps a Llama-3-8B MLP activation within 1 GiB; and
a layer's outputs overwrite its inputs as they are propagated (one copy of every window's activations, not two)."""

import pytest
import torch
from conftest import allocations
from test_architectures import CONFIGS, SMALL, X, tiny
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from optimum_mosaic import PrunedConfig, Pruner
from optimum_mosaic.architectures import get_arch_spec, named_projections
from optimum_mosaic.calibration.layerwise import capture, forward_layer, windows_per_forward
from optimum_mosaic.calibration.statistics import InputStatistics

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = [(t, {}) for t in sorted(CONFIGS)] + [(t, dict(structured_sparsity=0.25)) for t in ("llama", "gemma3_text")]


def pruned(model_type: str, batch_size, **config):
    """Weights after a default (ALPS-warm, sequential="projection") prune of 8 windows, and the most windows any
    projection saw in one call."""
    model, most = tiny(model_type), [0]
    hooks = [
        lin.register_forward_pre_hook(lambda mod, args: most.append(args[0].shape[0] if args[0].dim() > 2 else 0))
        for lin in named_projections(model).values()
    ]
    Pruner(model, None).prune(
        PrunedConfig(sparsity=0.5, **SMALL, **config), calibration_dataset=X, batch_size=batch_size
    )
    for h in hooks:
        h.remove()
    return {n: lin.weight.detach().clone() for n, lin in named_projections(model).items()}, max(most)


@pytest.mark.parametrize(("model_type", "config"), CASES, ids=[f"{t}{'-composite' if c else ''}" for t, c in CASES])
def test_batches_give_the_weights_of_one_batch(model_type, config):
    whole, seen = pruned(model_type, None, **config)  # 8 windows of a 96-wide MLP: one batch
    halves, seen_halves = pruned(model_type, 2, **config)
    assert seen == 8 or model_type == "opt"  # OPT flattens its MLP input ([tokens, d]: counted as 0)
    assert seen_halves == 2 or model_type == "opt"
    assert halves.keys() == whole.keys()
    assert all(torch.equal(halves[n], whole[n]) for n in whole), [
        n for n in whole if not torch.equal(halves[n], whole[n])
    ]
    assert sum(int((w == 0).sum()) for w in whole.values()) > 0.3 * sum(w.numel() for w in whole.values())  # pruned


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "phi3", "opt"])
def test_after_the_attention_is_pruned_later_forwards_skip_it(model_type):
    """In 4 batches, the attention's first projection runs for ``o``'s statistics and once more to replace each
    window by the residual stream h₁ (2 runs per batch; recomputing the attention for gate/up, down and the outputs
    was 4). OPT normalises after its residual add, so it keeps recomputing; its weights are the same either way."""
    model = tiny(model_type)
    spec = get_arch_spec(model)
    first, last = spec.projections["q"], spec.projections["down"]
    runs = {first: 0, last: 0}
    hooks = []
    for layer in model.model.decoder.layers if model_type == "opt" else model.model.layers:
        for path in runs:
            hooks.append(
                layer.get_submodule(path).register_forward_pre_hook(lambda *_, p=path: runs.update({p: runs[p] + 1}))
            )
    Pruner(model, None).prune(PrunedConfig(sparsity=0.5, **SMALL), calibration_dataset=X, batch_size=2)
    for h in hooks:
        h.remove()
    calls = 4 * model.config.num_hidden_layers  # batches × layers, per forward of every window
    # the dense outlier profile runs every window once; down then runs only for the outputs (its statistics stop
    # the forward at its input), q also for o's statistics and h₁ (OPT: for o, gate/up, down and the outputs)
    assert runs[last] == 2 * calls
    assert runs[first] == (1 + (4 if model_type == "opt" else 2)) * calls


def test_skipping_the_attention_puts_back_an_instance_level_forward():
    """accelerate's hooks replace ``module.forward`` on the instance: the zeroed attention is undone to that."""
    model = tiny("llama")
    attention = model.model.layers[0].self_attn
    runs, own = [], attention.forward

    def wrapped(*args, **kwargs):
        runs.append(1)
        return own(*args, **kwargs)

    attention.forward = wrapped
    Pruner(model, None).prune(PrunedConfig(sparsity=0.5, **SMALL), calibration_dataset=X, batch_size=2)
    assert attention.__dict__["forward"] is wrapped
    assert len(runs) == 3 * 4  # 4 batches: the dense profile, o's statistics and h₁; never for gate/up, down, outputs


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_pruning_the_mlp_alone_enters_its_half_first_with_the_same_weights(model_type):
    only_mlp = dict(targets=["gate", "up", "down"])
    whole, _ = pruned(model_type, None, **only_mlp)
    halves, _ = pruned(model_type, 2, **only_mlp)
    assert all(torch.equal(halves[n], whole[n]) for n in whole)
    assert all(bool((w == 0).any()) == ("mlp" in n) for n, w in whole.items())


def test_a_flattened_input_is_summed_window_by_window():
    """OPT hands its MLP a [tokens, d] input: with ``seqlen`` the sums are those of the [windows, seqlen, d] input."""
    x = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(0))
    windowed, flat, one = (InputStatistics.empty(7, True, dtype=torch.float64) for _ in range(3))
    windowed.update(x)
    flat.update(x.reshape(-1, 7), seqlen=5)
    one.update(x.reshape(-1, 7))
    assert torch.equal(flat.hessian, windowed.hessian) and torch.equal(flat.sumsq, windowed.sumsq)
    assert flat.tokens == one.tokens == 30
    # without it, one fp32 product of all 30 rows: close, but not the bits the same windows give in any other batching
    torch.testing.assert_close(one.hessian, windowed.hessian, rtol=1e-5, atol=1e-5)
    assert not torch.equal(one.hessian, windowed.hessian)


def test_the_default_batch_keeps_one_mlp_activation_within_a_gib():
    shapes = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8)
    with torch.device("meta"):
        llama3_8b = LlamaDecoderLayer(LlamaConfig(**shapes, intermediate_size=14336), 0)
        smollm2 = LlamaDecoderLayer(LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9), 0)
    # 2³⁰ B / (4 B × 2048 tokens × 14336) = 9.1 windows of 2048 tokens; all 32 SmolLM2 windows of 512 (96 MiB)
    assert windows_per_forward(llama3_8b, 128, 2048) == 9
    assert windows_per_forward(llama3_8b, 4, 2048) == 4
    assert windows_per_forward(smollm2, 32, 512) == 32
    assert windows_per_forward(smollm2, 128, 1 << 20) == 1  # never 0


def test_propagating_overwrites_the_inputs_instead_of_allocating_a_second_copy():
    model = tiny("llama")
    acts = capture(model, get_arch_spec(model), X, torch.device("cpu"), batch_size=2)
    layer, size = model.model.layers[0], acts.hidden.numel() * acts.hidden.element_size()
    expected = forward_layer(layer, acts, 0)
    assert max(allocations(lambda: forward_layer(layer, acts.clone(), 0))) >= size  # a second copy of all windows
    inputs = acts.hidden
    out = forward_layer(layer, acts, 0, "in_place")
    assert out is inputs and torch.equal(out, expected)
    assert max(allocations(lambda: forward_layer(layer, acts, 0, "in_place"))) < size / 2  # one batch at a time
    assert forward_layer(layer, acts, 0, "none") is None  # run for its hooks
    assert max(allocations(lambda: forward_layer(layer, acts, 0, "none"))) < size / 2
    with pytest.raises(ValueError, match="outputs must be"):
        forward_layer(layer, acts, 0, "inplace")
