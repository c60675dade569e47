"""Saving a pruned model: one function (``save_pruned``) for every pruned-model save — weights with exact zeros,
the sidecar ``mosaic_config.json`` (with the manifest of the files the save wrote) and the model card — through
``output_dir.checkpoint_directory`` (staged, then installed so that only files of Mosaic saves are replaced).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .output_dir import (  # noqa: F401  (re-exported: the output-directory rules are part of the save API)
    STAGING_MARKER,
    atomic_directory,
    check_output_dir,
    checkpoint_directory,
    clean_stale_staging,
    install_checkpoint,
    is_checkpoint,
    replaced_files,
)


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


def weights_dtype(model) -> str:
    """The floating dtype the model's weights are in, as transformers reports it (``"bfloat16"``, …)."""
    return str(model.dtype).removeprefix("torch.")


def write_record(
    staging: Path,
    target: Path,
    config,
    report,
    shapes: dict,
    zeros: dict,
    compressed: dict | None = None,
    card=None,
    dtype: str = "float32",
) -> None:
    """The sidecar and the model card of a checkpoint staged in ``staging`` for ``target``.

    The sidecar lists the files the save wrote (``files``: the manifest ``install_checkpoint`` replaces, nothing
    else). The card (README.md) is rendered from the staged files and merged into ``card`` (text of an existing
    card; default the README.md already in ``target``), whose text and metadata outside the optimum-mosaic section
    stay. ``compressed``: the ``mosaic_compressed`` spec of a compressed checkpoint (sidecar ``format_version`` 2).
    ``dtype``: the floating dtype the projections were written in (``PrunedModelForCausalLM`` reloads in it).
    """
    from .configuration import COMPRESSED_FORMAT_VERSION, FORMAT_VERSION, SIDECAR_NAME
    from .model_card import CARD_NAME, write_card

    version = FORMAT_VERSION if compressed is None else COMPRESSED_FORMAT_VERSION
    files = {p.name for p in staging.iterdir()} - {STAGING_MARKER} | {SIDECAR_NAME, CARD_NAME}
    files |= replaced_files(target, files)[1]  # files of an earlier save there that stay (e.g. its tokenizer)
    sidecar = {
        "format_version": version,
        "config": {**config.to_dict(), "format_version": version},
        "report": report.to_dict(),
        "source": report.source,
        "shapes": shapes,
        "zeros": zeros,
        "dtype": dtype,
        "versions": versions(),
        "files": sorted(files),
    }
    if compressed is not None:
        sidecar["compressed"] = {"format": "bitmap64", "values_dtype": compressed["values_dtype"]}
    (staging / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2) + "\n")
    if card is None and (target / CARD_NAME).is_file():
        card = (target / CARD_NAME).read_text(encoding="utf-8")
    write_card(staging, target.name, card)


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
    card: str | None = None,
    **save_kwargs,
) -> Path:
    """Every save of a pruned model goes through here: dense safetensors with exact zeros + ``mosaic_config.json``
    + a model card (README.md, merged into the one already there).

    ``config``/``report`` default to the model's record (``mosaic_config``/``mosaic_report``). The report's
    sparsity is measured again from the weights written (``report.measure``), so the sidecar (and the card made
    from it) states what the files hold; a model that lost the zeros its prune left is saved with a warning.
    Only files an earlier Mosaic save wrote are replaced (``install_checkpoint``). ``overwrite``: allow a
    non-empty directory that is not an optimum-mosaic checkpoint (its files stay; same-named ones are replaced).
    ``merge``: the same, as transformers' ``save_pretrained`` into a Trainer ``output_dir``. ``compressed``: the
    projections in the bitmap format instead (``sparse/checkpoint.py``; sidecar ``format_version`` 2), values in
    fp32 or ``values_dtype=torch.bfloat16``. ``card``: text of a card to extend when ``directory`` has none.
    ``save_kwargs`` go to transformers' ``save_pretrained``.
    """
    from .report import measured_report, record_of, warn_if_zeros_lost
    from .sparse.checkpoint import save_model

    config, report = record_of(model, config, report)
    report = measured_report(model, config, report)
    warn_if_zeros_lost(report, "saving")
    shapes, zeros = linear_summary(model)
    target = Path(directory)
    with _no_room_is_one_error(target), checkpoint_directory(target, overwrite, merge) as staging:
        spec = save_model(model, staging, compressed, values_dtype, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        dtype = weights_dtype(model)
        write_record(staging, target.expanduser(), config, report, shapes, zeros, spec, card, dtype)
    model.mosaic_report = report
    return target


@contextlib.contextmanager
def _no_room_is_one_error(target: Path):
    """A write that fails for lack of room (disk full, quota, ``ulimit -f``: ``OSError`` or safetensors'
    ``SafetensorError``) becomes a ``SaveError`` naming the target; the old output is untouched (staged write)."""
    import errno

    from .exceptions import SaveError

    full = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
    try:
        yield
    except Exception as err:
        if type(err).__name__ != "SafetensorError" and not (isinstance(err, OSError) and err.errno in full):
            raise
        reason = " ".join(str(err).split()) or type(err).__name__
        raise SaveError(
            f"could not write the checkpoint to {target} ({reason}): free disk space (or raise the file-size limit, "
            "ulimit -f); nothing there was changed"
        ) from err


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
    return save_pruned(
        model,
        tokenizer,
        Path(save_directory),
        overwrite=overwrite,
        merge=True,
        compressed=compressed,
        values_dtype=values_dtype,
        **kwargs,
    )


def save_offloaded(store, model, tokenizer, staging: Path, target: Path, config, report) -> None:
    """The checkpoint of an offloaded prune (``offload.LayerStore``): the layer shards already in ``staging``, the
    rest of the weights, the index, config, tokenizer, sidecar and card."""
    store.save(staging)
    model.config.architectures = [type(model).__name__]  # as transformers' save_pretrained records it
    if getattr(model, "_auto_class", None) is not None:  # Mosaic*ForCausalLM (heterogeneous shapes): ship its code
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, staging, config=model.config)
    model.config.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    shapes = linear_summary(model, count=False)[0]
    zeros = dict(sorted(store.zeros.items()))
    write_record(staging, Path(target), config, report, shapes, zeros, dtype=str(store.dtype).removeprefix("torch."))
