"""Config and model classes for checkpoints whose decoder layers have different shapes.

The two modules below import nothing from optimum_mosaic: ``save_pretrained`` copies them into the
checkpoint (``auto_map``), so ``trust_remote_code=True`` loads such a checkpoint without this package.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_mosaic import MOSAIC_CONFIGS
from .modeling_mosaic import MOSAIC_MODELS, reshape_layers

for _base, _config in MOSAIC_CONFIGS.items():
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, MOSAIC_MODELS[_base], exist_ok=True)
    _config.register_for_auto_class()
    MOSAIC_MODELS[_base].register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MOSAIC_CONFIGS", "MOSAIC_MODELS", "reshape_layers"]


def fit_config_to_shapes(model) -> bool:
    """Make ``model.config`` describe the layers as they now are.

    Same shapes in every layer → the plain base config with new sizes (``head_dim`` pinned), *if the base
    config class accepts them* (``LlamaConfig`` refuses a hidden size that is not a multiple of the head
    count, which head removal usually causes: 4096 hidden, 32 → 24 heads). Otherwise, or when the layers
    differ → the matching ``Mosaic*Config`` with ``layer_shapes`` (its top-level sizes stay those of the
    dense model, which the base class accepted) and the model re-classed to ``Mosaic*ForCausalLM`` (a
    subclass that adds no state), so ``save_pretrained`` ships ``auto_map`` and the code. Returns whether
    the Mosaic config is used.
    """
    from ..architectures import get_arch_spec
    from ..structured import model_shapes

    spec = get_arch_spec(model)
    layer_shapes = list(model_shapes(model, spec).values())
    shapes = [
        {"intermediate_size": s.intermediate, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads}
        for s in layer_shapes
    ]
    first = layer_shapes[0]
    sizes = {"intermediate": first.intermediate, "heads": first.heads, "kv_heads": first.kv_heads}
    sizes["head_dim"] = first.head_dim
    config = model.config
    if all(s == shapes[0] for s in shapes) and not config.model_type.startswith("mosaic_"):
        plain = {key: sizes[field] for field, key in spec.config_keys.items()}  # the attributes this family has
        if base_config_accepts(config, plain):
            for key, value in plain.items():
                setattr(config, key, value)
            return False
    _use_mosaic_config(model, spec, shapes, first.head_dim)
    return True


def base_config_accepts(config, values: dict) -> bool:
    """Whether ``config``'s own class validates with ``values`` set (transformers' strict config checks)."""
    import copy

    trial = copy.deepcopy(config)
    for key, value in values.items():
        setattr(trial, key, value)
    try:
        if hasattr(trial, "validate"):
            trial.validate()
    except Exception:  # huggingface_hub's StrictDataclassClassValidationError, ValueError, TypeError
        return False
    return True


def _use_mosaic_config(model, spec, shapes: list[dict], head_dim: int) -> None:
    from ..exceptions import UnsupportedArchitectureError

    config = model.config
    base = config.model_type.removeprefix("mosaic_")
    if base not in MOSAIC_CONFIGS:
        raise UnsupportedArchitectureError(
            f"these layer shapes need a Mosaic config class, which exists for {sorted(MOSAIC_CONFIGS)}, not "
            f"{config.model_type!r}; use structured_sparsity=0 for this architecture"
        )
    drop = ("model_type", "architectures", "auto_map", "layer_shapes")
    data = {k: v for k, v in config.to_dict().items() if k not in drop}
    pinned = {"head_dim": head_dim} if "head_dim" in spec.config_keys else {}
    new = MOSAIC_CONFIGS[base].from_dict({**data, **pinned, "layer_shapes": shapes})
    new._attn_implementation = config._attn_implementation
    model.config = new
    model.__class__ = MOSAIC_MODELS[base]
