"""One run of ``compare.py`` in its own process: load the checkpoint, prune (timed), count zeros, perplexity.

    python benchmarks/compare_worker.py '<json spec>'     # written by compare.py; prints one result line

The spec names the library (``mosaic``, ``llmcompressor`` or ``dense``), the checkpoint directory and a
``.pt`` file of token windows that the parent made once (calibration, held-out search windows, evaluation),
so every run of both libraries sees exactly the same tensors. Only torch, transformers and the light helpers
of optimum_mosaic (``evaluation.mean_nll``, ``calibration.data``) are imported at module level or in the
llm-compressor path, so this file also runs in llm-compressor's own virtual environment (older transformers).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

RESULT_PREFIX = "COMPARE_RESULT "


def peak_rss_mib() -> float:
    """VmHWM of this process in MiB (``ru_maxrss`` survives fork+exec on Linux, so it would report the parent's)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decoder_linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: weight}`` of every ``nn.Linear`` except the output head (the decoder layers' projections)."""
    head = model.get_output_embeddings()
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def sparsity(weights: dict[str, torch.Tensor], dense_numel: dict[str, int]) -> float:
    """Zeros / dense parameter count over the names of ``dense_numel``. Entries that structured pruning removed
    (a smaller weight, or a module gone) count as zeros, so composite and unstructured runs are comparable."""
    unknown = sorted(set(weights) - set(dense_numel))
    if unknown:
        raise ValueError(f"weights {unknown[:3]} were not in the dense model")
    total = sum(dense_numel.values())
    if total == 0:
        raise ValueError("the dense model has no decoder Linear weights to count")
    zeros = sum(int((w == 0).sum()) + dense_numel[n] - w.numel() for n, w in weights.items())
    zeros += sum(n for name, n in dense_numel.items() if name not in weights)
    return zeros / total


def head_sparsity(model: nn.Module) -> float:
    """Fraction of zeros in the output head (should stay at its dense value: neither library is asked to prune it)."""
    head = model.get_output_embeddings()
    return float((head.weight == 0).float().mean()) if head is not None else 0.0


def arranged_windows(calibration: torch.Tensor, held_out: torch.Tensor, seed: int) -> torch.Tensor:
    """Rows placed so that ``sample_windows(.., nsamples, .., seed, holdout)`` — the draw ``Pruner`` makes from
    pre-made windows — returns ``calibration`` in order and ``held_out`` as the held-out set. Checked, not assumed."""
    from optimum_mosaic.calibration.data import sample_windows

    rows = torch.cat([calibration, held_out])
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    out = torch.empty_like(rows)
    out[order] = rows
    got, rest = sample_windows(None, out, calibration.shape[0], calibration.shape[1], seed, held_out.shape[0])
    if not (torch.equal(got, calibration) and torch.equal(rest, held_out)):
        raise RuntimeError("sample_windows no longer draws pre-made windows by one seeded permutation; update this")
    return out


def prune_mosaic(model, windows: dict, spec: dict) -> tuple[nn.Module, dict]:
    """``Pruner.prune`` on the shared windows (plus the held-out windows when the λ/M search wants them)."""
    from optimum_mosaic import PrunedConfig, Pruner

    config = PrunedConfig(**spec["config"])
    if config.nsamples != windows["calibration"].shape[0] or config.seqlen != windows["calibration"].shape[1]:
        raise ValueError("the config's nsamples/seqlen must match the shared calibration windows")
    holdout = config.search_samples if config.search_grid and config.allocation.startswith("projection") else 0
    if holdout > windows["held_out"].shape[0]:
        raise ValueError(f"the λ/M search needs {holdout} held-out windows, the parent made fewer")
    data = arranged_windows(windows["calibration"], windows["held_out"][:holdout], config.seed)
    pruner = Pruner(model)
    start = time.perf_counter()
    pruner.prune(config, calibration_dataset=data)
    elapsed = time.perf_counter() - start
    used = pruner.report.calibration.get("held_out", holdout)
    if used != holdout:
        raise RuntimeError(f"Pruner held out {used} calibration windows, the worker arranged {holdout}")
    return pruner.model, {"prune_s": elapsed, "timings": pruner.report.timings}


def prune_llmcompressor(model, windows: dict, spec: dict) -> tuple[nn.Module, dict]:
    """llm-compressor's ``oneshot`` with SparseGPT or Wanda on the decoder layers, fed the shared windows as is."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from torch.utils.data import DataLoader

    # a decoder-layer class as the target prunes exactly the Linear layers inside the decoder layers;
    # targets=["Linear"] would reach lm_head whatever `ignore` says (module names gain a trailing ".")
    common = dict(sparsity=spec["sparsity"], targets=list(model._no_split_modules), ignore=["re:.*lm_head"])
    if spec["kernel"] == "sparsegpt":
        modifier = SparseGPTModifier(**common, dampening_frac=spec["dampening"], block_size=spec["block_size"])
    elif spec["kernel"] == "wanda":
        modifier = WandaPruningModifier(**common)
    else:
        raise ValueError(f"llm-compressor runs sparsegpt or wanda, not {spec['kernel']!r}")
    rows = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows["calibration"]]
    loader = DataLoader(rows, batch_size=1, shuffle=False)
    start = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=[modifier], processor=spec["model"])
    return model, {"prune_s": time.perf_counter() - start}


PRUNE = {"mosaic": prune_mosaic, "llmcompressor": prune_llmcompressor, "dense": lambda m, w, s: (m, {"prune_s": 0.0})}


def run(spec: dict) -> dict:
    """Load → prune (only this is timed) → zero counts → ``exp(mean_nll)`` on the shared evaluation windows."""
    from transformers import AutoModelForCausalLM

    from optimum_mosaic.evaluation import mean_nll

    if spec["library"] not in PRUNE:
        raise ValueError(f"library must be one of {sorted(PRUNE)}, got {spec['library']!r}")
    torch.set_num_threads(int(spec["threads"]))
    windows = torch.load(spec["windows"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    dense = {n: w.numel() for n, w in decoder_linear_weights(model).items()}
    head_dense = head_sparsity(model)  # GGUF-dequantised checkpoints hold some exact zeros already
    model, info = PRUNE[spec["library"]](model, windows, spec)
    model.eval()
    if spec.get("save_to"):  # for evaluations elsewhere (benchmarks/domains_table.py)
        model.save_pretrained(spec["save_to"])
    achieved = sparsity({n: w.detach() for n, w in decoder_linear_weights(model).items()}, dense)
    nll = mean_nll(model, windows["evaluation"], batch_size=1)
    return {
        "method": spec["method"],
        "library": spec["library"],
        "kernel": spec.get("kernel"),
        "repeat": spec.get("repeat", 0),
        "threads": torch.get_num_threads(),
        "sparsity": achieved,
        "lm_head_sparsity": head_sparsity(model),
        "lm_head_dense_sparsity": head_dense,
        "ppl": math.exp(nll),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        **info,
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: compare_worker.py '<json spec>'")
    result = run(json.loads(argv[0]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
