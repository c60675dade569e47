"""Run by ``test_accelerate.py`` under ``accelerate launch`` (and imported by it for the 1-process reference):
prune a tiny random Llama with each configuration of ``CONFIGS`` and save every rank's weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_llama, token_windows  # noqa: E402

from optimum_mosaic import PrunedConfig, Pruner  # noqa: E402
from optimum_mosaic.calibration.distributed import world  # noqa: E402

# 8 calibration windows × 32 tokens (+2 held out for the λ/M search of projection allocation)
BASE = dict(sparsity=0.5, nsamples=8, seqlen=32, search_samples=2)
CONFIGS = {
    "projection_sparsegpt": dict(allocation="projection", pruner="sparsegpt"),
    "uniform_wanda": dict(allocation="uniform", pruner="wanda"),
    "projection_sparsegpt_layer": dict(allocation="projection", pruner="sparsegpt", sequential="layer"),
    "composite": dict(allocation="projection", pruner="sparsegpt", structured_sparsity=0.2),
}


def prune_all() -> dict[str, dict[str, torch.Tensor]]:
    """``{configuration: state_dict}`` of the tiny model pruned with every configuration."""
    windows = token_windows(10, 32)
    out = {}
    for name, options in CONFIGS.items():
        model = tiny_llama()
        Pruner(model).prune(PrunedConfig(**BASE, **options), calibration_dataset=windows)
        out[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    rank, size = world()
    torch.save({"world_size": size, "weights": prune_all()}, Path(sys.argv[1]) / f"rank{rank}.pt")
    if size > 1:
        torch.distributed.destroy_process_group()
