"""Compressed checkpoints: the decoder projections in the bitmap format, inside safetensors (no pickle).

Each projection ``<module>`` (``model.layers.3.mlp.up_proj``) is written as three tensors instead of
``<module>.weight``: ``<module>.weight_bitmaps`` (uint8 ``[rows · ⌈in/64⌉, 8]``), ``<module>.weight_values``
(fp32, or bf16) and ``<module>.weight_offsets`` (int32 ``[rows]``) — the layout of ``format.py`` with ``pad=1``:

    bytes = rows · ⌈in/64⌉ · 8  +  nnz · itemsize  +  rows · 4        (0.3 + 1/32 + 1/in of dense at 70 %, fp32)

Everything else (embeddings, norms, biases, ``lm_head``) is stored as usual. ``config.json`` names the
``Mosaic*`` class of the architecture with ``mosaic_compressed = {"values_dtype", "nnz": {module: count}}``
(the stored sizes), and the class's code is shipped in the checkpoint (``auto_map``), so transformers with
``trust_remote_code=True`` reads it without this package (decoding to dense). The sidecar has
``format_version`` 2; the default dense layout (``format_version`` 1) is unchanged.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import nn

from .format import BitmapTensor, check_consistent, compress, decompress
from .linear import MIN_SPARSITY, SparseLinear

PARTS = ("bitmaps", "values", "offsets")


def _projections(model) -> dict[str, nn.Module]:
    from ..architectures import named_projections

    return named_projections(model)


def _packed(module: nn.Module) -> BitmapTensor:
    """The bitmap form of a projection: ``SparseLinear``/``CompressedLinear`` as held, ``nn.Linear`` compressed now."""
    if hasattr(module, "weight_values"):
        shape = (module.out_features, module.in_features)
        return BitmapTensor(module.weight_bitmaps, module.weight_values, module.weight_offsets, shape)
    return compress(module.weight.detach())


def has_sparse_modules(model) -> bool:
    return any(hasattr(m, "weight_values") for m in _projections(model).values())


def state_dict_for_save(model, compressed: bool, values_dtype: torch.dtype | None = None) -> tuple[dict, dict | None]:
    """``(state dict to write, mosaic_compressed spec or None)``: projections as three bitmap tensors
    (``compressed``), or as dense ``weight`` (also for a model running on the sparse kernel)."""
    state = model.state_dict()
    spec = {"values_dtype": None, "nnz": {}} if compressed else None
    for name, module in _projections(model).items():
        if not compressed and not hasattr(module, "weight_values"):
            continue
        packed = _packed(module)
        for part in PARTS:
            state.pop(f"{name}.weight_{part}", None)
        state.pop(f"{name}.weight", None)
        if not compressed:
            state[f"{name}.weight"] = decompress(packed).to(
                module.bias.dtype if module.bias is not None else torch.float32
            )
            continue
        if values_dtype is not None:
            packed = packed.to(values_dtype)
        if packed.values.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{name}: compressed values are stored in float32 or bfloat16, not {packed.values.dtype}")
        spec["values_dtype"] = spec["values_dtype"] or str(packed.values.dtype).removeprefix("torch.")
        if spec["values_dtype"] != str(packed.values.dtype).removeprefix("torch."):
            raise ValueError("all projections of a compressed checkpoint hold values of one dtype; pass values_dtype")
        for part in PARTS:
            state[f"{name}.weight_{part}"] = getattr(packed, part).contiguous()
        spec["nnz"][name] = packed.values.numel()
    return state, spec


@contextlib.contextmanager
def _as_mosaic_class(model, spec: dict | None):
    """While saving: the model is its ``Mosaic*`` class (so ``auto_map`` and the code are written) with a config
    that lists the compressed projections (``spec``); restored afterwards."""
    if spec is None:
        yield
        return
    from ..exceptions import UnsupportedArchitectureError
    from ..models import MOSAIC_CONFIGS, MOSAIC_MODELS

    config, cls = model.config, model.__class__
    base = config.model_type.removeprefix("mosaic_")
    if base not in MOSAIC_CONFIGS:
        raise UnsupportedArchitectureError(
            f"compressed checkpoints are written for {sorted(MOSAIC_CONFIGS)}, not {config.model_type!r}; "
            "save without compressed=True (the dense layout)"
        )
    if config.model_type.startswith("mosaic_"):
        new = copy.deepcopy(config)
    else:
        data = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
        new = MOSAIC_CONFIGS[base].from_dict(data)
        new._attn_implementation = config._attn_implementation
    new.mosaic_compressed = spec
    model.config, model.__class__ = new, MOSAIC_MODELS[base]
    try:
        yield
    finally:
        model.config, model.__class__ = config, cls


def save_model(
    model, directory: Path, compressed: bool, values_dtype: torch.dtype | None = None, **save_kwargs
) -> dict | None:
    """transformers' ``save_pretrained(directory, **save_kwargs)`` with the projections compressed (or made dense
    again); returns the ``mosaic_compressed`` spec written into ``config.json`` (None for the dense layout). The
    class method is called, never a bound override (``model.save_pretrained`` of a pruned model lands here)."""
    if not compressed and not has_sparse_modules(model):
        type(model).save_pretrained(model, directory, **save_kwargs)
        return None
    if save_kwargs.get("state_dict") is not None:
        raise TypeError("state_dict= cannot be combined with compressed=True or a model on the sparse kernel")
    state, spec = state_dict_for_save(model, compressed, values_dtype)
    with _as_mosaic_class(model, spec):
        type(model).save_pretrained(model, directory, state_dict=state, **save_kwargs)
    return spec


def _weight_file(path: Path, name: str) -> Path:
    import json

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text())["weight_map"].get(f"{name}.weight_values", "model.safetensors")
        return path / shard
    return path / "model.safetensors"


def materialize(model, path: Path, sparse_kernel: bool, min_sparsity: float = MIN_SPARSITY) -> None:
    """After loading a compressed checkpoint with ``mosaic_decompress=False``: check every ``CompressedLinear``
    (a corrupted or truncated file → ``CheckpointMismatchError`` naming it), then run it on the sparse kernel
    (``SparseLinear``, when its sparsity reaches ``min_sparsity``) or decode it to ``nn.Linear``."""
    from ..exceptions import CheckpointMismatchError

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    stored = getattr(torch, (getattr(model.config, "mosaic_compressed", None) or {}).get("values_dtype", "float32"))
    for name, module in list(model.named_modules()):
        if not (hasattr(module, "weight_values") and hasattr(module, "to_linear")):
            continue  # CompressedLinear, from this package or from the code shipped in the checkpoint
        packed = _packed(module)
        if packed.values.dtype != stored:  # from_pretrained(dtype=...) cast them; back to the stored (exact) values
            packed = packed.to(stored)
        try:
            check_consistent(packed)
        except ValueError as err:
            raise CheckpointMismatchError(
                f"{name} in {_weight_file(path, name)}: {err}. The file is corrupted or truncated: copy the checkpoint "
                "again, or re-save it with save_pretrained(..., compressed=True)."
            ) from err
        parent, _, child = name.rpartition(".")
        if sparse_kernel and 1 - packed.values.numel() / max(1, packed.shape[0] * packed.shape[1]) >= min_sparsity:
            new = SparseLinear(module.in_features, module.out_features, module.bias is not None)
            new.load_packed(packed)
            new.bias = module.bias
        else:
            new = module.to_linear(dtype)
        setattr(model.get_submodule(parent), child, new)
    if hasattr(model.config, "mosaic_compressed"):
        del model.config.mosaic_compressed
