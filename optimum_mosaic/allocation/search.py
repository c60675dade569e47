"""Choose λ and M for the projection allocation by the loss on held-out calibration windows.

The paper's λ = 0.08, M = 5 were tuned on 7B+ models; small models want other values. Each candidate
plan is scored by a cheap proxy supplied by the caller (e.g. Wanda masks from dense statistics,
then the mean NLL of held-out calibration windows — never the evaluation text); λ = 0 (= uniform) is
always a candidate, so the search cannot pick a plan that scores worse than uniform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers.utils import logging

from ..plan import SparsityPlan

logger = logging.get_logger(__name__)

LAMDA_GRID = (0.03, 0.06, 0.1, 0.15)
THRESHOLD_GRID = (3.0, 5.0, 8.0)


def search_grid(sparsity: float, lamda, threshold, lamdas=LAMDA_GRID, thresholds=THRESHOLD_GRID):
    """Candidate ``(λ, M)`` pairs; a fixed (non-'auto') value pins its axis. λ stays below min(S, 1−S)."""
    lam = [x for x in lamdas if x < min(sparsity, 1 - sparsity)] if lamda == "auto" else [float(lamda)]
    ms = list(thresholds) if threshold == "auto" else [float(threshold)]
    pairs = [(0.0, ms[0])] if lamda == "auto" else []
    return pairs + [(x, m) for x in lam for m in ms if x > 0]


def search_allocation(
    allocate: Callable[..., SparsityPlan],
    profile,
    sparsity: float,
    candidates: Sequence[tuple[float, float]],
    score: Callable[[SparsityPlan], float],
) -> tuple[float, float, list[dict]]:
    """Return the best ``(λ, M)`` by ``score`` (lower is better) and the table of all candidates."""
    table = []
    for lamda, threshold in candidates:
        plan = allocate(profile, sparsity, lamda=lamda, outlier_threshold=threshold)
        loss = score(plan)
        table.append({"lamda": lamda, "outlier_threshold": threshold, "loss": round(loss, 6)})
        logger.info("λ=%.3f M=%.1f → held-out loss %.4f", lamda, threshold, loss)
    best = min(table, key=lambda row: row["loss"])
    return best["lamda"], best["outlier_threshold"], table
