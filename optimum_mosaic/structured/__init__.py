"""Structured pruning: score whole units, remove the lowest, physically shrink the layers."""

from __future__ import annotations

import torch

from ..architectures import ArchSpec, decoder_layers, layer_projections
from .budget import MLP_ROWS, LayerCut, LayerShape, plan_cuts
from .scores import channel_scores, head_scores, kv_scores, select_channels, select_heads
from .shrink import mask_units, shrink_attention, shrink_mlp

__all__ = ["LayerCut", "LayerShape", "apply_cuts", "layer_shape", "plan_cuts", "choose_units"]


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


def choose_units(layer, spec: ArchSpec, stats: dict, cut: LayerCut) -> dict[str, torch.Tensor]:
    """Which channels, query heads and key/value groups layer keeps (``stats``: projection → InputStatistics)."""
    p = layer_projections(layer, spec)
    shape = layer_shape(layer, spec)
    x = stats[next(k for k in MLP_ROWS if k in stats)].sumsq  # gate and up read the same input
    gate = p["gate"].weight if "gate" in p else None
    ch = channel_scores(gate, p["up"].weight, p["down"].weight, x, stats["down"].sumsq)
    hs = head_scores(p["q"].weight, p["o"].weight, stats["q"].sumsq, stats["o"].sumsq, shape.head_dim)
    kv = kv_scores(p["k"].weight, p["v"].weight, stats["k"].sumsq, shape.head_dim)
    heads, groups = select_heads(hs, kv, cut.groups, cut.heads_per_group)
    return {"channels": select_channels(ch, shape.intermediate - cut.channels), "heads": heads, "groups": groups}


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


def model_shapes(model, spec: ArchSpec) -> dict[int, LayerShape]:
    return {i: layer_shape(layer, spec) for i, layer in enumerate(decoder_layers(model, spec))}
