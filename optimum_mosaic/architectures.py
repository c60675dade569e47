"""One table of architecture facts, keyed by ``config.model_type``.

Every other module asks this table where a decoder layer keeps its projections; nothing else in the
package names module paths. Projections use the canonical keys ``q, k, v, o, gate, up, down``; a family
lists only those it has (OPT has no ``gate``). Keys that share one module path are row blocks of a fused
weight (Phi-3's ``qkv_proj``, ``gate_up_proj``), stacked in the order the keys are listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .exceptions import UnsupportedArchitectureError

if TYPE_CHECKING:  # annotations only: importing this table (and the CLI that reads it) does not load torch
    import torch
    from torch import nn

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
UNITS = ("mlp", "attention")

_LLAMA_PATHS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
# canonical layer-shape fields → config attribute that holds them (a missing field cannot be changed)
_LLAMA_CONFIG_KEYS = {
    "intermediate": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
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
    structured_units: tuple[str, ...] = UNITS  # units structured pruning can remove in this family
    config_keys: dict[str, str] = field(default_factory=lambda: dict(_LLAMA_CONFIG_KEYS))
    # norms that read a projection's output before the residual add (Gemma-2/3): projection key → path in the layer
    post_norms: dict[str, str] = field(default_factory=dict)
    # the norm that opens the MLP half: its input is the residual stream h₁ = x + (post-normed) attention(x), and
    # the layer run from h₁ with the attention returning zeros reproduces the layer (pre-norm residual halves);
    # "" where that does not hold (OPT-350m normalises after the residual add)
    mlp_norm: str = "post_attention_layernorm"

    @property
    def keys(self) -> tuple[str, ...]:
        """The canonical projection keys this family has, in canonical order."""
        return tuple(k for k in PROJECTIONS if k in self.projections)

    @property
    def fused(self) -> dict[str, tuple[str, ...]]:
        """``{module path: keys}`` for every path that stacks the rows of more than one projection."""
        blocks: dict[str, tuple[str, ...]] = {}
        for key, path in self.projections.items():
            blocks[path] = (*blocks.get(path, ()), key)
        return {path: keys for path, keys in blocks.items() if len(keys) > 1}


class RowSlice:
    """Rows ``[start, stop)`` of a fused ``nn.Linear``, seen as a Linear of its own.

    ``weight`` is a view of the fused parameter, so in-place writes land in the fused matrix. Every block
    reads the fused module's input, so forward hooks are registered on the fused module itself.
    """

    def __init__(self, fused: nn.Linear, start: int, stop: int):
        self.fused, self.start, self.stop = fused, start, stop

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.weight[self.start : self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.fused.bias is None else self.fused.bias[self.start : self.stop]

    @property
    def in_features(self) -> int:
        return self.fused.in_features

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    def register_forward_hook(self, hook):
        """``hook(self, args, output rows)``: the fused module's input is this block's input."""
        return self.fused.register_forward_hook(
            lambda _m, args, out: hook(self, args, out[..., self.start : self.stop])
        )

    def register_forward_pre_hook(self, hook):
        """``hook(self, args)`` on the fused module's input."""
        return self.fused.register_forward_pre_hook(lambda _m, args: hook(self, args))

    def __repr__(self) -> str:
        return f"RowSlice(rows {self.start}:{self.stop} of {self.fused})"


