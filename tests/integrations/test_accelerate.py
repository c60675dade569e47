"""``accelerate launch`` with the shipped config (integrations/accelerate/cpu_2proc.yaml): 2 CPU processes each
calibrate on half of the windows, the statistics are all-reduced over gloo, and both ranks end with exactly the
weights (so the masks) of a 1-process prune."""

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import distributed_worker  # noqa: E402
from conftest import char_tokenizer, tiny_llama  # noqa: E402

CONFIG = ROOT / "integrations" / "accelerate" / "cpu_2proc.yaml"
EXAMPLE = ROOT / "examples" / "distributed_prune.py"
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(ACCELERATE is None, reason="accelerate is not installed next to this interpreter")
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40


def launch(script: Path, *args: str) -> str:
    """Run ``script`` on 2 processes with the shipped config; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}  # each process its own set/dict hash order
    env["OMP_NUM_THREADS"] = "1"
    cmd = [ACCELERATE, "launch", "--config_file", str(CONFIG), str(script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_config_is_a_local_two_process_cpu_launch():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIG))
    assert (config.num_processes, config.num_machines, config.use_cpu, config.mixed_precision) == (2, 1, True, "no")
    assert config.main_process_port == 0  # a free port: launches can run side by side


@pytest.fixture(scope="module")
def one_process(one_thread):
    return distributed_worker.prune_all()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    launch(HERE / "distributed_worker.py", str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", list(distributed_worker.CONFIGS))
def test_two_processes_prune_exactly_like_one(one_process, two_processes, name):
    reference = one_process[name]
    assert [r["world_size"] for r in two_processes] == [2, 2]
    for rank in two_processes:
        weights = rank["weights"][name]
        assert weights.keys() == reference.keys()
        for key, w in reference.items():
            assert weights[key].shape == w.shape, key
            assert torch.equal(weights[key] == 0, w == 0), f"{name}: mask of {key}"
            assert torch.equal(weights[key], w), f"{name}: weights of {key}"
    zeros = sum(int((w == 0).sum()) for k, w in reference.items() if "proj" in k)
    dense = sum(w.numel() for k, w in reference.items() if "proj" in k)
    assert zeros / dense > 0.3  # the models compared are pruned
    if name == "composite":  # units were removed: some shapes shrank
        dense_shapes = {k: w.shape for k, w in tiny_llama().state_dict().items()}
        assert any(w.shape != dense_shapes[k] for k, w in reference.items())


def test_example_saves_once_from_rank_zero(tmp_path, one_thread):
    dense = tmp_path / "dense"
    tiny_llama(num_hidden_layers=2).save_pretrained(dense)
    char_tokenizer().save_pretrained(dense)
    (tmp_path / "text.txt").write_text(TEXT)
    argv = ["--model", str(dense), "--text", str(tmp_path / "text.txt"), "--nsamples", "8", "--seqlen", "32"]
    argv += ["--structured-sparsity", "0.2"]
    stdout = launch(EXAMPLE, *argv, "--output", str(tmp_path / "two"))
    assert stdout.count("2 process(es)") == 1  # only rank 0 reports (and writes)
    main = runpy.run_path(str(EXAMPLE), run_name="example")["main"]
    result = main(argv + ["--output", str(tmp_path / "one")])
    assert result["world_size"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "one", "text.txt", "two"]  # no staging left
    one, two = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert (tmp_path / "two" / "mosaic_config.json").exists()

    from optimum_mosaic import PrunedModelForCausalLM

    PrunedModelForCausalLM.from_pretrained(tmp_path / "two")  # shapes and zero counts checked against the sidecar
