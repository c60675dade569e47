"""The default's kernel (ALPS-warm) on one wide projection, before and after a change: time, peak memory, how far
the result moves.

    python benchmarks/wide_projection.py --baseline fb83aef              # Llama-3-8B down_proj: 4096 × 14336
    python benchmarks/wide_projection.py --baseline fb83aef --rows 256 --cols 1024 --tokens 2048   # smoke
    python benchmarks/wide_projection.py --baseline HEAD --final-read --out /tmp/w.json   # H consumed by Hn

The baseline is ``optimum_mosaic/pruning/alps.py`` as of the git revision ``--baseline`` (``alps_speed.py`` loads
it); everything else is today's code. Each version runs in a fresh process (peak RSS = that process's VmHWM) on
the same problem: weights N(0, 0.02²), ``H = XᵀX`` from ``--tokens`` random inputs whose column scales follow
``0.1 + 10·u⁴`` (``u`` uniform; a few strong input channels, like real activations), 50 % sparsity. Reported:
wall time of ``alps_warm_prune``, peak RSS, the inverses made, the relative layer error
``tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ)`` and the share of weights whose kept/pruned state differs between the two.
``--final-read``: today's run marks the statistics as the walk marks the last projection reading them (``down_proj``
is the only reader of its input), so ``Hn`` is built in ``H``'s memory; the baseline's run copies.
Writes ``benchmarks/results/wide_projection.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "WIDE_RESULT "


def problem(rows: int, cols: int, tokens: int):
    from optimum_mosaic.calibration.statistics import InputStatistics

    g = torch.Generator().manual_seed(0)
    scale = torch.rand(cols, generator=g).pow(4) * 10 + 0.1
    stats = InputStatistics.empty(cols, hessian=True)
    for start in range(0, tokens, 2048):
        stats.update((torch.randn(min(2048, tokens - start), cols, generator=g) * scale).unsqueeze(0))
    return torch.randn(rows, cols, generator=g) * 0.02, stats.finalize()


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    if spec["baseline"]:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from alps_speed import baseline_module

        prune = baseline_module(spec["baseline"]).alps_warm_prune
    else:
        from optimum_mosaic.pruning.alps import alps_warm_prune as prune
    W, stats = problem(spec["rows"], spec["cols"], spec["tokens"])
    stats.final_read = spec.get("final_read", False) and not spec["baseline"]
    info = {}
    start = time.perf_counter()
    pruned = prune(W, stats, spec["sparsity"], info=info)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if stats.hessian is None:  # consumed by the kernel (``--final-read``): the same H again, for the error
        stats = problem(spec["rows"], spec["cols"], spec["tokens"])[1]
    E = W - pruned
    error = float(((E @ stats.hessian) * E).sum() / ((W @ stats.hessian) * W).sum())
    torch.save(pruned != 0, spec["support"])
    return dict(seconds=round(seconds, 3), peak_rss_mib=round(peak, 1), inverses=info.get("inverses"),
                iterations=info.get("iterations"), layer_error=error, zeros=int((pruned == 0).sum()))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision of alps.py to compare against")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=14336)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--final-read", action="store_true", help="today's run may build Hn in H's memory")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/wide_projection.json"))
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    rows, supports = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, baseline in ((f"baseline {args.baseline}", args.baseline), ("this code", "")):
            supports[name] = str(Path(tmp) / f"{len(supports)}.pt")
            spec = dict(vars(args), baseline=baseline, support=supports[name])
            done = subprocess.run([sys.executable, __file__, json.dumps(spec)], env=env, capture_output=True,
                                  text=True, cwd=ROOT, check=True)  # fmt: skip
            rows[name] = json.loads(done.stdout.split(PREFIX)[-1])
            print(name, rows[name], flush=True)
        a, b = (torch.load(p) for p in supports.values())
        flips = float((a != b).float().mean())
    base, new = rows.values()
    result = {
        "command": "python benchmarks/wide_projection.py " + " ".join(sys.argv[1:]),
        "problem": {k: getattr(args, k) for k in ("rows", "cols", "tokens", "sparsity", "threads", "final_read")},
        "torch": torch.__version__,
        "rows": rows,
        "speedup": round(base["seconds"] / new["seconds"], 2) if new["seconds"] else None,  # tiny runs can time 0
        "peak_saved_mib": round(base["peak_rss_mib"] - new["peak_rss_mib"], 1),
        "support_flips": flips,
        "layer_error_ratio": new["layer_error"] / base["layer_error"],
    }
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        print(PREFIX + json.dumps(worker(json.loads(sys.argv[1]))), flush=True)
    else:
        main()
