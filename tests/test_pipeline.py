"""The whole pipeline on tiny random models: every registered method, same contract."""

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows
from transformers import GPT2Config, GPT2LMHeadModel

from optimum_mosaic import PrunedConfig, Pruner
from optimum_mosaic.architectures import decoder_layers, get_arch_spec, layer_projections
from optimum_mosaic.calibration.layerwise import capture, forward_layer
from optimum_mosaic.exceptions import CalibrationError, UnsupportedArchitectureError
from optimum_mosaic.registry import list_methods

SMALL = dict(nsamples=8, seqlen=32, search_samples=4, block_size=32)


def prune(model, **kwargs):
    config = PrunedConfig(**{**SMALL, **kwargs})
    Pruner(model).prune(config, calibration_dataset=token_windows(12, 32), batch_size=4)
    return model


@pytest.mark.parametrize("allocation", list_methods("allocation"))
@pytest.mark.parametrize("pruner", list_methods("unstructured"))
def test_contract_every_method(allocation, pruner):
    model = prune(tiny_llama(), sparsity=0.6, allocation=allocation, pruner=pruner)
    report = model.mosaic_report
    assert abs(report.achieved_sparsity - report.planned_sparsity) < 2e-3
    if allocation != "projection_official":
        assert report.planned_sparsity == pytest.approx(0.6, abs=1e-6)
    else:
        assert report.notes  # drift is reported, never silent
    assert all(torch.isfinite(p).all() for p in model.parameters())
    again = prune(tiny_llama(), sparsity=0.6, allocation=allocation, pruner=pruner)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_capture_and_layer_walk_reproduce_the_model():
    model, windows = tiny_llama(), token_windows(4, 16)
    spec = get_arch_spec(model)
    acts = capture(model, spec, windows, torch.device("cpu"), batch_size=2)
    torch.testing.assert_close(acts.hidden, model.model.embed_tokens(windows))
    for i, layer in enumerate(decoder_layers(model, spec)):
        acts.hidden = forward_layer(layer, acts, i)
    with torch.no_grad():
        expected = model.model(windows).last_hidden_state
    torch.testing.assert_close(model.model.norm(acts.hidden), expected)
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in model.model.layers)  # restored


def test_pruning_is_sequential():
    """Layer 1 is calibrated on the outputs of the already-pruned layer 0, not on dense activations."""
    from optimum_mosaic.calibration.data import sample_windows

    windows, _ = sample_windows(None, token_windows(12, 32), 8, 32, seed=0)
    reference = tiny_llama()
    prune(reference, sparsity=0.5, allocation="uniform", pruner="wanda", targets=["q"], ignore=[r"layers\.[12]\."])
    pruned_layer0 = reference.model.layers[0].self_attn.q_proj.weight
    manual = tiny_llama()
    manual.model.layers[0].self_attn.q_proj.weight.data.copy_(pruned_layer0)
    # with layer 0 pruned, Wanda on layer 1 must equal what the pipeline computes
    full = prune(
        tiny_llama(), sparsity=0.5, allocation="uniform", pruner="wanda", targets=["q"], ignore=[r"layers\.2\."]
    )
    spec = get_arch_spec(manual)
    acts = capture(manual, spec, windows, torch.device("cpu"), batch_size=4)
    acts.hidden = forward_layer(manual.model.layers[0], acts, 0)
    q1 = layer_projections(manual.model.layers[1], spec, ["q"])["q"]
    from optimum_mosaic.calibration.layerwise import collect_statistics
    from optimum_mosaic.pruning.wanda import wanda_prune

    stats, _ = collect_statistics(manual.model.layers[1], acts, 1, {"q": q1}, hessian=False)
    expected = wanda_prune(q1.weight, stats["q"], 0.5)
    assert torch.equal(full.model.layers[1].self_attn.q_proj.weight, expected)


def test_targets_and_ignore_leave_other_layers_dense():
    model = prune(
        tiny_llama(),
        sparsity=0.5,
        allocation="uniform",
        pruner="magnitude",
        targets=["gate", "up", "down"],
        ignore=[r"layers\.1\."],
    )
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()
    assert (model.model.layers[1].mlp.up_proj.weight != 0).all()
    assert (model.model.layers[2].mlp.up_proj.weight == 0).float().mean() == pytest.approx(0.5, abs=1e-3)


