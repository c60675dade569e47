"""Kernel variants compared by ``layer_error.py``: name → ``fn(weight, stats, sparsity, nm=None) -> weight``."""

from __future__ import annotations

from functools import partial

from optimum_mosaic.registry import get_method


def kernel(name: str, **options):
    return partial(get_method("unstructured", name).fn, **options)


VARIANTS = {
    "wanda": kernel("wanda"),
    "sparsegpt": kernel("sparsegpt"),
    "alps": kernel("alps"),
}
