"""The pruning walk in batches against one batch: the same weights, and what the batches cost.

    python benchmarks/batched_walk.py                      # SmolLM2-135M, default config, 50 %, 32 × 512
    python benchmarks/batched_walk.py --batch-sizes 32 8 4

Per batch size one fresh process prunes the packaged model with the default (uniform ALPS-warm,
``sequential="projection"``) on the bundled corpus and saves its projections; the parent checks that every batch size
gave the weights of the first bit for bit and writes ``results/batched_walk.json`` (prune seconds, peak RSS = the
process's VmHWM). With several batches each input group costs a forward that stops at that input, then one forward
gives the outputs: extra forward time for activations of one batch. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def one(batch_size: int, sparsity: float, nsamples: int, seqlen: int, out: str) -> dict:
    from optimum_mosaic import PrunedConfig, Pruner
    from optimum_mosaic.architectures import named_projections

    torch.set_num_threads(2)
    pruner = Pruner.from_pretrained("smollm2-135m")
    start = time.perf_counter()
    pruner.prune(PrunedConfig(sparsity=sparsity, nsamples=nsamples, seqlen=seqlen), batch_size=batch_size)
    elapsed = time.perf_counter() - start
    torch.save({n: lin.weight.detach() for n, lin in named_projections(pruner.model).items()}, out)
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 2**20
    return {"batch_size": batch_size, "prune_s": round(elapsed, 1), "peak_rss_gib": round(peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/batched_walk.json"))
    args = parser.parse_args()
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for bs in args.batch_sizes:
            path = f"{tmp}/{bs}.pt"
            spec = [bs, args.sparsity, args.nsamples, args.seqlen, path]
            cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            weights = torch.load(path)
            first = first or weights
            row["weights_equal_first"] = all(torch.equal(weights[n], first[n]) for n in first)
            rows.append(row)
            print(row, flush=True)
    setup = {"model": "smollm2-135m", "config": "default", "sparsity": args.sparsity, "nsamples": args.nsamples,
             "seqlen": args.seqlen, "threads": 2, "torch": torch.__version__}  # fmt: skip
    Path(args.out).write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(one(*json.loads(sys.argv[2]))), flush=True)
    else:
        main()
