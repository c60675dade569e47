"""One process against two (each solving a share of the projections), end to end, and the weights they save.

    python benchmarks/distributed_speed.py                    # SmolLM2-135M, PrunedConfig() at 50 %, 1 thread each
    python benchmarks/distributed_speed.py --extra --pruner sparsegpt

Runs ``examples/distributed_prune.py`` as ``python`` (1 process) and ``torchrun --nproc_per_node N`` with
``OMP_NUM_THREADS`` fixed, times each launch wall to wall (model load, calibration, prune, save), reads the prune
time each prints, and compares every tensor of the two checkpoints. Writes
``benchmarks/results/distributed_speed.json``. Take it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def launch(argv: list[str], procs: int, threads: int, output: Path) -> dict:
    script = [str(ROOT / "examples" / "distributed_prune.py"), "--output", str(output), *argv]
    if procs == 1:
        command = [sys.executable, *script]
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        command = [*torchrun, "--master_port", "29531", *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    total = re.search(r"total ([\d.]+)s", done.stdout)
    return {"procs": procs, "threads": threads, "wall_s": round(wall, 1), "prune_s": float(total.group(1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/distributed_speed.json"))
    args, extra = parser.parse_known_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        outputs = [Path(tmp) / "one", Path(tmp) / "many"]
        for procs, output in zip((1, args.procs), outputs, strict=True):
            rows.append(launch(extra, procs, args.threads, output))
            print(rows[-1], flush=True)
        one, many = (load_file(str(p / "model.safetensors")) for p in outputs)
        differ = [k for k in one if not torch.equal(one[k], many[k])]
    result = {
        "argv": extra,
        "rows": rows,
        "speedup_wall": round(rows[0]["wall_s"] / rows[1]["wall_s"], 3),
        "speedup_prune": round(rows[0]["prune_s"] / rows[1]["prune_s"], 3),
        "tensors_differing": differ,
        "env": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
