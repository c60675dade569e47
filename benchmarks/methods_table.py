"""The other one-shot methods next to SparseGPT and Mosaic on the real SmolLM2-135M, at 50 % and 70 %.

    python benchmarks/methods_table.py                       # all runs; --resume keeps finished rows
    python benchmarks/methods_table.py --runs "uniform ALPS" --sparsities 0.5

Same protocol as ``allocation_table.py`` (same dense weights, 32 × 512 calibration windows, perplexity on the
first 40 × 512 tokens of *Persuasion*), so the Mosaic rows of ``results/allocation_table.json`` are comparable;
they are copied into the printed table as reference. Writes ``benchmarks/results/methods_table.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from optimum_mosaic import PrunedConfig, Pruner, perplexity
from optimum_mosaic.calibration.data import sample_windows
from optimum_mosaic.evaluation import mean_nll
from optimum_mosaic.report import format_table

RUNS = {
    "uniform SparseGPT": dict(allocation="uniform", pruner="sparsegpt"),
    "sensitivity (proxy, α=0.1) SparseGPT": dict(allocation="sensitivity", pruner="sparsegpt"),
    "sensitivity (Hutchinson, α=0.1) SparseGPT": dict(allocation="sensitivity_hutchinson", pruner="sparsegpt"),
    "uniform SparseGPT + ISC": dict(allocation="uniform", pruner="sparsegpt", saliency="isc"),
    "sensitivity (Hutchinson) + ISC": dict(allocation="sensitivity_hutchinson", pruner="sparsegpt", saliency="isc"),
    "uniform ALPS": dict(allocation="uniform", pruner="alps"),
    "uniform APT": dict(allocation="uniform", pruner="apt"),
    "uniform SparseGPT, two-pass (sequential=layer)": dict(
        allocation="uniform", pruner="sparsegpt", sequential="layer"
    ),
    "uniform ALPS, two-pass (sequential=layer)": dict(allocation="uniform", pruner="alps", sequential="layer"),
    # issue 12: where ALPS's gain comes from, on the whole model (see layer_error.py for the layer-level study)
    "projection (auto) SparseGPT": dict(allocation="projection", pruner="sparsegpt"),  # the default before
    "uniform SparseGPT + refit": dict(allocation="uniform", pruner="sparsegpt_refit"),
    "uniform ALPS-warm": dict(allocation="uniform", pruner="alps_warm"),  # whatever alps_warm's defaults are
    "uniform ALPS-warm (ρ₀ 0.3, 12 it, 3 CG)": dict(
        allocation="uniform", pruner="alps_warm", admm_rho=0.3, admm_iterations=12, cg_iterations=3
    ),
    "uniform ALPS-warm (ρ₀ 0.5, 6 it, 3 CG)": dict(
        allocation="uniform", pruner="alps_warm", admm_rho=0.5, admm_iterations=6, cg_iterations=3
    ),
    "uniform ALPS-warm (ρ₀ 0.5, 9 it, 0 CG)": dict(
        allocation="uniform", pruner="alps_warm", admm_rho=0.5, admm_iterations=9, cg_iterations=0
    ),
    "layer (OWL λ=0.08 M=5) ALPS-warm": dict(allocation="layer", pruner="alps_warm"),
    "sensitivity (Hutchinson, α=0.1) ALPS-warm": dict(allocation="sensitivity_hutchinson", pruner="alps_warm"),
    "projection (λ=-0.03 M=5) ALPS-warm": dict(
        allocation="projection", pruner="alps_warm", lamda=-0.03, outlier_threshold=5
    ),
    "projection (paper λ=0.08 M=5) ALPS-warm": dict(
        allocation="projection", pruner="alps_warm", lamda=0.08, outlier_threshold=5
    ),
    "projection (auto) ALPS-warm": dict(allocation="projection", pruner="alps_warm"),
    # a cheaper λ search: the candidates pruned by a cheaper kernel, the winner by ALPS-warm
    "projection (auto, SparseGPT search) ALPS-warm": dict(
        allocation="projection", pruner="alps_warm", search_pruner="sparsegpt"
    ),
    "projection (auto, Wanda search) ALPS-warm": dict(
        allocation="projection", pruner="alps_warm", search_pruner="wanda"
    ),
    "default": dict(),  # whatever PrunedConfig() does today
}
REFERENCE = ("projection (auto)", "layer (OWL λ=0.08 M=5)")  # rows of allocation_table.json shown alongside


def reference_rows(path: Path, sparsities) -> list[dict]:
    if not path.exists():
        return []
    rows = json.loads(path.read_text())["rows"]
    keep = [r for r in rows if r["run"] in REFERENCE and r["pruner"] == "sparsegpt" and r["sparsity"] in sparsities]
    return [{**r, "run": f"{r['run']} SparseGPT (allocation_table.json)"} for r in keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results/methods_table.json")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out, run the missing ones")
    args = parser.parse_args()

    pruner = Pruner.from_pretrained(args.model)
    dense = pruner.model  # kept aside: a prune may shrink the model (the lossless clean-up of emptied channels)
    evaluate = lambda: perplexity(  # noqa: E731
        pruner.model, pruner.tokenizer, seqlen=args.seqlen, max_windows=args.eval_windows, progress=False
    )
    # the decision metric (defaults are chosen on calibration text, never on Persuasion): mean NLL on 8 windows of
    # the calibration corpus that neither the calibration set nor the λ search's held-out set (the next 8) touch
    unseen = sample_windows(pruner.tokenizer, None, args.nsamples, args.seqlen, 0, 16)[1][8:]
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if args.resume and out.exists() else []
    done = {(r["run"], r["sparsity"]) for r in rows}
    for sparsity in args.sparsities:
        for name in args.runs:
            if (name, sparsity) in done:
                continue
            pruner = Pruner(copy.deepcopy(dense), pruner.tokenizer)
            config = PrunedConfig(
                sparsity=sparsity, nsamples=args.nsamples, seqlen=args.seqlen, calibration_corpus="austen", **RUNS[name]
            )
            start = time.perf_counter()
            pruner.prune(config)
            elapsed = time.perf_counter() - start  # before the evaluation below
            report = pruner.report
            row = {
                "run": name,
                "sparsity": sparsity,
                "ppl": evaluate(),
                "calib_nll": round(mean_nll(pruner.model, unseen, 4), 5),
                "achieved": report.achieved_sparsity,
                "lamda": report.lamda,
                "search": report.search,
                "prune_s": round(elapsed, 1),
                "timings": report.timings,
                "plan_range": [min(v for layer in report.plan.values() for v in layer.values()),
                               max(v for layer in report.plan.values() for v in layer.values())],
            }  # fmt: skip
            rows.append(row)
            print({k: v for k, v in row.items() if k != "timings"}, flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, ensure_ascii=False) + "\n")
    table = rows
    if args.model == "smollm2-135m":  # allocation_table.json holds SmolLM2 rows only
        table += reference_rows(out.parent / "allocation_table.json", args.sparsities)
    base = {r["sparsity"]: r["ppl"] for r in rows if r["run"] == "uniform SparseGPT"}
    for r in table:
        r["vs uniform SparseGPT"] = f"{r['ppl'] / base[r['sparsity']]:.3f}×" if r["sparsity"] in base else "-"
    table.sort(key=lambda r: (r["sparsity"], r["ppl"]))
    print(format_table(table, ["run", "sparsity", "achieved", "calib_nll", "ppl", "vs uniform SparseGPT", "prune_s"]))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
