"""Quality, size and speed of unstructured-only, composite and structured-only pruning.

    python benchmarks/structured_benchmark.py                                  # SmolLM2-135M
    python benchmarks/structured_benchmark.py --model gemma3-270m --eval-windows 20 --out benchmarks/results/structured_gemma3.json
    python benchmarks/structured_benchmark.py --old-code /path/to/old/checkout --only composite   # old rows

Every prune runs in its own subprocess (``--prune NAME``; with ``--old-code`` that subprocess imports
optimum_mosaic from another checkout, so old and new code are compared on the same windows and settings), and
every checkpoint is measured in a fresh subprocess (``--measure PATH``) with torch threads fixed: parameters,
safetensors size, prefill time of a 512-token prompt, greedy decode tokens/s (dense kernels, then with the
projections holding ≥ 30 % zeros on the sparse CPU kernel), and perplexity on held-out text.
``--heal-steps N`` adds a row: the composite β = 0.2 checkpoint after N LoRA steps on the calibration text
(``examples/lora_on_pruned.py``: masks recorded first, merged and re-masked). Results: ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

_COMMON = dict(allocation="uniform", pruner="sparsegpt", structured_units=["mlp"])  # no λ search; old and new alike
VARIANTS = {
    "unstructured-only": dict(sparsity=0.5, structured_sparsity=0.0, **_COMMON),
    "composite β=0.1": dict(sparsity=0.5, structured_sparsity=0.1, **_COMMON),
    "composite β=0.2": dict(sparsity=0.5, structured_sparsity=0.2, **_COMMON),
    "composite β=0.25": dict(sparsity=0.5, structured_sparsity=0.25, **_COMMON),
    "structured-only 0.2": dict(sparsity=0.2, structured_sparsity=0.2, **_COMMON),
}
HEALED = "composite β=0.2"


def measure(path: str, threads: int, eval_windows: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_mosaic  # noqa: F401  (registers the per-layer-shape classes)
    from optimum_mosaic import perplexity

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
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
    layers = model.get_decoder().layers
    ppl = round(perplexity(model, tokenizer, seqlen=512, max_windows=eval_windows, progress=False), 3)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "decoder_parameters": sum(p.numel() for p in layers.parameters()),
        "nonzero_decoder_parameters": sum(int((p != 0).sum()) for p in layers.parameters()),
        "safetensors_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
        "prefill_512_s": round(statistics.median(prefill), 3),
        "decode_tokens_per_s": round(statistics.median(decode), 2),
        "perplexity": ppl,
        **_kernel_decode(model, prompt),  # last: it swaps the model's projections
    }


def _kernel_decode(model, prompt) -> dict:
    """Decode tokens/s with the projections that hold ≥ 30 % zeros on the sparse CPU kernel (measured after the
    dense figures; a dense model swaps nothing)."""
    import torch

    from optimum_mosaic.sparse import to_sparse_kernel

    to_sparse_kernel(model, min_sparsity=0.3)
    swapped = len(getattr(model, "mosaic_sparse_kernel", {}).get("swapped", []) or [])
    if not swapped:
        return {"kernel_projections": 0}
    decode = []
    with torch.inference_mode():
        model.generate(prompt[:, :16], max_new_tokens=4, do_sample=False)  # warm-up (and the one-time build)
        for _ in range(3):
            start = time.perf_counter()
            out = model.generate(prompt[:, :16], max_new_tokens=64, min_new_tokens=64, do_sample=False)
            decode.append((out.shape[1] - 16) / (time.perf_counter() - start))
    return {"kernel_projections": swapped, "decode_kernel_tokens_per_s": round(statistics.median(decode), 2)}


def prune(name: str, model: str, target: str, nsamples: int, seqlen: int) -> dict:
    from optimum_mosaic import PrunedConfig, Pruner

    pruner = Pruner.from_pretrained(model)
    # the Austen corpus these tables were first measured on (the default became the mixed corpus in issue 19)
    corpus = {"calibration_corpus": "austen"} if hasattr(PrunedConfig, "calibration_corpus") else {}
    start = time.perf_counter()
    pruner.prune(PrunedConfig(nsamples=nsamples, seqlen=seqlen, **VARIANTS[name], **corpus), save_directory=target)
    report = pruner.report
    return {
        "prune_s": round(time.perf_counter() - start, 1),
        "achieved_sparsity": report.achieved_sparsity,
        "structured_sparsity": report.structured_sparsity,
    }


def _child(args: list[str], pythonpath: str | None = None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def heal(path: Path, steps: int, seqlen: int) -> dict:
    """LoRA on the calibration text, merged and re-masked (examples/lora_on_pruned.py)."""
    import runpy

    example = Path(__file__).resolve().parents[1] / "examples" / "lora_on_pruned.py"
    main = runpy.run_path(str(example), run_name="example")["main"]
    target = path.with_name(path.name + "-healed")
    start = time.perf_counter()
    result = main(["--model", str(path), "--steps", str(steps), "--seqlen", str(seqlen), "--output", str(target)])
    return {"path": str(target), "heal_s": round(time.perf_counter() - start, 1), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", help="measure one checkpoint and print JSON (internal)")
    parser.add_argument("--prune", help="prune one variant and print JSON (internal)")
    parser.add_argument("--target", help="where --prune saves (internal)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workdir", default="benchmarks/checkpoints")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--only", nargs="+", default=None, help="variants whose name contains one of these words")
    parser.add_argument("--old-code", default=None, help="a checkout of older optimum-mosaic to prune with")
    parser.add_argument("--label", default=None, help="code label of the rows (default: new, or old with --old-code)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row")
    parser.add_argument("--heal-steps", type=int, default=0)
    parser.add_argument("--heal-seqlen", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/structured.json")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.threads, args.eval_windows)))
        return
    if args.prune:
        print(json.dumps(prune(args.prune, args.model, args.target, args.nsamples, args.seqlen)))
        return

    from optimum_mosaic.packaged_models import resolve_model_path
    from optimum_mosaic.report import format_table

    label = args.label or ("old" if args.old_code else "new")
    measure_args = ["--threads", str(args.threads), "--eval-windows", str(args.eval_windows)]
    out = Path(args.out)
    names = [n for n in VARIANTS if not args.only or any(w in n for w in args.only)]
    # rows of earlier runs stay unless this run measures them again
    redone = {(label, n) for n in names} | {(label, f"{HEALED} + LoRA {args.heal_steps} steps")}
    redone |= set() if args.no_dense else {("-", "dense")}
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    rows = [r for r in rows if "code" in r and (r["code"], r["model"]) not in redone]  # older files: other protocol

    def add(row: dict) -> None:  # written after every row: a failure late in a long run keeps the rest
        rows.append(row)
        print(row, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, ensure_ascii=False) + "\n")

    if not args.no_dense:
        add(
            {"model": "dense", "code": "-", **_child(["--measure", str(resolve_model_path(args.model)), *measure_args])}
        )
    for name in names:
        target = Path(args.workdir) / args.model / label / name.replace(" ", "_").replace("=", "")
        pruned = _child(
            [
                "--prune",
                name,
                "--target",
                str(target),
                "--model",
                args.model,
                "--nsamples",
                str(args.nsamples),
                "--seqlen",
                str(args.seqlen),
            ],
            args.old_code,
        )
        add({"model": name, "code": label, **pruned, **_child(["--measure", str(target), *measure_args])})
        if args.heal_steps and name == HEALED:
            healed = heal(target, args.heal_steps, args.heal_seqlen)
            measured = _child(["--measure", healed["path"], *measure_args])
            add({"model": f"{name} + LoRA {args.heal_steps} steps", "code": label, **healed, **measured})
    columns = ["model", "code", "parameters", "safetensors_mib", "prefill_512_s", "decode_tokens_per_s"]
    columns += ["decode_kernel_tokens_per_s", "perplexity"]
    print(format_table(rows, columns + ["prune_s"]))


if __name__ == "__main__":
    main()
