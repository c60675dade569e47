"""Why a bf16 / fp16 model is pruned with its resident layer in fp32: the matmul of a SmolLM2 MLP input
(2048 × 576 by 576 × 1536) per dtype on one thread. Writes ``benchmarks/results/dtype_matmul.json``."""

import json
import time
from pathlib import Path

import torch


def main() -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    rows = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            x @ y
        rows[str(dtype).removeprefix("torch.")] = round((time.perf_counter() - start) / 3 * 1000, 2)
    result = {"cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "ms": rows,
              "slowdown_vs_fp32": {k: round(v / rows["float32"], 1) for k, v in rows.items()}}  # fmt: skip
    print(result)
    Path(__file__).with_name("results").joinpath("dtype_matmul.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
