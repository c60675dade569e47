"""The second audit's data-loss and false-fact items: a save replaces only the files Mosaic saves wrote (the manifest
in the sidecar), a card is written at save and merged with the one there, a sidecar whose figures the weights
contradict is refused, lost zeros are warned about, and a checkpoint that ships model code loads its tokenizer
without transformers' "run the custom code?" prompt."""

import json
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner, SparsityPreservingCallback
from optimum_mosaic.exceptions import CheckpointMismatchError, SparsityLostWarning
from optimum_mosaic.hub import push_to_hub
from optimum_mosaic.model_card import MARK_END, MARK_START
from optimum_mosaic.registry import BUILTIN_METHODS
from optimum_mosaic.serialization import clean_stale_staging

X = token_windows(4, 32)
WANDA = PrunedConfig(sparsity=0.5, allocation="uniform", pruner="wanda", nsamples=4, seqlen=32)


def prune(seed=0, config=WANDA, target=None, **model_overrides):
    model = tiny_llama(seed, **model_overrides)
    Pruner(model, char_tokenizer()).prune(config, calibration_dataset=X, save_directory=target)
    return model


def add_user_files(ck):
    (ck / "notes.txt").write_text("my notes")
    (ck / "results").mkdir()
    (ck / "results" / "r.json").write_text('{"acc": 0.5}')
    readme = (ck / "README.md").read_text()
    (ck / "README.md").write_text(readme.replace(MARK_START, "My own paragraph about this model.\n\n" + MARK_START))


