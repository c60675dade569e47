"""Structured pruning inside the layer walk: options and costs per layer (dense pre-pass), a budget across
layers, then per layer removal of whole units with structured-OBS compensation and physical shrinking."""

from __future__ import annotations

import torch

from ..architectures import ArchSpec, decoder_layers, layer_projections
from .budget import MAX_CHANNEL_REMOVAL, MLP_ROWS, LayerCut, LayerShape, Option, allocate_removal, layer_cuts, plan_cuts
from .obs import StructuredOBS, greedy_channels, greedy_heads
from .shrink import mask_units, shrink_attention, shrink_mlp

__all__ = [
    "LayerCut",
    "LayerShape",
    "allocate_removal",
    "apply_cuts",
    "layer_cuts",
    "layer_shape",
    "model_shapes",
    "output_gain",
    "plan_cuts",
    "remove_units",
    "unit_options",
]


def layer_shape(layer, spec: ArchSpec) -> LayerShape:
    p = layer_projections(layer, spec)
    head_dim = layer.get_submodule(spec.attention).head_dim
    return LayerShape(
        hidden=p["q"].in_features,
        intermediate=p["down"].in_features,
        heads=p["q"].out_features // head_dim,
        kv_heads=p["k"].out_features // head_dim,
        head_dim=head_dim,
        mlp_matrices=1 + sum(k in p for k in MLP_ROWS),
    )


def model_shapes(model, spec: ArchSpec) -> dict[int, LayerShape]:
    return {i: layer_shape(layer, spec) for i, layer in enumerate(decoder_layers(model, spec))}


@torch.no_grad()
def output_gain(layer, spec: ArchSpec, key: str, linear, stats) -> torch.Tensor | None:
    """First-order gain ``g = |γ| / rms(y)`` of the norm that reads ``y = W x`` before the residual add
    (``spec.post_norms``, Gemma-2/3): an error ``e`` in ``y`` reaches the residual stream as about ``g ⊙ e``, so
    removal costs are ``Σ_r g_r² e_r²``. ``γ`` is the norm's output on a vector of ones (its effective weight,
    Gemma's ``1 + w``); ``rms(y)² = tr(W H Wᵀ) / (tokens · d_out)`` from the input Hessian; floored at 1e-6 × its mean.
    ``None``: no post-norm."""
    path = spec.post_norms.get(key)
    if path is None:
        return None
    norm = layer.get_submodule(path)
    W = linear.weight.detach().to(torch.float64)
    probe = torch.ones(1, W.shape[0], dtype=next(norm.parameters()).dtype, device=W.device)
    gamma = norm(probe).reshape(-1).to(torch.float64).abs()
    power = torch.einsum("ij,jk,ik->", W, stats.hessian.to(torch.float64), W) / (max(stats.tokens, 1) * W.shape[0])
    gain = gamma / power.clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    return gain.clamp_min(1e-6 * float(gain.mean()))  # γ = 0 rows (Gemma-3 has some): ~no weight, no 1/0 in _store


def _obs_state(linear, stats, dampening: float, bias: bool, gain: torch.Tensor | None = None) -> StructuredOBS:
    """Structured-OBS state of ``linear`` on its input statistics; ``bias``: with the constant input column;
    ``gain``: output rows scaled by it (``output_gain``), so that costs are measured after the post-norm."""
    weight, current = linear.weight, linear.bias
    if gain is not None:  # the compensation is per output row, so scaling rows and unscaling (_store) is exact
        weight = weight.detach().to(torch.float64) * gain.view(-1, 1)
        current = None if current is None else current.detach().to(torch.float64) * gain
    intercept = (stats.total, stats.tokens, current) if bias else None
    return StructuredOBS(weight, stats.hessian, dampening, intercept)


@torch.no_grad()
def _store(linear, state: StructuredOBS, gain: torch.Tensor | None = None) -> None:
    weight, bias = state.weight, state.bias
    if gain is not None:
        weight = weight / gain.view(-1, 1)
        bias = None if bias is None else bias / gain
    linear.weight.copy_(weight)
    if bias is not None:
        if linear.bias is None:
            linear.bias = torch.nn.Parameter(bias.to(linear.weight.dtype))
        else:
            linear.bias.copy_(bias)


