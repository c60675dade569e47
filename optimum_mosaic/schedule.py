"""Sparsity schedules and mask selection for pruning during training. Pure functions on tensors.

Cubic schedule (Zhu & Gupta 2017): s_t = s_f + (s_i − s_f)·(1 − (t − t₀)/(n·Δt))³ for t₀ ≤ t ≤ t₀ + n·Δt.
Regeneration (GraNet, Liu et al. NeurIPS 2021): drop the k weakest surviving weights, regrow the k pruned
positions with the largest |∂L/∂W|; k = fraction × zeros, so the sparsity is unchanged.
"""

from __future__ import annotations

import torch


def check_schedule(initial: float, final: float, start_step: int, end_step: int, frequency: int = 1) -> None:
    """Raise ``ValueError`` unless 0 ≤ initial ≤ final < 1, end_step > start_step ≥ 0 and frequency ≥ 1."""
    if not 0.0 <= initial <= final < 1.0:
        raise ValueError(f"sparsities must satisfy 0 <= initial <= final < 1, got initial={initial}, final={final}")
    if start_step < 0 or end_step <= start_step:
        raise ValueError(f"steps must satisfy 0 <= start_step < end_step, got start={start_step}, end={end_step}")
    if int(frequency) != frequency or frequency < 1:
        raise ValueError(f"frequency must be an integer >= 1, got {frequency}")


def cubic_sparsity(
    step: int, initial: float, final: float, start_step: int, end_step: int, frequency: int = 1
) -> float:
    """Scheduled sparsity at ``step``: s_i up to ``start_step``, s_f from ``end_step`` on, and in between

    s_t = s_f + (s_i − s_f)·(1 − (t − t₀)/(t_end − t₀))³ with t = t₀ + ⌊(step − t₀)/Δt⌋·Δt,

    i.e. the value only changes every ``frequency`` (Δt) steps counted from ``start_step`` (t₀).
    """
    check_schedule(initial, final, start_step, end_step, frequency)
    if step >= end_step:
        return float(final)
    t = start_step + max(0, step - start_step) // frequency * frequency
    if t == start_step:
        return float(initial)
    remaining = 1.0 - (t - start_step) / (end_step - start_step)
    return float(final + (initial - final) * remaining**3)


def zero_count(numel: int, sparsity: float) -> int:
    """Number of zeros a matrix of ``numel`` entries gets at ``sparsity``: round(s·numel)."""
    return int(round(sparsity * numel))


def prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask of ``scores``' shape with exactly round(s·numel) ``False`` entries: the lowest scores.

    Ties are broken by flat index (a stable sort: among equal scores the earlier entry is pruned first).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = scores.detach().reshape(-1)
    order = torch.sort(flat, stable=True).indices
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[order[: zero_count(flat.numel(), sparsity)]] = False
    return mask.view(scores.shape)


def regrow(mask: torch.Tensor, scores: torch.Tensor, grad: torch.Tensor, fraction: float) -> torch.Tensor:
    """GraNet regeneration: a new mask with the same number of zeros as ``mask``.

    With k = min(round(fraction × zeros), survivors): the k surviving entries with the lowest ``scores``
    (e.g. |W|) are dropped, and the k entries pruned in ``mask`` with the largest |``grad``| are regrown.
    Dropped entries are not candidates for regrowth. Ties are broken by flat index (stable sorts).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    flat = mask.reshape(-1)
    alive, dead = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
    k = min(int(round(fraction * dead.numel())), alive.numel())
    drop = alive[torch.sort(scores.detach().reshape(-1)[alive], stable=True).indices[:k]]
    grow = dead[torch.sort(grad.detach().reshape(-1)[dead].abs(), descending=True, stable=True).indices[:k]]
    new = flat.clone()
    new[drop] = False
    new[grow] = True
    return new.view(mask.shape)
