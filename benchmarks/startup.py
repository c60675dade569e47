"""Start-up cost: ``import optimum_mosaic`` against ``import transformers``, and ``optimum-mosaic --help`` / a bad
argument, each in a fresh interpreter (median of ``--repeat`` runs, wall clock).

    python benchmarks/startup.py            # 5 runs each; writes benchmarks/results/startup.json

Goals (issue 14): ``import optimum_mosaic`` ≤ 1.2 × ``import transformers``; ``--help`` and a bad-argument error
< 2 s on 2 CPU cores. The numbers depend on the machine's load and its file cache: compare them within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLI = shutil.which("optimum-mosaic", path=str(Path(sys.executable).parent)) or "optimum-mosaic"
CASES = {
    "python (empty)": [sys.executable, "-c", "pass"],
    "import transformers": [sys.executable, "-c", "import transformers"],
    "import optimum_mosaic": [sys.executable, "-c", "import optimum_mosaic"],
    "import torch": [sys.executable, "-c", "import torch"],
    "optimum-mosaic --help": [CLI, "--help"],
    "optimum-mosaic prune --help": [CLI, "prune", "--help"],
    "bad argument (prune --sparsity 1.5)": [CLI, "prune", "--sparsity", "1.5"],
    "missing model (prune --model ./nope)": [CLI, "prune", "--model", "./nope", "--output", "x"],
}


def time_once(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, capture_output=True)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "startup.json"))
    args = parser.parse_args(argv)
    for cmd in CASES.values():  # warm the file cache once
        time_once(cmd)
    rows = {}
    for _ in range(args.repeat):  # interleaved, so that load changes hit every case alike
        for name, cmd in CASES.items():
            rows.setdefault(name, []).append(time_once(cmd))
    medians = {name: round(statistics.median(times), 3) for name, times in rows.items()}
    ratio = medians["import optimum_mosaic"] / medians["import transformers"]
    result = {
        "median_s": medians,
        "import_ratio_vs_transformers": round(ratio, 3),
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "python": platform.python_version(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, medians))
    for name, value in medians.items():
        print(f"{name:<{width}}  {value:6.3f} s")
    print(f"import optimum_mosaic / import transformers = {ratio:.2f} (goal <= 1.2)")
    return result


if __name__ == "__main__":
    main()
