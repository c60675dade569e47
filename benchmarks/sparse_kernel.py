"""The sparse CPU kernel against dense torch: matrix × vector per shape, the prefill crossover, and SmolLM2 end to end.

    python benchmarks/sparse_kernel.py             # everything (≈ 25 min on 2 cores); JSON + Markdown tables
    python benchmarks/sparse_kernel.py --quick     # small settings, a few minutes (sparse_kernel_quick.json)
    python benchmarks/sparse_kernel.py --only kernel crossover

(a) kernel: y = x Wᵀ for one token, W of each SmolLM2-135M projection shape (q/o 576×576, k/v 192×576,
    gate/up 1536×576, down 576×1536) and 4096×4096, 11008×4096, unstructured (uniform random zeros) at 50/70/90 %
    (30/40 % too for the SmolLM2 shapes: where the swap starts to pay), 1 and 2 threads. Dense torch F.linear in
    fp32 and bf16 against the kernel with fp32 and bf16 values (``auto`` path). Two regimes:
    *streamed* — a pass over enough copies of W that they cannot stay in the last-level cache (as in decoding,
    where each weight is read once per token), and *resident* — the same W again and again (cache-hot when it
    fits). Times: per product, the best of 7 rounds that alternate between the four ways (so that a change of
    load on a shared machine hits them alike).
(b) crossover: 2 … 64 tokens through the kernel's sparse path and through its dense blocks + GEMM, vs dense.
(c) end to end (``benchmarks/sparse_kernel_e2e.py``): SmolLM2-135M dense, 50 % and 70 % unstructured (Wanda,
    uniform) and a composite (structured + unstructured), each in a fresh process: greedy decode tokens/s,
    resident memory, decoder-weight bytes, checkpoint size; dense fp32 vs the sparse kernel.
Results: ``benchmarks/results/sparse_kernel.json`` (``--quick``: ``sparse_kernel_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
SMOLLM2 = {"q,o": (576, 576), "k,v": (192, 576), "gate,up": (1536, 576), "down": (576, 1536)}
LARGE = {"4096²": (4096, 4096), "11008×4096": (11008, 4096)}


def cpu_facts() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    from optimum_mosaic.sparse import kernel

    return {
        "cpu": name or platform.processor(),
        "isa": [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16") if f in flags],
        "l3": l3.read_text().strip() if l3.exists() else "?",
        "logical_cpus": len([line for line in info.splitlines() if line.startswith("processor")]),
        "kernel_paths": kernel.available_paths(),
        "auto_path": kernel.resolve_path("auto"),
        "torch": torch.__version__,
    }


def _l3_bytes() -> int:
    path = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    text = path.read_text().strip() if path.exists() else "32M"
    return int(text[:-1]) * {"K": 2**10, "M": 2**20}.get(text[-1], 1)


def interleaved(runs: dict, rounds: int = 7, min_round_s: float = 0.02) -> dict[str, float]:
    """Seconds per product for each of ``runs`` ({name: list of zero-argument calls}): the rounds alternate
    between the runs, so a change of load on a shared machine hits them alike, and each run's best round counts."""
    reps = {}
    for name, calls in runs.items():
        start = time.perf_counter()
        for call in calls:
            call()
        reps[name] = max(1, math.ceil(min_round_s / max(time.perf_counter() - start, 1e-9)))
    best = dict.fromkeys(runs, math.inf)
    for _ in range(rounds):
        for name, calls in runs.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                for call in calls:
                    call()
            best[name] = min(best[name], (time.perf_counter() - start) / (reps[name] * len(calls)))
    return best


