"""Why a bf16 / fp16 model is pruned with its resident layer in fp32: the matmul of a SmolLM2 MLP input
(2048 × 576 by 576 × 1536) per dtype on one thread. The answer depends on the CPU (AVX2 has no bf16 arithmetic;
AVX-512-BF16 and AMX do), so ``benchmarks/results/dtype_matmul.json`` keeps one entry per kind of CPU, keyed by
torch's capability (``AVX2``, ``AVX512``) plus ``+AMX`` where AMX tiles are usable; a run replaces its own entry."""

import json
import platform
import time
from pathlib import Path

import torch

OUT = Path(__file__).with_name("results").joinpath("dtype_matmul.json")


def cpu_kind() -> str:
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.backends.cpu.get_cpu_capability() + ("+AMX" if amx else "")


def main() -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    ms = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            x @ y
        ms[str(dtype).removeprefix("torch.")] = round((time.perf_counter() - start) / 3 * 1000, 2)
    entry = {"torch": torch.__version__, "processor": platform.processor() or platform.machine(), "ms": ms,
             "slowdown_vs_fp32": {k: round(v / ms["float32"], 2) for k, v in ms.items()}}  # fmt: skip
    runs = json.loads(OUT.read_text())["runs"] if OUT.exists() else {}
    runs[cpu_kind()] = entry
    print(cpu_kind(), entry)
    OUT.write_text(json.dumps({"runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
