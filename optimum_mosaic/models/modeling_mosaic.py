"""Causal LMs whose decoder layers keep their own MLP width and head counts (``config.layer_shapes``).

Each class is its base model built as usual, then every layer's projections are rebuilt at the
recorded sizes before the weights are loaded.
"""

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


class _ReshapedLayers:
    mosaic_layout = LLAMA_LAYOUT

    def __init__(self, config):
        super().__init__(config)
        layers, paths = self.mosaic_layout
        reshape_layers(self.get_submodule(layers), config, paths)


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
