"""Trainer callbacks: zeros preserved through AdamW fine-tuning, gradual pruning on schedule, checkpoints."""

from __future__ import annotations

import importlib.util
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner
from optimum_mosaic.allocation.outliers import wanda_scores
from optimum_mosaic.callbacks import (
    MASKS_NAME,
    GradualPruningCallback,
    SparsityPreservingCallback,
    prunable_linears,
    read_masks,
)
from optimum_mosaic.schedule import cubic_sparsity, prune_mask

DATA = [{"input_ids": row, "labels": row} for row in token_windows(n=32, seqlen=16)]
SCHEDULE = dict(final_sparsity=0.6, initial_sparsity=0.1, start_step=2, end_step=14, frequency=3)


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(TrainerCallback):
    """Records, after every optimizer step, the zero pattern of the weights and the callback's masks."""

    def __init__(self, pruning: SparsityPreservingCallback | None = None):
        self.pruning, self.weights, self.masks = pruning, {}, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.linears = prunable_linears(model)
        self.on_step_end(args, state, control)

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = {name: lin.weight != 0 for name, lin in self.linears.items()}
        if self.pruning is not None:
            self.masks[state.global_step] = {name: mask.clone() for name, mask in self.pruning.masks.items()}


class StartMasks(TrainerCallback):
    """Copies the masks a pruning callback starts training with (it must run after that callback)."""

    def __init__(self, pruning):
        self.pruning = pruning

    def on_train_begin(self, args, state, control, **kwargs):
        self.pruning.started_with = {name: mask.clone() for name, mask in self.pruning.masks.items()}


def train(model, callbacks, output_dir, steps=12, resume=None, **overrides):
    args = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        logging_steps=4,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model, args=TrainingArguments(**(args | overrides)), train_dataset=DATA, callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def pruned_llama():
    model = tiny_llama()
    Pruner(model).prune(PrunedConfig(sparsity=0.5, allocation="uniform", pruner="magnitude"))
    return model


def zeros(masks: dict) -> dict:
    return {name: int((~mask).sum()) for name, mask in masks.items()}


def expected_zeros(step: int, linears: dict) -> dict:
    level = cubic_sparsity(step, 0.1, 0.6, 2, 14, 3)
    return {name: round(level * lin.weight.numel()) for name, lin in linears.items()}


