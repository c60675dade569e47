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

    Same shapes in every layer → the plain base config with new sizes (``head_dim`` pinned).
    Different shapes → the matching ``Mosaic*Config`` with ``layer_shapes`` and the model re-classed to
    ``Mosaic*ForCausalLM`` (a subclass that adds no state), so ``save_pretrained`` ships ``auto_map``
    and the code. Returns whether the layers are heterogeneous.
    """
    from ..architectures import get_arch_spec
    from ..exceptions import UnsupportedArchitectureError
    from ..structured import model_shapes

    spec = get_arch_spec(model)
    layer_shapes = list(model_shapes(model, spec).values())
    shapes = [
        {"intermediate_size": s.intermediate, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads}
        for s in layer_shapes
    ]
    config = model.config
    base = config.model_type.removeprefix("mosaic_")
    first = layer_shapes[0]
    sizes = {"intermediate": first.intermediate, "heads": first.heads, "kv_heads": first.kv_heads}
    sizes["head_dim"] = first.head_dim
    if all(s == shapes[0] for s in shapes):
        if config.model_type.startswith("mosaic_"):
            return False  # keep the class; layer_shapes below stay true
        for field, key in spec.config_keys.items():  # the config attributes this family has
            setattr(config, key, sizes[field])
        return False
    if base not in MOSAIC_CONFIGS:
        raise UnsupportedArchitectureError(
            f"layers of different shapes can be saved for {sorted(MOSAIC_CONFIGS)}, not {config.model_type!r}; "
            "use structured_sparsity=0 for this architecture"
        )
    data = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    head_dim = {"head_dim": first.head_dim} if "head_dim" in spec.config_keys else {}
    new = MOSAIC_CONFIGS[base].from_dict({**data, **head_dim, "layer_shapes": shapes})
    new._attn_implementation = config._attn_implementation
    model.config = new
    model.__class__ = MOSAIC_MODELS[base]
    return True
