"""Uniform allocation: every projection of every layer gets the target sparsity S."""

from ..plan import SparsityPlan
from ..registry import register_method


def uniform_allocation(profile, sparsity: float, **_) -> SparsityPlan:
    return SparsityPlan({k: sparsity for k in profile.numel}, profile.numel)


register_method("uniform", "allocation", uniform_allocation)
