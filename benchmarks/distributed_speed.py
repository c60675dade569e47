"""One process against two (each solving a share of the projections), end to end, and the weights they save.

    python benchmarks/distributed_speed.py                    # SmolLM2-135M, PrunedConfig() at 50 %, 1 thread each
    python benchmarks/distributed_speed.py --extra --pruner sparsegpt
    python benchmarks/distributed_speed.py --shape llama3-8b --nsamples 32 --seqlen 2048   # one 8B-shaped layer

Runs ``examples/distributed_prune.py`` as ``python`` (1 process), under ``torchrun --nproc_per_node N`` and with
``--procs N`` (the example forks its own processes: no launcher to start or wait for), with ``OMP_NUM_THREADS``
fixed; times each launch wall to wall (model load, calibration, prune, save), reads the prune time each prints, and
compares every tensor of the checkpoints. The bundled corpus is tokenised (and kept on disk) before any run. Writes
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
from dtype_matmul import cpu_kind  # a benchmark beside this one: the script's folder is on sys.path
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def launch(argv: list[str], procs: int, threads: int, output: Path, launcher: str = "torchrun") -> dict:
    script = [str(ROOT / "examples" / "distributed_prune.py"), "--output", str(output), *argv]
    if procs == 1:
        command = [sys.executable, *script]
    elif launcher == "fork":
        command = [sys.executable, *script, "--procs", str(procs)]
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        command = [*torchrun, "--master_port", "29531", *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # ru_maxrss: the largest process of the tree (KiB)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode:
        raise RuntimeError(stderr[-3000:])
    total = re.search(r"total ([\d.]+)s", stdout)
    return {"procs": procs, "threads": threads, "launcher": launcher if procs > 1 else "python",
            "wall_s": round(wall, 1), "prune_s": float(total.group(1)),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}  # fmt: skip


def warm_token_cache(argv: list[str]) -> None:
    """Tokenise the bundled corpus once for the model's tokenizer (``calibration.data.part_ids`` keeps it on disk),
    so that neither timed run pays for it and the first does not pay for the second."""
    if "--text" in argv:
        return
    from transformers import AutoTokenizer

    from optimum_mosaic.calibration.data import MIXED_SHARES, part_ids
    from optimum_mosaic.packaged_models import resolve_model_path

    model = argv[argv.index("--model") + 1] if "--model" in argv else "smollm2-135m"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    for part in MIXED_SHARES:
        part_ids(tokenizer, part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", default=None, help="a random checkpoint at one of scale.py's shapes")
    parser.add_argument("--layers", type=int, default=1, help="with --shape: decoder layers")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--launchers", default="torchrun,fork", help="how the processes start: torchrun, fork (--procs)"
    )
    args, extra = parser.parse_known_args()
    name = f"distributed_speed_{args.shape}.json" if args.shape else "distributed_speed.json"
    out = Path(args.out or ROOT / "benchmarks/results" / name)
    rows, argv = [], list(extra)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape:
            from scale import make_checkpoint

            make_checkpoint(args.shape, args.layers, Path(tmp) / "model")
            extra = ["--model", str(Path(tmp) / "model"), *extra]
        launchers = args.launchers.split(",")
        outputs = [Path(tmp) / name for name in ("one", *launchers)]
        warm_token_cache(extra)
        for (procs, launcher), output in zip([(1, None), *((args.procs, x) for x in launchers)], outputs, strict=True):
            rows.append(launch(extra, procs, args.threads, output, launcher))
            print(rows[-1], flush=True)
        one, *many = (load_file(str(p / "model.safetensors")) for p in outputs)
        differ = sorted({k for other in many for k in one if not torch.equal(one[k], other[k])})
    result = {
        "argv": argv,
        "shape": args.shape,
        "layers": args.layers if args.shape else None,
        "rows": rows,
        "speedup_wall": round(rows[0]["wall_s"] / rows[1]["wall_s"], 3),
        "speedup_prune": round(rows[0]["prune_s"] / rows[1]["prune_s"], 3),
        "speedup_wall_by_launcher": {r["launcher"]: round(rows[0]["wall_s"] / r["wall_s"], 3) for r in rows[1:]},
        "tensors_differing": differ,
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "cpu": cpu_kind(),
        },
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
