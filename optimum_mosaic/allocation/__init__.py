"""Allocation: pure functions from outlier statistics to a ``SparsityPlan``."""

from . import owl, pod, sensitivity, uniform  # noqa: F401  (each module registers its method)
from .outliers import OutlierProfile, wanda_scores

__all__ = ["OutlierProfile", "wanda_scores"]
