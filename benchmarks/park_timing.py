"""What parking ``Hn`` costs (``RidgeInverses.park``): one default prune of a Llama-3-8B-shaped layer (4 × 2048 random
tokens, 2 threads) with timers around the write (``park``), the reads into each ridge inverse's buffer
(``copies.read_into``) and CG's read (``hessian``, which includes its ``read_into``).

    python benchmarks/park_timing.py --out benchmarks/results/park_timing_llama3-8b.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # noqa: E402

from optimum_mosaic import copies  # noqa: E402
from optimum_mosaic.pruning import ridge  # noqa: E402

CALLS: dict[str, list[float]] = collections.defaultdict(list)


def timed(owner, name: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            CALLS[name].append(round(time.perf_counter() - start, 3))

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(scale.SHAPES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    for owner, name in ((ridge.RidgeInverses, "park"), (ridge.RidgeInverses, "hessian"), (copies, "read_into")):
        timed(owner, name)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model, windows = Path(tmp) / "model", Path(tmp) / "windows.pt"
        scale.make_checkpoint(args.shape, 1, model)
        scale.make_windows(types.SimpleNamespace(nsamples=4, seqlen=2048), windows)
        config = {"nsamples": 4, "seqlen": 2048, "sparsity": 0.5, **scale.METHODS["default"]}
        spec = {"model": str(model), "windows": str(windows), "threads": 2, "sparsity": 0.5, "method": "default",
                "library": "mosaic", "config": config}  # fmt: skip
        row = scale.worker(spec)
    calls = {name: [s for s in seconds if s >= 0.001] for name, seconds in CALLS.items()}  # the non-parking calls: 0
    payload = {"shape": args.shape, "tokens": 4 * 2048, "threads": 2, "prune_s": round(row["prune_s"], 1),
               "seconds_per_call": calls, "parking_s": round(sum(calls["park"]) + sum(calls["hessian"])
               + sum(calls["read_into"][:-1]), 2), "torch": torch.__version__}  # fmt: skip
    print(json.dumps(payload))
    out = Path(args.out or Path(__file__).parent / "results" / f"park_timing_{args.shape}.json")
    out.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
