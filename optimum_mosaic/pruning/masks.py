"""Mask helpers shared by the unstructured kernels: exact-k selection and N:M groups."""

from __future__ import annotations

import torch


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask with True at exactly the ``k`` lowest entries of ``scores`` (ties broken by index).

    O(n): the k-th smallest value ``t`` by selection, everything below ``t``, then the first entries equal to ``t``."""
    flat = scores.flatten()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    t = flat.kthvalue(k).values
    mask = flat < t
    ties = torch.nonzero(flat == t).flatten()[: k - int(mask.sum())]
    mask[ties] = True
    return mask.view_as(scores)


def row_lowest_k_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True at the lowest entries of every row (the comparison group is one output row).

    The matrix gets exactly ``round(s · numel)`` zeros: every row ``floor(s · d_in)``, and the first
    rows one more where the total needs it (the reference's ``int(s · d_in)`` per row drifts by up to
    ``1/d_in``).
    """
    rows, cols = scores.shape
    total = int(round(sparsity * rows * cols))
    base, extra = divmod(total, rows)
    k = torch.full((rows, 1), base, device=scores.device)
    k[:extra] += 1
    ranks = torch.argsort(torch.argsort(scores, dim=1, stable=True), dim=1)
    return ranks < k


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the ``n`` lowest scores of every group of ``m`` consecutive input columns, per row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input size ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.argsort(groups, dim=2, stable=True)[..., :n], True)
    return mask.reshape(rows, cols)
