"""The defaults a user gets are the ones the README documents (issue 12): the ``**Defaults**`` line of the README
names ``PrunedConfig()``'s method fields, and the README's main job parses to ``PrunedConfig()`` with only the
options it spells out changed."""

import ast
import re
import shlex
from pathlib import Path

from optimum_mosaic import PrunedConfig
from optimum_mosaic.commands import build_parser, config_from_args

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def test_the_readme_states_the_defaults():
    line = next(block for block in README.split("\n\n") if block.startswith("**Defaults**"))  # one paragraph
    stated = {key: ast.literal_eval(value) for key, value in re.findall(r"`(\w+)=([^`]+)`", line)}
    assert {"allocation", "pruner", "sparsity", "structured_sparsity"} <= set(stated), line
    default = PrunedConfig()
    assert {key: getattr(default, key) for key in stated} == stated


def test_the_main_job_runs_the_defaults():
    command = next(line for line in README.splitlines() if "optimum-mosaic prune" in line and "pip install" in line)
    argv = shlex.split(command.split("&& optimum-mosaic ", 1)[1])
    args = build_parser().parse_args(argv)
    assert args.command == "prune"
    config = config_from_args(args)
    spelled = {"sparsity": 0.5, "nsamples": 32, "seqlen": 512}
    assert config == PrunedConfig(**spelled)
    assert f"--sparsity {spelled['sparsity']}" in command
