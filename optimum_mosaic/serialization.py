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
    from .architectures import named_projections

    shapes, zeros = {}, {}
    for name, lin in named_projections(model).items():
        shapes[name] = [lin.out_features, lin.in_features]  # not weight.shape: bnb 4-bit packs the weight
        if count:
            zeros[name] = int((lin.weight == 0).sum().item())
    return shapes, zeros


def _write_sidecar(directory: Path, config, report, shapes: dict, zeros: dict) -> None:
    import json

    from .configuration import FORMAT_VERSION, SIDECAR_NAME

    sidecar = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "report": report.to_dict(),
        "shapes": shapes,
        "zeros": zeros,
        "versions": versions(),
    }
    (directory / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2) + "\n")


def save_pruned(model, tokenizer, directory, config, report) -> Path:
    """Dense safetensors with exact zeros + ``mosaic_config.json``, written atomically."""
    shapes, zeros = linear_summary(model)
    with atomic_directory(directory) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _write_sidecar(staging, config, report, shapes, zeros)
    return Path(directory)


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
