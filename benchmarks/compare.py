"""Mosaic vs llm-compressor on one model and one calibration set: prune time, peak RSS, sparsity, perplexity.

    python benchmarks/compare.py                                   # default subset, real SmolLM2-135M
    python benchmarks/compare.py --methods uniform-sparsegpt llmcompressor-sparsegpt --repeats 3
    python benchmarks/compare.py --peer-python /work/peer-venv/bin/python --threads 2

Methods: ``{uniform,owl,projection}-{magnitude,wanda,sparsegpt,alps_warm}``, ``default`` (``PrunedConfig()``'s
allocation and pruner), ``composite`` (projection + SparseGPT with ``--structured`` of the weights removed as whole units), ``dense`` (no pruning) and ``llmcompressor-{sparsegpt,
wanda}`` (``oneshot`` with ``SparseGPTModifier`` / ``WandaPruningModifier``, dampening 0.01, block 128, the decoder
layers as targets). The parent draws the calibration windows once (``sample_windows`` on the bundled corpus,
``--seed``) and the evaluation windows once (the first ``--eval-windows`` windows of *Persuasion*, exactly as
``optimum_mosaic.perplexity`` cuts them), saves them, and starts one subprocess per run (``compare_worker.py``)
with the same torch thread count. A worker times only the prune call, counts zeros among the decoder Linear
weights with one function for both libraries, and reports its own peak RSS (VmHWM) and ``exp(mean NLL)``.
Runs are interleaved (``for r in repeats: for m in methods``); the table shows median prune time and the ratios
ours / llm-compressor of the same kernel (sparsegpt ↔ SparseGPTModifier, wanda ↔ WandaPruningModifier).

llm-compressor pins an older transformers, so it usually lives in its own venv: ``--peer-python`` (default: this
interpreter if it can import llmcompressor, else ``$MOSAIC_PEER_PYTHON``, else those rows are skipped).
Writes ``--out`` (JSON), the Markdown table next to it (``.md``) and a plot (``.png``, needs matplotlib).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from compare_worker import RESULT_PREFIX

WORKER = Path(__file__).with_name("compare_worker.py")
ALLOCATIONS = {"uniform": "uniform", "owl": "layer", "projection": "projection"}
KERNELS = ("magnitude", "wanda", "sparsegpt", "alps_warm")
PEER = "llmcompressor"
PEER_KERNELS = ("sparsegpt", "wanda")
OURS = [f"{a}-{k}" for a in ALLOCATIONS for k in KERNELS] + ["composite", "default"]
ALL_METHODS = ["dense", *OURS, *(f"{PEER}-{k}" for k in PEER_KERNELS)]
DEFAULT_METHODS = [
    "dense",
    "uniform-sparsegpt",
    "uniform-wanda",
    "projection-sparsegpt",
    "projection-wanda",
    "owl-sparsegpt",
    "composite",
    f"{PEER}-sparsegpt",
    f"{PEER}-wanda",
]
COLUMNS = ["method", "kernel", "sparsity", "ppl", "prune_s", "peak_rss_mib", "time vs llmc", "ppl vs llmc"]


def method_spec(name: str, args) -> dict:
    """The worker spec of one method (without paths): library, kernel and, for ours, the ``PrunedConfig`` fields."""
    if name == "dense":
        return {"library": "dense", "kernel": None}
    if name.startswith(f"{PEER}-"):
        kernel = name.removeprefix(f"{PEER}-")
        if kernel not in PEER_KERNELS:
            raise ValueError(f"{name}: llm-compressor kernels are {PEER_KERNELS}")
        return {"library": PEER, "kernel": kernel, "sparsity": args.sparsity, "dampening": 0.01, "block_size": 128}
    if name == "default":  # PrunedConfig()'s allocation and pruner, whatever they are
        from optimum_mosaic import PrunedConfig

        default = PrunedConfig()
        allocation, kernel, extra = default.allocation, default.pruner, {}
    elif name == "composite":
        allocation, kernel, extra = "projection", "sparsegpt", {"structured_sparsity": args.structured}
    else:
        allocation, _, kernel = name.partition("-")
        if allocation not in ALLOCATIONS or kernel not in KERNELS:
            raise ValueError(f"unknown method {name!r}; choose from {ALL_METHODS}")
        allocation, extra = ALLOCATIONS[allocation], {}
    config = dict(allocation=allocation, pruner=kernel, sparsity=args.sparsity, nsamples=args.nsamples)
    config.update(seqlen=args.seqlen, seed=args.seed, dampening=0.01, block_size=128, **extra)
    return {"library": "mosaic", "kernel": kernel, "config": config}


def resolve_peer_python(given: str | None) -> tuple[str | None, str]:
    """The interpreter for llm-compressor runs and a note saying where it came from (``None``: skip them)."""
    if given:
        if not Path(given).exists():
            raise SystemExit(f"--peer-python {given} does not exist")
        return given, f"llm-compressor runs use {given} (--peer-python)"
    if importlib.util.find_spec("llmcompressor") is not None:
        return sys.executable, "llm-compressor runs use this interpreter"
    env = os.environ.get("MOSAIC_PEER_PYTHON")
    if env and Path(env).exists():
        return env, f"llm-compressor runs use $MOSAIC_PEER_PYTHON={env}"
    return None, "llm-compressor is not importable here and $MOSAIC_PEER_PYTHON is unset: its rows are skipped"


def make_windows(model_path: str, args, holdout: int, path: Path) -> dict:
    """Calibration (+ held-out search) windows from the bundled corpus and the evaluation windows, saved once."""
    from transformers import AutoTokenizer

    from optimum_mosaic.calibration.data import bos_id, load_default_corpus, sample_windows, split_windows, tokenize

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calibration, held_out = sample_windows(tokenizer, None, args.nsamples, args.seqlen, args.seed, holdout)
    text = tokenize(tokenizer, load_default_corpus("evaluation"))
    evaluation = split_windows(text, args.seqlen, bos_id(tokenizer))[: args.eval_windows]
    if evaluation.shape[0] < args.eval_windows:
        raise SystemExit(f"Persuasion holds only {evaluation.shape[0]} windows of {args.seqlen} tokens")
    windows = {"calibration": calibration, "held_out": held_out, "evaluation": evaluation}
    torch.save(windows, path)
    return windows


def run_worker(python: str, spec: dict, env: dict, timeout: float | None = None) -> dict:
    """Run one spec in a fresh process; its result, or ``{"error": ...}`` with the tail of its stderr."""
    try:
        proc = subprocess.run(
            [python, str(WORKER), json.dumps(spec)], capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"method": spec["method"], "repeat": spec["repeat"], "error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"method": spec["method"], "repeat": spec["repeat"], "error": "\n".join(tail)}
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def aggregate(runs: list[dict], order: list[str]) -> list[dict]:
    """One row per method: median prune time and perplexity over repeats, the largest peak RSS."""
    rows = []
    for method in order:
        ok = [r for r in runs if r["method"] == method and "error" not in r]
        failed = [r for r in runs if r["method"] == method and "error" in r]
        if not ok:
            if failed:
                rows.append({"method": method, "error": failed[-1]["error"].splitlines()[-1]})
            continue
        first = ok[0]
        rows.append(
            {
                "method": method,
                "library": first["library"],
                "kernel": first["kernel"] or "-",
                "sparsity": first["sparsity"],
                "lm_head_sparsity": max(r["lm_head_sparsity"] for r in ok),
                "lm_head_dense_sparsity": first.get("lm_head_dense_sparsity", 0.0),
                "ppl": statistics.median(r["ppl"] for r in ok),
                "prune_s": statistics.median(r["prune_s"] for r in ok),
                "prune_s_all": [r["prune_s"] for r in ok],
                "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
                "repeats": len(ok),
                "failed": len(failed),
            }
        )
    return rows


def add_ratios(rows: list[dict]) -> list[dict]:
    """``time_ratio`` and ``ppl_ratio`` = ours / the llm-compressor row of the same kernel (``None`` if none)."""
    peer = {r["kernel"]: r for r in rows if r.get("library") == PEER}
    for row in rows:
        ref = peer.get(row.get("kernel")) if row.get("library") == "mosaic" else None
        row["time_ratio"] = row["prune_s"] / ref["prune_s"] if ref and ref["prune_s"] > 0 else None
        row["ppl_ratio"] = row["ppl"] / ref["ppl"] if ref else None
    return rows


def markdown(rows: list[dict]) -> str:
    """The Markdown table (ratios as ``0.850×``; an lm_head column only if some run added zeros to the head)."""
    from optimum_mosaic.report import format_table

    columns = list(COLUMNS)
    if any(r.get("lm_head_sparsity", 0) > r.get("lm_head_dense_sparsity", 0) + 1e-9 for r in rows):
        columns.insert(3, "lm_head_sparsity")
    table = []
    for r in rows:
        ratios = {"time vs llmc": r.get("time_ratio"), "ppl vs llmc": r.get("ppl_ratio")}
        shown = {k: "-" if v is None else f"{v:.3f}×" for k, v in ratios.items()}
        prune_s = r.get("prune_s")
        table.append({**r, **shown, "prune_s": f"{prune_s:.1f}" if prune_s is not None else "-"})
    errors = [f"- {r['method']} failed: {r['error']}" for r in rows if "error" in r]
    return "\n".join([format_table([r for r in table if "error" not in r], columns), *errors])


def plot(rows: list[dict], path: Path) -> str:
    """Prune time and perplexity per method as two bar charts; returns a note (matplotlib may be missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    rows = [r for r in rows if "error" not in r]
    names = [r["method"] for r in rows]
    colours = [
        "tab:orange" if r["library"] == PEER else "tab:grey" if r["library"] == "dense" else "tab:blue" for r in rows
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.5), sharey=True)
    for ax, key, label in zip(
        axes, ("prune_s", "ppl"), ("prune time (s, median)", "perplexity (Persuasion)"), strict=True
    ):
        ax.barh(names, [r[key] for r in rows], color=colours)
        ax.set_xlabel(label)
    axes[0].invert_yaxis()  # first method on top (the y axis is shared)
    fig.suptitle("optimum-mosaic (blue) vs llm-compressor (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="packaged alias or a local checkpoint directory")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--structured", type=float, default=0.25, help="structured_sparsity of the composite method")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help=f"any of {ALL_METHODS}")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default="benchmarks/results/compare.json")
    p.add_argument("--peer-python", default=None, help="python of a venv with llmcompressor")
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker run")
    args = p.parse_args(argv)
    for name in args.methods:
        method_spec(name, args)  # fail on a bad name before any work
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    return args


