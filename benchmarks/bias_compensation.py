"""Does FLAP-style bias compensation help structured OBS? (issue 11)

    python benchmarks/bias_compensation.py                                   # SmolLM2-135M, both variants
    python benchmarks/bias_compensation.py --model gemma3-270m --eval-windows 20 --only composite

Each variant is pruned twice from the same dense weights and calibration windows: structured OBS as shipped, and
with a constant input column in the Hessian (``StructuredOBS(..., intercept=...)``), which refits a bias on
``down_proj`` / ``o_proj`` together with the kept columns. Scored on the held-out calibration NLL (8 windows neither
the calibration set nor a λ search touches) and reported with perplexity on held-out text. The knob is the ``bias``
argument of ``structured.remove_units`` / ``unit_options``, patched in here: it is not a ``PrunedConfig`` option.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import optimum_mosaic.layer_walk as layer_walk
from optimum_mosaic import PrunedConfig, Pruner, perplexity
from optimum_mosaic.calibration.data import sample_windows
from optimum_mosaic.evaluation import mean_nll

_COMMON = dict(allocation="uniform", pruner="sparsegpt", structured_units=["mlp"])  # as structured_benchmark.py
VARIANTS = {
    "composite β=0.2": dict(sparsity=0.5, structured_sparsity=0.2, **_COMMON),
    "structured-only 0.2": dict(sparsity=0.2, structured_sparsity=0.2, **_COMMON),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--only", nargs="+", default=None, help="variants whose name contains one of these words")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/bias_compensation_<model>.json")
    args = parser.parse_args()
    out = Path(args.out or f"benchmarks/results/bias_compensation_{args.model}.json")
    remove_units, unit_options = layer_walk.remove_units, layer_walk.unit_options
    pruner = Pruner.from_pretrained(args.model)
    unseen = sample_windows(pruner.tokenizer, None, args.nsamples, args.seqlen, 0, 16)[1][8:]
    rows = []
    for name in [n for n in VARIANTS if not args.only or any(w in n for w in args.only)]:
        for bias in (False, True):
            layer_walk.remove_units = functools.partial(remove_units, bias=bias)
            layer_walk.unit_options = functools.partial(unit_options, bias=bias)
            pruner = Pruner.from_pretrained(args.model)
            start = time.perf_counter()
            pruner.prune(
                PrunedConfig(nsamples=args.nsamples, seqlen=args.seqlen, calibration_corpus="austen", **VARIANTS[name])
            )
            elapsed = time.perf_counter() - start
            model = pruner.model
            row = {
                "run": name,
                "bias": bias,
                "prune_s": round(elapsed, 1),
                "projection_biases": sum(1 for n, _ in model.named_parameters() if n.endswith("proj.bias")),
                "calib_nll": round(mean_nll(model, unseen, 4), 5),
                "ppl": round(perplexity(model, pruner.tokenizer, seqlen=512, max_windows=args.eval_windows), 3),
            }
            rows.append(row)
            print(row, flush=True)
            out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
