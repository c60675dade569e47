"""Mask helpers shared by the unstructured kernels: exact-k selection and N:M groups."""

from __future__ import annotations

import math

import torch

from ..calibration.distributed import total

SAMPLE = 8192  # entries sampled to bracket a k-th value
CHUNK = 1 << 20  # entries compared at a time while the bracket is counted and gathered
SHARED_SELECTION = 1 << 19  # entries above which processes sharing a matrix's rows select without gathering it


def kth_smallest(flat: torch.Tensor, j: int, key=None, shard=None) -> torch.Tensor:
    """The ``j``-th smallest (1-based) entry of the 1-D ``flat``: exactly ``flat.kthvalue(j).values``, faster on
    large tensors. A fixed pseudo-random sample of ``SAMPLE`` entries brackets the value (rank ``j/n`` ± 4 binomial
    standard deviations); then ``j`` minus the count below the bracket is the rank inside the (small) bracket,
    where ``kthvalue`` runs. If the bracket misses (probability ≈ 1e-4), the full selection runs. ``key`` (an
    elementwise function, e.g. ``torch.abs``): the ``j``-th smallest of ``key(flat)``, applied one chunk at a time.

    ``shard`` (a ``RowShard``): ``flat`` is this process's part, and the value is that of every process's parts
    together (the same on each): each samples its part in proportion to its size, and only the samples, the
    counts below the bracket and the entries inside it are exchanged — never the parts."""
    key = key or (lambda x: x)
    if shard is not None:
        return _shared_kth_smallest(flat, j, key, shard)
    n = flat.numel()
    if n <= 4 * SAMPLE:
        return key(flat).kthvalue(j).values
    idx = torch.randint(n, (SAMPLE,), generator=torch.Generator().manual_seed(n)).to(flat.device)
    lo, hi = _bracket(key(flat[idx]).sort().values, j / n)
    below, band = _count_bracket(flat, key, lo, hi)
    rank = j - below
    if 1 <= rank <= band.numel():
        return band.kthvalue(rank).values
    return key(flat).kthvalue(j).values


