"""Register the Mosaic classes with transformers' Auto classes as soon as those can be used, without importing
torch at ``import optimum_mosaic``.

``optimum_mosaic.models`` imports torch and eight transformers model families, which ``import optimum_mosaic``
must not pay for. A one-shot import hook watches transformers' ``configuration_auto`` and ``modeling_auto``:
once either has loaded, ``import optimum_mosaic.models`` (whose import registers the classes) runs — deferred
until no transformers module is half-initialised (transformers' ``@auto_docstring`` imports ``modeling_auto``
from inside the definition of ``LlamaConfig``; registering there would import a class that does not exist yet).
If transformers' Auto classes are already loaded, the registration happens at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

TARGETS = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")
_state = {"done": False, "busy": False, "pending": False}


def _initialising(name: str) -> bool:
    module = sys.modules.get(name)
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _ready(loading: str | None = None) -> bool:
    """No transformers module (other than ``loading``, whose code has run) is in the middle of its import."""
    return not any(n.startswith("transformers") and n != loading and _initialising(n) for n in list(sys.modules))


def _register(loading: str | None = None) -> None:
    if _state["done"] or _state["busy"]:
        return
    if not _ready(loading):
        _state["pending"] = True  # retried by the next import
        return
    _state["busy"] = True
    try:
        import optimum_mosaic.models  # noqa: F401  (its import registers the classes)
    except Exception as err:  # never break the user's import of transformers
        warnings.warn(f"optimum-mosaic could not register its model classes with transformers: {err}", stacklevel=2)
    finally:
        _state.update(done=True, busy=False, pending=False)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Hook)]


class _Hook(importlib.abc.MetaPathFinder):
    """Finds nothing itself. It wraps the real loader of every transformers module so that the registration is
    tried right after a ``TARGETS`` module's code has run, and — when that had to wait — again at the end of each
    later one, so the outermost import (e.g. ``tokenization_auto``, which imports ``configuration_auto``) completes it
    before ``AutoTokenizer``/``AutoConfig`` read a Mosaic checkpoint's config."""

    def __init__(self):
        self.finding = False

    def find_spec(self, fullname, path, target=None):
        if self.finding:
            return None
        if _state["pending"]:
            _register()
        if _state["done"] or fullname.partition(".")[0] != "transformers":
            return None
        self.finding = True  # importlib.util.find_spec asks every finder again, this one included
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.finding = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if fullname in TARGETS or _state["pending"]:  # the outermost transformers import retries at its end
                _register(fullname)

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if any(t in sys.modules for t in TARGETS):
        _register()
    if not _state["done"] and not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