_LLAMA = ArchSpec(layers="model.layers", decoder="model")
_GEMMA2 = ArchSpec(
    layers="model.layers",
    decoder="model",
    post_norms={"o": "post_attention_layernorm", "down": "post_feedforward_layernorm"},
    mlp_norm="pre_feedforward_layernorm",
)
_PHI3 = ArchSpec(
    layers="model.layers",
    decoder="model",
    projections={
        **_LLAMA_PATHS,
        **dict.fromkeys(("q", "k", "v"), "self_attn.qkv_proj"),
        **dict.fromkeys(("gate", "up"), "mlp.gate_up_proj"),
    },
    structured_units=(),
)
_OPT = ArchSpec(
    layers="model.decoder.layers",
    decoder="model.decoder",
    projections={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "up": "fc1",
        "down": "fc2",
    },
    mlp="",
    structured_units=("mlp",),  # OPT derives head_dim = hidden / heads, so whole heads cannot go
    config_keys={"intermediate": "ffn_dim"},
    mlp_norm="",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "phi3": _PHI3,
    "opt": _OPT,
}
# structurally pruned checkpoints (optimum_mosaic.models) keep their base family's layout
ARCHITECTURES.update({f"mosaic_{name}": spec for name, spec in list(ARCHITECTURES.items()) if spec.structured_units})


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


def check_structured(spec: ArchSpec, units, model_type: str) -> None:
    """Raise ``UnsupportedArchitectureError`` if structured pruning of ``units`` is impossible for ``spec``."""
    missing = [u for u in units if u not in spec.structured_units]
    if not missing:
        return
    can = list(spec.structured_units)
    fix = f"pass structured_units={can}" if can else "use structured_sparsity=0 (unstructured pruning works)"
    raise UnsupportedArchitectureError(
        f"{model_type!r}: structured pruning cannot remove {missing} units in this architecture "
        f"(it supports {can or 'none'}); {fix}."
    )


def present_keys(spec: ArchSpec, keys=PROJECTIONS) -> tuple[str, ...]:
    """``keys`` that the family has. All of ``PROJECTIONS`` (the default) means 'whatever it has'; any other
    selection naming a projection the family lacks is an error."""
    keys = tuple(keys)
    missing = [k for k in keys if k not in spec.projections]
    if missing and set(keys) != set(PROJECTIONS):
        raise UnsupportedArchitectureError(
            f"this architecture has no {missing} projection(s); it has {list(spec.keys)}. Drop them from targets."
        )
    return tuple(k for k in keys if k in spec.projections)


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return get_submodule(model, spec.layers)


def _block_rows(layer: nn.Module, spec: ArchSpec, keys: tuple[str, ...], total: int) -> list[int]:
    """Row counts of the blocks of one fused weight: q has ``o``'s input width, gate and up ``down``'s; the
    blocks left (k and v) share the remaining rows equally."""
    partner = {"q": "o", "gate": "down", "up": "down"}
    known = {k: layer.get_submodule(spec.projections[partner[k]]).in_features for k in keys if k in partner}
    rest = [k for k in keys if k not in known]
    share, odd = divmod(total - sum(known.values()), max(1, len(rest)))
    if odd or share < 0 or (not rest and share):
        raise UnsupportedArchitectureError(f"cannot split {total} fused rows into {keys}")
    return [known.get(k, share) for k in keys]


def layer_projections(layer: nn.Module, spec: ArchSpec, keys=PROJECTIONS) -> dict[str, nn.Linear]:
    """``{projection key: nn.Linear}`` for one decoder layer (a ``RowSlice`` for a block of a fused weight)."""
    keys = present_keys(spec, keys)
    out = {}
    for path, block in spec.fused.items():
        if any(k in keys for k in block):
            fused, start = layer.get_submodule(path), 0
            for key, rows in zip(block, _block_rows(layer, spec, block, fused.out_features), strict=True):
                out[key], start = RowSlice(fused, start, start + rows), start + rows
    return {k: out[k] if k in out else layer.get_submodule(spec.projections[k]) for k in keys}


def named_projections(model: nn.Module, keys=PROJECTIONS) -> dict[str, nn.Linear]:
    """``{module name: nn.Linear}`` of the projection modules of every decoder layer (e.g.
    ``model.layers.0.mlp.up_proj``); a fused module appears once, whole."""
    spec = get_arch_spec(model)
    keys = present_keys(spec, keys)
    return {
        f"{spec.layers}.{idx}.{spec.projections[key]}": layer.get_submodule(spec.projections[key])
        for idx, layer in enumerate(decoder_layers(model, spec))
        for key in keys
    }
