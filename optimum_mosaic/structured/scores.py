"""Importance of whole units (MLP channels, attention heads, key/value groups): the aggregated Wanda
score ``Σ |W_ij|·‖X_j‖`` over every weight that the unit owns."""

from __future__ import annotations

import torch


def channel_scores(
    gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor, x_sumsq: torch.Tensor, z_sumsq: torch.Tensor
) -> torch.Tensor:
    """MLP channel i owns row i of gate and up (input X) and column i of down (input Z):
    ``score_i = Σ_j |gate_ij|‖X_j‖ + Σ_j |up_ij|‖X_j‖ + ‖Z_i‖ Σ_r |down_ri|`` (no gate term without a gate)."""
    x = x_sumsq.float().sqrt()
    rows = sum(w.abs().float() @ x for w in (gate, up) if w is not None)
    return rows + down.abs().float().sum(0) * z_sumsq.float().sqrt()


def head_scores(
    q: torch.Tensor, o: torch.Tensor, x_sumsq: torch.Tensor, a_sumsq: torch.Tensor, head_dim: int
) -> torch.Tensor:
    """Query head h owns its ``head_dim`` rows of q (input X) and columns of o (input A, the attention output)."""
    rows = q.abs().float() @ x_sumsq.float().sqrt()
    cols = o.abs().float().sum(0) * a_sumsq.float().sqrt()
    return rows.view(-1, head_dim).sum(1) + cols.view(-1, head_dim).sum(1)


def kv_scores(k: torch.Tensor, v: torch.Tensor, x_sumsq: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Key/value head g owns its rows of k and v (input X)."""
    x = x_sumsq.float().sqrt()
    return (k.abs().float() @ x + v.abs().float() @ x).view(-1, head_dim).sum(1)


def select_channels(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices (ascending) of the channels kept after removing the ``remove`` lowest scores."""
    keep = scores.numel() - remove
    return torch.sort(torch.argsort(scores, descending=True, stable=True)[:keep]).values


def select_heads(q_scores: torch.Tensor, kv: torch.Tensor, groups_kept: int, heads_per_group: int):
    """Keep ``groups_kept`` key/value groups, each with ``heads_per_group`` query heads, so every layer
    still has the same number of query heads per key/value head (what GQA needs).

    A group's score is its key/value score plus the scores of the query heads it would keep.
    Returns ``(query heads kept, key/value groups kept)``, ascending.
    """
    n_kv = kv.numel()
    per_group = q_scores.view(n_kv, -1)  # query heads h = g·n_rep + r share key/value head g
    best = torch.sort(per_group, dim=1, descending=True, stable=True)
    group_score = kv + best.values[:, :heads_per_group].sum(1)
    groups = torch.sort(torch.argsort(group_score, descending=True, stable=True)[:groups_kept]).values
    n_rep = per_group.shape[1]
    heads = [g * n_rep + r for g in groups.tolist() for r in sorted(best.indices[g, :heads_per_group].tolist())]
    return torch.tensor(heads), groups
