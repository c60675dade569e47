"""Size and speed of dense / unstructured-only / structured-only / composite at 50 % removed.

    python benchmarks/structured_benchmark.py            # prunes, saves, then measures each checkpoint

Each checkpoint is measured in a fresh subprocess (``--measure PATH``) with torch threads fixed:
parameter count, safetensors size, peak RSS after loading, prefill latency of a 512-token prompt,
greedy decode tokens/s, and perplexity on held-out text. Results: ``benchmarks/results/structured.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# one allocation for all three (OWL, λ=0.08, M=5: no λ search, per-layer shapes differ)
_PLAN = dict(allocation="layer", lamda=0.08, outlier_threshold=5)
VARIANTS = {
    "unstructured-only": dict(sparsity=0.5, structured_sparsity=0.0, **_PLAN),
    "structured-only": dict(sparsity=0.5, structured_sparsity=0.5, **_PLAN),
    "composite (β=0.25)": dict(sparsity=0.5, structured_sparsity=0.25, **_PLAN),
}


def _peak_rss_mib() -> float:
    """VmHWM of this process. (``ru_maxrss`` is inherited from the parent across fork+exec on Linux,
    so it reported the driver's peak for every checkpoint.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(path: str, threads: int, eval_windows: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_mosaic  # noqa: F401  (registers the per-layer-shape classes)
    from optimum_mosaic import perplexity

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rss_mib = _peak_rss_mib()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = torch.randint(100, 20000, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(prompt[:, :32])  # warm-up
        prefill = []
        for _ in range(5):
            start = time.perf_counter()
            model(prompt, use_cache=False)
            prefill.append(time.perf_counter() - start)
        decode = []
        for _ in range(3):
            start = time.perf_counter()
            out = model.generate(prompt[:, :16], max_new_tokens=64, min_new_tokens=64, do_sample=False)
            decode.append((out.shape[1] - 16) / (time.perf_counter() - start))
    files = list(Path(path).glob("*.safetensors"))
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "nonzero_parameters": sum(int((p != 0).sum()) for p in model.parameters()),
        "safetensors_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
        "peak_rss_after_load_mib": round(rss_mib, 1),
        "prefill_512_s": round(statistics.median(prefill), 3),
        "decode_tokens_per_s": round(statistics.median(decode), 2),
        "perplexity": round(perplexity(model, tokenizer, seqlen=512, max_windows=eval_windows, progress=False), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", help="measure one checkpoint and print JSON (used internally)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workdir", default="benchmarks/checkpoints")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results/structured.json")
    parser.add_argument("--prune-only", action="store_true", help="prune and save, measure later")
    parser.add_argument("--measure-only", action="store_true", help="measure checkpoints saved by --prune-only")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.threads, args.eval_windows)))
        return

    import torch

    from optimum_mosaic import PrunedConfig, Pruner
    from optimum_mosaic.packaged_models import resolve_model_path
    from optimum_mosaic.report import format_table

    paths = {"dense": resolve_model_path(args.model)}
    timing_file = Path(args.workdir) / "prune_s.json"
    prune_s = json.loads(timing_file.read_text()) if args.measure_only else {}
    for name, options in VARIANTS.items():
        target = Path(args.workdir) / name.split(" ")[0]
        paths[name] = str(target)
        if args.measure_only:
            continue
        pruner = Pruner.from_pretrained(args.model)
        start = time.perf_counter()
        pruner.prune(PrunedConfig(nsamples=args.nsamples, seqlen=args.seqlen, **options), save_directory=target)
        prune_s[name] = round(time.perf_counter() - start, 1)
        del pruner
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    timing_file.write_text(json.dumps(prune_s))
    if args.prune_only:
        return
    rows = []
    for name, path in paths.items():
        cmd = [
            sys.executable,
            __file__,
            "--measure",
            path,
            "--threads",
            str(args.threads),
            "--eval-windows",
            str(args.eval_windows),
        ]
        result = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        )
        rows.append({"model": name, **result, "prune_s": prune_s.get(name, "-")})
        print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
