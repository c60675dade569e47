"""Compressed checkpoints (sidecar format_version 2): exact round trips, the sparse kernel on load, code shipped for
trust_remote_code, and the sidecar checks on corrupted or truncated files."""

import json
import struct
import subprocess
import sys

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows
from safetensors import safe_open
from torch import nn

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner
from optimum_mosaic.architectures import named_projections
from optimum_mosaic.exceptions import CheckpointMismatchError
from optimum_mosaic.serialization import save_pruned
from optimum_mosaic.sparse import SparseLinear

X = token_windows(2, 16, seed=9)
GEN = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def pruned_tiny(sparsity: float = 0.7):
    model = tiny_llama()
    config = PrunedConfig(sparsity=sparsity, pruner="wanda", allocation="uniform", nsamples=4, seqlen=32)
    return Pruner(model, char_tokenizer()).prune(config, calibration_dataset=token_windows(8, 32))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = pruned_tiny()
    root = tmp_path_factory.mktemp("compressed")
    save_pruned(model, char_tokenizer(), root / "dense", model.mosaic_config, model.mosaic_report)
    save_pruned(model, char_tokenizer(), root / "packed", model.mosaic_config, model.mosaic_report, compressed=True)
    return model, root


def logits(model):
    with torch.no_grad():
        return model(X).logits


def test_compressed_round_trip_is_bit_exact(saved):
    model, root = saved
    loaded = PrunedModelForCausalLM.from_pretrained(root / "packed")
    assert all(type(m) is nn.Linear for m in named_projections(loaded).values())
    assert torch.equal(logits(loaded), logits(model))
    dense = PrunedModelForCausalLM.from_pretrained(root / "dense")
    for name, tensor in dense.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded.generate(X[:, :4], **GEN), model.generate(X[:, :4], **GEN))


def test_sidecar_and_config_name_the_format(saved):
    _, root = saved
    sidecar = json.loads((root / "packed" / "mosaic_config.json").read_text())
    assert sidecar["format_version"] == 2 and sidecar["config"]["format_version"] == 2
    assert sidecar["compressed"] == {"format": "bitmap64", "values_dtype": "float32"}
    config = json.loads((root / "packed" / "config.json").read_text())
    assert config["model_type"] == "mosaic_llama" and "AutoModelForCausalLM" in config["auto_map"]
    assert len(config["mosaic_compressed"]["nnz"]) == 21
    default = json.loads((root / "dense" / "config.json").read_text())
    assert "mosaic_compressed" not in default
    assert json.loads((root / "dense" / "mosaic_config.json").read_text())["format_version"] == 1


