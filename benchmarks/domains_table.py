"""Quality where the model is used: perplexity on every evaluation domain and zero-shot accuracy, per method.

    python benchmarks/domains_table.py                                   # SmolLM2, 50 / 70 %, the default runs
    python benchmarks/domains_table.py --model gemma3-270m --sparsities 0.7 --runs "uniform SparseGPT" default
    python benchmarks/domains_table.py --resume                          # keeps the finished rows of --out
    python benchmarks/domains_table.py --table | --tasks-table | --headline   # RESULTS.md's tables, from --out

Calibration: 32 × 512 windows (seed 0) of the bundled corpus the run names: ``PrunedConfig()``'s (the mixed corpus
since issue 19) or the Austen novels (the only corpus before it). Decision metric (the only one any choice may use):
mean NLL on 16 held-out calibration windows, reported per part: 8 Austen windows (fiction), 4 code and 4 technical
prose windows of the mixed corpus (none of them in any run's calibration windows: asserted). Reported, never used to
choose: perplexity on the first ``--eval-windows`` × 512 tokens of each domain of ``optimum_mosaic.domains`` (Persuasion
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
from dtype_matmul import cpu_kind  # a benchmark beside this one: the script's folder is on sys.path

from optimum_mosaic import PrunedConfig, Pruner, perplexity
from optimum_mosaic.calibration.data import MIXED_SHARES, _shares, mixed_windows, sample_windows
from optimum_mosaic.domains import DOMAINS, domain_text
from optimum_mosaic.evaluation import mean_nll
from optimum_mosaic.zero_shot import evaluate_tasks, task_manager

AUSTEN = dict(calibration_corpus="austen")
RUNS = {
    "dense": None,
    "uniform SparseGPT": dict(allocation="uniform", pruner="sparsegpt", **AUSTEN),
    "uniform SparseGPT, mixed corpus": dict(allocation="uniform", pruner="sparsegpt", calibration_corpus="mixed"),
    "default": dict(),  # whatever PrunedConfig() does today (since issue 19: uniform ALPS-warm on the mixed corpus)
    "ALPS-warm, Austen (default before issue 19)": dict(allocation="uniform", pruner="alps_warm", **AUSTEN),
    "ALPS-warm, Austen, δ 0.1": dict(allocation="uniform", pruner="alps_warm", dampening=0.1, **AUSTEN),
    "ALPS-warm, Austen, δ 0.3": dict(allocation="uniform", pruner="alps_warm", dampening=0.3, **AUSTEN),
    "ALPS-warm, mixed corpus, δ 0.1": dict(allocation="uniform", pruner="alps_warm", dampening=0.1),
    "ALPS-warm, mixed corpus, ρ₀ 0.3, 12 iterations": dict(admm_rho=0.3, admm_iterations=12),  # layer_error.py's best
    "ALPS-warm, mixed corpus, dense target": dict(dense_target=True),  # solved for the dense model's outputs
    "uniform ALPS": dict(allocation="uniform", pruner="alps", **AUSTEN),
    "uniform ALPS, mixed corpus": dict(allocation="uniform", pruner="alps"),  # full ADMM + PCG on the default corpus
    "projection (auto) SparseGPT": dict(allocation="projection", pruner="sparsegpt", **AUSTEN),  # before issue 12
    "composite β=0.2 (default pruner)": dict(structured_sparsity=0.2),
    "structured only (MLP channels)": dict(structured_sparsity="all"),  # coarse-grained: all of S as whole units
    "llm-compressor SparseGPT (Austen)": "llmcompressor",  # SparseGPTModifier on uniform SparseGPT's windows
}
TASKS = ("mosaic_lastword_persuasion", "mosaic_nextsent_persuasion", "mosaic_lastword_shakespeare",
         "mosaic_nextsent_shakespeare")  # fmt: skip


def on_other_cpu(row: dict) -> bool:
    """Whether ``row`` ran elsewhere than the AVX2 VM (rows record ``dtype_matmul.cpu_kind()``; rows without it ran
    there): results move at the rounding level between BLAS paths, and prune times compare only on one machine."""
    return row.get("cpu", "AVX2") != "AVX2"


def held_out_windows(tokenizer, args) -> dict[str, torch.Tensor]:
    """Held-out calibration windows per part (the only data a choice may use): fiction from the Austen draw's
    held-out windows, code and technical prose from the mixed corpus's (disjoint from either corpus's
    calibration windows at this nsamples / seqlen / seed 0)."""
    fiction = sample_windows(tokenizer, None, args.nsamples, args.seqlen, 0, 16)[1][8:]
    held = mixed_windows(tokenizer, args.nsamples, args.seqlen, 0, 16)[1]
    counts = _shares(16, MIXED_SHARES)
    return {"fiction": fiction, "code": held[counts["fiction"] : -counts["prose"]], "prose": held[-counts["prose"] :]}


def llmcompressor_prune(args, tokenizer, sparsity: float):
    """llm-compressor's ``SparseGPTModifier`` (its own venv, ``--peer-python``) on the Austen calibration windows
    uniform SparseGPT uses, damp 0.01, block 128; the pruned model is saved there and loaded here."""
    import subprocess
    import tempfile

    from transformers import AutoModelForCausalLM

    from optimum_mosaic.packaged_models import resolve_model_path

    windows = sample_windows(tokenizer, None, args.nsamples, args.seqlen, 0, 0, "austen")[0]
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"calibration": windows, "held_out": windows[:0], "evaluation": windows[:1]}, f"{tmp}/w.pt")
        spec = {"method": "llmcompressor-sparsegpt", "library": "llmcompressor", "kernel": "sparsegpt",
                "model": str(resolve_model_path(args.model)), "windows": f"{tmp}/w.pt", "sparsity": sparsity,
                "dampening": 0.01, "block_size": 128, "threads": torch.get_num_threads(), "save_to": f"{tmp}/out"}  # fmt: skip
        worker = Path(__file__).with_name("compare_worker.py")
        env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run(
            [args.peer_python, str(worker), json.dumps(spec)], capture_output=True, text=True, env=env
        )
        result = [line for line in done.stdout.splitlines() if line.startswith("COMPARE_RESULT ")]
        if done.returncode or not result:
            raise RuntimeError(done.stderr[-2000:])
        model = AutoModelForCausalLM.from_pretrained(f"{tmp}/out", dtype=torch.float32).eval()
    return model, json.loads(result[-1].removeprefix("COMPARE_RESULT "))["prune_s"]


def quality(model, tokenizer, args, manager, held_out) -> dict:
    ppl = {
        d: round(perplexity(model, tokenizer, domain_text(d), args.seqlen, args.eval_windows, progress=False), 3)
        for d in DOMAINS
    }
    nll = {part: round(mean_nll(model, windows, 4), 5) for part, windows in held_out.items()}
    row = {"ppl": ppl, "calib_nll": nll["fiction"], "held_out_nll": nll}
    if args.task_limit:
        start = time.perf_counter()
        rows = evaluate_tasks(model, tokenizer, TASKS, limit=args.task_limit, batch_size=16, manager=manager)
        row["tasks"] = {f"{r.task}/{r.metric}": [round(r.value, 4), round(r.stderr or 0.0, 4)] for r in rows}
        row["eval_tasks_s"] = round(time.perf_counter() - start, 1)
    return row


def markdown(rows: list[dict], baseline: str = "uniform SparseGPT") -> str:
    """The rows as a table, by sparsity then in ``RUNS`` order; perplexity ratios against ``baseline`` at the same
    sparsity; the decision column is the mean NLL over the 16 held-out windows (8 fiction, 4 code, 4 prose)."""
    head = "| run | S | prune s | held-out NLL: mean (fiction / code / prose) | " + " | ".join(DOMAINS) + " |"
    lines = [head, "|" + "---|" * (4 + len(DOMAINS))]
    base = {r["sparsity"]: r for r in rows if r["run"] == baseline}
    order = list(RUNS)
    for r in sorted(rows, key=lambda r: (r["sparsity"], order.index(r["run"]) if r["run"] in order else 99)):
        parts = r.get("held_out_nll")
        nll = f"{r['calib_nll']:.3f} (fiction only)"
        if parts:
            mean = (8 * parts["fiction"] + 4 * parts["code"] + 4 * parts["prose"]) / 16
            nll = f"{mean:.3f} ({' / '.join(f'{v:.3f}' for v in parts.values())})"
        cells = []
        for d in DOMAINS:
            ref = base.get(r["sparsity"])
            ratio = f" ({r['ppl'][d] / ref['ppl'][d]:.3f}×)" if ref and r is not ref and r["sparsity"] else ""
            cells.append(f"{r['ppl'][d]:.2f}{ratio}")
        prune = f"{r['prune_s']:.1f}{OTHER_CPU_MARK if on_other_cpu(r) else ''}" if r["sparsity"] else "–"
        lines.append(f"| {r['run']} | {r['sparsity'] or '–'} | {prune} | {nll} | " + " | ".join(cells) + " |")
    return "\n".join(lines + other_cpu_note(rows))


def other_cpu_note(rows: list[dict]) -> list[str]:
    """A footnote for the rows marked ``OTHER_CPU_MARK`` (none when every row ran on the AVX2 VM)."""
    kinds = sorted({r["cpu"] for r in rows if on_other_cpu(r)})
    if not kinds:
        return []
    return ["", f"{OTHER_CPU_MARK} ran on another machine ({', '.join(kinds)}), not on the AVX2 VM of unmarked rows: "
            "its prune time compares only with rows of its own sequence, its figures differ at the rounding level."]  # fmt: skip


TASK_COLUMNS = (  # (task/metric, ...) per column of the zero-shot table; one cell may hold acc / acc_norm
    ("mosaic_lastword_persuasion/acc",),
    ("mosaic_nextsent_persuasion/acc", "mosaic_nextsent_persuasion/acc_norm"),
    ("mosaic_lastword_shakespeare/acc",),
    ("mosaic_nextsent_shakespeare/acc", "mosaic_nextsent_shakespeare/acc_norm"),
)
TASK_LABELS = {
    "mosaic_lastword_persuasion/acc": "last-word *Persuasion* / acc",
    "mosaic_nextsent_persuasion/acc": "next-sentence *Persuasion* / acc",
    "mosaic_nextsent_persuasion/acc_norm": "next-sentence *Persuasion* / acc_norm",
    "mosaic_lastword_shakespeare/acc": "last-word Shakespeare / acc",
    "mosaic_nextsent_shakespeare/acc": "next-sentence Shakespeare / acc",
    "mosaic_nextsent_shakespeare/acc_norm": "next-sentence Shakespeare / acc_norm",
}
OTHER_CPU_MARK = "†"
STRUCTURED_RUNS = ("composite β=0.2 (default pruner)", "structured only (MLP channels)")


def mean_accuracy(row: dict) -> tuple[float, float]:
    """Mean of the four tasks' ``acc`` and its standard error (the four stderrs combined: ``√(Σ se²) / 4``)."""
    cells = [row["tasks"][column[0]] for column in TASK_COLUMNS]
    return sum(v for v, _ in cells) / len(cells), sum(se * se for _, se in cells) ** 0.5 / len(cells)


