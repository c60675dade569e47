"""Pipeline time against the unavoidable work, on the real SmolLM2-135M.

    python benchmarks/pipeline_speed.py                          # this checkout
    PYTHONPATH=/path/to/old/checkout python benchmarks/pipeline_speed.py --label before

*Unavoidable work* (measured here with plain torch, independent of the package): one forward of every
decoder layer over the calibration tokens, with hooks accumulating the statistics the method needs
(``Σx²`` per input channel; ``XᵀX`` for Hessian methods), plus one factorisation of the damped Hessian
per linear (one Cholesky + one triangular inverse, the cheapest way to the factor SparseGPT needs).
*Pipeline*: ``Pruner.prune`` wall time (model loading excluded), same calibration size. Results are
appended to ``benchmarks/results/pipeline_speed.json`` under ``--label``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RUNS = {
    "uniform sparsegpt": dict(allocation="uniform", pruner="sparsegpt"),
    "uniform wanda": dict(allocation="uniform", pruner="wanda"),
    "projection sparsegpt (λ=0.08, M=5)": dict(
        allocation="projection", pruner="sparsegpt", lamda=0.08, outlier_threshold=5.0
    ),
}


@torch.inference_mode()
def unavoidable_work(model, windows: torch.Tensor, hessian: bool, batch_size: int = 8) -> float:
    """Seconds for one hooked forward per layer + (if ``hessian``) one factorisation per linear."""
    layers = model.model.layers
    inputs = {}

    def grab(mod, args, kwargs):
        inputs.setdefault("kwargs", kwargs)
        inputs.setdefault("x", []).append(args[0] if args else kwargs["hidden_states"])
        raise StopIteration

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    for i in range(0, windows.shape[0], batch_size):
        try:
            model.model(windows[i : i + batch_size], use_cache=False)
        except StopIteration:
            pass
    handle.remove()
    x = inputs["x"]
    kwargs = {k: v for k, v in inputs["kwargs"].items() if k != "hidden_states"}
    start = time.perf_counter()
    for layer in layers:
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        sums = {
            m: [torch.zeros(m.in_features), torch.zeros(m.in_features, m.in_features) if hessian else None]
            for m in linears
        }

        def hook(mod, args, out, sums=sums):
            a = args[0].reshape(-1, mod.in_features).float()
            sums[mod][0] += a.square().sum(0)
            if hessian:
                sums[mod][1].addmm_(a.T, a)

        handles = [m.register_forward_hook(hook) for m in linears]
        x = [layer(b, **kwargs) for b in x]
        x = [y[0] if isinstance(y, tuple) else y for y in x]
        for h in handles:
            h.remove()
        if hessian:
            for m in linears:
                H = sums[m][1]
                H += 0.01 * torch.diag(H).mean() * torch.eye(H.shape[0])
                L = torch.linalg.cholesky(H.flip(0, 1))
                torch.linalg.solve_triangular(L, torch.eye(H.shape[0]), upper=False)
    return time.perf_counter() - start


def main() -> None:
    from optimum_mosaic import PrunedConfig, Pruner
    from optimum_mosaic.calibration.data import sample_windows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    parser.add_argument("--out", default="benchmarks/results/pipeline_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    pruner = Pruner.from_pretrained("smollm2-135m")
    dense = {k: v.clone() for k, v in pruner.model.state_dict().items()}
    windows, _ = sample_windows(pruner.tokenizer, None, args.nsamples, args.seqlen, 0, 0)
    rows = []
    for name in args.runs:
        kw = RUNS[name]
        base = unavoidable_work(pruner.model, windows, hessian=kw["pruner"] == "sparsegpt")
        config = PrunedConfig(sparsity=0.5, nsamples=args.nsamples, seqlen=args.seqlen, **kw)
        start = time.perf_counter()
        pruner.prune(config, calibration_dataset=windows)
        wall = time.perf_counter() - start
        rows.append(
            {
                "run": name,
                "unavoidable_s": round(base, 1),
                "pipeline_s": round(wall, 1),
                "ratio": round(wall / base, 2),
                "stages_s": pruner.report.timings,
                "achieved_sparsity": pruner.report.achieved_sparsity,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        pruner.model.load_state_dict(dense)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.label] = {"nsamples": args.nsamples, "seqlen": args.seqlen, "threads": 2, "rows": rows}
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
