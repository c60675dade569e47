"""Causal LMs whose decoder layers keep their own MLP width and head counts (``config.layer_shapes``).

Each class is its base model built as usual, then every layer's projections are rebuilt at the
recorded sizes before the weights are loaded.
"""

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from .configuration_mosaic import MosaicLlamaConfig, MosaicMistralConfig, MosaicQwen2Config, MosaicQwen3Config


def _linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


def reshape_layers(layers, config) -> None:
    """Rebuild each layer's q/k/v/o and gate/up/down at the sizes in ``config.layer_shapes``."""
    for layer, shape in zip(layers, getattr(config, "layer_shapes", None) or [], strict=False):
        attn, mlp = layer.self_attn, layer.mlp
        hidden, head_dim = config.hidden_size, attn.head_dim
        q, kv, ffn = (
            shape["num_attention_heads"] * head_dim,
            shape["num_key_value_heads"] * head_dim,
            shape["intermediate_size"],
        )
        attn.q_proj = _linear(attn.q_proj, hidden, q)
        attn.k_proj = _linear(attn.k_proj, hidden, kv)
        attn.v_proj = _linear(attn.v_proj, hidden, kv)
        attn.o_proj = _linear(attn.o_proj, q, hidden)
        attn.num_key_value_groups = shape["num_attention_heads"] // shape["num_key_value_heads"]
        mlp.gate_proj = _linear(mlp.gate_proj, hidden, ffn)
        mlp.up_proj = _linear(mlp.up_proj, hidden, ffn)
        mlp.down_proj = _linear(mlp.down_proj, ffn, hidden)


class _ReshapedLayers:
    def __init__(self, config):
        super().__init__(config)
        reshape_layers(self.model.layers, config)


class MosaicLlamaForCausalLM(_ReshapedLayers, LlamaForCausalLM):
    config_class = MosaicLlamaConfig


class MosaicMistralForCausalLM(_ReshapedLayers, MistralForCausalLM):
    config_class = MosaicMistralConfig


class MosaicQwen2ForCausalLM(_ReshapedLayers, Qwen2ForCausalLM):
    config_class = MosaicQwen2Config


class MosaicQwen3ForCausalLM(_ReshapedLayers, Qwen3ForCausalLM):
    config_class = MosaicQwen3Config


MOSAIC_MODELS = {
    "llama": MosaicLlamaForCausalLM,
    "mistral": MosaicMistralForCausalLM,
    "qwen2": MosaicQwen2ForCausalLM,
    "qwen3": MosaicQwen3ForCausalLM,
}
