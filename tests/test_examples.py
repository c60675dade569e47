"""Every example runs, end to end, on a tiny checkpoint (the same code that runs on SmolLM2-135M)."""

import runpy
from pathlib import Path

import pytest
from conftest import char_tokenizer, tiny_llama

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families. "
) * 12


def example(name: str):
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="example")["main"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    dense = root / "dense"
    tiny_llama(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, hidden_size=96).save_pretrained(dense)
    char_tokenizer().save_pretrained(dense)
    (root / "text.txt").write_text(TEXT)
    return root


@pytest.fixture(scope="module")
def pruned(files):
    argv = ["--model", str(files / "dense"), "--text", str(files / "text.txt"), "--output", str(files / "pruned")]
    result = example("prune_smollm2")(argv + ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "2"])
    return files / "pruned", result


def test_prune_example(pruned):
    _, result = pruned
    assert result["report"].achieved_sparsity == pytest.approx(0.5, abs=2e-3)
    assert result["report"].structured_sparsity == pytest.approx(0.25, abs=0.06)
    assert result["parameters"] < tiny_llama(num_hidden_layers=2, hidden_size=96).num_parameters()
    assert 1 < result["dense"] < 3 * 96 and 1 < result["pruned"] < 3 * 96  # random weights: near the vocabulary size


def test_distributed_example_on_one_process(files):
    # launched on 2 processes (accelerate, gloo) in tests/integrations/test_accelerate.py
    argv = ["--model", str(files / "dense"), "--text", str(files / "text.txt"), "--output", str(files / "distributed")]
    result = example("distributed_prune")(argv + ["--nsamples", "4", "--seqlen", "32"])
    assert result["world_size"] == 1 and result["report"].achieved_sparsity == pytest.approx(0.5, abs=2e-3)
    assert (files / "distributed" / "model.safetensors").exists()


def test_distributed_example_forks_its_own_processes(files, monkeypatch, capfd):
    # --procs 2 without a launcher: two forked processes (gloo, file rendezvous) save what one process saves
    from safetensors.torch import load_file

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    module = runpy.run_path(str(EXAMPLES / "distributed_prune.py"), run_name="example")
    argv = ["--model", str(files / "dense"), "--text", str(files / "text.txt"), "--nsamples", "4", "--seqlen", "32"]
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module["launch_here"]([*argv, "--output", str(files / "forked")], 2)
        assert "2 process(es)" in capfd.readouterr().out
        module["main"]([*argv, "--output", str(files / "alone")])
    finally:
        torch.set_num_threads(threads)
    forked, alone = (load_file(str(files / d / "model.safetensors")) for d in ("forked", "alone"))
    assert forked.keys() == alone.keys() and all(torch.equal(forked[k], alone[k]) for k in alone)
    assert any(int((t == 0).sum()) > t.numel() // 3 for t in forked.values())  # pruned, not copied


@pytest.mark.parametrize("bits", ["4", "8"])
def test_bnb_example(pruned, files, bits):
    pytest.importorskip("bitsandbytes")
    path, _ = pruned
    argv = ["--model", str(path), "--bits", bits, "--prompt", "It is a", "--seqlen", "32", "--eval-windows", "2"]
    result = example("bnb_on_pruned")(argv + ["--text", str(files / "text.txt")])
    assert result["report"].masks_intact and result["report"].sparsity_before > 0.3
    assert len(result["text"]) > 0
    assert result["perplexity"]["quantized"] == pytest.approx(result["perplexity"]["full"], rel=0.25)


def test_lora_example(pruned, files):
    pytest.importorskip("peft")
    path, pruned_result = pruned
    argv = ["--model", str(path), "--text", str(files / "text.txt"), "--steps", "3", "--seqlen", "32"]
    result = example("lora_on_pruned")(argv + ["--output", str(files / "lora")])
    # a composite checkpoint: the sparsity of the report (removed weights count as zeros of the dense shapes), not
    # the zero fraction of the shrunk matrices (0.33 here)
    assert result["after"] == result["before"] == pytest.approx(pruned_result["report"].achieved_sparsity, abs=1e-6)
    assert result["before"] == pytest.approx(0.5, abs=2e-3)

    from optimum_mosaic import PrunedModelForCausalLM

    PrunedModelForCausalLM.from_pretrained(files / "lora")  # zero counts checked against the sidecar
