"""``transformers.Trainer`` callbacks that keep a pruned model sparse while it trains, or prune it gradually.

With a keep-mask M per weight matrix every optimizer step runs ∇W ← ∇W ⊙ M before ``optimizer.step()`` and
W ← W ⊙ M after it. ``GradualPruningCallback`` also recomputes M at the cubic schedule's sparsity
(``schedule.cubic_sparsity``) from |W| or Wanda's |W|·‖X_j‖, with optional GraNet regeneration.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .allocation.outliers import wanda_scores
from .architectures import PROJECTIONS, named_projections
from .report import measured_sparsity
from .schedule import check_schedule, cubic_sparsity, prune_mask, regrow

logger = logging.get_logger(__name__)

MASKS_NAME = "mosaic_masks.safetensors"
METHODS = ("magnitude", "wanda")


def prunable_linears(model: nn.Module, targets=PROJECTIONS) -> dict[str, nn.Linear]:
    """``{module name: nn.Linear}`` of the target projections of every decoder layer.

    A peft model is unwrapped to its base model and a LoRA layer to its ``base_layer``; names are relative
    to the transformers model (``model.layers.0.self_attn.q_proj``).
    """
    get_base = getattr(model, "get_base_model", None)
    model = get_base() if callable(get_base) else model
    return {name: getattr(linear, "base_layer", linear) for name, linear in named_projections(model, targets).items()}


def weight_sparsity(linears: dict[str, nn.Linear]) -> float:
    """Fraction of exact zeros among the weights of ``linears`` (e.g. ``prunable_linears(model)``)."""
    zeros = sum(int((linear.weight == 0).sum()) for linear in linears.values())
    return zeros / max(1, sum(linear.weight.numel() for linear in linears.values()))


def write_masks(masks: dict[str, torch.Tensor], path: str) -> None:
    """Save bool masks as uint8 tensors keyed by module name (safetensors has no packed bool)."""
    save_file({name: mask.to(torch.uint8).cpu().contiguous() for name, mask in masks.items()}, path)


def read_masks(path: str) -> dict[str, torch.Tensor]:
    """Masks written by ``write_masks`` (a file, or a checkpoint folder holding ``mosaic_masks.safetensors``)."""
    if os.path.isdir(path):
        path = os.path.join(path, MASKS_NAME)
    return {name: tensor.bool() for name, tensor in load_file(path).items()}


def _check_targets(targets) -> tuple[str, ...]:
    targets = tuple(PROJECTIONS if targets is None else targets)
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {list(PROJECTIONS)}, got unknown {unknown}")
    return targets


class SparsityPreservingCallback(TrainerCallback):
    """Keeps the zeros of a pruned model at zero while it is fine-tuned (masks W ≠ 0 taken at train begin).

    ``masks``: ``{module name: bool keep-mask}`` to use instead of the zeros of the weights; ``targets``:
    projection keys (default all of q k v o gate up down); ``masks_path``: a mask file or checkpoint folder to
    resume from; ``save_masks``: write ``mosaic_masks.safetensors`` into every checkpoint.
    When resuming, the masks of ``checkpoint-{global_step}`` in ``output_dir`` are loaded if that file exists.
    """

    def __init__(self, masks=None, targets=None, masks_path: str | None = None, save_masks: bool = False):
        self.targets = _check_targets(targets)
        self.masks_path = masks_path
        self.save_masks = save_masks
        self._given = masks
        self._masks: dict[str, torch.Tensor] = {}
        self._linears: dict[str, nn.Linear] = {}
        self._model = None  # the transformers model (a peft model's base), for its pruning record
        self.final_sparsity: float | None = None

    # -- masks ----------------------------------------------------------------------------------
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The live keep-masks, ``{module name: bool tensor}`` on each weight's device."""
        return self._masks

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.cpu().clone() for name, mask in self._masks.items()}

    def load_state_dict(self, masks: dict[str, torch.Tensor]) -> None:
        """Use ``masks`` from now on (or from the next ``on_train_begin`` if training has not started)."""
        if self._linears:
            self.set_masks(masks)
        else:
            self._given = masks

    def set_masks(self, masks: dict[str, torch.Tensor], optimizer=None) -> None:
        """Check names and shapes, move the masks to the weights' devices and apply them."""
        missing, unknown = sorted(set(self._linears) - set(masks)), sorted(set(masks) - set(self._linears))
        if missing or unknown:
            raise ValueError(f"masks do not match the target projections: missing {missing}, unknown {unknown}")
        for name, linear in self._linears.items():
            if masks[name].shape != linear.weight.shape:
                raise ValueError(f"mask {name}: shape {tuple(masks[name].shape)} != {tuple(linear.weight.shape)}")
        self._masks = {name: masks[name].to(linear.weight.device, torch.bool) for name, linear in self._linears.items()}
        self.apply_masks()
        self._mask_optimizer_state(optimizer)

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, linear in self._linears.items():
            linear.weight.mul_(self._masks[name])

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for name, linear in self._linears.items():
            if linear.weight.grad is not None:
                linear.weight.grad.mul_(self._masks[name])

    @torch.no_grad()
    def _mask_optimizer_state(self, optimizer) -> None:
        """Zero the optimizer state (e.g. Adam moments) of pruned entries, so a regrown weight starts clean."""
        state = getattr(getattr(optimizer, "optimizer", optimizer), "state", None) or {}
        for name, linear in self._linears.items():
            for value in state.get(linear.weight, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == linear.weight.shape:
                    value.mul_(self._masks[name])

    def weight_sparsity(self) -> float:
        """Sparsity as the report and the card define it (``report.DENOMINATOR``) for a model carrying a pruning
        record (``mosaic_report``): zeros and removed weights among the pruned projections of the dense model.
        Otherwise the fraction of exact zeros among the target weights."""
        measured = measured_sparsity(self._model) if self._model is not None else None
        return weight_sparsity(self._linears) if measured is None else measured

    def mask_sparsity(self) -> float:
        """Fraction of pruned entries in the masks."""
        zeros = sum(int((~mask).sum()) for mask in self._masks.values())
        return zeros / max(1, sum(mask.numel() for mask in self._masks.values()))

    # -- where masks come from ------------------------------------------------------------------
    def _starting_masks(self, args, state) -> dict[str, torch.Tensor]:
        if self._given is not None:
            return self._given
        path = self._resume_path(args, state)
        if path is not None:
            logger.info(f"{type(self).__name__}: loading masks from {path}")
            return read_masks(path)
        return self._fresh_masks(state)

    def _resume_path(self, args, state) -> str | None:
        if self.masks_path is not None:
            return self.masks_path
        path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", MASKS_NAME)
        return path if state.global_step > 0 and os.path.isfile(path) else None

    def _fresh_masks(self, state) -> dict[str, torch.Tensor]:
        return {name: linear.weight != 0 for name, linear in self._linears.items()}

    # -- Trainer events -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        get_base = getattr(model, "get_base_model", None)
        self._model = get_base() if callable(get_base) else model
        self._linears = prunable_linears(model, self.targets)
        self.set_masks(self._starting_masks(args, state), optimizer)
        self._warn_if_nothing_to_keep()

    def _warn_if_nothing_to_keep(self) -> None:
        """One warning when the masks keep every weight: the model's zeros were lost before training (or it was
        never pruned), so this callback preserves nothing."""
        if self._masks and self.mask_sparsity() == 0.0:
            import warnings

            from .exceptions import SparsityLostWarning

            warnings.warn(
                f"{type(self).__name__}: the target projections hold no exact zeros, so there is no sparsity to "
                "preserve (zeros lost by an earlier fine-tune or merge, or the model was never pruned); prune it "
                "first, or pass masks=",
                SparsityLostWarning,
                stacklevel=3,
            )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.mask_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.apply_masks()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._linears:
            return
        logs["sparsity"] = round(self.weight_sparsity(), 6)
        if state.log_history:  # Trainer.log appended a copy of ``logs`` just before calling on_log
            state.log_history[-1]["sparsity"] = logs["sparsity"]

    def on_save(self, args, state, control, **kwargs):
        if self.save_masks and self._masks and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            write_masks(self._masks, os.path.join(folder, MASKS_NAME))

    def on_train_end(self, args, state, control, **kwargs):
        self.final_sparsity = self.weight_sparsity()
        logger.info(f"{type(self).__name__}: final sparsity {self.final_sparsity:.4f}")


class GradualPruningCallback(SparsityPreservingCallback):
    """Prunes while training: at every step where ``schedule.cubic_sparsity`` changes, each target matrix is
    re-masked at the scheduled sparsity (exactly round(s·numel) zeros) by |W| (``method="magnitude"``) or by
    |W|·‖X_j‖ (``"wanda"``, ‖X_j‖² summed by forward hooks over the training tokens since the last update);
    between updates the masks are enforced as in ``SparsityPreservingCallback``.

    Regeneration (``regrowth_fraction`` > 0), every ``regrowth_frequency`` steps (default ``frequency``) with
    start_step < t < end_step: after re-masking, ``schedule.regrow`` drops the weakest survivors and revives as
    many pruned entries with the largest |∂L/∂W|, at zero. The dense gradient is copied in
    ``on_pre_optimizer_step`` (the last point where it exists unmasked; the Trainer zeroes gradients before
    ``on_step_end``) and used in ``on_step_end``. Masks are saved with every checkpoint and reloaded on resume.
    """

    def __init__(
        self,
        final_sparsity: float,
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        end_step: int | None = None,
        frequency: int = 10,
        method: str = "magnitude",
        regrowth_fraction: float = 0.0,
        regrowth_frequency: int | None = None,
        targets=None,
        masks_path: str | None = None,
        save_masks: bool = True,
    ):
        super().__init__(targets=targets, masks_path=masks_path, save_masks=save_masks)
        end = start_step + 1 if end_step is None else end_step  # None: the Trainer's max_steps, checked later
        check_schedule(initial_sparsity, final_sparsity, start_step, end, frequency)
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        if not 0.0 <= regrowth_fraction <= 1.0:
            raise ValueError(f"regrowth_fraction must be in [0, 1], got {regrowth_fraction}")
        if regrowth_frequency is not None and (int(regrowth_frequency) != regrowth_frequency or regrowth_frequency < 1):
            raise ValueError(f"regrowth_frequency must be an integer >= 1, got {regrowth_frequency}")
        self.final, self.initial, self.start_step, self.frequency = (
            final_sparsity,
            initial_sparsity,
            start_step,
            frequency,
        )
        self.end_step_arg, self.end_step = end_step, end_step
        self.method, self.regrowth_fraction = method, regrowth_fraction
        self.regrowth_frequency = regrowth_frequency or frequency
        self.level: float | None = None  # sparsity of the current masks
        self.history: list[tuple[int, float]] = []  # (step, mask sparsity) after every mask change
        self._sumsq: dict[str, torch.Tensor] = {}
        self._hooks: list = []
        self._grads: dict[str, torch.Tensor] = {}

    def scheduled_sparsity(self, step: int) -> float:
        return cubic_sparsity(step, self.initial, self.final, self.start_step, self.end_step, self.frequency)

    def is_regrowth_step(self, step: int) -> bool:
        return (
            self.regrowth_fraction > 0
            and self.start_step < step < self.end_step
            and (step - self.start_step) % self.regrowth_frequency == 0
        )

    def _scores(self, name: str) -> torch.Tensor:
        weight, sumsq = self._linears[name].weight.detach(), self._sumsq.get(name)
        if sumsq is None or not bool(sumsq.any()):  # magnitude, or Wanda before any training forward
            return weight.abs().float()
        return wanda_scores(weight, sumsq)

    def _fresh_masks(self, state) -> dict[str, torch.Tensor]:
        level = self.scheduled_sparsity(state.global_step)
        return {name: prune_mask(self._scores(name), level) for name in self._linears}

    def _accumulate(self, name: str):
        def hook(module, inputs, output):
            if module.training:
                x = inputs[0].detach()
                self._sumsq[name] += x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)

        return hook

    def _register_hooks(self) -> None:
        for name, linear in self._linears.items():
            self._sumsq[name] = torch.zeros(linear.in_features, device=linear.weight.device)
            self._hooks.append(linear.register_forward_hook(self._accumulate(name)))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._sumsq = [], {}

    def _warn_if_nothing_to_keep(self) -> None:
        """Nothing to warn about: gradual pruning may start from a dense model."""

    # -- Trainer events -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.end_step = state.max_steps if self.end_step_arg is None else self.end_step_arg
        check_schedule(self.initial, self.final, self.start_step, self.end_step, self.frequency)
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self.level = self.scheduled_sparsity(state.global_step)
        self.history = [(state.global_step, self.mask_sparsity())]
        if self.regrowth_fraction > 0 and not all(lin.weight.requires_grad for lin in self._linears.values()):
            raise ValueError("regrowth needs gradients of the pruned weights, but some target weights are frozen")
        if self.method == "wanda":
            self._register_hooks()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.is_regrowth_step(state.global_step + 1):  # the step about to be taken
            self._grads = {
                name: linear.weight.grad.detach().abs()  # .abs() copies: the dense gradient, before masking
                for name, linear in self._linears.items()
                if linear.weight.grad is not None
            }
        super().on_pre_optimizer_step(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        level = self.scheduled_sparsity(state.global_step)
        grads, self._grads = self._grads, {}
        if level == self.level and not grads:
            return
        masks = {}
        for name in self._linears:
            scores = self._scores(name)
            mask = self._masks[name] if level == self.level else prune_mask(scores, level)
            masks[name] = regrow(mask, scores, grads[name], self.regrowth_fraction) if name in grads else mask
        for sumsq in self._sumsq.values():
            sumsq.zero_()
        self.level = level
        self.set_masks(masks, optimizer)
        self.history.append((state.global_step, self.mask_sparsity()))

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()
        super().on_train_end(args, state, control, **kwargs)
        if state.global_step < self.end_step:
            logger.warning(
                f"GradualPruningCallback: training stopped at step {state.global_step} before end_step "
                f"{self.end_step}; sparsity {self.level:.4f} instead of {self.final}"
            )
