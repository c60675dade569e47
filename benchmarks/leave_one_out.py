"""Generalisation measured on calibration data alone: each part of the mixed corpus left out of calibration in turn.

    python benchmarks/leave_one_out.py --sparsities 0.7 --runs default "ALPS-warm, mixed corpus, dense target"
    python benchmarks/leave_one_out.py --table          # the table in RESULTS.md, from --out

For every run of ``domains_table.RUNS`` (bundled-corpus runs only), sparsity and part P of the mixed corpus (fiction,
code, technical prose): calibrate on ``--nsamples`` × ``--seqlen`` windows of the two other parts in their relative
shares (fiction : code : prose = 2 : 1 : 1, so without prose 2 : 1), then measure the mean next-token NLL on
``--windows`` windows of P, a domain that calibration never saw. Everything comes from the calibration corpus; no
evaluation text is read. ``domains_table.py``'s held-out windows come from the same parts as the calibration
windows, so they reward fitting those parts; this check rewards what carries over to a part left out. Each run
prunes a fresh copy of the dense model. Writes ``benchmarks/results/leave_one_out_<model>.json`` after every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from domains_table import RUNS  # a benchmark beside this one: the script's folder is on sys.path
from dtype_matmul import cpu_kind

from optimum_mosaic import PrunedConfig, Pruner
from optimum_mosaic.calibration.data import MIXED_SHARES, _shares, bos_id, part_ids, split_windows
from optimum_mosaic.evaluation import mean_nll


def left_out_windows(tokenizer, left_out: str, nsamples: int, seqlen: int, windows: int, seed: int = 0):
    """``(calibration, evaluation)``: ``nsamples`` windows of the parts other than ``left_out`` in their shares of the
    mixed corpus (one seeded permutation per part, then one seeded order), and ``windows`` windows of ``left_out``."""
    if left_out not in MIXED_SHARES:
        raise ValueError(f"left_out must be one of {sorted(MIXED_SHARES)}, got {left_out!r}")
    generator = torch.Generator().manual_seed(seed)
    bos = bos_id(tokenizer)
    pools = {p: split_windows(part_ids(tokenizer, p), seqlen, bos) for p in MIXED_SHARES}
    drawn = {p: pool[torch.randperm(pool.shape[0], generator=generator)] for p, pool in pools.items()}
    kept = {p: s for p, s in MIXED_SHARES.items() if p != left_out}
    counts = _shares(nsamples, {p: s / sum(kept.values()) for p, s in kept.items()})
    calibration = torch.cat([drawn[p][: counts[p]] for p in kept])
    calibration = calibration[torch.randperm(calibration.shape[0], generator=generator)]
    return calibration, drawn[left_out][:windows]


def markdown(rows: list[dict]) -> str:
    """Mean NLL on the part left out, per run and sparsity (dense first), and the change against ``default``."""
    parts = [p for p in MIXED_SHARES if any(r["left_out"] == p for r in rows)]
    nll = {(r["run"], r["sparsity"], r["left_out"]): r["nll"] for r in rows}
    head = "| run | S | " + " | ".join(f"{p} left out" for p in parts) + " | mean |"
    lines = [head, "|" + "---|" * (len(parts) + 3)]
    order = list(RUNS)
    for run, s in sorted({(r["run"], r["sparsity"]) for r in rows}, key=lambda k: (k[1], order.index(k[0]))):
        cells = [nll.get((run, s, p)) for p in parts] + [None]
        base = [nll.get(("default", s, p)) for p in parts] + [None]
        for values in (cells, base):
            values[-1] = None if None in values[:-1] else sum(values[:-1]) / len(parts)  # the mean
        delta = run not in ("dense", "default")
        shown = ["–" if v is None else f"{v:.3f}" + (f" ({v - b:+.3f})" if delta and b is not None else "")
                 for v, b in zip(cells, base, strict=True)]  # fmt: skip
        label = "–" if run == "dense" else f"{s:.0%}".replace("%", " %")
        lines.append(f"| {run} | {label} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.7])
    parser.add_argument("--runs", nargs="+", default=["dense", "default"])
    parser.add_argument("--parts", nargs="+", default=list(MIXED_SHARES), choices=list(MIXED_SHARES))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16, help="windows of the left-out part measured")
    parser.add_argument("--out", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--table", action="store_true", help="print --out as a markdown table; prune nothing")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out or f"benchmarks/results/leave_one_out_{args.model}.json")
    if args.table:
        print(markdown(json.loads(out.read_text())["rows"]))
        return
    bad = [r for r in args.runs if RUNS[r] is not None and not isinstance(RUNS[r], dict)]
    if bad or any(isinstance(RUNS[r], dict) and "calibration_corpus" in RUNS[r] for r in args.runs):
        raise SystemExit(f"runs must calibrate on the windows given here (not another corpus or library): {args.runs}")
    dense = Pruner.from_pretrained(args.model)
    rows = json.loads(out.read_text())["rows"] if args.resume and out.exists() else []
    done = {(r["run"], r["sparsity"], r["left_out"]) for r in rows}
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    for sparsity in args.sparsities:
        for name in args.runs:
            for part in args.parts:
                key = (name, 0.0 if RUNS[name] is None else sparsity, part)
                if key in done:
                    continue
                windows, held = left_out_windows(dense.tokenizer, part, args.nsamples, args.seqlen, args.windows)
                model, elapsed = dense.model, 0.0
                if RUNS[name] is not None:
                    pruner = Pruner(copy.deepcopy(dense.model), dense.tokenizer)
                    config = PrunedConfig(sparsity=sparsity, nsamples=args.nsamples, seqlen=args.seqlen, **RUNS[name])
                    start = time.perf_counter()
                    model = pruner.prune(config, calibration_dataset=windows)
                    elapsed = time.perf_counter() - start
                row = {"run": name, "sparsity": key[1], "left_out": part, "nll": round(mean_nll(model, held, 4), 5),
                       "prune_s": round(elapsed, 1), "cpu": cpu_kind()}  # fmt: skip
                rows.append(row)
                done.add(key)
                print(row, flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(
                    json.dumps({"args": vars(args), "env": env, "rows": rows}, indent=1, ensure_ascii=False) + "\n"
                )


if __name__ == "__main__":
    main()
