"""bf16 / fp16 checkpoints (what real models ship): pruned in their own dtype for every family (each layer runs and
is solved in fp32 while resident, rounded to its dtype once), exact zeros kept, saved in that dtype with the dtype in the sidecar, reloaded in it; masks those of fp32 pruning of the same
(rounded) weights up to the dtype's rounding; ``Pruner.from_pretrained(dtype="auto")`` and ``--offload`` keep it."""

import copy
import json

import pytest
import torch
from test_architectures import CONFIGS, SMALL, UNITS, VOCAB, X, tiny
from transformers import AutoModelForCausalLM

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner
from optimum_mosaic.architectures import named_projections
from optimum_mosaic.evaluation import mean_nll
from optimum_mosaic.exceptions import CheckpointMismatchError

pytestmark = pytest.mark.usefixtures("one_thread")
HELD_OUT = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))


def shipped(model_type: str, directory, dtype=torch.bfloat16):
    """A tiny model as real ones ship: saved in ``dtype``, loaded with ``from_pretrained`` (a ``.to(dtype)`` would
    also cast the rotary buffers transformers keeps in fp32); and the same checkpoint loaded in fp32."""
    tiny(model_type).to(dtype).save_pretrained(directory)
    load = AutoModelForCausalLM.from_pretrained
    return load(directory, dtype=dtype).eval(), load(directory, dtype=torch.float32).eval()


def weights(model) -> dict[str, torch.Tensor]:
    return {name: lin.weight.detach().clone() for name, lin in named_projections(model).items()}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_bf16_prune_keeps_the_dtype_and_the_fp32_masks(model_type, tmp_path):
    rounded, reference = shipped(model_type, tmp_path / "dense")  # the same weights, pruned in bf16 and in fp32
    config = PrunedConfig(sparsity=0.5, **SMALL)
    Pruner(reference, None).prune(config, calibration_dataset=X)
    Pruner(rounded, None).prune(config, calibration_dataset=X, save_directory=tmp_path / "out")

    got, want = weights(rounded), weights(reference)
    assert {w.dtype for w in got.values()} == {torch.bfloat16}
    assert {n: int((w == 0).sum()) for n, w in got.items()} == {n: int((w == 0).sum()) for n, w in want.items()}
    agree = sum(int(((got[n] == 0) == (want[n] == 0)).sum()) for n in got) / sum(w.numel() for w in got.values())
    # the layers run in fp32 during the walk; what differs is the bf16 embedding / rotary outputs they are fed
    assert agree >= 0.96, agree
    # the bf16 prune is as good: held-out NLL of both, evaluated in fp32, within 0.5 %
    assert mean_nll(copy.deepcopy(rounded).float(), HELD_OUT, 4) <= 1.005 * mean_nll(reference, HELD_OUT, 4)

    assert json.loads((tmp_path / "out" / "mosaic_config.json").read_text())["dtype"] == "bfloat16"
    loaded = PrunedModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == torch.bfloat16
    assert all(torch.equal(w, got[n]) for n, w in weights(loaded).items())
    with torch.no_grad():
        assert torch.equal(loaded(X[:2]).logits, rounded(X[:2]).logits)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_fp16_composite_prune(model_type, tmp_path):
    model = shipped(model_type, tmp_path / "dense", torch.float16)[0]
    config = PrunedConfig(sparsity=0.5, structured_sparsity=0.2, structured_units=UNITS[model_type], **SMALL)
    Pruner(model, None).prune(config, calibration_dataset=X, save_directory=tmp_path / "out")
    report = model.mosaic_report
    assert {w.dtype for w in weights(model).values()} == {torch.float16}
    assert report.structured_sparsity > 0.1 and abs(report.achieved_sparsity - 0.5) < 0.01
    with torch.no_grad():
        assert torch.isfinite(model(X[:2]).logits).all()
    loaded = PrunedModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == torch.float16 and loaded.mosaic_sidecar["dtype"] == "float16"
    assert loaded.mosaic_report.achieved_sparsity == report.achieved_sparsity


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    tiny("llama").to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("offload", [False, True])
def test_from_pretrained_auto_keeps_the_checkpoint_dtype(bf16_checkpoint, tmp_path, offload):
    assert Pruner.from_pretrained(bf16_checkpoint).model.dtype == torch.float32  # the default computes in fp32
    pruner = Pruner.from_pretrained(bf16_checkpoint, dtype="auto", offload=offload)
    assert pruner.model.dtype == torch.bfloat16
    pruner.prune(PrunedConfig(sparsity=0.5, **SMALL), calibration_dataset=X, save_directory=tmp_path / "out")
    loaded = PrunedModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == torch.bfloat16 and loaded.mosaic_sidecar["dtype"] == "bfloat16"
    assert abs(loaded.mosaic_report.achieved_sparsity - 0.5) < 1e-3
    assert PrunedModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).dtype == torch.float32


def test_bad_dtypes_are_one_line_errors(bf16_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="dtype=torch.int8: use .auto."):
        Pruner.from_pretrained(bf16_checkpoint, dtype="int8")
    model = tiny("llama")
    Pruner(model, None).prune(PrunedConfig(sparsity=0.5, **SMALL), calibration_dataset=X, save_directory=tmp_path)
    sidecar = tmp_path / "mosaic_config.json"
    record = json.loads(sidecar.read_text())
    assert record["dtype"] == "float32"
    sidecar.write_text(json.dumps({**record, "dtype": "float8"}))
    with pytest.raises(CheckpointMismatchError, match="records dtype 'float8'"):
        PrunedModelForCausalLM.from_pretrained(tmp_path)
    assert PrunedModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32
    del record["dtype"]  # a checkpoint from before the field: float32, as it was written
    sidecar.write_text(json.dumps(record))
    assert PrunedModelForCausalLM.from_pretrained(tmp_path).dtype == torch.float32
