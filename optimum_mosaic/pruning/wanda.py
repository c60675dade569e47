"""Wanda (Sun et al., arXiv 2306.11695): score ``S_ij = |W_ij| · ‖X_j‖₂`` — the norm, not its square —
and zero the lowest scores of *each output row* (``s · d_in`` per row, exact in total). No weight update."""

from __future__ import annotations

import torch

from ..allocation.outliers import wanda_scores
from ..registry import register_method
from .masks import nm_mask, row_lowest_k_mask


def wanda_prune(weight: torch.Tensor, stats, sparsity: float, nm=None, **_) -> torch.Tensor:
    scores = wanda_scores(weight, stats.sumsq)
    mask = nm_mask(scores, *nm) if nm else row_lowest_k_mask(scores, sparsity)
    return weight.masked_fill(mask, 0)


register_method("wanda", "unstructured", wanda_prune, needs=("sumsq",))
