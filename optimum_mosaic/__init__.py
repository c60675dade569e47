"""optimum-mosaic: composite projection pruning (Mosaic) for Hugging Face causal language models.

Importing the package is cheap (no torch, no transformers models): every public name is loaded on first use.
The Mosaic config/model classes (``optimum_mosaic.models``) are registered with transformers' Auto classes as
soon as transformers' ``modeling_auto`` is imported (``_autoregister.py``), so that
``AutoModelForCausalLM.from_pretrained`` reads heterogeneous checkpoints after ``import optimum_mosaic``.
"""

__version__ = "0.1.0"

from .notices import silence_bnb_cpu_notices  # noqa: E402

silence_bnb_cpu_notices()  # before transformers.trainer_utils imports bitsandbytes

from . import _autoregister  # noqa: E402

_autoregister.install()

_EXPORTS = {
    "Pruner": ".pruner",
    "PrunedConfig": ".configuration",
    "PrunedModelForCausalLM": ".modeling",
    "SparsityPlan": ".plan",
    "SparsityPreservingCallback": ".callbacks",
    "GradualPruningCallback": ".callbacks",
    "SparseKVCache": ".sparse.kv_cache",
    "perplexity": ".evaluation",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
