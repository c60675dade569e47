"""Quality where the model is used: perplexity on every evaluation domain and zero-shot accuracy, per method.

    python benchmarks/domains_table.py                                   # SmolLM2, 50 / 70 %, the default runs
    python benchmarks/domains_table.py --model gemma3-270m --sparsities 0.7 --runs "uniform SparseGPT" default
    python benchmarks/domains_table.py --resume                          # keeps the finished rows of --out

Calibration: the bundled Austen novels (32 × 512 windows, seed 0), as a user who passes no data. Decision metric
(the only one any choice may use): mean NLL on 8 held-out calibration windows. Reported, never used to choose:
perplexity on the first ``--eval-windows`` × 512 tokens of each domain of ``optimum_mosaic.domains`` (Persuasion
is in-domain: same author as the calibration) and accuracy on the package's offline lm-eval tasks
(``optimum_mosaic.zero_shot``; first ``--task-limit`` examples). Every run prunes a fresh copy of the dense model;
prune time is the prune alone. Writes ``benchmarks/results/domains_<model>.json`` after every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from optimum_mosaic import PrunedConfig, Pruner, perplexity
from optimum_mosaic.calibration.data import sample_windows
from optimum_mosaic.domains import DOMAINS, domain_text
from optimum_mosaic.evaluation import mean_nll
from optimum_mosaic.zero_shot import evaluate_tasks, task_manager

RUNS = {
    "dense": None,
    "uniform SparseGPT": dict(allocation="uniform", pruner="sparsegpt"),
    "default": dict(),  # whatever PrunedConfig() does today
    "uniform ALPS": dict(allocation="uniform", pruner="alps"),
    "uniform ALPS-warm (ρ₀ 0.3, 12 it, 3 CG)": dict(
        allocation="uniform", pruner="alps_warm", admm_rho=0.3, admm_iterations=12, cg_iterations=3
    ),
    "projection (auto) SparseGPT": dict(allocation="projection", pruner="sparsegpt"),  # the default before issue 12
    "composite β=0.2 (default pruner)": dict(structured_sparsity=0.2),
    "structured only (MLP channels)": dict(structured_sparsity="all"),  # coarse-grained: all of S as whole units
}
TASKS = ("mosaic_lastword_persuasion", "mosaic_nextsent_persuasion", "mosaic_lastword_shakespeare",
         "mosaic_nextsent_shakespeare")  # fmt: skip


def quality(model, tokenizer, args, manager, unseen) -> dict:
    ppl = {
        d: round(perplexity(model, tokenizer, domain_text(d), args.seqlen, args.eval_windows, progress=False), 3)
        for d in DOMAINS
    }
    start = time.perf_counter()
    rows = evaluate_tasks(model, tokenizer, TASKS, limit=args.task_limit, batch_size=8, manager=manager)
    tasks = {f"{r.task}/{r.metric}": [round(r.value, 4), round(r.stderr or 0.0, 4)] for r in rows}
    return {"ppl": ppl, "tasks": tasks, "calib_nll": round(mean_nll(model, unseen, 4), 5),
            "eval_tasks_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--runs", nargs="+", default=["dense", "uniform SparseGPT", "default", "uniform ALPS"])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--task-limit", type=int, default=200)
    parser.add_argument("--out", default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    out = Path(args.out or f"benchmarks/results/domains_{args.model}.json")

    pruner = Pruner.from_pretrained(args.model)
    dense, tokenizer = pruner.model, pruner.tokenizer
    manager = task_manager(None, TASKS)
    unseen = sample_windows(tokenizer, None, args.nsamples, args.seqlen, 0, 16)[1][8:]
    rows = json.loads(out.read_text())["rows"] if args.resume and out.exists() else []
    done = {(r["run"], r["sparsity"]) for r in rows}
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    for sparsity in args.sparsities:
        for name in args.runs:
            key = (name, 0.0 if RUNS[name] is None else sparsity)
            if key in done:
                continue
            model, elapsed, report = dense, 0.0, None
            if RUNS[name] is not None:
                pruner = Pruner(copy.deepcopy(dense), tokenizer)
                options = {k: sparsity if v == "all" else v for k, v in RUNS[name].items()}
                config = PrunedConfig(sparsity=sparsity, nsamples=args.nsamples, seqlen=args.seqlen, **options)
                start = time.perf_counter()
                model = pruner.prune(config)
                elapsed, report = time.perf_counter() - start, pruner.report
            row = {"run": name, "sparsity": key[1], "prune_s": round(elapsed, 1)}
            row.update(quality(model, tokenizer, args, manager, unseen))
            if report is not None:
                row.update(achieved=report.achieved_sparsity, structured=report.structured_sparsity,
                           timings=report.timings)  # fmt: skip
            rows.append(row)
            done.add(key)
            print({k: v for k, v in row.items() if k != "timings"}, flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            payload = {"args": vars(args), "env": env, "domains": {d: DOMAINS[d].description for d in DOMAINS}}
            out.write_text(json.dumps({**payload, "rows": rows}, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
