"""Layer reconstruction error of the kernels on real SmolLM2-135M layers (same weights, same statistics).

    python benchmarks/layer_error.py --layers 0 15 29 --sparsities 0.5 0.7

For each chosen decoder layer, the dense model's calibration inputs (32 × 512 tokens of the bundled corpus)
give ``H = XᵀX`` per projection; every kernel prunes the same dense weight with the same ``H`` and we report
the relative error ``tr((W−Ŵ)H(W−Ŵ)ᵀ) / tr(WHWᵀ)`` summed over the layer's seven projections, and the
kernel time. Writes ``benchmarks/results/layer_error.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from optimum_mosaic import PrunedConfig, Pruner
from optimum_mosaic.architectures import decoder_layers
from optimum_mosaic.calibration.layerwise import forward_layer
from optimum_mosaic.registry import get_method
from optimum_mosaic.report import format_table

KERNELS = ("wanda", "sparsegpt", "apt", "alps")


def layer_error(weight: torch.Tensor, new: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    d = (weight - new).double()
    return float(torch.trace(d @ H.double() @ d.T)), float(
        torch.trace(weight.double() @ H.double() @ weight.double().T)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/layer_error.json")
    args = parser.parse_args()

    pruner = Pruner.from_pretrained("smollm2-135m")
    config = PrunedConfig(sparsity=0.5, allocation="uniform", nsamples=args.nsamples, seqlen=args.seqlen)
    targets = pruner._targets(config)
    acts, _ = pruner._calibrate(config, None, batch_size=8)
    layers = decoder_layers(pruner.model, pruner.spec)
    rows = []
    for idx in range(max(args.layers) + 1):
        if idx in args.layers:
            stats, _ = pruner._layer_statistics(layers[idx], acts, idx, targets, hessian=True)
            for sparsity in args.sparsities:
                for name in args.kernels:
                    fn, err, ref, seconds = get_method("unstructured", name).fn, 0.0, 0.0, 0.0
                    for proj, lin in targets[idx].items():
                        start = time.perf_counter()
                        new = fn(lin.weight.data, stats[proj], sparsity)
                        seconds += time.perf_counter() - start
                        e, r = layer_error(lin.weight.data, new, stats[proj].hessian)
                        err, ref = err + e, ref + r
                    rows.append({"layer": idx, "sparsity": sparsity, "kernel": name, "relative_error": err / ref,
                                 "seconds": round(seconds, 2)})  # fmt: skip
                    print(rows[-1], flush=True)
        acts.hidden = forward_layer(layers[idx], acts, idx)  # dense outputs feed the next layer
    for row in rows:
        base = next(
            r for r in rows if (r["layer"], r["sparsity"], r["kernel"]) == (row["layer"], row["sparsity"], "sparsegpt")
        )
        row["vs sparsegpt"] = round(row["relative_error"] / base["relative_error"], 3)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    print(format_table(rows, ["layer", "sparsity", "kernel", "relative_error", "vs sparsegpt", "seconds"]))


if __name__ == "__main__":
    main()
