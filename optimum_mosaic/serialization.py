"""Saving a pruned model: one function (``save_pruned``) for every pruned-model save, atomic writes, and the
output-directory rules.

Atomic: everything lands in a staging directory next to the target (``.<name>.tmp-*``, with a marker file
saying it is ours) that is renamed at the end. A save never deletes what optimum-mosaic did not write: a
non-empty directory that is not an optimum-mosaic checkpoint is refused unless ``overwrite=True``; the
current directory (or one holding it) is refused always. Staging folders left by a killed save are removed
by the next save to the same target (an interrupted replacement is rolled back instead).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .exceptions import OutputDirectoryError

STAGING_MARKER = ".optimum-mosaic-staging"  # written into every staging (and backup) folder this module makes


# -- where a save may go ----------------------------------------------------------------------------------
def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by optimum-mosaic (it holds ``mosaic_config.json``)."""
    from .configuration import SIDECAR_NAME

    return (Path(path) / SIDECAR_NAME).is_file()


def check_output_dir(target: str | os.PathLike, overwrite: bool = False, merge: bool = False) -> Path:
    """Raise ``OutputDirectoryError`` unless a save can go to ``target``; called before any work is done.

    Refused: an empty name, the current directory or one of its parents, an existing file, a location that
    cannot be written, and (unless ``overwrite`` or ``merge``) a non-empty directory that is not an
    optimum-mosaic checkpoint — replacing it would delete files optimum-mosaic did not write.
    """
    if not isinstance(target, (str, os.PathLike)) or not str(target).strip():
        raise OutputDirectoryError(f"save directory: expected a directory path, got {target!r}")
    path = Path(target).expanduser()
    resolved = path.resolve()
    if path.name in ("", ".", "..") or resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise OutputDirectoryError(
            f"save directory {str(target)!r} is the current directory (or holds it): saving replaces the whole "
            "directory; name a new sub-directory instead, e.g. --output ./pruned-model"
        )
    if path.exists() and not path.is_dir():
        raise OutputDirectoryError(f"save directory {path} is an existing file; choose a directory path")
    _check_writable(path, next(p for p in (resolved.parent, *resolved.parents) if p.exists()))
    if path.is_dir() and not merge and not overwrite and any(path.iterdir()) and not is_checkpoint(path):
        raise OutputDirectoryError(
            f"save directory {path} is not empty and is not an optimum-mosaic checkpoint: saving there would "
            "delete its files. Choose a new directory, or pass overwrite=True (--overwrite) to replace it."
        )
    return path