def random_pruned(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W[torch.rand(rows, cols, generator=g) < sparsity] = 0
    return W


def _copies(nbytes: int, streamed: bool, stream_bytes: int) -> int:
    """Copies of a matrix that make a pass stream from memory (≥ ``stream_bytes``), or 1 (cache-resident)."""
    return max(2, math.ceil(stream_bytes / nbytes)) if streamed else 1


def dense_calls(W: torch.Tensor, x: torch.Tensor, streamed: bool, stream_bytes: int) -> list:
    weights = [W.clone() for _ in range(_copies(W.numel() * W.element_size(), streamed, stream_bytes))]
    return [lambda w=w: F.linear(x, w) for w in weights]


def sparse_calls(packed, x: torch.Tensor, streamed: bool, stream_bytes: int, dense_from: int | None = None) -> list:
    from optimum_mosaic.sparse import BitmapTensor, sparse_linear

    n = _copies(packed.nbytes, streamed, stream_bytes)
    copies = [
        BitmapTensor(packed.bitmaps.clone(), packed.values.clone(), packed.offsets.clone(), packed.shape)
        for _ in range(n)
    ]
    return [lambda p=p: sparse_linear(x, p, dense_from=dense_from) for p in copies]


def kernel_table(shapes: dict, threads: list[int], quick: bool) -> list[dict]:
    from optimum_mosaic.sparse import compress

    stream_bytes = max(4 * _l3_bytes(), 128 * 2**20) if not quick else 4 * _l3_bytes()
    rows = []
    for name, (out_f, in_f) in shapes.items():
        x = torch.randn(1, in_f)
        small = (out_f, in_f) in SMOLLM2.values()
        sparsities = [0.5, 0.7, 0.9] if quick or not small else [0.3, 0.4, 0.5, 0.7, 0.9]
        for sparsity in sparsities:
            W = random_pruned(out_f, in_f, sparsity)
            packed = compress(W)
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                row = {"shape": f"{out_f}×{in_f}", "projection": name, "sparsity": sparsity, "threads": n_threads}
                for regime in ("streamed", "resident"):
                    streamed = regime == "streamed"
                    t = interleaved(
                        {
                            "dense_fp32": dense_calls(W, x, streamed, stream_bytes),
                            "dense_bf16": dense_calls(W.bfloat16(), x.bfloat16(), streamed, stream_bytes),
                            "kernel_fp32": sparse_calls(packed, x, streamed, stream_bytes),
                            "kernel_bf16": sparse_calls(packed.to(torch.bfloat16), x, streamed, stream_bytes),
                        }
                    )
                    row[regime] = {f"{k}_us": round(v * 1e6, 1) for k, v in t.items()}
                    row[regime]["speedup_fp32"] = round(t["dense_fp32"] / t["kernel_fp32"], 2)
                    row[regime]["speedup_bf16_values"] = round(t["dense_fp32"] / t["kernel_bf16"], 2)
                row["bytes_ratio_fp32"] = round(packed.nbytes / packed.dense_nbytes, 4)
                rows.append(row)
                print(_kernel_line(row), flush=True)
    torch.set_num_threads(max(threads))
    return rows


def _kernel_line(row: dict) -> str:
    s, r = row["streamed"], row["resident"]
    return (
        f"{row['shape']:>11} {row['sparsity']:.0%} t{row['threads']}: streamed dense {s['dense_fp32_us']} µs, "
        f"kernel {s['kernel_fp32_us']} µs ({s['speedup_fp32']}×, bf16 values {s['speedup_bf16_values']}×); "
        f"resident {r['speedup_fp32']}×"
    )


def crossover(threads: list[int], quick: bool) -> list[dict]:
    """Tokens through the sparse path vs the dense blocks + GEMM, 70 %, streamed weights."""
    from optimum_mosaic.sparse import compress

    stream_bytes = 4 * _l3_bytes()
    rows = []
    shapes = [(1536, 576)] if quick else [(1536, 576), (4096, 4096)]
    for out_f, in_f in shapes:
        W = random_pruned(out_f, in_f, 0.7)
        packed = compress(W)
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for tokens in (1, 2, 4, 8, 12, 16, 24, 32, 64):
                x = torch.randn(tokens, in_f)
                t = interleaved(
                    {
                        "dense": dense_calls(W, x, True, stream_bytes),
                        "sparse_path": sparse_calls(packed, x, True, stream_bytes, dense_from=10**9),
                        "dense_blocks": sparse_calls(packed, x, True, stream_bytes, dense_from=1),
                    },
                    rounds=5,
                )
                row = {"shape": f"{out_f}×{in_f}", "threads": n_threads, "tokens": tokens}
                rows.append({**row, **{f"{k}_us": round(v * 1e6, 1) for k, v in t.items()}})
                print(rows[-1], flush=True)
    torch.set_num_threads(max(threads))
    return rows


def markdown(results: dict) -> str:
    lines = []
    if results.get("kernel"):
        lines += [
            "| shape | sparsity | threads | dense fp32 µs | dense bf16 µs | kernel fp32 µs | kernel bf16-values µs "
            "| speed-up fp32 (streamed) | speed-up fp32 (resident) | bytes / dense |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in results["kernel"]:
            s, r = row["streamed"], row["resident"]
            lines.append(
                f"| {row['shape']} ({row['projection']}) | {row['sparsity']:.0%} | {row['threads']} | {s['dense_fp32_us']} "
                f"| {s['dense_bf16_us']} | {s['kernel_fp32_us']} | {s['kernel_bf16_us']} | **{s['speedup_fp32']}×** "
                f"| {r['speedup_fp32']}× | {row['bytes_ratio_fp32']} |"
            )
    if results.get("crossover"):
        lines += ["", "| shape | threads | tokens | dense µs | kernel sparse path µs | kernel dense blocks µs |"]
        lines.append("|---|---|---|---|---|---|")
        for row in results["crossover"]:
            lines.append(
                f"| {row['shape']} | {row['threads']} | {row['tokens']} | {row['dense_us']} | {row['sparse_path_us']} "
                f"| {row['dense_blocks_us']} |"
            )
    if results.get("e2e"):
        sys.path.insert(0, str(HERE))
        from sparse_kernel_e2e import markdown_rows

        lines += ["", *markdown_rows(results["e2e"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings (a smoke run)")
    parser.add_argument("--only", nargs="*", choices=["kernel", "crossover", "e2e"], default=None)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument(
        "--workdir", default=str(HERE / "checkpoints" / "sparse_kernel"), help="pruned checkpoints (e2e)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    parts = args.only or ["kernel", "crossover", "e2e"]
    out = Path(args.out or HERE / "results" / f"sparse_kernel{'_quick' if args.quick else ''}.json")
    results = json.loads(out.read_text()) if out.exists() and args.only else {}
    results["machine"] = cpu_facts()
    results["note"] = "timings on a machine whose 2 cores may be shared; ratios are taken within one run"
    shapes = (
        {**SMOLLM2, **LARGE} if not args.quick else {"q,o": (576, 576), "gate,up": (1536, 576), "4096²": (4096, 4096)}
    )
    if "kernel" in parts:
        results["kernel"] = kernel_table(shapes, args.threads, args.quick)
    if "crossover" in parts:
        results["crossover"] = crossover(args.threads, args.quick)
    if "e2e" in parts:
        sys.path.insert(0, str(HERE))
        import sparse_kernel_e2e

        results["e2e"] = sparse_kernel_e2e.run(Path(args.workdir), args.threads, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
