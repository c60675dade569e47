"""Perplexity of allocations × sparsities (and back-ends) on the real SmolLM2-135M.

    python benchmarks/allocation_table.py --nsamples 32 --seqlen 512 --eval-windows 40

Every run starts from the same dense weights and the same calibration windows; perplexity is measured
on the first ``--eval-windows`` windows of the held-out novel (*Persuasion*), never on calibration text.
Writes ``benchmarks/results/allocation_table.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from optimum_mosaic import PrunedConfig, Pruner, perplexity
from optimum_mosaic.report import format_table

RUNS = {
    "uniform": dict(allocation="uniform"),
    "layer (OWL λ=0.08 M=5)": dict(allocation="layer", lamda=0.08, outlier_threshold=5),
    "projection (auto)": dict(allocation="projection"),
    "projection (paper λ=0.08 M=5)": dict(allocation="projection", lamda=0.08, outlier_threshold=5),
    "projection_official (λ=0.08 M=5)": dict(allocation="projection_official", lamda=0.08, outlier_threshold=5),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    parser.add_argument(
        "--backends", nargs="*", default=["wanda", "magnitude"], help="extra back-ends, uniform at the last sparsity"
    )
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results/allocation_table.json")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out, run the missing ones")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    pruner = Pruner.from_pretrained(args.model)
    dense = pruner.model  # kept aside: a prune may shrink the model (the lossless clean-up of emptied channels)
    evaluate = lambda: perplexity(
        pruner.model, pruner.tokenizer, seqlen=args.seqlen, max_windows=args.eval_windows, progress=False
    )  # noqa: E731
    rows = json.loads(Path(args.out).read_text())["rows"] if args.resume and Path(args.out).exists() else []
    if not rows:
        rows = [{"run": "dense", "pruner": "-", "sparsity": 0.0, "ppl": evaluate()}]
        print(rows[0], flush=True)
    done = {(r["run"], r["pruner"], r["sparsity"]) for r in rows}
    jobs = [(name, "sparsegpt", s) for s in args.sparsities for name in args.runs]
    jobs += [("uniform", b, args.sparsities[-1]) for b in args.backends]
    jobs = [job for job in jobs if job not in done]
    for name, backend, sparsity in jobs:
        pruner = Pruner(copy.deepcopy(dense), pruner.tokenizer)
        config = PrunedConfig(
            sparsity=sparsity,
            pruner=backend,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            calibration_corpus="austen",
            **RUNS[name],
        )
        start = time.perf_counter()
        pruner.prune(config)
        elapsed = time.perf_counter() - start  # before the evaluation below
        report = pruner.report
        row = {
            "run": name,
            "pruner": backend,
            "sparsity": sparsity,
            "ppl": evaluate(),
            "achieved": report.achieved_sparsity,
            "lamda": report.lamda,
            "M": report.outlier_threshold,
            "prune_s": round(elapsed, 1),
            "search": report.search,
        }
        rows.append(row)
        print({k: v for k, v in row.items() if k != "search"}, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    print(format_table(rows, ["run", "pruner", "sparsity", "achieved", "lamda", "M", "ppl", "prune_s"]))


if __name__ == "__main__":
    main()