def tasks_markdown(rows: list[dict]) -> str:
    """Zero-shot accuracy of every unstructured row that has it, by sparsity then in ``RUNS`` order (llm-compressor
    beside our SparseGPT rows)."""
    lines = [
        "| S | run | last-word *P.* | next-sent. *P.* acc / acc_norm | last-word Sh. | next-sent. Sh. acc / acc_norm "
        "| mean acc ± stderr |",
        "|---|---|---|---|---|---|---|",
    ]
    order = list(RUNS)
    order.insert(
        order.index("uniform SparseGPT, mixed corpus") + 1, order.pop(order.index("llm-compressor SparseGPT (Austen)"))
    )
    shown = [r for r in rows if "tasks" in r and r["run"] not in STRUCTURED_RUNS]
    for r in sorted(shown, key=lambda r: (r["sparsity"], order.index(r["run"]))):
        cells = [" / ".join(f"{r['tasks'][key][0]:.3f}" for key in column) for column in TASK_COLUMNS]
        mean, se = mean_accuracy(r)
        sparsity = f"{r['sparsity']:.0%}".replace("%", " %") if r["sparsity"] else "–"
        run = r["run"] + (f" {OTHER_CPU_MARK}" if on_other_cpu(r) else "")
        lines.append(f"| {sparsity} | {run} | " + " | ".join(cells) + f" | {mean:.3f} ± {se:.3f} |")
    return "\n".join(lines + other_cpu_note(shown))


