"""Choose λ and M for the projection allocation by the loss on held-out calibration windows.

The paper's λ = 0.08, M = 5 were tuned on 7B+ models; small models want other values (and on
SmolLM2-135M even the opposite direction scored better with Wanda). Each candidate plan is scored by
a function supplied by the caller (the pruner's kernel on dense statistics, then the mean NLL of
held-out calibration windows — never the evaluation text); λ = 0 (= uniform) is always a candidate,
so the search cannot pick a plan that *scores* worse than uniform. Kernels with a Hessian cost about
a second per layer per candidate, so they get a smaller grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers.utils import logging

from ..plan import SparsityPlan

logger = logging.get_logger(__name__)

LAMDA_GRID = {"cheap": (0.03, 0.06, 0.1), "hessian": (0.03, 0.06)}  # each searched with both signs
THRESHOLD_GRID = {"cheap": (3.0, 5.0, 8.0), "hessian": (5.0,)}


def _cost(kernel_needs) -> str:
    return "hessian" if "hessian" in kernel_needs else "cheap"


def search_thresholds(kernel_needs=()) -> tuple[float, ...]:
    return THRESHOLD_GRID[_cost(kernel_needs)]


def search_grid(sparsity: float, lamda, threshold, kernel_needs=()):
    """Candidate ``(λ, M)`` pairs; a fixed (non-'auto') value pins its axis. |λ| stays below min(S, 1−S)."""
    lamdas, thresholds = LAMDA_GRID[_cost(kernel_needs)], THRESHOLD_GRID[_cost(kernel_needs)]
    if lamda == "auto":
        lam = [sign * x for x in lamdas if x < min(sparsity, 1 - sparsity) for sign in (1, -1)]
    else:
        lam = [float(lamda)]
    ms = list(thresholds) if threshold == "auto" else [float(threshold)]
    pairs = [(0.0, ms[0])] if lamda == "auto" else []
    return pairs + [(x, m) for x in lam for m in ms if x != 0]


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