def test_projection_bytes_shrink_with_density(saved):
    """fp32 at 70 %: bitmaps 1 bit per weight, values 0.3 · 4 B, an int32 offset per 64-column row."""
    model, root = saved
    with safe_open(root / "packed" / "model.safetensors", "pt") as f:
        for name, lin in named_projections(model).items():
            parts = {p: f.get_tensor(f"{name}.weight_{p}") for p in ("bitmaps", "values", "offsets")}
            nnz = int((lin.weight != 0).sum())
            assert parts["values"].numel() == nnz and parts["values"].dtype == torch.float32
            stored = sum(t.numel() * t.element_size() for t in parts.values())
            rows, cols = lin.weight.shape
            assert stored == rows * -(-cols // 64) * 8 + nnz * 4 + rows * 4
            assert stored / lin.weight.numel() / 4 < 0.36  # 0.3 + 1/32 + 1/64 here (64-wide rows)


def test_sparse_kernel_from_compressed_and_dense_checkpoints(saved):
    model, root = saved
    expected, greedy = logits(model), model.generate(X[:, :4], **GEN)
    for name in ("packed", "dense"):
        loaded = PrunedModelForCausalLM.from_pretrained(root / name, sparse_kernel=True)
        assert all(isinstance(m, SparseLinear) for m in named_projections(loaded).values()), name
        torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(loaded.generate(X[:, :4], **GEN), greedy)


def test_save_pretrained_compressed_and_back(saved, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path / "c", compressed=True)
    assert json.loads((tmp_path / "c" / "mosaic_config.json").read_text())["format_version"] == 2
    loaded = PrunedModelForCausalLM.from_pretrained(tmp_path / "c", sparse_kernel=True)
    loaded.save_pretrained(tmp_path / "again", compressed=True)  # from the sparse kernel's own tensors
    assert torch.equal(logits(PrunedModelForCausalLM.from_pretrained(tmp_path / "again")), logits(model))
    loaded.save_pretrained(tmp_path / "plain")  # without compressed: the dense layout again (sidecar version 1)
    assert json.loads((tmp_path / "plain" / "mosaic_config.json").read_text())["format_version"] == 1
    from transformers import AutoModelForCausalLM

    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")), logits(model))


def test_bf16_values(saved, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path / "bf16", compressed=True, values_dtype=torch.bfloat16)
    loaded = PrunedModelForCausalLM.from_pretrained(tmp_path / "bf16", sparse_kernel=True)
    assert loaded.model.layers[0].mlp.up_proj.weight_values.dtype == torch.bfloat16
    rounded = pruned_tiny()
    with torch.no_grad():
        for lin in named_projections(rounded).values():
            lin.weight.copy_(lin.weight.bfloat16().float())
    torch.testing.assert_close(logits(loaded), logits(rounded), rtol=1e-5, atol=1e-5)


def test_remote_code_reads_the_compressed_checkpoint_without_optimum_mosaic(saved):
    model, root = saved
    out = root / "remote_logits.pt"
    script = f"""
import sys, torch
sys.modules["optimum_mosaic"] = None
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(root / "packed")!r}, trust_remote_code=True)
with torch.no_grad():
    torch.save(m(torch.tensor({X.tolist()})).logits, {str(out)!r})
print(type(m).__name__, type(m.model.layers[0].mlp.up_proj).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["MosaicLlamaForCausalLM", "Linear"]
    assert torch.equal(torch.load(out), logits(model))


def test_composite_compressed_round_trip(tmp_path):
    from test_composite import composite

    model = composite()
    save_pruned(model, None, tmp_path / "c", model.mosaic_config, model.mosaic_report, compressed=True)
    assert torch.equal(logits(PrunedModelForCausalLM.from_pretrained(tmp_path / "c")), logits(model))
    fast = PrunedModelForCausalLM.from_pretrained(tmp_path / "c", sparse_kernel=True)
    torch.testing.assert_close(logits(fast), logits(model), rtol=1e-5, atol=1e-5)


# -- sidecar checks on damaged files -------------------------------------------------------------------------------
def _tensor_bytes(path, key):
    """(start, end) byte positions of tensor ``key`` inside a safetensors file."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + size])[key]["data_offsets"]
    return 8 + size + begin, 8 + size + end


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst / "model.safetensors"


def test_a_flipped_bitmap_bit_is_refused(saved, tmp_path):
    weights = _copy(saved[1] / "packed", tmp_path / "c")
    start, _ = _tensor_bytes(weights, "model.layers.1.mlp.gate_proj.weight_bitmaps")
    raw = bytearray(weights.read_bytes())
    raw[start + 3] ^= 0x10
    weights.write_bytes(bytes(raw))
    with pytest.raises(
        CheckpointMismatchError, match=r"model\.layers\.1\.mlp\.gate_proj in .*model\.safetensors.*corrupted"
    ):
        PrunedModelForCausalLM.from_pretrained(tmp_path / "c")


def test_a_value_set_to_zero_is_refused_by_the_zero_count(saved, tmp_path):
    weights = _copy(saved[1] / "packed", tmp_path / "c")
    start, _ = _tensor_bytes(weights, "model.layers.0.self_attn.o_proj.weight_values")
    raw = bytearray(weights.read_bytes())
    raw[start : start + 4] = struct.pack("<f", 0.0)
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointMismatchError, match=r"o_proj: .* records \d+ zero weights"):
        PrunedModelForCausalLM.from_pretrained(tmp_path / "c", sparse_kernel=True)


def test_a_truncated_file_is_refused(saved, tmp_path):
    weights = _copy(saved[1] / "packed", tmp_path / "c")
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointMismatchError, match="truncated or corrupted"):
        PrunedModelForCausalLM.from_pretrained(tmp_path / "c")


def test_values_of_the_wrong_length_are_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = _copy(saved[1] / "packed", tmp_path / "c")
    tensors = load_file(weights)
    key = "model.layers.2.mlp.down_proj.weight_values"
    tensors[key] = tensors[key][:-5].clone()
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError):
        PrunedModelForCausalLM.from_pretrained(tmp_path / "c")


def test_the_card_of_a_compressed_checkpoint_tells_the_truth(saved):
    """Parameters are counted as the dense matrices the bitmaps stand for (not bitmap bytes), and the card says the
    file holds the bitmap format instead of claiming dense storage."""
    from optimum_mosaic.model_card import facts_from_dir, render_card

    _, root = saved
    assert facts_from_dir(root / "packed").parameters == facts_from_dir(root / "dense").parameters
    packed, dense = str(render_card(root / "packed")), str(render_card(root / "dense"))
    assert "bitmap format (a bitmap per 64 columns" in packed and "stored in dense matrices" not in packed
    assert "stored in dense matrices" in dense and "bitmap format (a bitmap per 64 columns" not in dense
    on_kernel = PrunedModelForCausalLM.from_pretrained(root / "packed", sparse_kernel=True)
    assert f"| parameters | {facts_from_dir(root / 'dense').parameters:,} |" in str(render_card(on_kernel))
