"""Unstructured kernels: pure functions ``(weight, stats, sparsity, nm=None, **options) -> weight``."""

from . import alps, apt, magnitude, refit, sparsegpt, wanda  # noqa: F401  (each module registers its method)
