"""The checkpoint sidecar (``mosaic_config.json``) read back: its format version checked, its parts present, its
config a valid ``PrunedConfig`` — every problem a ``CheckpointMismatchError`` that names the file and what to do."""

from __future__ import annotations

import json
from pathlib import Path

from .configuration import FORMAT_VERSIONS, SIDECAR_NAME, PrunedConfig, _is_int
from .exceptions import CheckpointMismatchError

_MISSING = object()


def format_version_problem(version) -> str | None:
    """Why ``version`` is no sidecar format this optimum-mosaic reads, with what to do; None when it is one."""
    if _is_int(version) and version in FORMAT_VERSIONS:
        return None
    if _is_int(version) and version > max(FORMAT_VERSIONS):
        return f"format_version {version} is from a newer optimum-mosaic. Upgrade optimum-mosaic (pip install -U)."
    given = "is missing" if version is _MISSING else f"{version!r} ({type(version).__name__}) is no format number"
    return (
        f"format_version {given} (optimum-mosaic writes the integer 1, dense, or 2, compressed): the file was "
        "edited or damaged, or not written by optimum-mosaic; restore the number or re-save the checkpoint"
    )


def read_sidecar(directory: str | Path) -> dict:
    """The checkpoint's ``mosaic_config.json``; a missing, malformed or too new file is a
    ``CheckpointMismatchError`` that names it."""
    path = Path(directory) / SIDECAR_NAME
    if not path.is_file():
        raise CheckpointMismatchError(
            f"{path} is missing: this is not an optimum-mosaic checkpoint (prune it with Pruner.prune first)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointMismatchError(
            f"{path} is not valid JSON ({err}): the file is damaged; re-save the checkpoint"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointMismatchError(
            f"{path} holds a {type(data).__name__}, not the sidecar object; re-save the checkpoint"
        )
    problem = format_version_problem(data.get("format_version", _MISSING))
    if problem:
        raise CheckpointMismatchError(f"{path}: {problem}")
    missing = [k for k in ("config", "report", "shapes", "zeros") if not isinstance(data.get(k), dict)]
    if missing:
        raise CheckpointMismatchError(f"{path} lacks {missing} (or they are not objects): re-save the checkpoint")
    try:
        PrunedConfig.from_dict(data["config"])
    except (ValueError, TypeError) as err:
        raise CheckpointMismatchError(f"{path}: its 'config' is not a valid PrunedConfig ({err})") from None
    return data
