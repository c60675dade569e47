"""Where a save may go and how it is written: output-directory rules, staging folders, and installing a checkpoint
into a folder that holds other files.

Everything is written to a staging directory next to the target (``.<name>.tmp-*``, with a marker file saying it
is ours). A new target is that folder renamed. Into an existing folder the files are moved one by one, and a save
replaces only the files that Mosaic saves wrote there — the manifest kept in the sidecar (``files``); everything
else in the folder (notes, results, a Trainer's ``checkpoint-*``, a hand-edited card's text outside our section)
survives, always. A non-empty folder that is not an optimum-mosaic checkpoint needs ``overwrite=True`` (or
``merge``, transformers' ``save_pretrained`` semantics); the current directory (or one holding it) is refused
always. The next save to the same target removes staging folders of killed saves and rolls back a killed install.
"""

from __future__ import annotations

import contextlib
import fnmatch
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
    optimum-mosaic checkpoint — a save there would replace files of the checkpoint's names that are not ours.
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
            f"save directory {path} is not empty and is not an optimum-mosaic checkpoint. Choose a new directory, "
            "or pass overwrite=True (--overwrite) to write the checkpoint beside its files (its files stay; only "
            "files of the same names as the checkpoint's are replaced)."
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
def _mark(folder: Path, role: str, **extra) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "role": role, **extra}
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
        if kind == "old":
            _roll_back(folder, target)  # a killed file-by-file install (install_checkpoint)
            removed.append(folder)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _new_staging(target: Path) -> Path:
    """A marked staging folder next to ``target``, after the leftovers of killed saves to it are cleaned up."""
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(0o755)
    _mark(staging, "staging")
    return staging


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False):
    """Yield a staging directory next to ``target``; on success it replaces ``target`` in one rename.

    ``target`` is checked first (``check_output_dir``). On any exception the staging directory is removed and
    ``target`` is left as it was.
    """
    target = check_output_dir(target, overwrite)
    staging = _new_staging(target)
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


# -- checkpoints: replace only what a save wrote -----------------------------------------------------------
_WEIGHT_PATTERNS = ("model*.safetensors", "model*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json")


def _manifest(target: Path) -> list[str] | None:
    from .configuration import SIDECAR_NAME

    with contextlib.suppress(OSError, ValueError, AttributeError):
        files = json.loads((target / SIDECAR_NAME).read_text()).get("files")
        return [str(f) for f in files] if isinstance(files, list) else None
    return None


def replaced_files(target: Path, new: set[str]) -> tuple[set[str], set[str]]:
    """``(replaced, kept)``: entries of ``target`` that a save writing ``new`` replaces or removes — those of the same
    names, and the weight files (shards, index) of the checkpoint there, which the new weights supersede — and the
    other files of that checkpoint's manifest (sidecar ``files``; e.g. the tokenizer of an earlier save), which
    stay and stay listed. Nothing else in the folder is touched. A checkpoint written before manifests existed has
    its weight files recognised by name."""
    from .configuration import SIDECAR_NAME

    if not target.is_dir():
        return set(), set()
    present = {p.name for p in target.iterdir()}
    manifest = _manifest(target)
    ours = set(manifest) if manifest is not None else (present if is_checkpoint(target) else set())
    weights = {n for n in ours if any(fnmatch.fnmatch(n, p) for p in _WEIGHT_PATTERNS)} | {SIDECAR_NAME}
    replaced = present & (new | (weights if is_checkpoint(target) else set()))
    kept = (present & set(manifest or ())) - replaced
    return replaced, kept


def install_checkpoint(staging: Path, target: Path) -> None:
    """Move the files of ``staging`` into ``target``. A new ``target`` is one rename. Into an existing one, the files
    ``replaced_files`` names are first moved to a marked backup folder (the old sidecar first, so that no sidecar
    ever vouches for weights it did not describe), then the new files come in, the sidecar last, then the backup
    goes; every other file stays. A killed install is rolled back by the next save (``clean_stale_staging``)."""
    from .configuration import SIDECAR_NAME

    if not target.exists():
        staging.rename(target)
        (target / STAGING_MARKER).unlink(missing_ok=True)
        return
    new = sorted(p.name for p in staging.iterdir() if p.name != STAGING_MARKER)
    replaced, _ = replaced_files(target, set(new))
    backup = target.with_name(f".{target.name}.old-{staging.name.rsplit('-', 1)[-1]}")
    backup.mkdir()
    _mark(backup, "backup", new=new, replaced=sorted(replaced))
    for name in sorted(replaced, key=lambda n: n != SIDECAR_NAME):
        os.replace(target / name, backup / name)
    for name in sorted(new, key=lambda n: n == SIDECAR_NAME):
        os.replace(staging / name, target / name)
    shutil.rmtree(backup, ignore_errors=True)


def _roll_back(backup: Path, target: Path) -> None:
    """Undo a killed ``install_checkpoint``: unless the new sidecar arrived (then the new checkpoint is whole), the
    new files that did arrive are removed and the backed-up ones moved back."""
    from .configuration import SIDECAR_NAME

    info = json.loads((backup / STAGING_MARKER).read_text())
    replaced = set(info.get("replaced", []))
    if not (target / SIDECAR_NAME).is_file():
        for name in info.get("new", []):
            path = target / name
            arrived = name not in replaced or (backup / name).exists()  # else it is the old file, not yet moved
            if not arrived or not (path.exists() or path.is_symlink()):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for entry in backup.iterdir():
            if entry.name != STAGING_MARKER:
                os.replace(entry, target / entry.name)
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def checkpoint_directory(target: str | Path, overwrite: bool = False, merge: bool = False):
    """Yield a staging directory; on success its files are installed into ``target`` (``install_checkpoint``):
    files of ``target`` that earlier Mosaic saves did not write always stay. ``target`` is checked first
    (``check_output_dir``; ``merge`` allows a non-empty non-checkpoint folder as transformers' ``save_pretrained``
    does). On any exception the staging directory is removed and ``target`` is left as it was."""
    target = check_output_dir(target, overwrite, merge)
    staging = _new_staging(target)
    try:
        yield staging
        install_checkpoint(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