def test_a_resave_keeps_the_users_files_and_card_text(tmp_path):
    """Audit 1: prune into ck, add notes.txt, results/r.json and edit README.md, prune again into ck."""
    ck = tmp_path / "ck"
    prune(0, target=ck)
    add_user_files(ck)
    second = prune(1, target=ck)
    assert (ck / "notes.txt").read_text() == "my notes" and (ck / "results" / "r.json").read_text() == '{"acc": 0.5}'
    readme = (ck / "README.md").read_text()
    assert "My own paragraph about this model." in readme and readme.count(MARK_START) == readme.count(MARK_END) == 1
    loaded = PrunedModelForCausalLM.from_pretrained(ck)  # the new checkpoint, whole
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, second.model.layers[0].mlp.up_proj.weight)
    manifest = json.loads((ck / "mosaic_config.json").read_text())["files"]
    assert "notes.txt" not in manifest and {"README.md", "mosaic_config.json", "model.safetensors"} <= set(manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no staging or backup folder left


def test_a_trainer_output_dir_survives_two_saves(tmp_path):
    """Audit 2: model.save_pretrained into a folder holding checkpoint-500/ and train.log, twice."""
    out = tmp_path / "out"
    (out / "checkpoint-500").mkdir(parents=True)
    (out / "checkpoint-500" / "trainer_state.json").write_text("{}")
    (out / "train.log").write_text("step 500")
    model = prune()
    model.save_pretrained(out)
    model.save_pretrained(out)
    assert (out / "train.log").read_text() == "step 500"
    assert (out / "checkpoint-500" / "trainer_state.json").read_text() == "{}"
    PrunedModelForCausalLM.from_pretrained(out)


def test_stale_shards_of_an_earlier_save_go_and_only_they(tmp_path):
    ck = tmp_path / "ck"
    model = prune()
    model.save_pretrained(ck, max_shard_size="100KB")
    shards = sorted(p.name for p in ck.glob("model-*.safetensors"))
    assert len(shards) > 1
    (ck / "model-notes.safetensors.txt").write_text("mine")  # looks like ours, is not in the manifest
    model.save_pretrained(ck)
    assert not list(ck.glob("model-*-of-*.safetensors")) and not (ck / "model.safetensors.index.json").exists()
    assert (ck / "model-notes.safetensors.txt").read_text() == "mine"
    PrunedModelForCausalLM.from_pretrained(ck)


def test_a_checkpoint_written_before_manifests_keeps_unknown_files(tmp_path):
    ck = tmp_path / "ck"
    prune(target=ck)
    sidecar = json.loads((ck / "mosaic_config.json").read_text())
    del sidecar["files"]
    (ck / "mosaic_config.json").write_text(json.dumps(sidecar))
    (ck / "eval.csv").write_text("a,b")
    prune(1, target=ck)
    assert (ck / "eval.csv").read_text() == "a,b"


def _killed_install(target, kill_after: int) -> None:
    """A process that dies (SIGKILL) after ``kill_after`` file moves of a save into an existing checkpoint."""
    code = f"""
import os, signal, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from conftest import char_tokenizer, tiny_llama, token_windows
from optimum_mosaic import PrunedConfig, Pruner
model = tiny_llama(1)
config = PrunedConfig(sparsity=0.5, allocation="uniform", pruner="wanda", nsamples=4, seqlen=32)
Pruner(model, char_tokenizer()).prune(config, calibration_dataset=token_windows(4, 32))
real, moves = os.replace, [0]
def replace(a, b):
    moves[0] += 1
    if moves[0] > {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
os.replace = replace
model.save_pretrained({str(target)!r})
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]


@pytest.mark.parametrize("kill_after", [1, 4, 9])
def test_a_save_killed_while_installing_is_rolled_back(tmp_path, kill_after):
    ck = tmp_path / "ck"
    first = prune(0, target=ck)
    add_user_files(ck)
    before = {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()}
    _killed_install(ck, kill_after)
    assert any(p.name.startswith(".ck.old-") for p in tmp_path.iterdir())  # killed mid-install
    clean_stale_staging(ck)  # what the next save to ck does first
    assert {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()} == before
    assert (ck / "results" / "r.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    loaded = PrunedModelForCausalLM.from_pretrained(ck)
    assert torch.equal(loaded.model.layers[1].self_attn.o_proj.weight, first.model.layers[1].self_attn.o_proj.weight)


def edit_sidecar(ck, **changes):
    sidecar = json.loads((ck / "mosaic_config.json").read_text())
    sidecar["report"].update(changes)
    (ck / "mosaic_config.json").write_text(json.dumps(sidecar))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"achieved_sparsity": 0.9}, "achieved_sparsity"),
        ({"per_type": {"q": 0.9}}, "per_type"),
        ({"per_layer": {"0": 0.5, "1": 0.5, "2": 0.7}}, r"per_layer\[2\]"),
    ],
)
def test_an_edited_sidecar_figure_is_refused(tmp_path, changes, field):
    """Audit 3: achieved_sparsity 0.9 written into a 50 % checkpoint's sidecar used to load and reach the card."""
    ck = tmp_path / "ck"
    prune(target=ck)
    edit_sidecar(ck, **changes)
    with pytest.raises(CheckpointMismatchError, match=f"{field}.*stated.*counted.*edited"):
        PrunedModelForCausalLM.from_pretrained(ck)
    with pytest.raises(CheckpointMismatchError, match=field):
        push_to_hub(ck, "tester/never", token="unused")  # refused before any network call
    counted = PrunedModelForCausalLM.from_pretrained(ck, check_sparsity=False)
    assert counted.mosaic_report.achieved_sparsity == 0.5 and counted.mosaic_report.per_type["q"] == 0.5


def test_the_card_is_written_at_save_with_what_was_measured(tmp_path):
    ck = tmp_path / "ck"
    prune(config=PrunedConfig(sparsity=0.5, pruner="magnitude", allocation="uniform", nsamples=4, seqlen=64), target=ck)
    card = (ck / "README.md").read_text()
    assert "No calibration data was used" in card and "4 × 64" not in card  # audit 4: said both
    assert "| calibration windows | none (this allocation and pruner need no data) |" in card
    assert "**50.00 %** sparsity, counted from the saved weights" in card


def test_every_builtin_method_has_a_card_description():
    from optimum_mosaic.model_card import _ALLOCATIONS, _PRUNERS

    assert set(BUILTIN_METHODS["unstructured"]) <= {k for k, v in _PRUNERS.items() if v}
    assert set(BUILTIN_METHODS["allocation"]) <= {k for k, v in _ALLOCATIONS.items() if v}
    assert f"`{PrunedConfig().pruner}`: ALPS started from SparseGPT" in _card_row(PrunedConfig().pruner)


def _card_row(pruner: str) -> str:
    from optimum_mosaic.model_card import _hyperparameters

    config = {**PrunedConfig().to_dict(), "pruner": pruner}
    return dict((k, v) for k, v in _hyperparameters(config, {"achieved_sparsity": 0.5}))["pruner"]


@pytest.mark.parametrize(
    "card, expected",
    [
        ("---\nlicense: mit\nbase_model: someone/base-7b\n---\n# base\n", ("mit", "someone/base-7b")),
        ("# no metadata\n", (None, None)),
    ],
)
def test_licence_and_base_model_come_from_the_source_checkpoint(tmp_path, card, expected):
    """Audit 4: licence and base_model used to reach the card only for a packaged alias."""
    from huggingface_hub import ModelCard

    src = tmp_path / "base"
    tiny_llama().save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    (src / "README.md").write_text(card)
    Pruner.from_pretrained(str(src)).prune(WANDA, calibration_dataset=X, save_directory=tmp_path / "out")
    data = ModelCard((tmp_path / "out" / "README.md").read_text()).data
    assert (data.license, data.base_model) == expected


def test_the_base_model_of_a_hub_cache_snapshot(tmp_path):
    from optimum_mosaic.packaged_models import source_record

    snapshot = tmp_path / "hub" / "models--someone--base-7b" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert source_record(str(snapshot), str(snapshot))["base_model"] == "someone/base-7b"
    assert source_record("smollm2-135m", "/cache/x")["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def lose_zeros(model):
    with torch.no_grad():
        for lin in (layer.mlp.up_proj for layer in model.model.layers):
            lin.weight.add_(1e-3 * (lin.weight == 0))


def test_lost_zeros_are_warned_at_save_and_at_reload(tmp_path):
    """Audit 5: a fine-tune without the callback used to save and reload silently."""
    model = prune()
    lose_zeros(model)
    with pytest.warns(SparsityLostWarning, match=r"saving: the weights hold sparsity 0\.\d+ but the prune left 0\.5"):
        model.save_pretrained(tmp_path / "ck")
    with pytest.warns(SparsityLostWarning, match="loading .* the prune left 0.5000"):
        PrunedModelForCausalLM.from_pretrained(tmp_path / "ck")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparsityLostWarning)  # an intact model: no warning
        prune().save_pretrained(tmp_path / "intact")
        PrunedModelForCausalLM.from_pretrained(tmp_path / "intact")


def test_the_callback_warns_when_there_is_nothing_to_preserve():
    from types import SimpleNamespace

    dense = tiny_llama()
    args, state = SimpleNamespace(output_dir="unused"), SimpleNamespace(global_step=0)
    with pytest.warns(SparsityLostWarning, match="hold no exact zeros"):
        SparsityPreservingCallback().on_train_begin(args, state, None, model=dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparsityLostWarning)
        SparsityPreservingCallback().on_train_begin(args, state, None, model=prune())


def test_a_remote_code_checkpoint_loads_its_tokenizer_without_a_prompt(tmp_path):
    """Audit 12: per-layer head counts ship model code (auto_map); AutoTokenizer used to stop at "[y/N]"."""
    ck = tmp_path / "composite"
    config = PrunedConfig(sparsity=0.5, pruner="wanda", nsamples=4, seqlen=32, structured_sparsity=0.2)
    prune(config=config, target=ck)  # uneven MLP widths per layer
    assert "auto_map" in json.loads((ck / "config.json").read_text())
    code = f"""
import optimum_mosaic
from transformers import AutoTokenizer
print("LOADED", type(AutoTokenizer.from_pretrained({str(ck)!r})).__name__)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300
    )
    assert "LOADED" in done.stdout and "custom code" not in done.stdout + done.stderr, done.stderr[-2000:]


def test_an_edited_sidecar_is_refused_at_a_quantized_load(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    ck = tmp_path / "ck"
    prune(target=ck)
    edit_sidecar(ck, achieved_sparsity=0.9)
    with pytest.raises(CheckpointMismatchError, match=r"achieved_sparsity: stated 0\.9, counted 0\.5"):
        PrunedModelForCausalLM.from_pretrained(ck, quantization_config=BitsAndBytesConfig(load_in_8bit=True))


def test_a_save_without_room_is_one_error_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    from optimum_mosaic.exceptions import SaveError

    ck = tmp_path / "ck"
    prune(target=ck)
    before = {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()}

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    with pytest.raises(SaveError, match=f"could not write the checkpoint to {ck} .*No space left.*nothing there"):
        prune(1).save_pretrained(ck)
    assert {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