def test_preserving_callback_keeps_the_pruned_zeros(tmp_path):
    model = pruned_llama()
    linears = prunable_linears(model)
    masks = {name: lin.weight != 0 for name, lin in linears.items()}
    before = {name: lin.weight.detach().clone() for name, lin in linears.items()}
    assert all(z == m.numel() // 2 for z, m in zip(zeros(masks).values(), masks.values(), strict=True))
    callback = SparsityPreservingCallback()
    trainer = train(model, [callback], tmp_path)

    for name, lin in linears.items():
        assert torch.equal(lin.weight != 0, masks[name])
        assert torch.equal(callback.masks[name], masks[name])
        changed = (lin.weight != before[name])[masks[name]].float().mean()
        assert changed > 0.9  # the surviving weights were trained
        moments = trainer.optimizer.state[lin.weight]
        assert not moments["exp_avg"][~masks[name]].any() and not moments["exp_avg_sq"][~masks[name]].any()
    logged = [entry["sparsity"] for entry in trainer.state.log_history if "sparsity" in entry]
    assert len(logged) == 4 and all(value == pytest.approx(0.5) for value in logged)  # 3 logs + the summary
    assert callback.final_sparsity == pytest.approx(0.5)


def test_without_the_callback_adamw_regrows_the_zeros(tmp_path):
    model = pruned_llama()
    linears = prunable_linears(model)
    masks = {name: lin.weight != 0 for name, lin in linears.items()}
    train(model, [], tmp_path, steps=3)
    for name, lin in linears.items():
        regrown = (lin.weight != 0)[~masks[name]].float().mean()
        assert regrown > 0.9


def test_preserving_callback_applies_given_masks(tmp_path):
    model = tiny_llama()
    linears = prunable_linears(model, targets=["gate", "up"])
    masks = {name: prune_mask(lin.weight.abs(), 0.3) for name, lin in linears.items()}
    train(model, [SparsityPreservingCallback(masks=masks, targets=["gate", "up"])], tmp_path, steps=3)
    for name, lin in linears.items():
        assert torch.equal(lin.weight != 0, masks[name])
    q_proj = prunable_linears(model, targets=["q"])
    assert all(bool((lin.weight != 0).all()) for lin in q_proj.values())  # untouched projections stay dense
    with pytest.raises(ValueError, match="missing"):
        train(tiny_llama(), [SparsityPreservingCallback(masks={})], tmp_path, steps=1)


@pytest.fixture(scope="module")
def magnitude_run(tmp_path_factory):
    model = tiny_llama()
    callback = GradualPruningCallback(**SCHEDULE)
    recorder = Recorder(callback)
    train(model, [callback, recorder], tmp_path_factory.mktemp("magnitude"), steps=16)
    return model, callback, recorder


def assert_on_schedule(recorder, linears, steps=16):
    assert sorted(recorder.weights) == list(range(steps + 1))
    for step, pattern in recorder.weights.items():
        assert zeros(pattern) == expected_zeros(step, linears), step


def test_gradual_magnitude_reaches_the_final_sparsity_on_schedule(magnitude_run):
    model, callback, recorder = magnitude_run
    linears = prunable_linears(model)
    assert_on_schedule(recorder, linears)
    assert zeros(recorder.weights[16]) == {n: round(0.6 * lin.weight.numel()) for n, lin in linears.items()}
    assert [step for step, _ in callback.history] == [0, 5, 8, 11, 14]  # train begin, then every update
    assert callback.history[2][1] == pytest.approx(cubic_sparsity(8, 0.1, 0.6, 2, 14), abs=1e-3)
    assert callback.final_sparsity == pytest.approx(0.6, abs=1e-4)
    for earlier, later in pairwise(callback.history):  # magnitude masks only shrink
        for name in linears:
            old, new = recorder.weights[earlier[0]][name], recorder.weights[later[0]][name]
            assert not (new & ~old).any()


def test_gradual_wanda_follows_the_schedule_with_different_masks(tmp_path, magnitude_run):
    model = tiny_llama()
    callback = GradualPruningCallback(**SCHEDULE, method="wanda")
    recorder = Recorder(callback)
    train(model, [callback, recorder], tmp_path, steps=16)
    linears = prunable_linears(model)
    assert_on_schedule(recorder, linears)
    magnitude = magnitude_run[2].weights[16]
    differ = sum(int((recorder.weights[16][name] != magnitude[name]).sum()) for name in linears)
    assert differ > 100  # same data and seed: only the scores differ
    assert all(not lin._forward_hooks for lin in linears.values())  # hooks removed on train end


def test_wanda_update_uses_the_accumulated_input_norms(tmp_path):
    model = tiny_llama()
    callback = GradualPruningCallback(0.5, start_step=0, end_step=4, frequency=2, method="wanda", targets=["down"])
    args, state, control = SimpleNamespace(output_dir=str(tmp_path)), TrainerState(max_steps=4), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    (name, down), *_ = prunable_linears(model, targets=["down"]).items()
    sumsq = torch.zeros(down.in_features)

    def accumulate(module, inputs, output):
        sumsq.add_(inputs[0].reshape(-1, module.in_features).pow(2).sum(0))

    with torch.no_grad():
        handle = down.register_forward_hook(accumulate)
        model.train()(token_windows(4, 16, seed=1))
        handle.remove()
        model.eval()(token_windows(4, 16, seed=2))  # evaluation forwards do not count
    assert sumsq.any() and torch.allclose(callback._sumsq[name], sumsq)
    level = cubic_sparsity(2, 0.0, 0.5, 0, 4, 2)
    expected = prune_mask(wanda_scores(down.weight, callback._sumsq[name]), level)
    assert not torch.equal(expected, prune_mask(down.weight.abs(), level))  # Wanda ≠ magnitude here
    state.global_step = 2
    callback.on_step_end(args, state, control)
    assert torch.equal(callback.masks[name], expected)
    assert int((down.weight == 0).sum()) == round(level * down.weight.numel())
    assert not callback._sumsq[name].any()  # reset after the update
    callback.on_train_end(args, state, control)


def test_gradual_regrowth_stays_on_schedule_and_moves_masks(tmp_path):
    model = tiny_llama()
    callback = GradualPruningCallback(**SCHEDULE, regrowth_fraction=0.2)
    recorder = Recorder(callback)
    train(model, [callback, recorder], tmp_path, steps=16)
    linears = prunable_linears(model)
    for step, masks in recorder.masks.items():
        assert zeros(masks) == expected_zeros(step, linears), step
        for name, mask in masks.items():  # every masked entry is a zero weight
            assert not (recorder.weights[step][name] & ~mask).any()
    regrown = {}
    for step in (5, 8, 11):  # regrowth steps: start < t < end, every 3 steps from the start
        regrown[step] = sum(int((recorder.masks[step][n] & ~recorder.masks[step - 1][n]).sum()) for n in linears)
        grown_then_trained = sum(
            int((recorder.masks[step][n] & ~recorder.masks[step - 1][n] & recorder.weights[step + 1][n]).sum())
            for n in linears
        )
        assert grown_then_trained == regrown[step] > 0  # regrown at zero, then trained by the next step
    assert callback.final_sparsity == pytest.approx(0.6, abs=1e-4)


def test_checkpoint_masks_are_saved_and_restored_on_resume(tmp_path):
    schedule = dict(final_sparsity=0.5, start_step=0, end_step=9, frequency=3, regrowth_fraction=0.3)
    callback = GradualPruningCallback(**schedule)
    recorder = Recorder(callback)
    train(tiny_llama(), [callback, recorder], tmp_path, steps=10, save_strategy="steps", save_steps=6)
    saved = read_masks(str(tmp_path / "checkpoint-6"))
    assert (tmp_path / "checkpoint-6" / MASKS_NAME).is_file()
    assert all(torch.equal(saved[name], mask) for name, mask in recorder.masks[6].items())
    final = read_masks(str(tmp_path / "checkpoint-10" / MASKS_NAME))
    assert all(torch.equal(final[name], mask) for name, mask in callback.masks.items())

    # regrown entries are still zero in the saved weights: masks rebuilt from |W| would not be the saved ones
    assert sum(zeros(recorder.weights[6]).values()) > sum(zeros(saved).values())
    weights = load_file(str(tmp_path / "checkpoint-6" / "model.safetensors"))
    level = cubic_sparsity(6, 0.0, 0.5, 0, 9, 3)
    rebuilt = {name: prune_mask(weights[f"{name}.weight"].abs(), level) for name in saved}
    assert any(not torch.equal(rebuilt[name], saved[name]) for name in saved)

    resumed = GradualPruningCallback(**schedule)
    train(tiny_llama(seed=1), [resumed, StartMasks(resumed)], tmp_path, steps=10, resume=str(tmp_path / "checkpoint-6"))
    assert all(torch.equal(resumed.started_with[name], mask) for name, mask in saved.items())
    assert resumed.history[0] == (6, pytest.approx(level, abs=1e-3))
    assert resumed.final_sparsity == pytest.approx(0.5, abs=1e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers helper
def test_gradual_pruning_of_a_peft_model_prunes_the_base_weights(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    linears = prunable_linears(model)
    assert len(linears) == 21 and all(type(lin) is torch.nn.Linear for lin in linears.values())
    callback = GradualPruningCallback(0.5, end_step=4, frequency=2)
    train(model, [callback], tmp_path, steps=5)
    assert zeros(callback.masks) == {n: lin.weight.numel() // 2 for n, lin in linears.items()}
    assert all(int((lin.weight == 0).sum()) == lin.weight.numel() // 2 for lin in linears.values())
    assert [step for step, _ in callback.history] == [0, 2, 4]


def test_gradual_argument_validation():
    for kwargs, match in [
        (dict(final_sparsity=1.0), "< 1"),
        (dict(final_sparsity=0.3, initial_sparsity=0.5), "initial <= final"),
        (dict(final_sparsity=0.5, start_step=5, end_step=5), "start_step < end_step"),
        (dict(final_sparsity=0.5, frequency=0), "frequency"),
        (dict(final_sparsity=0.5, method="sparsegpt"), "method"),
        (dict(final_sparsity=0.5, regrowth_fraction=1.5), "regrowth_fraction"),
        (dict(final_sparsity=0.5, regrowth_frequency=0), "regrowth_frequency"),
        (dict(final_sparsity=0.5, targets=["qkv"]), "targets"),
    ]:
        with pytest.raises(ValueError, match=match):
            GradualPruningCallback(**kwargs)


def test_finetune_example_keeps_the_sparsity(tmp_path, capsys):
    checkpoint = tmp_path / "pruned"
    config = PrunedConfig(sparsity=0.5, allocation="uniform", pruner="magnitude")
    Pruner(tiny_llama(), char_tokenizer()).prune(config, save_directory=checkpoint)
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a fortune. " * 20)
    path = Path(__file__).parents[1] / "examples" / "finetune_with_callback.py"
    spec = importlib.util.spec_from_file_location("finetune_with_callback", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--model", str(checkpoint), "--text", str(text), "--max-steps", "3", "--seqlen", "32", "--cpu"]
    result = example.main([*argv, "--lr", "1e-2", "--output", str(tmp_path / "out")])
    assert result["sparsity_before"] == pytest.approx(0.5) and result["sparsity_after"] == result["sparsity_before"]
    assert "sparsity before 0.500000, after 0.500000" in capsys.readouterr().out
    PrunedModelForCausalLM.from_pretrained(tmp_path / "out")  # checks the zeros against the sidecar