def sigmas(difference: float, se_a: float, se_b: float) -> str:
    """``|difference|`` in units of the two standard errors combined, ``√(se_a² + se_b²)`` (a task at 0 or 1 accuracy
    has stderr 0: two such rows give "0.0" for no difference, "∞" otherwise)."""
    sigma = (se_a * se_a + se_b * se_b) ** 0.5
    return f"{abs(difference) / sigma:.1f}" if sigma else ("0.0" if difference == 0 else "∞")


def headline_markdown(rows: list[dict]) -> str:
    """Mosaic's headline: composite against structured-only pruning at each sparsity both were run at — perplexity
    on every domain (and how much lower the composite's is), then every task's accuracy with the difference in units
    of the two standard errors combined (σ)."""
    composite, coarse = STRUCTURED_RUNS
    pairs = {}
    for r in rows:
        if r["run"] in STRUCTURED_RUNS:
            pairs.setdefault(r["sparsity"], {})[r["run"]] = r
    pairs = {s: p for s, p in sorted(pairs.items()) if len(p) == 2}
    pct = {s: f"{s:.0%}".replace("%", " %") for s in pairs}
    lines = [
        "| S | composite: " + " / ".join(DOMAINS) + " | structured only | composite's perplexity lower by |",
        "|---|---|---|---|",
    ]
    for s, p in pairs.items():
        a, b = (" / ".join(f"{p[name]['ppl'][d]:.2f}" for d in DOMAINS) for name in (composite, coarse))
        lower = " / ".join(f"{100 * (1 - p[composite]['ppl'][d] / p[coarse]['ppl'][d]):.1f}" for d in DOMAINS)
        lines.append(f"| {pct[s]} | {a} | {b} | {lower} % |")
    dense = next((r for r in rows if r["run"] == "dense" and "tasks" in r), None)
    head = "| task / metric | " + " | ".join(f"{pct[s]}: composite | structured only | difference" for s in pairs)
    lines += ["", head + (" | dense |" if dense else " |"), "|---" * (1 + 3 * len(pairs) + bool(dense)) + "|"]
    for key, label in TASK_LABELS.items():
        cells = []
        for p in pairs.values():
            (va, sa), (vb, sb) = p[composite]["tasks"][key], p[coarse]["tasks"][key]
            cells += [f"{va:.3f} ± {sa:.3f}", f"{vb:.3f} ± {sb:.3f}", f"{va - vb:+.3f} ({sigmas(va - vb, sa, sb)} σ)"]
        tail = f" | {dense['tasks'][key][0]:.3f} |" if dense else " |"
        lines.append(f"| {label} | " + " | ".join(cells).replace("-", "−") + tail)
    cells = []
    for p in pairs.values():
        (ma, sa), (mb, sb) = mean_accuracy(p[composite]), mean_accuracy(p[coarse])
        relative = f"{100 * (ma / mb - 1):+.0f} % relative ({sigmas(ma - mb, sa, sb)} σ)".replace("-", "−")
        cells += [f"{ma:.3f}", f"{mb:.3f}", relative]
    tail = f" | {mean_accuracy(dense)[0]:.3f} |" if dense else " |"
    lines.append("| mean of the four tasks' acc | " + " | ".join(cells) + tail)
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--runs", nargs="+", default=["dense", "uniform SparseGPT", "default", "uniform ALPS"])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--task-limit", type=int, default=200)
    parser.add_argument("--out", default=None)
    parser.add_argument("--peer-python", default="/work/peer-venv/bin/python", help="a venv with llmcompressor")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--table", action="store_true", help="print --out as a markdown table; prune nothing")
    parser.add_argument(
        "--baseline", default="uniform SparseGPT", help="--table: the run perplexity ratios are against"
    )
    parser.add_argument("--tasks-table", action="store_true", help="print --out's zero-shot table; prune nothing")
    parser.add_argument(
        "--headline", action="store_true", help="print --out's composite vs structured-only tables; prune nothing"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out or f"benchmarks/results/domains_{args.model}.json")
    if args.table or args.tasks_table or args.headline:
        rows = json.loads(out.read_text())["rows"]
        tables = markdown(rows, args.baseline), tasks_markdown(rows), headline_markdown(rows)
        print(tables[0] if args.table else tables[1] if args.tasks_table else tables[2])
        return

    pruner = Pruner.from_pretrained(args.model)
    dense, tokenizer = pruner.model, pruner.tokenizer
    manager = task_manager(None, TASKS)
    held_out = held_out_windows(tokenizer, args)
    rows = json.loads(out.read_text())["rows"] if args.resume and out.exists() else []
    done = {(r["run"], r["sparsity"]) for r in rows}
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    for sparsity in args.sparsities:
        for name in args.runs:
            key = (name, 0.0 if RUNS[name] is None else sparsity)
            if key in done:
                continue
            model, elapsed, report = dense, 0.0, None
            if RUNS[name] == "llmcompressor":
                model, elapsed = llmcompressor_prune(args, tokenizer, sparsity)
            elif RUNS[name] is not None:
                pruner = Pruner(copy.deepcopy(dense), tokenizer)
                options = {k: sparsity if v == "all" else v for k, v in RUNS[name].items()}
                config = PrunedConfig(sparsity=sparsity, nsamples=args.nsamples, seqlen=args.seqlen, **options)
                start = time.perf_counter()
                model = pruner.prune(config)
                elapsed, report = time.perf_counter() - start, pruner.report
                seen = {tuple(w.tolist()) for w in pruner._windows}
                assert not any(tuple(w.tolist()) in seen for ws in held_out.values() for w in ws), "overlap"
            row = {"run": name, "sparsity": key[1], "prune_s": round(elapsed, 1), "cpu": cpu_kind()}
            row.update(quality(model, tokenizer, args, manager, held_out))
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
