"""ALPS kernel time before/after the speed-ups, on real SmolLM2-135M layers, and how far the results move.

    python benchmarks/alps_speed.py --baseline 2f5738a --layers 10 29 --sparsities 0.5 0.7

The baseline is ``optimum_mosaic/pruning/alps.py`` as of the git revision ``--baseline`` (one float64 ``eigh`` per
projection, re-assembled per ρ). Both versions prune the seven projections of a layer in order with one shared
``InputStatistics`` per input group, exactly as a prune does, on one thread; the time is the process CPU time,
best of ``--repeats``. ADMM's support is sensitive at the rounding level, so a *control* runs the baseline on ``H``
perturbed by 1e-7 (relative, symmetric): the baseline against itself shows how many support flips rounding alone
causes. Statistics come from ``layer_error.py``'s cache. Writes ``benchmarks/results/alps_speed.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from layer_error import DEFAULT_STATS, PROJECTIONS, load_statistics  # noqa: E402

from optimum_mosaic.calibration.statistics import InputStatistics  # noqa: E402
from optimum_mosaic.pruning.alps import alps_prune  # noqa: E402
from optimum_mosaic.report import format_table  # noqa: E402


def baseline_module(revision: str):
    source = subprocess.check_output(["git", "show", f"{revision}:optimum_mosaic/pruning/alps.py"], text=True)
    source = source.replace("\nregister_method(", "\n(lambda *args, **kwargs: None)(")  # today's are registered
    spec = importlib.util.spec_from_loader("optimum_mosaic.pruning._alps_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "optimum_mosaic.pruning"
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:alps.py", "exec"), module.__dict__)
    return module


def perturbed(H: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(H.shape, generator=torch.Generator().manual_seed(0)) * 1e-7 * H.abs()
    return H + (noise + noise.T) / 2


def run(fn, layer: dict, sparsity: float, repeats: int, perturb: bool = False):
    best = None
    for _ in range(repeats):
        shared = {}
        for owner, H in layer["H"].items():
            H = perturbed(H) if perturb else H
            shared[owner] = InputStatistics(sumsq=torch.diag(H).clone(), hessian=H, tokens=1)
        outs, secs = {}, {}
        for proj in PROJECTIONS:
            start = time.process_time()
            outs[proj] = fn(layer["weights"][proj], shared[layer["groups"][proj]], sparsity)
            secs[proj] = time.process_time() - start
        if best is None or sum(secs.values()) < sum(best[1].values()):
            best = (outs, secs)
    return best


def rel_error(W, new, H) -> float:
    E, W, H = (W - new).double(), W.double(), H.double()
    return float(((E @ H) * E).sum() / ((W @ H) * W).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="2f5738a")
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 29])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stats", type=Path, default=DEFAULT_STATS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/alps_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    old = baseline_module(args.baseline).alps_prune
    stats = load_statistics(args.stats, args.layers, 32, 512, 16)
    rows = []
    for sparsity in args.sparsities:
        for idx in args.layers:
            layer = stats[idx]
            before, t_before = run(old, layer, sparsity, args.repeats)
            after, t_after = run(alps_prune, layer, sparsity, args.repeats)
            control, _ = run(old, layer, sparsity, 1, perturb=True)
            for proj in PROJECTIONS:
                W, H = layer["weights"][proj], layer["H"][layer["groups"][proj]]
                flips = lambda a, b: round(float(((a != 0) != (b != 0)).float().mean()), 5)  # noqa: E731
                rows.append({
                    "sparsity": sparsity, "layer": idx, "projection": proj, "shape": "×".join(map(str, W.shape)),
                    "before_s": round(t_before[proj], 3), "after_s": round(t_after[proj], 3),
                    "max_abs_diff": round(float((before[proj] - after[proj]).abs().max()), 4),
                    "support_flips": flips(before[proj], after[proj]),
                    "control_flips": flips(before[proj], control[proj]),
                    "error_before": round(rel_error(W, before[proj], H), 6),
                    "error_after": round(rel_error(W, after[proj], H), 6),
                })  # fmt: skip
                print(rows[-1], flush=True)
    totals = {}
    for r in rows:
        t = totals.setdefault(r["shape"], {"shape": r["shape"], "before_s": 0.0, "after_s": 0.0, "n": 0})
        t["before_s"] += r["before_s"]
        t["after_s"] += r["after_s"]
        t["n"] += 1
    summary = []
    for t in totals.values():
        summary.append({"shape": t["shape"], "before_s": round(t["before_s"] / t["n"], 3),
                        "after_s": round(t["after_s"] / t["n"], 3), "speed-up": round(t["before_s"] / t["after_s"], 2)})  # fmt: skip
    layer_before = sum(r["before_s"] for r in rows) / (len(args.layers) * len(args.sparsities))
    layer_after = sum(r["after_s"] for r in rows) / (len(args.layers) * len(args.sparsities))
    summary.append({"shape": "whole layer (7 projections)", "before_s": round(layer_before, 3),
                    "after_s": round(layer_after, 3), "speed-up": round(layer_before / layer_after, 2)})  # fmt: skip
    meta = {**{k: str(v) for k, v in vars(args).items()}, "threads": 1, "torch": torch.__version__}
    args.out.write_text(json.dumps({"args": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    print(format_table(summary, ["shape", "before_s", "after_s", "speed-up"]))
    cols = ["sparsity", "layer", "projection", "max_abs_diff", "support_flips", "control_flips"]
    print(format_table(rows, [*cols, "error_before", "error_after"]))


if __name__ == "__main__":
    main()
