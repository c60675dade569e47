"""``import optimum_mosaic`` and the CLI's help and argument errors stay light: no torch, no Trainer utilities,
no peft or bitsandbytes (the timings are measured in benchmarks/startup.py, not here)."""

import ast
import json
import subprocess
import sys

import pytest

from optimum_mosaic.registry import BUILTIN_METHODS

HEAVY = ("torch", "transformers.trainer_utils", "peft", "bitsandbytes", "torch._inductor")


def loaded_after(code: str) -> dict:
    probe = f"import sys, json\n{code}\nprint(json.dumps({{m: m in sys.modules for m in {list(HEAVY)!r}}}))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_loads_nothing_heavy():
    assert loaded_after("import optimum_mosaic") == dict.fromkeys(HEAVY, False)


def test_help_and_argument_errors_load_nothing_heavy():
    code = """
from optimum_mosaic.commands import main
try:
    main(["prune", "--help"])
except SystemExit:
    pass
assert main(["prune", "--sparsity", "1.5"]) == 2
assert main(["prune", "--lamda", "auto", "--allocation", "layer"]) == 2
try:
    main(["prune", "--nsamples", "2.5"])
except SystemExit as done:
    assert done.code == 2
"""
    assert loaded_after(code) == dict.fromkeys(HEAVY, False)


def test_public_names_load_on_first_use():
    code = (
        "import optimum_mosaic as m\nassert m.Pruner.__name__ == 'Pruner' and m.PrunedConfig.__name__ == 'PrunedConfig'"
    )
    assert loaded_after(code)["torch"] is True
    assert loaded_after("import optimum_mosaic as m\nm.SparsityPreservingCallback")["transformers.trainer_utils"]


@pytest.fixture(scope="module")
def mosaic_checkpoint(tmp_path_factory):
    """A checkpoint whose layers differ, so it needs the registered Mosaic classes."""
    from conftest import char_tokenizer, tiny_llama, token_windows

    from optimum_mosaic import PrunedConfig, Pruner

    path = tmp_path_factory.mktemp("startup") / "composite"
    model = tiny_llama(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    config = PrunedConfig(sparsity=0.5, structured_sparsity=0.25, allocation="layer", lamda=0.2, nsamples=8, seqlen=32)
    Pruner(model, char_tokenizer()).prune(config, calibration_dataset=token_windows(8, 32), save_directory=path)
    assert model.config.model_type == "mosaic_llama"
    return path


@pytest.mark.parametrize(
    "code",
    [
        "import optimum_mosaic\nfrom transformers import AutoModelForCausalLM\nm = AutoModelForCausalLM.from_pretrained(P)",
        "import optimum_mosaic\nfrom transformers import AutoConfig\nm = AutoConfig.from_pretrained(P)",
        "from transformers import AutoModelForCausalLM\nimport optimum_mosaic\nm = AutoModelForCausalLM.from_pretrained(P)",
        # transformers' @auto_docstring imports modeling_auto while LlamaConfig is being defined: no warning there
        "import optimum_mosaic\nfrom transformers import AutoConfig\nAutoConfig.from_pretrained(P + '/../dense')\n"
        "from transformers import AutoModelForCausalLM\nm = AutoModelForCausalLM.from_pretrained(P)",
    ],
)
def test_auto_classes_read_mosaic_checkpoints_after_import_optimum_mosaic(mosaic_checkpoint, code):
    from conftest import tiny_llama

    if not (mosaic_checkpoint.parent / "dense").exists():
        tiny_llama().save_pretrained(mosaic_checkpoint.parent / "dense")
    script = f"P = {str(mosaic_checkpoint)!r}\n{code}\nprint(type(m).__name__)"
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] in ("MosaicLlamaForCausalLM", "MosaicLlamaConfig")


def test_the_builtin_method_names_are_the_registered_ones():
    code = "from optimum_mosaic.registry import list_methods; print([list_methods(k) for k in ('allocation', 'unstructured')])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    registered = ast.literal_eval(done.stdout.strip().splitlines()[-1])  # a fresh process: none registered by tests
    assert registered == [sorted(BUILTIN_METHODS["allocation"]), sorted(BUILTIN_METHODS["unstructured"])]