@torch.no_grad()
def unit_options(
    layer, spec: ArchSpec, stats: dict, units, dampening: float, scale: float, bias: bool = False
) -> dict[str, list[Option]]:
    """What this layer could give up, per unit kind, with the structured-OBS cost ``ε / scale`` of each option.
    ``stats``: projection → InputStatistics with the Hessians of ``o`` and ``down``."""
    p, shape = layer_projections(layer, spec), layer_shape(layer, spec)
    options = {}
    if "mlp" in units:
        gain = output_gain(layer, spec, "down", p["down"], stats["down"])
        state = _obs_state(p["down"], stats["down"], dampening, bias, gain)
        _, steps = greedy_channels(state, int(MAX_CHANNEL_REMOVAL * shape.intermediate))
        options["mlp"], removed, cost = [Option(0, 0, 0.0)], 0, 0.0
        for count, eps in steps:
            removed, cost = removed + count, cost + eps
            options["mlp"].append(Option(removed, removed * shape.mlp_matrices * shape.hidden, cost / scale))
    if "attention" in units:
        state = _obs_state(p["o"], stats["o"], dampening, bias, output_gain(layer, spec, "o", p["o"], stats["o"]))
        whole = shape.attention_params
        options["attention"] = []
        for groups in range(1, shape.kv_heads + 1):
            for per_group in range(1, shape.heads // shape.kv_heads + 1):
                _, _, eps = greedy_heads(state.clone(), shape.head_dim, shape.kv_heads, groups, per_group)
                size = whole - shape.attention_size(groups, per_group)
                options["attention"].append(Option((groups, per_group), size, eps / scale))
    return options


@torch.no_grad()
def remove_units(
    layer, spec: ArchSpec, stats: dict, cut: LayerCut, dampening: float, bias: bool = False
) -> dict[str, torch.Tensor]:
    """Remove what ``cut`` says, choosing units greedily by structured-OBS cost on ``stats`` (Hessians of the
    inputs of ``o`` and ``down``), compensating ``o``/``down`` (and, with ``bias``, their biases: FLAP-style),
    then slicing every projection. Returns the kept ``channels``, ``heads`` and ``groups``."""
    p, shape = layer_projections(layer, spec), layer_shape(layer, spec)
    whole = LayerCut.whole(shape)
    keep = {
        "channels": torch.arange(shape.intermediate),
        "heads": torch.arange(shape.heads),
        "groups": torch.arange(shape.kv_heads),
    }
    if (cut.groups, cut.heads_per_group) != (whole.groups, whole.heads_per_group):
        gain = output_gain(layer, spec, "o", p["o"], stats["o"])
        state = _obs_state(p["o"], stats["o"], dampening, bias, gain)
        keep["heads"], keep["groups"], _ = greedy_heads(
            state, shape.head_dim, shape.kv_heads, cut.groups, cut.heads_per_group
        )
        _store(p["o"], state, gain)
    if cut.channels < shape.intermediate:
        gain = output_gain(layer, spec, "down", p["down"], stats["down"])
        state = _obs_state(p["down"], stats["down"], dampening, bias, gain)
        keep["channels"], _ = greedy_channels(state, shape.intermediate - cut.channels)
        _store(p["down"], state, gain)
    apply_cuts(layer, spec, keep)
    return keep


def apply_cuts(layer, spec: ArchSpec, keep: dict[str, torch.Tensor], physical: bool = True) -> None:
    """Remove (``physical``) or zero (``physical=False``) everything ``keep`` does not list."""
    shape = layer_shape(layer, spec)
    if not physical:
        dropped = lambda kept, n: torch.tensor(sorted(set(range(n)) - set(kept.tolist())), dtype=torch.long)  # noqa: E731
        mask_units(
            layer,
            spec.projections,
            dropped(keep["channels"], shape.intermediate),
            dropped(keep["heads"], shape.heads),
            dropped(keep["groups"], shape.kv_heads),
            shape.head_dim,
        )
        return
    if len(keep["channels"]) < shape.intermediate:
        shrink_mlp(layer, spec.projections, keep["channels"])
    if len(keep["heads"]) < shape.heads or len(keep["groups"]) < shape.kv_heads:
        shrink_attention(layer, spec.projections, spec.attention, keep["heads"], keep["groups"], shape.head_dim)
