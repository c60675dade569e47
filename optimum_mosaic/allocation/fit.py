"""Bring a raw per-projection allocation to the exact global target without leaving its band."""

from __future__ import annotations

from collections.abc import Mapping

from ..plan import Key, SparsityPlan


def normalise(values: Mapping, lamda: float) -> dict:
    """Min-max scale to ``[0, 2λ]``: ``c = 2λ (D - min D) / (max D - min D)`` (all zeros if D is constant)."""
    lo, hi = min(values.values()), max(values.values())
    if hi - lo <= 0:
        return {k: 0.0 for k in values}
    return {k: 2 * lamda * (v - lo) / (hi - lo) for k, v in values.items()}


def fit_to_target(
    raw: Mapping[Key, float], numel: Mapping[Key, int], target: float, lo: float, hi: float, tol: float = 1e-9
) -> SparsityPlan:
    """Clamp ``raw + t`` into ``[lo, hi]`` with the shift ``t`` chosen so that Σ s·n / Σ n = target.

    The weighted mean of ``clamp(raw + t)`` is continuous and non-decreasing in ``t``, so bisection
    finds ``t``; when ``raw`` already meets the target inside the band, ``t = 0`` and nothing moves.
    """
    lo, hi = max(lo, 0.0), min(hi, 1.0 - 1e-6)
    if not lo <= target <= hi:
        raise ValueError(f"target sparsity {target} lies outside the band [{lo}, {hi}]")
    total = sum(numel[k] for k in raw)

    def mean_at(t: float) -> float:
        return sum(min(max(v + t, lo), hi) * numel[k] for k, v in raw.items()) / total

    t_lo, t_hi = lo - max(raw.values()), hi - min(raw.values())
    if abs(mean_at(0.0) - target) <= tol:
        t_lo = t_hi = 0.0
    for _ in range(200):
        if t_hi - t_lo <= 1e-12:
            break
        mid = (t_lo + t_hi) / 2
        t_lo, t_hi = (mid, t_hi) if mean_at(mid) < target else (t_lo, mid)
    t = (t_lo + t_hi) / 2
    return SparsityPlan({k: min(max(v + t, lo), hi) for k, v in raw.items()}, {k: numel[k] for k in raw})
