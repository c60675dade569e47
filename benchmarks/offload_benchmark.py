"""Prune a checkpoint that does not fit a memory limit, one decoder layer resident at a time.

    python benchmarks/offload_benchmark.py                 # build the model once, then run both prunes
    python benchmarks/offload_benchmark.py --limit-gib 1.5 --layers 24

A random Llama (hidden 1536, MLP 4096, 12 heads / 4 KV heads, tied 32k vocabulary; 24 layers ≈ 2.6 GB in
fp32) is written once to ``benchmarks/checkpoints/offload-llama``. Each prune runs in its own process inside a
memory cgroup limited to ``--limit-gib`` (cgroup v1 ``memory.limit_in_bytes``; needs root — without it the
runs are only measured): the offloaded prune (``Pruner.from_pretrained(path, offload=True)``) and the
ordinary in-memory prune, same SparseGPT config. Peak RSS is the child's VmHWM. Writes
``benchmarks/results/offload.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
GIB = 1024**3


def build(path: Path, layers: int) -> float:
    """Write the random checkpoint (once); return its weight size in GiB."""
    if not (path / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from optimum_mosaic.serialization import atomic_directory

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=1536,
            intermediate_size=4096,
            num_hidden_layers=layers,
            num_attention_heads=12,
            num_key_value_heads=4,
            tie_word_embeddings=True,
        )
        with atomic_directory(path, overwrite=True) as staging:
            LlamaForCausalLM(config).save_pretrained(staging, max_shard_size="1GB")
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / GIB


def worker(path: str, offload: bool, nsamples: int, seqlen: int, out: str) -> None:
    import torch

    from optimum_mosaic import PrunedConfig, Pruner

    torch.manual_seed(0)
    windows = torch.randint(0, 32000, (nsamples, seqlen))
    config = PrunedConfig(
        sparsity=0.5, allocation="projection", lamda=0.08, outlier_threshold=5.0, nsamples=nsamples, seqlen=seqlen
    )
    t0 = time.perf_counter()
    if offload:
        pruner = Pruner.from_pretrained(path, offload=True)
        pruner.prune(config, calibration_dataset=windows, save_directory=out)
    else:
        from transformers import AutoModelForCausalLM

        pruner = Pruner(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        pruner.prune(config, calibration_dataset=windows)
    wall = time.perf_counter() - t0
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(
        json.dumps(
            {
                "wall_s": round(wall, 1),
                "peak_rss_gib": round(peak / 1024**2, 3),
                "achieved_sparsity": pruner.report.achieved_sparsity,
            }
        )
    )


CGROUP = Path("/sys/fs/cgroup/memory/mosaic_offload_benchmark")


def memory_cgroup(limit: int) -> Path | None:
    """A cgroup-v1 memory group capped at ``limit`` bytes (swap included where accounted), or None."""
    try:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.limit_in_bytes").write_text(str(limit))
        if (CGROUP / "memory.memsw.limit_in_bytes").exists():
            (CGROUP / "memory.memsw.limit_in_bytes").write_text(str(limit))
        return CGROUP
    except OSError:
        return None


def run(args, offload: bool) -> dict:
    group = memory_cgroup(int(args.limit_gib * GIB))

    def cap():
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--path",
        str(args.path),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
    ] + (["--offload"] if offload else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap)
    limited = {"memory_limited": group is not None}
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"killed by signal {-proc.returncode} (out of memory)"]
        return {"ok": False, "returncode": proc.returncode, "error": tail[0][:300], **limited}
    return {"ok": True, **json.loads(proc.stdout.strip().splitlines()[-1]), **limited}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=ROOT / "checkpoints" / "offload-llama")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--limit-gib", type=float, default=1.5)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "results" / "offload.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(str(args.path), args.offload, args.nsamples, args.seqlen, str(args.path) + "-pruned")

    size = build(args.path, args.layers)
    layer_gib = size / args.layers  # close enough: the tied embedding is 0.18 GiB of the total
    result = {
        "model_gib": round(size, 3),
        "one_layer_gib": round(layer_gib, 3),
        "limit_gib": args.limit_gib,
        "calibration": f"{args.nsamples} x {args.seqlen} random tokens",
        "offloaded": run(args, offload=True),
        "in_memory": run(args, offload=False),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
