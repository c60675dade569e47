"""Unstructured kernels: pure functions ``(weight, stats, sparsity, nm=None, **options) -> weight``."""

from . import alps, apt, magnitude, sparsegpt, wanda  # noqa: F401  (each module registers its method)
