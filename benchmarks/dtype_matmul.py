"""Why a bf16 / fp16 model is pruned with its resident layer in fp32 — and where that costs: per dtype on one thread,
(a) the matmul of a SmolLM2 MLP input (2048 × 576 by 576 × 1536) and (b) the seven projections of one
Llama-3-8B-shaped layer applied to 2048 tokens (``F.linear``: q, k, v, o, gate, up, down; the work of one forward of
the walk, attention scores aside). The answer depends on the CPU (AVX2 has no bf16 arithmetic; AVX-512-BF16 and AMX
do), so ``benchmarks/results/dtype_matmul.json`` keeps one entry per kind of CPU, keyed by torch's capability
(``AVX2``, ``AVX512``) plus ``+AMX`` where AMX tiles are usable; a run replaces its own entry.

    python benchmarks/dtype_matmul.py            # (a) and (b)
    python benchmarks/dtype_matmul.py --small    # (a) only (seconds; (b) takes minutes where bf16 is emulated)
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scale import SHAPES

OUT = Path(__file__).with_name("results").joinpath("dtype_matmul.json")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def projection_shapes(shape: str = "llama3-8b") -> dict[str, tuple[int, int]]:
    """(out, in) of the seven projections of one decoder layer of ``scale.py``'s ``shape``."""
    dims = SHAPES[shape]
    hidden, mlp = dims["hidden_size"], dims["intermediate_size"]
    kv = hidden // dims["num_attention_heads"] * dims["num_key_value_heads"]
    return {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
            "gate": (mlp, hidden), "up": (mlp, hidden), "down": (hidden, mlp)}  # fmt: skip


def cpu_kind() -> str:
    """The kind of CPU, as torch sees it: ``AVX2``, ``AVX512``, plus ``+AMX`` where AMX tiles are usable."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.backends.cpu.get_cpu_capability() + ("+AMX" if amx else "")


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(min(times) * 1000, 2)


def ratios(ms: dict) -> dict:
    return {k: round(v / ms["float32"], 2) for k, v in ms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="only the SmolLM2 matmul")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    pairs = {str(d).removeprefix("torch."): (a.to(d), b.to(d)) for d in DTYPES}
    ms = {name: best_ms(lambda x=x, y=y: x @ y, 3) for name, (x, y) in pairs.items()}
    entry = {"torch": torch.__version__, "processor": platform.processor() or platform.machine(), "ms": ms,
             "slowdown_vs_fp32": ratios(ms)}  # fmt: skip
    if not args.small:
        x = torch.randn(2048, 4096)
        weights = {name: torch.randn(shape) * 0.02 for name, shape in projection_shapes().items()}
        layer = {}
        for dtype in DTYPES:
            w = {name: t.to(dtype) for name, t in weights.items()}
            inputs = {4096: x.to(dtype), 14336: torch.randn(2048, 14336).to(dtype)}

            def forward(w=w, inputs=inputs):
                for t in w.values():
                    F.linear(inputs[t.shape[1]], t)

            layer[str(dtype).removeprefix("torch.")] = best_ms(forward, 2)
        entry["llama3_8b_projections_2048_tokens_ms"] = layer
        entry["llama3_8b_projections_vs_fp32"] = ratios(layer)
    runs = json.loads(OUT.read_text())["runs"] if OUT.exists() else {}
    runs[cpu_kind()] = {**runs.get(cpu_kind(), {}), **entry}
    print(cpu_kind(), entry)
    OUT.write_text(json.dumps({"runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