def test_text_calibration_with_a_tokenizer():
    model = tiny_llama()
    text = ["It is a truth universally acknowledged, that a single man in possession of a good fortune"] * 20
    Pruner(model, char_tokenizer()).prune(PrunedConfig(**{**SMALL, "allocation": "layer"}), calibration_dataset=text)
    assert model.mosaic_report.achieved_sparsity == pytest.approx(0.5, abs=1e-3)


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*llama"):
        Pruner(gpt2)


def test_empty_corpus_and_too_many_samples_are_explained():
    with pytest.raises(CalibrationError, match="empty"):
        Pruner(tiny_llama(), char_tokenizer()).prune(PrunedConfig(**SMALL), calibration_dataset=["", "  "])
    with pytest.raises(CalibrationError, match="holds 1 windows.*nsamples=8"):
        Pruner(tiny_llama(), char_tokenizer()).prune(PrunedConfig(**SMALL), calibration_dataset="x" * 40)


def test_auto_search_result_equals_a_direct_prune_with_the_chosen_lamda():
    auto = prune(tiny_llama(), sparsity=0.6, allocation="projection")
    report = auto.mosaic_report
    assert [row["lamda"] for row in report.search] == [0.0, 0.03, -0.03]
    assert report.lamda == min(report.search, key=lambda row: row["loss"])["lamda"]
    direct = prune(tiny_llama(), sparsity=0.6, allocation="projection", lamda=report.lamda, outlier_threshold=5.0)
    for a, b in zip(auto.state_dict().values(), direct.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_search_pruner_scores_the_candidates_and_pruner_prunes_the_winner():
    cheap = prune(tiny_llama(), sparsity=0.6, allocation="projection", pruner="wanda").mosaic_report
    mixed = prune(tiny_llama(), sparsity=0.6, allocation="projection", pruner="sparsegpt", search_pruner="wanda")
    report = mixed.mosaic_report
    assert [row["loss"] for row in report.search] == [row["loss"] for row in cheap.search]  # Wanda's candidates
    assert report.lamda == cheap.lamda
    direct = prune(tiny_llama(), sparsity=0.6, allocation="projection", lamda=report.lamda, outlier_threshold=5.0,
                   pruner="sparsegpt")  # fmt: skip
    for a, b in zip(mixed.state_dict().values(), direct.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="search_pruner: must be one of"):
        PrunedConfig(allocation="projection", search_pruner="sparse_gpt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs where one is present)")
def test_layers_walk_on_cuda_one_at_a_time():
    model = tiny_llama()  # stays on the CPU; each layer visits the GPU while it is pruned
    Pruner(model, device="cuda").prune(
        PrunedConfig(**SMALL, allocation="layer"), calibration_dataset=token_windows(12, 32)
    )
    assert next(model.parameters()).device.type == "cpu"
    assert model.mosaic_report.achieved_sparsity == pytest.approx(0.5, abs=1e-3)
    cpu = prune(tiny_llama(), allocation="layer")
    for a, b in zip(model.state_dict().values(), cpu.state_dict().values(), strict=True):
        assert torch.equal(a == 0, b == 0) or (a == 0).ne(b == 0).float().mean() < 0.01  # fp differences move ties only


@pytest.mark.parametrize("sequential", ["projection", "layer"])
def test_the_last_reader_of_an_input_group_caches_nothing(sequential):
    """The walk marks the last projection reading each input group's statistics (q, k, v → v; gate, up → up; o and
    down alone), the kernel does not cache its factor then, every cache is empty once the group is solved, and the
    weights are those of a walk that caches everything (the cached factor is the same computation)."""
    from optimum_mosaic.registry import get_method

    method = get_method("unstructured", "sparsegpt")
    original, seen = method.fn, []

    def recording(weight, stats, *args, **kwargs):
        seen.append((tuple(weight.shape), stats.final_read, stats))
        return original(weight, stats, *args, **kwargs)

    object.__setattr__(method, "fn", recording)
    try:
        model = prune(tiny_llama(), sparsity=0.5, allocation="uniform", pruner="sparsegpt", sequential=sequential)
    finally:
        object.__setattr__(method, "fn", original)
    flags = [final for _, final, _ in seen]
    per_layer = len(seen) // model.config.num_hidden_layers
    order = [shape for shape, _, _ in seen[:per_layer]]
    groups = [s for _, _, s in seen[:per_layer]]
    expected = [all(groups[j] is not groups[i] for j in range(i + 1, per_layer)) for i in range(per_layer)]
    assert flags[:per_layer] == expected and expected.count(True) == 4 and len(order) == 7  # one per input group
    assert all(not stats.cache for _, _, stats in seen)

    from optimum_mosaic.calibration.statistics import InputStatistics

    cached = tiny_llama()
    default = InputStatistics.__dict__["final_read"]
    InputStatistics.final_read = property(lambda self: False, lambda self, value: None)  # every reader caches
    try:
        prune(cached, sparsity=0.5, allocation="uniform", pruner="sparsegpt", sequential=sequential)
    finally:
        InputStatistics.final_read = default
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), cached.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("sequential", ["projection", "layer"])
def test_the_default_kernel_consuming_h_changes_no_weight(sequential):
    """ALPS-warm's last reader of a group builds ``Hn`` in the memory of ``H`` (``normalized_hessian``); the walk's
    weights equal those of a walk in which every reader copies."""
    from optimum_mosaic.calibration.statistics import InputStatistics

    model = prune(tiny_llama(), sparsity=0.6, allocation="uniform", pruner="alps_warm", sequential=sequential)
    copying = tiny_llama()
    default = InputStatistics.__dict__["final_read"]
    InputStatistics.final_read = property(lambda self: False, lambda self, value: None)
    try:
        prune(copying, sparsity=0.6, allocation="uniform", pruner="alps_warm", sequential=sequential)
    finally:
        InputStatistics.final_read = default
    assert model.mosaic_report.achieved_sparsity == pytest.approx(0.6, abs=1e-3)
    for a, b in zip(model.state_dict().values(), copying.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sequential", ["projection", "layer"])
def test_a_walk_that_parks_every_last_readers_hn_changes_no_weight(sequential, tmp_path, monkeypatch):
    """With every ``Hn`` counted as wide (``copies.IN_MEMORY_BYTES = 0``) the last reader of each of a layer's four
    input groups parks ``Hn`` in a temporary file while ADMM iterates (the earlier readers keep it for the next); the
    walk's weights equal the default walk's, and no file is left behind."""
    import tempfile

    from optimum_mosaic import copies
    from optimum_mosaic.pruning import ridge

    options = dict(sparsity=0.6, allocation="uniform", pruner="alps_warm", sequential=sequential)
    model = prune(tiny_llama(), **options)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(copies, "IN_MEMORY_BYTES", 0)
    parked, original = [], ridge.RidgeInverses.park

    def park(self):
        original(self)
        parked.append(isinstance(self.parked, copies.FileCopy))

    monkeypatch.setattr(ridge.RidgeInverses, "park", park)
    parking = prune(tiny_llama(), **options)
    assert sum(parked) == 4 * len(model.model.layers) < len(parked)
    for a, b in zip(model.state_dict().values(), parking.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not list(tmp_path.iterdir())


def test_statistics_multiply_only_the_lower_triangle_and_make_no_d_by_d_temporary():
    """``XᵀX`` is symmetric: ``update`` multiplies row strips of its lower triangle (here 3 strips of a 3000-wide input:
    2/3 of the full product's flops) and copies the upper triangle from them. No temporary of ``d × d`` (the full fp32
    product was 36 MB here, 0.77 GiB at 14336). The sums equal an fp64 reference and are exactly symmetric."""
    from conftest import allocations
    from torch.utils.flop_counter import FlopCounterMode

    from optimum_mosaic.calibration import statistics

    d, windows, seqlen = 3000, 2, 200
    x = torch.randn(windows, seqlen, d, generator=torch.Generator().manual_seed(0))
    stats = statistics.InputStatistics.empty(d, True, dtype=torch.float64)
    largest = allocations(lambda: stats.update(x))[0]
    assert largest <= statistics.GRAM_ROWS * d * 8 < d * d * 4  # one strip's fp64 conversion at most
    counter = FlopCounterMode(display=False)
    with counter:
        statistics.InputStatistics.empty(d, True, dtype=torch.float64).update(x)
    assert counter.get_total_flops() < 0.7 * windows * 2 * seqlen * d * d
    reference = torch.einsum("wti,wtj->ij", x.double(), x.double())
    assert torch.equal(stats.hessian, stats.hessian.T)
    torch.testing.assert_close(stats.hessian, reference, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(stats.sumsq, x.double().square().sum((0, 1)), rtol=1e-5, atol=1e-3)
