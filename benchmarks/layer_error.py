"""Layer reconstruction error of kernel variants on real SmolLM2-135M layers (same weights, same statistics).

    python benchmarks/layer_error.py --layers 0 10 20 29 --sparsities 0.5 0.7 --threads 1

For each chosen decoder layer, the dense model's inputs over ``nsamples × seqlen`` calibration tokens of the
bundled corpus give ``H = XᵀX`` per projection (q/k/v share one ``InputStatistics``, as do gate/up, so shared
factorisations are paid once per group, as in a real prune); a further ``holdout`` windows, disjoint from the
calibration ones, give ``H_eval``. Every variant prunes the same dense weights with the same statistics and we
report, summed over the layer's seven projections, the relative errors

    tr((W−Ŵ) H (W−Ŵ)ᵀ) / tr(W H Wᵀ)        (``rel_error``: calibration H, what the kernels minimise)
    tr((W−Ŵ) H_eval (W−Ŵ)ᵀ) / tr(W H_eval Wᵀ)   (``heldout_error``: same layer, unseen tokens)

and the kernel seconds (process CPU time of the kernel calls only — robust on a shared machine — with
``--threads`` torch threads; 1 by default, so CPU time = kernel time). Dense inputs feed
every layer (no sequential error), so this isolates the kernel. The statistics are cached in ``--stats``
(computing them costs one dense forward of every layer up to the last chosen one). Writes
``benchmarks/results/layer_error.json``; the variants are listed in ``layer_variants.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from layer_variants import VARIANTS  # noqa: E402

from optimum_mosaic.report import format_table  # noqa: E402

DEFAULT_STATS = Path.home() / ".cache" / "optimum_mosaic" / "layer_error_stats.pt"
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@torch.inference_mode()
def capture_statistics(layers_wanted, nsamples: int, seqlen: int, holdout: int, seed: int = 0) -> dict:
    """``{layer: {"weights": {proj: W}, "groups": {proj: owner}, "H": {owner: H}, "H_eval": {owner: H}}}``."""
    from optimum_mosaic import PrunedConfig, Pruner
    from optimum_mosaic.architectures import decoder_layers
    from optimum_mosaic.calibration.data import sample_windows
    from optimum_mosaic.calibration.layerwise import capture, forward_layer
    from optimum_mosaic.layer_walk import input_owners

    pruner = Pruner.from_pretrained("smollm2-135m")
    targets = pruner._targets(PrunedConfig(sparsity=0.5, allocation="uniform"))
    windows, held = sample_windows(pruner.tokenizer, None, nsamples, seqlen, seed, holdout)
    acts = capture(pruner.model, pruner.spec, torch.cat([windows, held]), pruner.device, 8)
    layers = decoder_layers(pruner.model, pruner.spec)
    out = {}
    for idx in range(max(layers_wanted) + 1):
        if idx in layers_wanted:
            owners = input_owners(pruner.spec, targets[idx])
            inputs = {o: [] for o in set(owners.values())}
            hooks = [
                targets[idx][o].register_forward_hook(lambda m, a, y, sink=sink: sink.append(a[0].double()))
                for o, sink in inputs.items()
            ]
            try:
                hidden = forward_layer(layers[idx], acts, idx)
            finally:
                for h in hooks:
                    h.remove()
            X = {o: torch.cat(xs) for o, xs in inputs.items()}  # [nsamples + holdout, seqlen, d]
            gram = lambda x: torch.einsum("nti,ntj->ij", x, x).float()  # noqa: E731
            out[idx] = {
                "weights": {p: lin.weight.detach().float().clone() for p, lin in targets[idx].items()},
                "groups": dict(owners),
                "H": {o: gram(x[:nsamples]) for o, x in X.items()},
                "H_eval": {o: gram(x[nsamples:]) for o, x in X.items()},
            }
            print(f"layer {idx}: statistics of {sorted(X)}", flush=True)
        else:
            hidden = forward_layer(layers[idx], acts, idx)
        acts.hidden = hidden  # dense outputs feed the next layer
    return out


def load_statistics(path: Path, layers, nsamples, seqlen, holdout) -> dict:
    key = {"nsamples": nsamples, "seqlen": seqlen, "holdout": holdout}
    cached = torch.load(path) if path.exists() else {"key": key, "layers": {}}
    if cached["key"] != key:
        cached = {"key": key, "layers": {}}
    missing = [i for i in layers if i not in cached["layers"]]
    if missing:
        cached["layers"].update(capture_statistics(missing, nsamples, seqlen, holdout))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cached, path)
    return {i: cached["layers"][i] for i in layers}


def errors(W: torch.Tensor, new: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """``(tr(E H Eᵀ), tr(W H Wᵀ))`` in float64 with ``E = W − Ŵ``."""
    E, W, H = (W - new).double(), W.double(), H.double()
    return float(((E @ H) * E).sum()), float(((W @ H) * W).sum())


def run_layer(layer: dict, variant: str, sparsity: float, nm=None) -> dict:
    """Prune the seven projections of one layer with one variant; returns the summed errors and the seconds."""
    from optimum_mosaic.calibration.statistics import InputStatistics

    fn = VARIANTS[variant]
    shared = {}  # one InputStatistics per input group, so caches are shared exactly as in a prune
    for owner, H in layer["H"].items():
        shared[owner] = InputStatistics(sumsq=torch.diag(H).clone(), hessian=H, tokens=1)
    sums = dict(err=0.0, base=0.0, err_eval=0.0, base_eval=0.0, seconds=0.0)
    for proj in PROJECTIONS:
        W, owner = layer["weights"][proj], layer["groups"][proj]
        start = time.process_time()
        new = fn(W, shared[owner], sparsity, nm=nm)
        sums["seconds"] += time.process_time() - start
        expected = W.numel() - round(sparsity * W.numel()) if nm is None else W.numel() * (1 - sparsity)
        assert int((new != 0).sum()) <= expected, (variant, proj)  # the sparsity is met
        e, b = errors(W, new, layer["H"][owner])
        sums["err"], sums["base"] = sums["err"] + e, sums["base"] + b
        e, b = errors(W, new, layer["H_eval"][owner])
        sums["err_eval"], sums["base_eval"] = sums["err_eval"] + e, sums["base_eval"] + b
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=", ".join(VARIANTS))
    parser.add_argument("--nm", type=int, nargs=2, default=None, metavar=("N", "M"), help="N:M instead of sparsity")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--holdout", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stats", type=Path, default=DEFAULT_STATS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/layer_error.json"))
    parser.add_argument("--append", action="store_true", help="merge into the rows already in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")

    stats = load_statistics(args.stats, args.layers, args.nsamples, args.seqlen, args.holdout)
    nm = tuple(args.nm) if args.nm else None
    sparsities = [args.nm[0] / args.nm[1]] if nm else args.sparsities
    rows = []
    for sparsity in sparsities:
        for variant in args.variants:
            total = dict(err=0.0, base=0.0, err_eval=0.0, base_eval=0.0, seconds=0.0)
            per_layer = {}
            for idx in args.layers:
                s = run_layer(stats[idx], variant, sparsity, nm)
                per_layer[idx] = round(s["err"] / s["base"], 5)
                total = {k: total[k] + s[k] for k in total}
            row = {
                "sparsity": f"{nm[0]}:{nm[1]}" if nm else sparsity,
                "variant": variant,
                "rel_error": round(total["err"] / total["base"], 5),
                "heldout_error": round(total["err_eval"] / total["base_eval"], 5),
                "seconds": round(total["seconds"], 2),
                "per_layer": per_layer,
            }
            rows.append(row)
            print(row, flush=True)

    previous = json.loads(args.out.read_text())["rows"] if args.append and args.out.exists() else []
    keys = {(r["sparsity"], r["variant"]) for r in rows}
    rows = [r for r in previous if (r["sparsity"], r["variant"]) not in keys] + rows
    for row in rows:
        base = next((r for r in rows if r["sparsity"] == row["sparsity"] and r["variant"] == "sparsegpt"), None)
        if base:
            row["vs sparsegpt"] = round(row["rel_error"] / base["rel_error"], 3)
    meta = {k: str(v) for k, v in vars(args).items()}
    meta["torch"] = torch.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": meta, "rows": rows}, indent=1) + "\n")
    cols = ["sparsity", "variant", "rel_error", "vs sparsegpt", "heldout_error", "seconds"]
    print(format_table(rows, cols))


if __name__ == "__main__":
    main()