def main(argv=None) -> dict:
    from optimum_mosaic import PrunedConfig
    from optimum_mosaic.packaged_models import resolve_model_path

    args = parse_args(argv)
    model_path = resolve_model_path(args.model)
    methods = list(dict.fromkeys(args.methods))
    notes = []
    peer_python = None
    if any(m.startswith(f"{PEER}-") for m in methods):
        peer_python, note = resolve_peer_python(args.peer_python)
        notes.append(note)
        print(note, flush=True)
        if peer_python is None:
            methods = [m for m in methods if not m.startswith(f"{PEER}-")]
    root = str(Path(importlib.util.find_spec("optimum_mosaic").origin).parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        windows_path = Path(tmp) / "windows.pt"
        make_windows(model_path, args, PrunedConfig().search_samples, windows_path)
        base = {"model": model_path, "windows": str(windows_path), "threads": args.threads}
        for repeat in range(args.repeats):
            for method in methods:
                spec = {**method_spec(method, args), **base, "method": method, "repeat": repeat}
                python = peer_python if spec["library"] == PEER else sys.executable
                result = run_worker(python, spec, env, args.timeout)
                runs.append(result)
                shown = {k: result[k] for k in ("sparsity", "ppl", "prune_s", "peak_rss_mib", "error") if k in result}
                print(f"[{repeat + 1}/{args.repeats}] {method}: {shown}", flush=True)
    rows = add_ratios(aggregate(runs, methods))
    table = markdown(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    notes.append(plot(rows, out.with_suffix(".png")))
    print(notes[-1])
    report = {"args": vars(args), "model_path": model_path, "peer_python": peer_python, "notes": notes}
    report.update(runs=runs, rows=rows)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    return report


if __name__ == "__main__":
    main()
