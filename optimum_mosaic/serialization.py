"""Atomic writes: everything lands in a temporary sibling directory that is renamed at the end."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = True):
    """Yield a staging directory next to ``target``; on success it replaces ``target`` in one rename.

    On any exception the staging directory is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True or choose another directory.")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(0o755)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        target.rename(backup)
    staging.rename(target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"optimum_mosaic": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def linear_summary(model, count: bool = True) -> tuple[dict[str, list[int]], dict[str, int]]:
    """``({module name: [out, in]}, {module name: exact zeros})`` for every projection of the decoder layers."""
    import torch

    from .architectures import named_projections

    shapes, zeros = {}, {}
    for name, lin in named_projections(model).items():
        shapes[name] = [lin.out_features, lin.in_features]  # not weight.shape: bnb 4-bit packs the weight
        if count and hasattr(lin, "weight_values"):  # bitmap format (sparse kernel, compressed checkpoint)
            zeros[name] = lin.out_features * lin.in_features - int(torch.count_nonzero(lin.weight_values))
        elif count:
            zeros[name] = int((lin.weight == 0).sum().item())
    return shapes, zeros


def _write_sidecar(directory: Path, config, report, shapes: dict, zeros: dict, compressed: dict | None = None) -> None:
    """``compressed``: the ``mosaic_compressed`` spec of a compressed checkpoint (sidecar ``format_version`` 2)."""
    import json

    from .configuration import COMPRESSED_FORMAT_VERSION, FORMAT_VERSION, SIDECAR_NAME

    version = FORMAT_VERSION if compressed is None else COMPRESSED_FORMAT_VERSION
    sidecar = {
        "format_version": version,
        "config": {**config.to_dict(), "format_version": version},
        "report": report.to_dict(),
        "shapes": shapes,
        "zeros": zeros,
        "versions": versions(),
    }
    if compressed is not None:
        sidecar["compressed"] = {"format": "bitmap64", "values_dtype": compressed["values_dtype"]}
    (directory / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2) + "\n")


def save_pruned(model, tokenizer, directory, config, report, compressed: bool = False, values_dtype=None) -> Path:
    """Dense safetensors with exact zeros + ``mosaic_config.json``, written atomically. ``compressed``: the
    projections in the bitmap format instead (``sparse/checkpoint.py``; sidecar ``format_version`` 2), values
    in fp32 or ``values_dtype=torch.bfloat16``."""
    from .sparse.checkpoint import save_model

    shapes, zeros = linear_summary(model)
    with atomic_directory(directory) as staging:
        spec = save_model(model, staging, compressed, values_dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _write_sidecar(staging, config, report, shapes, zeros, spec)
    return Path(directory)


def bind_save_pretrained(model):
    """``model.save_pretrained(directory, compressed=True, values_dtype=None)``: a compressed pruned checkpoint
    through ``save_pruned`` (sidecar included). Without ``compressed`` it is transformers' own method, unchanged
    (projections on the sparse kernel are written back as dense weights). Returns the model."""
    if getattr(model.save_pretrained, "mosaic_bound", False):
        return model
    original = model.save_pretrained

    def save_pretrained(save_directory, *args, compressed: bool = False, values_dtype=None, **kwargs):
        from .sparse.checkpoint import has_sparse_modules, state_dict_for_save

        if not compressed:
            if has_sparse_modules(model) and kwargs.get("state_dict") is None:
                kwargs["state_dict"] = state_dict_for_save(model, compressed=False)[0]
            return original(save_directory, *args, **kwargs)
        if args or kwargs:
            raise TypeError(f"save_pretrained(compressed=True) takes no other options, got {list(kwargs) or args}")
        from types import SimpleNamespace

        from .model_card import model_record

        config, report = model_record(model)
        record = SimpleNamespace(to_dict=lambda: report)
        return save_pruned(model, None, save_directory, config, record, compressed=True, values_dtype=values_dtype)

    save_pretrained.mosaic_bound = True
    model.save_pretrained = save_pretrained
    return model


def save_offloaded(store, model, tokenizer, staging: Path, config, report) -> None:
    """The checkpoint of an offloaded prune (``offload.LayerStore``): the layer shards already in ``staging``, the
    rest of the weights, the index, config, tokenizer and sidecar."""
    store.save(staging)
    model.config.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    _write_sidecar(staging, config, report, linear_summary(model, count=False)[0], dict(sorted(store.zeros.items())))