def _check_writable(path: Path, existing: Path) -> None:
    """Probe the nearest existing ancestor by creating (and removing) a folder in it: permission bits do not tell
    for root, read-only mounts or /proc."""
    if not existing.is_dir():
        raise OutputDirectoryError(f"save directory {path}: {existing} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".optimum-mosaic-probe-", dir=existing))
    except OSError as err:
        raise OutputDirectoryError(
            f"save directory {path} cannot be written ({err.strerror} in {existing}); choose another location"
        ) from None


# -- atomic writes --------------------------------------------------------------------------------------
def _mark(folder: Path, role: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "role": role}
    (folder / STAGING_MARKER).write_text(json.dumps(info) + "\n")


def _abandoned(folder: Path) -> bool:
    """A folder with our marker whose writer (a process on this host) is no longer running."""
    try:
        info = json.loads((folder / STAGING_MARKER).read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no readable marker: not ours, never touched
    if info.get("host") != socket.gethostname():
        return False  # written from another machine (shared file system): we cannot tell whether it still runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False  # alive: a save in progress


def clean_stale_staging(target: Path) -> list[Path]:
    """Remove the staging folders of earlier saves to ``target`` that were killed; an interrupted replacement
    (old checkpoint moved aside, new one not yet in place) is rolled back. Returns the folders removed."""
    removed = []
    for folder in sorted(target.parent.glob(f".{target.name}.*-*")):
        kind = folder.name[len(target.name) + 2 :].split("-", 1)[0]
        if kind not in ("tmp", "old") or not folder.is_dir() or not _abandoned(folder):
            continue
        if kind == "old" and not target.exists():
            (folder / STAGING_MARKER).unlink()
            folder.rename(target)  # the new checkpoint never arrived: the old one goes back in place
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False):
    """Yield a staging directory next to ``target``; on success it replaces ``target`` in one rename.

    ``target`` is checked first (``check_output_dir``). On any exception the staging directory is removed and
    ``target`` is left as it was.
    """
    target = check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(0o755)
    _mark(staging, "staging")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        target.rename(backup)
        _mark(backup, "backup")
    staging.rename(target)
    (target / STAGING_MARKER).unlink()
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def staged_into(target: Path):
    """Like ``atomic_directory`` for a directory that holds other files (transformers' ``save_pretrained``
    semantics, e.g. a Trainer ``output_dir``): files are written to staging, then moved in one by one; the old
    sidecar goes first and the new one comes last, so a crash never leaves a sidecar that vouches for
    weights it did not describe. Files of the target that the save does not write stay."""
    from .configuration import SIDECAR_NAME

    target = check_output_dir(target, merge=True)
    target.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    _mark(staging, "staging")
    try:
        yield staging
        (target / SIDECAR_NAME).unlink(missing_ok=True)
        files = sorted(p for p in staging.iterdir() if p.name != STAGING_MARKER)
        for file in sorted(files, key=lambda p: p.name == SIDECAR_NAME):
            os.replace(file, target / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- what a checkpoint holds ----------------------------------------------------------------------------
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
    from .configuration import COMPRESSED_FORMAT_VERSION, FORMAT_VERSION, SIDECAR_NAME

    version = FORMAT_VERSION if compressed is None else COMPRESSED_FORMAT_VERSION
    sidecar = {
        "format_version": version,
        "config": {**config.to_dict(), "format_version": version},
        "report": report.to_dict(),
        "source": report.source,
        "shapes": shapes,
        "zeros": zeros,
        "versions": versions(),
    }
    if compressed is not None:
        sidecar["compressed"] = {"format": "bitmap64", "values_dtype": compressed["values_dtype"]}
    (directory / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2) + "\n")


def save_pruned(
    model,
    tokenizer,
    directory,
    config=None,
    report=None,
    *,
    overwrite: bool = False,
    merge: bool = False,
    compressed: bool = False,
    values_dtype=None,
    **save_kwargs,
) -> Path:
    """Every save of a pruned model goes through here: dense safetensors with exact zeros + ``mosaic_config.json``.

    ``config``/``report`` default to the model's record (``mosaic_config``/``mosaic_report``). The report's
    sparsity is measured again from the weights written (``report.measure``), so the sidecar (and a card made
    from it) states what the files hold. ``overwrite``: replace a non-empty directory that is not an
    optimum-mosaic checkpoint. ``merge``: write into an existing directory and keep its other files
    (``model.save_pretrained`` semantics). ``compressed``: the projections in the bitmap format instead
    (``sparse/checkpoint.py``; sidecar ``format_version`` 2), values in fp32 or ``values_dtype=torch.bfloat16``.
    ``save_kwargs`` go to transformers' ``save_pretrained``.
    """
    from .report import measured_report, record_of
    from .sparse.checkpoint import save_model

    config, report = record_of(model, config, report)
    report = measured_report(model, config, report)
    shapes, zeros = linear_summary(model)
    writer = staged_into(Path(directory)) if merge else atomic_directory(directory, overwrite)
    with writer as staging:
        spec = save_model(model, staging, compressed, values_dtype, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _write_sidecar(staging, config, report, shapes, zeros, spec)
    model.mosaic_report = report
    return Path(directory)


def save_pretrained(
    model,
    save_directory,
    *,
    tokenizer=None,
    overwrite: bool = False,
    compressed: bool = False,
    values_dtype=None,
    **kwargs,
) -> Path:
    """``model.save_pretrained(dir)`` of a pruned model (bound by ``hub.attach_hub_methods``): transformers' save plus
    the sidecar, through ``save_pruned`` (``compressed``/``values_dtype`` as there; a model on the sparse kernel is
    written dense unless ``compressed``). Into a directory that holds other files (a Trainer ``output_dir``) the
    checkpoint is written beside them, as transformers does; ``overwrite=True`` replaces such a directory
    instead. Options transformers' ``save_pretrained`` does not know are a ``TypeError`` (it would ignore them).
    """
    import inspect

    known = set(inspect.signature(type(model).save_pretrained).parameters) - {"self", "save_directory", "kwargs"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(
            f"save_pretrained() got unknown option(s) {unknown}; it accepts "
            f"{sorted(known - {'push_to_hub'} | {'tokenizer', 'overwrite', 'compressed', 'values_dtype'})}"
        )
    if kwargs.pop("push_to_hub", False):
        raise TypeError(
            "save_pretrained(push_to_hub=True): call model.push_to_hub(repo_id), which also writes the card"
        )
    if not kwargs.get("is_main_process", True):  # another process writes the checkpoint
        return Path(save_directory)
    target = Path(save_directory)
    merge = not overwrite and target.is_dir() and any(target.iterdir()) and not is_checkpoint(target)
    return save_pruned(
        model,
        tokenizer,
        target,
        overwrite=overwrite,
        merge=merge,
        compressed=compressed,
        values_dtype=values_dtype,
        **kwargs,
    )


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
