"""Causal LMs whose decoder layers keep their own MLP width and head counts (``config.layer_shapes``), and
checkpoints whose projections are stored compressed (``config.mosaic_compressed``).

Each class is its base model built as usual, then every layer's projections are rebuilt at the
recorded sizes before the weights are loaded. In a compressed checkpoint (optimum-mosaic's
``save_pretrained(..., compressed=True)``, sidecar ``format_version`` 2) each listed projection is held as
three tensors ``<module>.weight_bitmaps`` / ``weight_values`` / ``weight_offsets``; ``from_pretrained`` reads
them and decodes them to dense ``nn.Linear`` weights in plain torch.
"""

import torch
from torch import nn
from transformers import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    GemmaForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    OPTForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from .configuration_mosaic import (
    MosaicGemma2Config,
    MosaicGemma3TextConfig,
    MosaicGemmaConfig,
    MosaicLlamaConfig,
    MosaicMistralConfig,
    MosaicOPTConfig,
    MosaicQwen2Config,
    MosaicQwen3Config,
)

# (decoder layers, {projection: path}): the facts of optimum_mosaic.architectures, repeated here because
# this file is copied into checkpoints and imports nothing from the package
LLAMA_LAYOUT = (
    "model.layers",
    {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
)
OPT_LAYOUT = (
    "model.decoder.layers",
    {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "up": "fc1",
        "down": "fc2",
    },
)


def _linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


def reshape_layers(layers, config, paths=LLAMA_LAYOUT[1]) -> None:
    """Rebuild each layer's projections (``paths``: canonical key → module path) at the sizes in
    ``config.layer_shapes``: q/o span the query heads, k/v the key/value heads, gate/up/down the MLP width."""
    for layer, shape in zip(layers, getattr(config, "layer_shapes", None) or [], strict=False):
        attn, hidden = layer.self_attn, config.hidden_size
        q = shape["num_attention_heads"] * attn.head_dim
        kv, ffn = shape["num_key_value_heads"] * attn.head_dim, shape["intermediate_size"]
        sizes = {"q": (hidden, q), "k": (hidden, kv), "v": (hidden, kv), "o": (q, hidden)}
        sizes |= {"gate": (hidden, ffn), "up": (hidden, ffn), "down": (ffn, hidden)}
        for key, path in paths.items():
            parent, _, name = path.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            setattr(owner, name, _linear(getattr(owner, name), *sizes[key]))
        attn.num_key_value_groups = shape["num_attention_heads"] // shape["num_key_value_heads"]


TILE = 64
_SHIFTS = torch.arange(8, dtype=torch.uint8)


class CompressedLinear(nn.Module):
    """A projection as stored in a compressed checkpoint: per 64-column tile of each row a 64-bit bitmap (bit j
    of byte b ↔ column 8b + j; ``weight_bitmaps`` [rows · ⌈in/64⌉, 8] uint8), the non-zeros in row-major order
    (``weight_values``), and where each row's values start (``weight_offsets`` [rows] int32). ``to_linear``
    decodes it; ``forward`` decodes on every call (correct, slow: ``from_pretrained`` replaces these)."""

    def __init__(self, in_features, out_features, nnz, bias=True, values_dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        tiles = out_features * -(-in_features // TILE)
        self.register_buffer("weight_bitmaps", torch.zeros(tiles, 8, dtype=torch.uint8, device=device))
        self.register_buffer("weight_values", torch.zeros(nnz, dtype=values_dtype, device=device))
        self.register_buffer("weight_offsets", torch.zeros(out_features, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def dense_weight(self) -> torch.Tensor:
        """The dense weight; ``ValueError`` if the three tensors disagree (a corrupted or truncated file)."""
        bits = ((self.weight_bitmaps.unsqueeze(-1) >> _SHIFTS.to(self.weight_bitmaps.device)) & 1).view(-1, TILE)
        per_row = bits.view(self.out_features, -1).sum(-1, dtype=torch.int64)
        if int(per_row.sum()) != self.weight_values.numel():
            raise ValueError(
                f"the bitmaps mark {int(per_row.sum())} values but {self.weight_values.numel()} are stored"
            )
        if not torch.equal(self.weight_offsets.long(), per_row.cumsum(0) - per_row):
            raise ValueError("the row offsets do not match the bitmaps")
        rows = self.weight_values.new_zeros(bits.shape).masked_scatter_(bits.bool(), self.weight_values)
        if bool(bits.view(self.out_features, -1)[:, self.in_features :].any()):
            raise ValueError("bits are set beyond the last column")
        return rows.view(self.out_features, -1)[:, : self.in_features]

    def to_linear(self, dtype=None) -> nn.Linear:
        weight = self.dense_weight()
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device)
        linear.to(dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x):
        return nn.functional.linear(x, self.dense_weight().to(x.dtype), self.bias)


def compress_layers(model, config) -> None:
    """Hold the projections listed in ``config.mosaic_compressed`` as ``CompressedLinear`` of the stored size."""
    spec = getattr(config, "mosaic_compressed", None) or {}
    values_dtype = getattr(torch, spec.get("values_dtype", "float32"))
    for name, nnz in spec.get("nnz", {}).items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        old = getattr(owner, child)
        device = old.weight.device
        setattr(
            owner,
            child,
            CompressedLinear(old.in_features, old.out_features, nnz, old.bias is not None, values_dtype, device),
        )


def decompress_layers(model) -> None:
    """Replace every ``CompressedLinear`` by the dense ``nn.Linear`` it encodes; the config forgets the format."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name, module in list(model.named_modules()):
        if isinstance(module, CompressedLinear):
            parent, _, child = name.rpartition(".")
            try:
                setattr(model.get_submodule(parent), child, module.to_linear(dtype))
            except ValueError as err:
                raise ValueError(f"{name}: {err}: the compressed checkpoint is corrupted or truncated") from err
    if hasattr(model.config, "mosaic_compressed"):
        del model.config.mosaic_compressed


class _ReshapedLayers:
    mosaic_layout = LLAMA_LAYOUT

    def __init__(self, config):
        super().__init__(config)
        layers, paths = self.mosaic_layout
        reshape_layers(self.get_submodule(layers), config, paths)
        compress_layers(self, config)

    @classmethod
    def from_pretrained(cls, *args, mosaic_decompress: bool = True, **kwargs):
        """As transformers' ``from_pretrained``; compressed projections are decoded to dense ``nn.Linear``
        unless ``mosaic_decompress=False`` (optimum-mosaic then puts them on its sparse kernel)."""
        model = super().from_pretrained(*args, **kwargs)
        if mosaic_decompress:
            decompress_layers(model)
        return model


class MosaicLlamaForCausalLM(_ReshapedLayers, LlamaForCausalLM):
    config_class = MosaicLlamaConfig


class MosaicMistralForCausalLM(_ReshapedLayers, MistralForCausalLM):
    config_class = MosaicMistralConfig


class MosaicQwen2ForCausalLM(_ReshapedLayers, Qwen2ForCausalLM):
    config_class = MosaicQwen2Config


class MosaicQwen3ForCausalLM(_ReshapedLayers, Qwen3ForCausalLM):
    config_class = MosaicQwen3Config


class MosaicGemmaForCausalLM(_ReshapedLayers, GemmaForCausalLM):
    config_class = MosaicGemmaConfig


class MosaicGemma2ForCausalLM(_ReshapedLayers, Gemma2ForCausalLM):
    config_class = MosaicGemma2Config


class MosaicGemma3ForCausalLM(_ReshapedLayers, Gemma3ForCausalLM):
    config_class = MosaicGemma3TextConfig


class MosaicOPTForCausalLM(_ReshapedLayers, OPTForCausalLM):
    config_class = MosaicOPTConfig
    mosaic_layout = OPT_LAYOUT


MOSAIC_MODELS = {
    "llama": MosaicLlamaForCausalLM,
    "mistral": MosaicMistralForCausalLM,
    "qwen2": MosaicQwen2ForCausalLM,
    "qwen3": MosaicQwen3ForCausalLM,
    "gemma": MosaicGemmaForCausalLM,
    "gemma2": MosaicGemma2ForCausalLM,
    "gemma3_text": MosaicGemma3ForCausalLM,
    "opt": MosaicOPTForCausalLM,
}
