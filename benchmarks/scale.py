"""What pruning costs at the sizes users prune: decoder layers with random weights at the shapes of Llama-2-7B,
Llama-3-8B and Llama-70B (cost and memory depend on the shapes, not the values).

    python benchmarks/scale.py                                     # Llama-3-8B, 1 layer, the four methods + llmc
    python benchmarks/scale.py --shape llama2-7b --methods default "uniform SparseGPT"
    python benchmarks/scale.py --shape llama-70b --methods "uniform SparseGPT" --nsamples 2

Per (shape, method) one fresh worker process (peak RSS = VmHWM of that process) prunes a ``--layers``-layer
Llama with the shape's hidden / MLP widths and heads (vocab: SmolLM2's tokenizer, tied embeddings), calibrated on
``--nsamples`` × ``--seqlen`` random token ids (the same tensor for every method, through ``compare_worker``).
Our runs are split into stages by timers around the functions that do the work: ``statistics`` (the hooks that
accumulate ‖X‖² and XᵀX), ``hessian`` (factorisations: SparseGPT's inverse Cholesky factor, ALPS's normalised H
and (Hn + ρI)⁻¹), ``solve`` (the kernels, less their Hessian work), ``structured`` (unit options and removal) and
``forward`` (the rest of the walk: layer forwards, capture). llm-compressor's ``SparseGPTModifier`` runs in its own
venv (``--peer-python``; total time and peak RSS only). Writes ``benchmarks/results/scale_<shape>.json``.

Extrapolation (``extrapolate``): statistics and forwards scale with tokens (× 128·2048 / tokens measured) and the
rest does not; a whole model = layers × one layer. Where a method ran at two or more token counts (``--nsamples``),
``token_fits`` also fits ``prune_s = a + b·tokens`` through those runs (no stage split needed: llm-compressor too). To one GPU: FLOPs / (the GPU's dense fp32 rate × 0.5).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compare_worker import RESULT_PREFIX  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, MLP, heads, key/value heads, decoder layers of the whole model
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, n=32),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, n=32),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, n=80),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2, n=2),  # smoke
}
METHODS = {
    "uniform SparseGPT": dict(allocation="uniform", pruner="sparsegpt"),
    "default": dict(),
    "full ALPS": dict(allocation="uniform", pruner="alps"),
    "composite β=0.2": dict(structured_sparsity=0.2),
    "llm-compressor SparseGPT": None,
}
FULL = 128 * 2048  # the calibration budget the issue asks about (tokens)


# -- the worker: one prune with stage timers --------------------------------------------------------------------
class Stages:
    """Seconds per stage; a timed call inside another timed call is charged to the inner stage only."""

    def __init__(self):
        self.seconds, self.stack = defaultdict(float), []

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        self.stack.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            inner = self.stack.pop()
            self.seconds[name] += elapsed - inner
            if self.stack:
                self.stack[-1] += elapsed

    def wrap(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            with self.stage(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)


def install_timers() -> Stages:
    from optimum_mosaic import layer_walk, registry
    from optimum_mosaic.calibration.statistics import InputStatistics
    from optimum_mosaic.pruning import alps, refit, sparsegpt

    stages = Stages()
    stages.wrap(InputStatistics, "update", "statistics")
    stages.wrap(InputStatistics, "finalize", "statistics")
    stages.wrap(sparsegpt, "inverse_hessian_factor", "hessian")
    stages.wrap(refit, "normalized_hessian", "hessian")
    stages.wrap(alps.RidgeInverses, "__call__", "hessian")
    stages.wrap(layer_walk, "remove_units", "structured")
    stages.wrap(layer_walk, "unit_options", "structured")
    for method in [m for (kind, _), m in registry._REGISTRY.items() if kind == "unstructured"]:
        object.__setattr__(method, "fn", _timed_fn(stages, method.fn))
    return stages


def _timed_fn(stages: Stages, fn):
    def timed(*args, **kwargs):
        with stages.stage("solve"):
            return fn(*args, **kwargs)

    return timed


def worker(spec: dict) -> dict:
    from compare_worker import run

    stages = install_timers()
    result = run(spec)
    timings = result.get("timings", {})
    walk = result["prune_s"]
    timed = sum(stages.seconds.values())
    result["stages_s"] = {**{k: round(v, 2) for k, v in stages.seconds.items()}, "forward": round(walk - timed, 2)}
    result["walk_s"] = timings
    return result


# -- the parent -------------------------------------------------------------------------------------------------
def make_checkpoint(shape: str, layers: int, directory: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from optimum_mosaic.packaged_models import resolve_model_path

    dims = {k: v for k, v in SHAPES[shape].items() if k != "n"}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    config = LlamaConfig(
        **dims,
        num_hidden_layers=layers,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)  # transformers' init: N(0, 0.02) weights
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def make_windows(args, path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    ids = lambda n, s: torch.randint(3, 49000, (n, s), generator=g)  # noqa: E731
    torch.save({"calibration": ids(args.nsamples, args.seqlen), "held_out": ids(0, args.seqlen),
                "evaluation": ids(1, 256)}, path)  # fmt: skip


def run_one(python: str, spec: dict, script: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    done = subprocess.run([python, str(script), json.dumps(spec)], env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode or not lines:
        return {"method": spec["method"], "error": done.stderr[-1500:]}
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def extrapolate(row: dict, tokens: int, layers: int, whole: int) -> dict:
    """One layer at ``FULL`` tokens, and the whole model (``whole`` layers), from a ``layers``-layer run."""
    stages = row.get("stages_s")
    if not stages:
        return {
            "layer_s": round(row["prune_s"] / layers, 1),
            "model_h": round(row["prune_s"] / layers * whole / 3600, 2),
        }
    scaled = sum(v * (FULL / tokens if k in ("statistics", "forward") else 1) for k, v in stages.items())
    return {
        "layer_at_128x2048_s": round(scaled / layers, 1),
        "model_at_128x2048_h": round(scaled / layers * whole / 3600, 2),
    }


def token_fits(rows: list[dict], layers: int, whole: int) -> dict:
    """Per method with runs at two or more token counts (same layers, no error, not marked ``contended``): the line
    ``prune_s = a + b·tokens`` through them, and its value at ``FULL`` tokens per layer and for the whole model.
    Needs no stage split, so it covers llm-compressor too; ``extrapolate`` assumes the split instead."""
    by_method = defaultdict(dict)
    for row in rows:
        if (
            row.get("layers") == layers
            and "error" not in row
            and row.get("prune_s") is not None
            and not row.get("contended")
        ):
            by_method[row["method"]][row["tokens"]] = row["prune_s"]
    fits = {}
    for method, points in by_method.items():
        if len(points) < 2:
            continue
        t = torch.tensor(list(points), dtype=torch.float64)
        y = torch.tensor(list(points.values()), dtype=torch.float64)
        b = float(((t - t.mean()) * (y - y.mean())).sum() / (t - t.mean()).square().sum())
        a = float(y.mean()) - b * float(t.mean())
        at_full = (a + b * FULL) / layers
        fits[method] = {"tokens": sorted(points), "fixed_s": round(a, 1), "s_per_1k_tokens": round(1000 * b, 2),
                        "layer_at_128x2048_s": round(at_full, 1), "model_at_128x2048_h": round(at_full * whole / 3600, 2)}  # fmt: skip
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--methods", nargs="+", default=["default", "uniform SparseGPT", "llm-compressor SparseGPT",
                                                         "composite β=0.2"])  # fmt: skip
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer-python", default=os.environ.get("MOSAIC_PEER_PYTHON", "/work/peer-venv/bin/python"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or ROOT / f"benchmarks/results/scale_{args.shape}.json")
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    tokens = args.nsamples * args.seqlen
    with tempfile.TemporaryDirectory() as tmp:
        model, windows = Path(tmp) / "model", Path(tmp) / "windows.pt"
        make_checkpoint(args.shape, args.layers, model)
        make_windows(args, windows)
        base = {"model": str(model), "windows": str(windows), "threads": args.threads, "sparsity": args.sparsity}
        for name in args.methods:
            common = dict(nsamples=args.nsamples, seqlen=args.seqlen, sparsity=args.sparsity)
            if METHODS[name] is None:
                spec = {**base, "method": name, "library": "llmcompressor", "kernel": "sparsegpt", "dampening": 0.01,
                        "block_size": 128}  # fmt: skip
                row = run_one(args.peer_python, spec, ROOT / "benchmarks/compare_worker.py")
            else:
                spec = {**base, "method": name, "library": "mosaic", "config": {**common, **METHODS[name]}}
                row = run_one(sys.executable, spec, Path(__file__))
            row.update(shape=args.shape, layers=args.layers, tokens=tokens, threads=args.threads)
            if "error" not in row:
                row.update(extrapolate(row, tokens, args.layers, SHAPES[args.shape]["n"]))
            rows = [r for r in rows if (r["method"], r.get("layers"), r.get("tokens")) != (name, args.layers, tokens)]
            rows.append(row)
            print({k: row.get(k) for k in ("method", "prune_s", "peak_rss_mib", "stages_s", "error")}, flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            fits = token_fits(rows, args.layers, SHAPES[args.shape]["n"])
            payload = {"shape": SHAPES[args.shape], "rows": rows, "token_fits": fits}
            out.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        print(RESULT_PREFIX + json.dumps(worker(json.loads(sys.argv[1]))), flush=True)
    else:
        main()
