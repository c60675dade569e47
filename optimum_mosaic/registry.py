"""The single list of methods. Each method module ends with one ``register_method`` call.

Only names are stored in configs and sidecars; loading resolves them here, never by import path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("unstructured", "allocation")
# The names the package's own modules register, so that option checks and ``--help`` need not import torch and
# every kernel; tests/test_startup.py checks that this list and the registry agree.
BUILTIN_METHODS = {
    "allocation": ("layer", "projection", "projection_official", "sensitivity", "sensitivity_hutchinson", "uniform"),
    "unstructured": ("alps", "alps_warm", "apt", "magnitude", "sparsegpt", "sparsegpt_refit", "wanda"),
}


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    fn: Callable
    needs: tuple[str, ...] = ()  # calibration statistics the method reads: "sumsq" and/or "hessian"
    rows: bool = False  # takes ``shard=RowShard``: solves a block of rows with the whole matrix's selections


_REGISTRY: dict[tuple[str, str], Method] = {}


def register_method(name: str, kind: str, fn: Callable, needs: tuple[str, ...] = (), rows: bool = False) -> Callable:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if (kind, name) in _REGISTRY:
        raise ValueError(f"a {kind} method named {name!r} is already registered")
    _REGISTRY[(kind, name)] = Method(name, kind, fn, tuple(needs), rows)
    return fn


def get_method(kind: str, name: str) -> Method:
    _ensure_loaded()
    try:
        return _REGISTRY[(kind, name)]
    except KeyError:
        raise ValueError(f"unknown {kind} method {name!r}; registered: {', '.join(list_methods(kind))}") from None


def is_method(kind: str, name) -> bool:
    """Whether ``name`` is a registered ``kind`` method (built-in names are known without loading the methods)."""
    if name in BUILTIN_METHODS.get(kind, ()):
        return True
    _ensure_loaded()
    return (kind, name) in _REGISTRY


def list_methods(kind: str) -> list[str]:
    _ensure_loaded()
    return sorted(name for k, name in _REGISTRY if k == kind)


def _ensure_loaded() -> None:
    # importing the stage packages runs their register_method calls
    from . import allocation, pruning  # noqa: F401
