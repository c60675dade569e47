"""One table of architecture facts, keyed by ``config.model_type``.

Every other module asks this table where a decoder layer keeps its projections; nothing else in the
package names module paths. Projections use the canonical keys ``q, k, v, o, gate, up, down``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

from .exceptions import UnsupportedArchitectureError

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")

_LLAMA_PATHS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclass(frozen=True)
class ArchSpec:
    """Where the decoder layers and their projections live for one family of models."""

    layers: str  # path of the ModuleList of decoder layers, from the CausalLM
    decoder: str  # path of the base model (embeddings + layers + final norm)
    projections: dict[str, str] = field(default_factory=lambda: dict(_LLAMA_PATHS))
    attention: str = "self_attn"  # module holding head_dim and num_key_value_groups
    mlp: str = "mlp"
    # projections that read the same input tensor share calibration statistics
    input_groups: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


_LLAMA = ArchSpec(layers="model.layers", decoder="model")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    # structurally pruned checkpoints (optimum_mosaic.models)
    "mosaic_llama": _LLAMA,
    "mosaic_mistral": _LLAMA,
    "mosaic_qwen2": _LLAMA,
    "mosaic_qwen3": _LLAMA,
}


def get_arch_spec(model_or_config) -> ArchSpec:
    """Look up the spec of a model (or config); unknown families get an error listing the known ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported architectures: "
            f"{', '.join(sorted(ARCHITECTURES))}. Open an issue or add an ArchSpec entry in "
            "optimum_mosaic/architectures.py."
        )
    return ARCHITECTURES[model_type]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return get_submodule(model, spec.layers)


def layer_projections(layer: nn.Module, spec: ArchSpec, keys=PROJECTIONS) -> dict[str, nn.Linear]:
    """``{projection key: nn.Linear}`` for one decoder layer, in canonical order."""
    return {key: layer.get_submodule(spec.projections[key]) for key in keys}


def named_projections(model: nn.Module, keys=PROJECTIONS) -> dict[str, nn.Linear]:
    """``{module name: nn.Linear}`` of the projections of every decoder layer (e.g. ``model.layers.0.mlp.up_proj``)."""
    spec = get_arch_spec(model)
    return {
        f"{spec.layers}.{idx}.{spec.projections[key]}": linear
        for idx, layer in enumerate(decoder_layers(model, spec))
        for key, linear in layer_projections(layer, spec, keys).items()
    }