def _bracket(sample: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds around quantile ``q`` of the sorted ``sample``: its rank ± 4 binomial standard deviations (+2)."""
    size = sample.numel()
    centre, margin = q * size, 4 * math.sqrt(q * (1 - q) * size) + 2
    return sample[max(int(centre - margin), 0)], sample[min(int(centre + margin), size - 1)]


def _count_bracket(flat: torch.Tensor, key, lo, hi) -> tuple[int, torch.Tensor]:
    """How many ``key(flat)`` lie below ``lo``, and those in ``[lo, hi]`` (in chunks: the comparison masks of a whole
    14336-wide matrix would cost 2 copies of it)."""
    below, parts = 0, []
    for chunk in flat.split(CHUNK):
        chunk = key(chunk)
        below += int(torch.count_nonzero(chunk < lo))
        parts.append(chunk[(chunk >= lo) & (chunk <= hi)])
    return below, torch.cat(parts) if parts else flat.new_empty(0)


def _shared_kth_smallest(flat: torch.Tensor, j: int, key, shard) -> torch.Tensor:
    """``kth_smallest`` over the parts of every process sharing ``shard`` (blocks of rows of one matrix): three
    exchanges — the samples, the counts below and inside the bracket, the entries inside it. Every branch depends
    on totals only, so each process makes the same collective calls."""
    sizes = shard.sizes(flat.numel())
    n = sum(sizes)
    if n <= 4 * SAMPLE:
        return shard.concat(key(flat), sizes).kthvalue(j).values
    shares = [round(SAMPLE * size / n) for size in sizes]
    seed = torch.Generator().manual_seed(n * shard.size + shard.rank)
    idx = torch.randint(flat.numel(), (shares[shard.rank],), generator=seed).to(flat.device)
    lo, hi = _bracket(shard.concat(key(flat[idx]), shares).sort().values, j / n)
    below, band = _count_bracket(flat, key, lo, hi)
    counts = shard.counts(below, band.numel())
    rank, band = j - sum(c[0] for c in counts), shard.concat(band, [c[1] for c in counts])
    if 1 <= rank <= band.numel():
        return band.kthvalue(rank).values
    return shard.concat(key(flat), sizes).kthvalue(j).values


def take_ties(ties: torch.Tensor, need: int, before: int = 0, after: int = 0, last: bool = False) -> torch.Tensor:
    """Of the positions ``ties`` (ascending), those among the first ``need`` (``last``: the last ``need``) of a
    sequence in which ``before`` ties precede them and ``after`` follow (other processes' rows)."""
    count = ties.numel()
    if last:
        take = min(count, max(0, need - after))
        return ties[count - take :]
    return ties[: min(count, max(0, need - before))]


def shared_selection(scores: torch.Tensor, shard) -> bool:
    """Whether ``scores`` (this process's rows) are selected over by exchanging samples and counts (four small
    exchanges) rather than gathered whole: only above ``SHARED_SELECTION`` entries, where gathering the rows and
    selecting over all of them on every process costs more than the exchanges' fixed latency."""
    return shard is not None and sum(shard.sizes(scores.numel())) > SHARED_SELECTION


def neighbours(counts: list[int], rank: int) -> tuple[int, int]:
    """The sums of ``counts`` over the ranks before and after ``rank``."""
    return sum(counts[:rank]), sum(counts[rank + 1 :])


def lowest_k_mask(scores: torch.Tensor, k: int, shard=None) -> torch.Tensor:
    """Boolean mask with True at exactly the ``k`` lowest entries of ``scores`` (ties broken by index).

    O(n): the k-th smallest value ``t`` by selection, everything below ``t``, then the first entries equal to ``t``.
    ``shard``: ``scores`` are this process's rows and the ``k`` lowest are those of every process's rows (a small
    matrix is gathered whole, see ``shared_selection``)."""
    if shard is not None and not shared_selection(scores, shard):
        return shard.local(lowest_k_mask(shard.gather(scores), k))
    flat = scores.flatten()
    n = flat.numel() if shard is None else sum(shard.sizes(flat.numel()))
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    t = kth_smallest(flat, k, shard=shard)
    mask = flat < t
    ties = torch.nonzero(flat == t).flatten()
    below, before = int(torch.count_nonzero(mask)), 0
    if shard is not None:
        counts = shard.counts(below, ties.numel())
        below, before = sum(c[0] for c in counts), neighbours([c[1] for c in counts], shard.rank)[0]
    mask[take_ties(ties, k - below, before)] = True
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


def whole_shape(weight: torch.Tensor, shard) -> tuple[int, int]:
    """The whole matrix's shape (``weight`` may be one process's rows of it)."""
    return (weight.shape[0] if shard is None else shard.rows, weight.shape[1])


def kept_count(shape: tuple[int, int], sparsity: float, nm) -> int:
    """Weights a ``shape`` matrix keeps at ``sparsity`` (exactly ``numel − round(s·numel)``) or under N:M."""
    rows, cols = shape
    if not nm:
        return rows * cols - int(round(sparsity * rows * cols))
    n, m = nm
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input size ({cols}) to be a multiple of {m}")
    return rows * cols - n * (rows * cols // m)


def already_pruned(weight: torch.Tensor, stats, sparsity: float, nm, info: dict | None, dampening: float, shard=None):
    """``weight`` with its dead inputs zeroed when that already holds the target's zeros (at least
    ``round(s·numel)``, or ``n`` in every group of ``m``), else None. Such a matrix is its own optimum (layer loss
    0); ADMM and CG would return it only up to float32 rounding, and where a kept weight is smaller than that
    rounding (or a dead input freed a place in the support) they fill the support from the noise at existing
    zeros — ±1e-6 weights where the matrix had exact zeros. So it is returned as it is. (``shard``: ``weight`` is
    this process's rows; the zeros of every process's rows are counted.)"""
    held = weight.masked_fill(torch.diag(stats.hessian).to(weight.device) == 0, 0.0)
    zero = held == 0
    if nm:
        n, m = nm
        kept_count(weight.shape, sparsity, nm)  # the N:M shape check
        short = int(torch.count_nonzero(torch.count_nonzero(zero.reshape(weight.shape[0], -1, m), dim=-1) < n))
        enough = total(short, shard) == 0
    else:
        shape = whole_shape(weight, shard)
        enough = total(int(torch.count_nonzero(zero)), shard) >= shape[0] * shape[1] - kept_count(shape, sparsity, nm)
    if not enough:
        return None
    if info is not None:
        info.update(iterations=0, cg_iterations=0, inverses=0, dampening=dampening, existing_zeros=True)
        if info.get("measure_error", False):
            info["error"] = 0.0
    return held
