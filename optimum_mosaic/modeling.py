"""``PrunedModelForCausalLM``: reload a Mosaic checkpoint and check it against its sidecar."""

from __future__ import annotations

from pathlib import Path

from .configuration import SIDECAR_NAME, PrunedConfig
from .exceptions import CheckpointMismatchError
from .report import PruningReport
from .sidecar import read_sidecar


class PrunedModelForCausalLM:
    """Loader for checkpoints written by ``Pruner.prune(save_directory=...)``.

    ``from_pretrained`` returns the transformers model itself (``AutoModelForCausalLM``), with the
    sidecar attached as ``model.mosaic_config`` / ``model.mosaic_report`` / ``model.mosaic_sidecar``, after checking that every
    prunable projection has the recorded shape and the recorded sparsity.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("use PrunedModelForCausalLM.from_pretrained(path)")

    @classmethod
    def from_pretrained(cls, path: str | Path, check_sparsity: bool = True, sparse_kernel: bool = False, **kwargs):
        """``path``: a local checkpoint directory or a Hub repo id (downloaded with ``snapshot_download``;
        ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``force_download`` are passed to it).
        Reads the dense layout and the compressed one (sidecar ``format_version`` 2). ``sparse_kernel=True``: the
        projections with at least ``optimum_mosaic.sparse.linear.MIN_SPARSITY`` zeros run on the sparse CPU
        kernel (``SparseLinear``; from a compressed checkpoint without ever holding them dense)."""

        from .configuration import COMPRESSED_FORMAT_VERSION
        from .serialization import linear_summary

        path = _resolve(path, {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs})
        sidecar = read_sidecar(path)
        _check_weight_files(Path(path))
        if "dtype" not in kwargs:
            kwargs["dtype"] = _saved_dtype(path, sidecar)
        quantization_config = kwargs.get("quantization_config")
        compressed = sidecar["format_version"] == COMPRESSED_FORMAT_VERSION
        _check_sparse_options(path, compressed, sparse_kernel, quantization_config, kwargs)
        if quantization_config is not None:
            from .quantization import normalise_quantization_config, prepare_quantization_config

            quantization_config = normalise_quantization_config(quantization_config)
            kwargs["quantization_config"] = prepare_quantization_config(quantization_config)
        model = _load_model(path, kwargs)
        if compressed:
            from .sparse.checkpoint import materialize

            materialize(model, Path(path), sparse_kernel)
        shapes, zeros = linear_summary(model)
        _check_shapes(Path(path), sidecar["shapes"], shapes)
        if quantization_config is not None:  # always bitsandbytes 8-bit or 4-bit (normalised above)
            from .quantization import guard_cpu_4bit_packing, quantization_report

            guard_cpu_4bit_packing(model)
            model.mosaic_quantization = quantization_report(model, path, quantization_config)
            if check_sparsity and model.mosaic_quantization.zeros_before != sum(sidecar["zeros"].values()):
                raise CheckpointMismatchError(
                    f"the weights in {path} hold {model.mosaic_quantization.zeros_before} zero weights but "
                    f"{path / SIDECAR_NAME} records {sum(sidecar['zeros'].values())}: the safetensors file was "
                    "modified or belongs to another prune."
                )
        elif check_sparsity:
            _check_zeros(Path(path), sidecar["zeros"], zeros)
        if sparse_kernel and not compressed:
            from .sparse import to_sparse_kernel

            to_sparse_kernel(model)
        model.mosaic_config = PrunedConfig.from_dict(sidecar["config"])
        model.mosaic_report = _checked_report(model, Path(path), sidecar, check_sparsity)
        model.mosaic_sidecar = sidecar
        from .hub import attach_hub_methods

        attach_hub_methods(model)
        return model


def _checked_report(model, path: Path, sidecar: dict, check: bool) -> PruningReport:
    """The sidecar's report with its sparsity figures counted again from the loaded weights; with ``check``, a
    sidecar whose figures the weights contradict (edited, or from another prune) is refused. A quantized model is
    not recounted (quantization adds zeros): its zero total was checked against the full-precision files."""
    from .report import measured_report, summary_mismatch, warn_if_zeros_lost

    stated = PruningReport.from_dict(sidecar["report"])
    if getattr(model, "hf_quantizer", None) is not None:
        problem = _global_mismatch(stated, sidecar, model.mosaic_config)
        measured = stated
    else:
        measured = measured_report(model, model.mosaic_config, stated)
        problem = summary_mismatch(stated, measured)
    if problem and check:
        raise CheckpointMismatchError(
            f"{path / SIDECAR_NAME} states sparsity figures its weights contradict ({problem}): the sidecar was "
            "edited or belongs to another prune. Re-save the model (model.save_pretrained), or load with "
            "check_sparsity=False to take the figures counted from the weights."
        )
    warn_if_zeros_lost(measured, f"loading {path}")
    return measured


def _global_mismatch(stated: PruningReport, sidecar: dict, config: PrunedConfig) -> str | None:
    """The global sparsity recounted from the sidecar's per-module zeros (checked against the files) when every
    projection was a target: (zeros + removed weights) / dense weights."""
    import math

    from .architectures import PROJECTIONS

    if not stated.dense_shapes or config.ignore or set(config.targets) != set(PROJECTIONS):
        return None
    dense = sum(math.prod(shape) for shape in stated.dense_shapes.values())
    removed = dense - sum(math.prod(shape) for shape in sidecar["shapes"].values())
    counted = (sum(sidecar["zeros"].values()) + removed) / max(1, dense)
    if abs(counted - stated.achieved_sparsity) > 2e-6:
        return f"achieved_sparsity: stated {stated.achieved_sparsity!r}, counted {round(counted, 6)!r}"
    return None


def _check_sparse_options(path: Path, compressed: bool, sparse_kernel: bool, quantization_config, kwargs) -> None:
    if compressed:
        if quantization_config is not None:
            raise ValueError(
                f"{path} is a compressed checkpoint; bitsandbytes quantizes dense weights at load time. Load it "
                "without quantization_config, or re-save it densely (save_pretrained without compressed=True)."
            )
        from . import models  # noqa: F401  (registers the Mosaic* classes that read the format)

        kwargs["mosaic_decompress"] = False  # materialize() checks the tensors, then decodes or keeps them
    if sparse_kernel and quantization_config is not None:
        raise ValueError("sparse_kernel=True runs unquantized weights; drop quantization_config or sparse_kernel")


_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _saved_dtype(path, sidecar: dict):
    """The dtype the checkpoint was written in (sidecar ``dtype``; float32 for checkpoints older than the field)."""
    import torch

    name = sidecar.get("dtype", "float32")
    if name not in _DTYPES:
        raise CheckpointMismatchError(
            f"{Path(path) / SIDECAR_NAME} records dtype {name!r}, none of {list(_DTYPES)}: the sidecar was edited or "
            "is corrupt; pass dtype=... to load anyway, or re-save the checkpoint"
        )
    return getattr(torch, name)


def _load_model(path: Path, kwargs: dict):
    """``AutoModelForCausalLM.from_pretrained`` with unreadable or resized tensors reported as checkpoint errors."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except SafetensorError as err:
        raise CheckpointMismatchError(
            f"the weights in {path} cannot be read ({err}): the file is truncated or corrupted. "
            "Copy the checkpoint again, or re-save it with Pruner.prune(save_directory=...)."
        ) from err
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise CheckpointMismatchError(
            f"tensors in the weights of {path} do not have the sizes its config.json records (see the load report "
            "above): the file was modified or belongs to another prune. Copy the checkpoint again, or re-save it."
        ) from err


