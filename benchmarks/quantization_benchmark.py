"""bitsandbytes 8-bit / 4-bit on top of pruned SmolLM2-135M: memory, perplexity, surviving sparsity, text.

    python benchmarks/structured_benchmark.py --prune-only      # once: writes benchmarks/checkpoints/*
    python benchmarks/quantization_benchmark.py

Every (checkpoint, precision) pair is measured in a fresh subprocess (``--measure PATH KIND``): weight
memory (``model.get_memory_footprint()``), peak RSS after loading (VmHWM), the pruned zeros that survive
quantization and the extra zeros it creates (``model.mosaic_quantization``), perplexity on held-out text,
greedy decode tokens/s and a short greedy continuation. Results: ``benchmarks/results/quantization.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHECKPOINTS = {"dense": None, "unstructured-only": "unstructured-only", "composite (β=0.25)": "composite"}
KINDS = ("fp32", "8bit", "4bit-nf4")
PROMPT = "It was a bright morning in Bath, and Anne"


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _quantization_config(kind: str):
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if kind.startswith("4bit"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind.split("-")[1])
    return None


def _load(path: str, kind: str):
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_mosaic import PrunedModelForCausalLM
    from optimum_mosaic.quantization import guard_cpu_4bit_packing, prepare_quantization_config, quantization_report

    config = _quantization_config(kind)
    if Path(path, "mosaic_config.json").is_file():
        model = PrunedModelForCausalLM.from_pretrained(path, quantization_config=config)
        return model, getattr(model, "mosaic_quantization", None)
    if config is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), None
    config = prepare_quantization_config(config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)
    guard_cpu_4bit_packing(model)
    return model, quantization_report(model, path, config)


def measure(path: str, kind: str, threads: int, eval_windows: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoTokenizer

    from optimum_mosaic import perplexity

    model, report = _load(path, kind)
    model.eval()
    rss = _peak_rss_mib()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up (bnb repacks on first forward)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        decode = 32 / (time.perf_counter() - start)
    row = {
        "weights_mib": round(model.get_memory_footprint() / 2**20, 1),
        "peak_rss_after_load_mib": round(rss, 1),
        "decode_tokens_per_s": round(decode, 2),
        "perplexity": round(perplexity(model, tokenizer, seqlen=512, max_windows=eval_windows, progress=False), 3),
        "text": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True),
    }
    if report is not None:
        row.update(
            sparsity_before=round(report.sparsity_before, 4),
            sparsity_after=round(report.sparsity_after, 4),
            pruned_zeros_kept=f"{report.pruned_zeros_kept}/{report.zeros_before}",
            extra_zeros=report.extra_zeros,
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "KIND"), help="one measurement (used internally)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workdir", default="benchmarks/checkpoints")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results/quantization.json")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.threads, args.eval_windows)))
        return

    from optimum_mosaic.packaged_models import resolve_model_path
    from optimum_mosaic.report import format_table

    rows = []
    for name, folder in CHECKPOINTS.items():
        path = resolve_model_path(args.model) if folder is None else str(Path(args.workdir) / folder)
        if not Path(path).is_dir():
            sys.exit(f"{path} is missing: run `python benchmarks/structured_benchmark.py --prune-only` first")
        for kind in KINDS:
            cmd = [sys.executable, __file__, "--measure", path, kind, "--threads", str(args.threads)]
            cmd += ["--eval-windows", str(args.eval_windows)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append({"model": name, "precision": kind, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, ensure_ascii=False) + "\n")
    columns = ["model", "precision", "weights_mib", "peak_rss_after_load_mib", "decode_tokens_per_s", "perplexity"]
    print(format_table(rows, columns + ["sparsity_before", "sparsity_after", "pruned_zeros_kept", "extra_zeros"]))
    print(format_table(rows, ["model", "precision", "text"]))


if __name__ == "__main__":
    main()
