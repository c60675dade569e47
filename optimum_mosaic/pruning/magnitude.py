"""Magnitude pruning: zero the ``k = round(s · numel)`` smallest ``|W_ij|`` of the whole matrix."""

from __future__ import annotations

import torch

from ..registry import register_method
from .masks import lowest_k_mask, nm_mask


def magnitude_prune(weight: torch.Tensor, stats, sparsity: float, nm=None, **_) -> torch.Tensor:
    scores = weight.abs().float()
    mask = nm_mask(scores, *nm) if nm else lowest_k_mask(scores, int(round(sparsity * weight.numel())))
    return weight.masked_fill(mask, 0)


register_method("magnitude", "unstructured", magnitude_prune)