_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")


def _resolve(path: str | Path, hub_kwargs: dict) -> Path:
    """A local directory as is; anything else is a Hub repo id, downloaded (or found in the cache)."""
    if Path(path).is_dir():
        return Path(path)
    text = str(path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not text:
        raise FileNotFoundError(f"{path} is not a directory (and not a Hub repo id of the form 'owner/name').")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(text, **hub_kwargs))


def _check_weight_files(path: Path) -> None:
    """Every shard the checkpoint names must be there; a missing one is named with the fix."""
    import json

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        return
    else:
        shards = ["model.safetensors"]
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise CheckpointMismatchError(
            f"{path} lacks the weight file(s) {missing}: the checkpoint is incomplete. Copy it again, or "
            "re-save it with Pruner.prune(save_directory=...)."
        )


def _check_shapes(path: Path, expected: dict, found: dict) -> None:
    diff = {
        name: (expected.get(name), found.get(name))
        for name in set(expected) | set(found)
        if expected.get(name) != found.get(name)
    }
    if diff:
        name, (want, got) = sorted(diff.items())[0]
        raise CheckpointMismatchError(
            f"{path / SIDECAR_NAME} records {name} with shape {want}, but the weights in {path} give {got} "
            f"({len(diff)} mismatching modules). The weights and the sidecar come from different prunes: "
            "re-save the checkpoint with Pruner.prune(save_directory=...)."
        )


def _check_zeros(path: Path, expected: dict, found: dict) -> None:
    for name, count in expected.items():
        if found.get(name) != count:
            raise CheckpointMismatchError(
                f"{name}: {path / SIDECAR_NAME} records {count} zero weights but the weights in {path} have "
                f"{found.get(name)}. The safetensors file was modified or belongs to another prune."
            )
