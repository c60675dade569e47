"""Configs of structurally pruned models: the base config plus ``layer_shapes``, one entry per decoder
layer: ``{"intermediate_size", "num_attention_heads", "num_key_value_heads"}``. ``head_dim`` is kept."""

from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3Config,
)


class MosaicLlamaConfig(LlamaConfig):
    model_type = "mosaic_llama"


class MosaicMistralConfig(MistralConfig):
    model_type = "mosaic_mistral"


class MosaicQwen2Config(Qwen2Config):
    model_type = "mosaic_qwen2"


class MosaicQwen3Config(Qwen3Config):
    model_type = "mosaic_qwen3"


class MosaicGemmaConfig(GemmaConfig):
    model_type = "mosaic_gemma"


class MosaicGemma2Config(Gemma2Config):
    model_type = "mosaic_gemma2"


class MosaicGemma3TextConfig(Gemma3TextConfig):
    model_type = "mosaic_gemma3_text"


class MosaicOPTConfig(OPTConfig):
    model_type = "mosaic_opt"


MOSAIC_CONFIGS = {
    "llama": MosaicLlamaConfig,
    "mistral": MosaicMistralConfig,
    "qwen2": MosaicQwen2Config,
    "qwen3": MosaicQwen3Config,
    "gemma": MosaicGemmaConfig,
    "gemma2": MosaicGemma2Config,
    "gemma3_text": MosaicGemma3TextConfig,
    "opt": MosaicOPTConfig,
}
