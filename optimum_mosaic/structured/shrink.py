"""Physically remove units: slice ``nn.Linear`` modules and fix the attention module's head bookkeeping.

``mask_units`` zeroes the same weights instead of removing them; the shrunk and the masked model
compute the same function (the test of this module checks the logits).
"""

from __future__ import annotations

import torch
from torch import nn

from .budget import MLP_ROWS


def slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding only the given output ``rows`` and input ``cols`` of ``linear``."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    new = nn.Linear(
        weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias.detach())
    return new


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a ``[n_heads·head_dim, …]`` projection."""
    return (heads.view(-1, 1) * head_dim + torch.arange(head_dim)).flatten()


def _replace(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, name, module)


def shrink_mlp(layer: nn.Module, paths: dict[str, str], keep: torch.Tensor) -> None:
    """Keep MLP channels ``keep``: rows of gate (if any) and up, columns of down."""
    for key in [k for k in MLP_ROWS if k in paths]:
        _replace(layer, paths[key], slice_linear(layer.get_submodule(paths[key]), rows=keep))
    _replace(layer, paths["down"], slice_linear(layer.get_submodule(paths["down"]), cols=keep))


def shrink_attention(
    layer: nn.Module, paths: dict[str, str], attention: str, heads: torch.Tensor, groups: torch.Tensor, head_dim: int
) -> None:
    """Keep query ``heads`` (rows of q, columns of o) and key/value ``groups`` (rows of k and v)."""
    q_rows, kv_rows = head_rows(heads, head_dim), head_rows(groups, head_dim)
    _replace(layer, paths["q"], slice_linear(layer.get_submodule(paths["q"]), rows=q_rows))
    for key in ("k", "v"):
        _replace(layer, paths[key], slice_linear(layer.get_submodule(paths[key]), rows=kv_rows))
    _replace(layer, paths["o"], slice_linear(layer.get_submodule(paths["o"]), cols=q_rows))
    layer.get_submodule(attention).num_key_value_groups = len(heads) // len(groups)


@torch.no_grad()
def mask_units(
    layer: nn.Module,
    paths: dict[str, str],
    channels_removed=None,
    heads_removed=None,
    groups_removed=None,
    head_dim: int | None = None,
) -> None:
    """Zero (instead of remove) what ``shrink_mlp``/``shrink_attention`` would remove."""
    get = layer.get_submodule
    if channels_removed is not None and len(channels_removed):
        for key in [k for k in MLP_ROWS if k in paths]:
            get(paths[key]).weight[channels_removed] = 0
        get(paths["down"]).weight[:, channels_removed] = 0
    if heads_removed is not None and len(heads_removed):
        get(paths["o"]).weight[:, head_rows(heads_removed, head_dim)] = 0
    if groups_removed is not None and len(groups_removed):
        rows = head_rows(groups_removed, head_dim)
        get(paths["v"]).weight[rows] = 0
        if get(paths["v"]).bias is not None:
            get(paths["v"]).bias[rows] = 0
