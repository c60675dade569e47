"""``import optimum_mosaic`` and the CLI's help and argument errors stay light: no torch, no Trainer utilities,
no peft or bitsandbytes (the timings are measured in benchmarks/startup.py, not here)."""

import ast
import json
import subprocess
import sys

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


def test_mosaic_classes_register_when_transformers_auto_models_load():
    code = """
import optimum_mosaic
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
assert "mosaic_llama" in CONFIG_MAPPING and "mosaic_opt" in CONFIG_MAPPING
assert MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING["mosaic_llama"]].__name__ == "MosaicLlamaForCausalLM"
"""
    loaded_after(code)


def test_the_builtin_method_names_are_the_registered_ones():
    code = "from optimum_mosaic.registry import list_methods; print([list_methods(k) for k in ('allocation', 'unstructured')])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    registered = ast.literal_eval(done.stdout.strip().splitlines()[-1])  # a fresh process: none registered by tests
    assert registered == [sorted(BUILTIN_METHODS["allocation"]), sorted(BUILTIN_METHODS["unstructured"])]
