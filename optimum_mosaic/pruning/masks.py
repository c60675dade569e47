"""Mask helpers shared by the unstructured kernels: exact-k selection and N:M groups."""

from __future__ import annotations

import math

import torch

SAMPLE = 8192  # entries sampled to bracket a k-th value
CHUNK = 1 << 20  # entries compared at a time while the bracket is counted and gathered


def kth_smallest(flat: torch.Tensor, j: int, key=None) -> torch.Tensor:
    """The ``j``-th smallest (1-based) entry of the 1-D ``flat``: exactly ``flat.kthvalue(j).values``, faster on
    large tensors. A fixed pseudo-random sample of ``SAMPLE`` entries brackets the value (rank ``j/n`` ± 4 binomial
    standard deviations); then ``j`` minus the count below the bracket is the rank inside the (small) bracket,
    where ``kthvalue`` runs. If the bracket misses (probability ≈ 1e-4), the full selection runs. ``key`` (an
    elementwise function, e.g. ``torch.abs``): the ``j``-th smallest of ``key(flat)``, applied one chunk at a time."""
    n, key = flat.numel(), key or (lambda x: x)
    if n <= 4 * SAMPLE:
        return key(flat).kthvalue(j).values
    idx = torch.randint(n, (SAMPLE,), generator=torch.Generator().manual_seed(n)).to(flat.device)
    sample = key(flat[idx]).sort().values
    q = j / n
    centre, margin = q * SAMPLE, 4 * math.sqrt(q * (1 - q) * SAMPLE) + 2
    lo, hi = sample[max(int(centre - margin), 0)], sample[min(int(centre + margin), SAMPLE - 1)]
    below, parts = 0, []
    for chunk in flat.split(CHUNK):  # in chunks: the comparison masks of a whole 14336-wide matrix cost 2 copies of it
        chunk = key(chunk)
        below += int(torch.count_nonzero(chunk < lo))
        parts.append(chunk[(chunk >= lo) & (chunk <= hi)])
    rank, band = j - below, torch.cat(parts)
    if 1 <= rank <= band.numel():
        return band.kthvalue(rank).values
    return key(flat).kthvalue(j).values


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask with True at exactly the ``k`` lowest entries of ``scores`` (ties broken by index).

    O(n): the k-th smallest value ``t`` by selection, everything below ``t``, then the first entries equal to ``t``."""
    flat = scores.flatten()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    t = kth_smallest(flat, k)
    mask = flat < t
    ties = torch.nonzero(flat == t).flatten()[: k - int(torch.count_nonzero(mask))]
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
