"""One-thread timings of the Hessian factorisations and one product at Llama-3-8B's ``down_proj`` (4096 × 14336): what
every process sharing that projection's rows repeats (the factorisations) against what it splits (the products).

    python benchmarks/factorisation_timings.py     # → benchmarks/results/factorisation_timings_llama3-8b.json

Take it on an otherwise idle machine (≈ 2 min, ≈ 4 GB).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from dtype_matmul import cpu_kind  # a benchmark beside this one: the script's folder is on sys.path

from optimum_mosaic.pruning.ridge import RidgeInverses
from optimum_mosaic.pruning.sparsegpt import inverse_hessian_factor

OUT = Path(__file__).resolve().parent / "results" / "factorisation_timings_llama3-8b.json"


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 1)


def main() -> None:
    torch.set_num_threads(1)
    n, rows = 14336, 4096
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 2048, generator=g)
    H = X @ X.T + torch.eye(n)  # positive definite, the shape of down's input Hessian
    x = H.diagonal().sqrt()
    Hn = H / x.outer(x)
    made = {}
    factor = seconds(lambda: inverse_hessian_factor(H, 0.01))
    ridge = seconds(lambda: made.setdefault("inverse", RidgeInverses(Hn, {}, ("k",))(0.5)))
    W, inverse = torch.randn(rows, n, generator=g), made["inverse"]
    result = {
        "shape": [rows, n],
        "seconds": {
            "sparsegpt factor (Cholesky + triangular inverse)": factor,
            "ridge inverse (Cholesky + cholesky_inverse)": ridge,
            f"product {rows} x {n} by {n} x {n}": seconds(lambda: W @ inverse),
            f"product {rows // 2} rows": seconds(lambda: W[: rows // 2] @ inverse),
        },
        "env": {"torch": torch.__version__, "threads": 1, "cpu": cpu_kind()},
    }
    print(json.dumps(result, indent=1))
    OUT.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
