"""peft LoRA on a pruned model, merged without losing the zeros.

A LoRA update is dense: merging gives W' = W + (α/r)·B·A, which fills every pruned position. The masks
M = [W ≠ 0] are therefore recorded from the base model *before* the adapter is attached, and the merge is
followed by W' ← W' ⊙ M, so the merged model has exactly the pruned model's zeros (the adapter's change at
kept positions is unchanged). Shape-reduced layers need nothing special: a LoRA on a smaller ``nn.Linear``
merges into a smaller dense weight.
"""

from __future__ import annotations

import torch

from .architectures import named_projections


def pruning_masks(model) -> dict[str, torch.Tensor]:
    """``{module name: W ≠ 0}`` for every projection of the decoder layers (bool, on the weight's device)."""
    return {name: linear.weight.detach() != 0 for name, linear in named_projections(model).items()}


def projection_module_names(model) -> list[str]:
    """The short names peft's ``target_modules`` matches (``q_proj``, ..., ``down_proj``)."""
    return sorted({name.rsplit(".", 1)[-1] for name in named_projections(model)})


def prepare_lora(model, lora_config=None, **lora_kwargs):
    """Record the pruning masks, then wrap ``model`` with a LoRA adapter (``peft.get_peft_model``).

    Without ``lora_config`` a ``LoraConfig(task_type="CAUSAL_LM", target_modules=<the seven projections>,
    **lora_kwargs)`` is used. The masks are kept on the returned model as ``mosaic_masks``.
    """
    from peft import LoraConfig, get_peft_model

    masks = pruning_masks(model)
    if lora_config is None:
        lora_kwargs.setdefault("target_modules", projection_module_names(model))
        lora_config = LoraConfig(task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(model, lora_config)
    peft_model.mosaic_masks = masks
    return peft_model


@torch.no_grad()
def apply_masks(model, masks: dict[str, torch.Tensor]) -> int:
    """W ← W ⊙ M for every masked module; returns how many non-zeros were cleared."""
    cleared = 0
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        if weight.shape != mask.shape:
            raise ValueError(f"{name}: mask shape {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
        cleared += int(((weight != 0) & ~mask).sum())
        weight.mul_(mask.to(weight.device))
    return cleared


def merge_and_remask(peft_model, masks: dict[str, torch.Tensor] | None = None):
    """``merge_and_unload()`` then re-apply the masks recorded before the adapter was attached.

    Returns the merged base model; ``model.mosaic_cleared`` counts the adapter entries the masks removed.
    """
    masks = masks if masks is not None else getattr(peft_model, "mosaic_masks", None)
    if masks is None:
        raise ValueError(
            "no pruning masks: create the adapter with optimum_mosaic.adapters.prepare_lora(model, ...), or pass "
            "masks=pruning_masks(base_model) recorded before the adapter was attached"
        )
    merged = peft_model.merge_and_unload()
    merged.mosaic_cleared = apply_masks(merged, masks)
    return merged
