"""Register the Mosaic classes with transformers' Auto classes when transformers' ``modeling_auto`` is imported.

``optimum_mosaic.models`` imports torch and eight transformers model families, which ``import optimum_mosaic``
must not pay for. A one-shot import hook runs ``import optimum_mosaic.models`` (whose import registers the
classes) right after ``transformers.models.auto.modeling_auto`` has finished loading, i.e. as soon as anyone
can call ``AutoModelForCausalLM``; if that module is already loaded, the registration happens at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

TARGET = "transformers.models.auto.modeling_auto"


def _register() -> None:
    try:
        import optimum_mosaic.models  # noqa: F401  (its import registers the classes)
    except Exception as err:  # never break the user's import of transformers
        warnings.warn(f"optimum-mosaic could not register its model classes with transformers: {err}", stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for ``TARGET`` it wraps the real loader so that ``_register`` runs after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot, and no recursion into ourselves below
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
