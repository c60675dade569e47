"""Structured removal costs measured after Gemma-2/3's post-norms (the RMSNorm between ``o``/``down`` and the
residual add): the gain of the norm, the costs it weights, and the compensation it must leave unchanged."""

from __future__ import annotations

import pytest
import torch
from test_architectures import tiny
from test_structured_units import _inputs, ridge_cost

from optimum_mosaic.architectures import ARCHITECTURES, get_arch_spec, layer_projections
from optimum_mosaic.calibration.statistics import InputStatistics
from optimum_mosaic.structured import LayerCut, layer_shape, output_gain, remove_units, unit_options

pytestmark = pytest.mark.usefixtures("one_thread")


def _gemma3_layer(seed: int = 0):
    model = tiny("gemma3_text", seed)
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():  # learned norm weights far from Gemma's zero initialisation (effective weight 1 + w)
        for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
            norm.weight.copy_(torch.randn(norm.weight.shape, generator=g) * 2.0)
    return model, layer


def _stats(X: torch.Tensor) -> InputStatistics:
    return InputStatistics(X.square().sum(0).float(), (X.T @ X).float(), X.shape[0])


def test_the_post_norm_families_name_their_norms():
    for name in ("gemma2", "gemma3_text", "mosaic_gemma3_text"):
        assert ARCHITECTURES[name].post_norms == {"o": "post_attention_layernorm", "down": "post_feedforward_layernorm"}
    for name in ("llama", "gemma", "qwen2", "mistral", "opt", "phi3"):  # pre-norm only: errors add directly
        assert ARCHITECTURES[name].post_norms == {}


def test_output_gain_is_the_norm_weight_over_the_rms_of_the_projection_output():
    model, layer = _gemma3_layer()
    spec, p = get_arch_spec(model), layer_projections(layer, get_arch_spec(model))
    X = _inputs(300, p["down"].in_features, 4)
    gain = output_gain(layer, spec, "down", p["down"], _stats(X))
    y = X @ p["down"].weight.double().T  # the outputs themselves, not the Hessian
    expected = (1.0 + layer.post_feedforward_layernorm.weight.double()).abs() / y.square().mean().sqrt()
    torch.testing.assert_close(gain, expected, rtol=1e-5, atol=0)
    # first order: a small error e in y moves the norm's output by about g ⊙ e (rms(y) varies per token: loose)
    e = 1e-4 * torch.randn_like(y)
    norm = layer.post_feedforward_layernorm.double()
    with torch.no_grad():
        moved = (norm(y + e) - norm(y)).square().sum() / (gain * e).square().sum()
    assert 0.5 < float(moved) < 2.0
    assert output_gain(model.model.layers[0], spec, "q", p["q"], _stats(X)) is None  # no norm after q
    llama = tiny("llama")
    assert output_gain(llama.model.layers[0], get_arch_spec(llama), "down", p["down"], _stats(X)) is None


def test_costs_on_a_post_norm_layer_are_least_squares_costs_of_the_row_scaled_weight():
    model, layer = _gemma3_layer()
    spec, p = get_arch_spec(model), layer_projections(layer, get_arch_spec(model))
    X = _inputs(300, p["down"].in_features, 5)
    stats = {"down": _stats(X)}
    damp, scale = 0.01, 3.0
    options = unit_options(layer, spec, stats, ("mlp",), damp, scale)["mlp"]
    gain = output_gain(layer, spec, "down", p["down"], stats["down"])
    weighted = gain.view(-1, 1) * p["down"].weight.double()
    batch = options[1].value  # the first step removes the cheapest channels under the weighted cost
    singles = [ridge_cost(weighted, X, damp, [c]) for c in range(X.shape[1])]
    first = sorted(range(X.shape[1]), key=singles.__getitem__)[:batch]
    assert options[1].cost == pytest.approx(ridge_cost(weighted, X, damp, first) / scale, rel=1e-5)
    plain = [ridge_cost(p["down"].weight, X, damp, [c]) for c in range(X.shape[1])]
    assert first != sorted(range(X.shape[1]), key=plain.__getitem__)[:batch]  # the norm changes the choice


def test_removal_after_a_post_norm_compensates_as_plain_least_squares_on_the_kept_channels():
    model, layer = _gemma3_layer(1)
    spec, p = get_arch_spec(model), layer_projections(layer, get_arch_spec(model))
    shape = layer_shape(layer, spec)
    X = _inputs(400, shape.intermediate, 6)
    stats = {"down": _stats(X), "o": _stats(_inputs(400, p["o"].in_features, 7))}
    W = p["down"].weight.detach().double().clone()
    cut = LayerCut(shape.intermediate - 10, shape.kv_heads, shape.heads // shape.kv_heads)
    keep = remove_units(layer, spec, stats, cut, dampening=0.01)["channels"]
    p = layer_projections(layer, spec)  # the shrunk modules
    assert len(keep) == shape.intermediate - 10 and p["down"].weight.shape[1] == len(keep)
    # per output row the compensation is a ridge least squares on the kept inputs: row scaling does not change it
    lam = 0.01 * X.square().sum(0).mean()
    A = torch.cat([X, lam.sqrt() * torch.eye(X.shape[1], dtype=torch.float64)])
    solution = torch.linalg.lstsq(A[:, keep], A @ W.T).solution.T
    torch.testing.assert_close(p["down"].weight.double(), solution, rtol=1e-4, atol=1e-5)


def test_a_row_the_norm_silences_neither_counts_nor_breaks_the_removal():
    model, layer = _gemma3_layer(2)
    with torch.no_grad():  # Gemma-3-270M has norm weights of exactly -1: effective weight 0
        layer.post_feedforward_layernorm.weight[:3] = -1.0
    spec, p = get_arch_spec(model), layer_projections(layer, get_arch_spec(model))
    shape = layer_shape(layer, spec)
    X = _inputs(300, shape.intermediate, 8)
    stats = {"down": _stats(X), "o": _stats(_inputs(300, p["o"].in_features, 9))}
    gain = output_gain(layer, spec, "down", p["down"], stats["down"])
    assert (gain[:3] > 0).all() and (gain[:3] < 1e-5 * gain.mean()).all()
    cut = LayerCut(shape.intermediate - 10, shape.kv_heads, shape.heads // shape.kv_heads)
    remove_units(layer, spec, stats, cut, dampening=0.01)
    assert torch.isfinite(layer_projections(layer, spec)["down"].weight).all()
