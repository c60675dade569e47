"""Choose λ and M for the projection allocation by the loss on held-out calibration windows.

The paper's λ = 0.08, M = 5 were tuned on 7B+ models; small models want other values. Each candidate
plan is scored by a function supplied by the caller — the prune itself, then the mean NLL of held-out
calibration windows, never the evaluation text. Cheaper proxies mis-ranked plans on SmolLM2-135M at
70 %: Wanda masks, SparseGPT on dense statistics and sequential SparseGPT on 8 windows all preferred
λ = -0.06, which lost to uniform (176.9 vs 172.3) once pruned with 32 windows. λ = 0 (= uniform) is
always a candidate, so the search cannot pick a plan that *scores* worse than uniform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers.utils import logging

from ..plan import SparsityPlan

logger = logging.get_logger(__name__)

LAMDA_GRID = (0.03,)  # searched with both signs, plus λ = 0: three prunes
THRESHOLD_GRID = (3.0, 5.0, 8.0)  # searched when λ is fixed; with λ 'auto', M stays at the paper's 5
DEFAULT_THRESHOLD = 5.0


def search_thresholds(lamda, threshold) -> tuple[float, ...]:
    """The outlier thresholds M whose ratios the search needs."""
    if threshold != "auto":
        return (float(threshold),)
    return (DEFAULT_THRESHOLD,) if lamda == "auto" else THRESHOLD_GRID


def search_grid(sparsity: float, lamda, threshold):
    """Candidate ``(λ, M)`` pairs; a fixed (non-'auto') value pins its axis. |λ| stays below min(S, 1−S)."""
    ms = search_thresholds(lamda, threshold)
    if lamda != "auto":
        return [(float(lamda), m) for m in ms]
    signed = [sign * x for x in LAMDA_GRID if x < min(sparsity, 1 - sparsity) for sign in (1, -1)]
    return [(0.0, ms[0])] + [(x, m) for x in signed for m in ms]


def search_allocation(
    allocate: Callable[..., SparsityPlan],
    profile,
    sparsity: float,
    candidates: Sequence[tuple[float, float]],
    score: Callable[[SparsityPlan, str], float],
) -> tuple[float, float, list[dict]]:
    """Return the best ``(λ, M)`` by ``score(plan, label)`` (lower is better; ``label`` names the candidate, for
    progress bars) and the table of all candidates."""
    table = []
    for i, (lamda, threshold) in enumerate(candidates, 1):
        plan = allocate(profile, sparsity, lamda=lamda, outlier_threshold=threshold)
        loss = score(plan, f"λ={lamda:+g} M={threshold:g}, candidate {i}/{len(candidates)}")
        table.append({"lamda": lamda, "outlier_threshold": threshold, "loss": round(loss, 6)})
        logger.info("λ=%.3f M=%.1f → held-out loss %.4f", lamda, threshold, loss)
    best = min(table, key=lambda row: row["loss"])
    return best["lamda"], best["outlier_threshold"], table
