"""Mustafar sparse KV cache on SmolLM2-135M (head_dim 64, 3 KV heads, 30 layers): bytes, perplexity, text, speed.

    python benchmarks/kv_cache_benchmark.py                      # 2 windows of 2048 tokens (see --help)
    python benchmarks/kv_cache_benchmark.py --quick              # smoke check, < 1 min

For K,V sparsity (0, 0) = dense ``DynamicCache``, (0.5, 0.5) and (0.7, 0.7), dense window 32:

(a) cache bytes after a full window, exact (``SparseKVCache.memory_report``): fp32 as run, and fp16 (the same
    sparsity pattern with 2-byte values: 8 B bitmap + ⌈c/8⌉·8·2 B + 4 B offset per 64-element tile);
(b) teacher-forced perplexity *through the cache*: each window of held-out text (*Persuasion*) is prefilled
    for its first ``--prefill`` tokens (dense attention), then fed one token at a time, so every later
    prediction attends to the pruned history (all but the 32 most recent tokens pruned). Scored: the
    predictions of tokens prefill … seqlen−1 (the same tokens for every configuration). The dense row is
    also checked against one ordinary forward pass over the window;
(c) a greedy continuation of ``--new-tokens`` tokens after a ``--seqlen``-token prompt, and how many of its
    tokens match the dense continuation;
(d) CPU decode tokens/s: the mean step time of (b) (context prefill…seqlen) and of (c) (context ≈ seqlen).
    SparseKVCache is the masked-dense reference path: every step decompresses the whole pruned tail, so it
    is *slower* than dense here; Mustafar's speed-up needs its sparse attention kernel.
Results: ``benchmarks/results/kv_cache.json`` (``--quick``: ``kv_cache_quick.json``) and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIGS = {"dense (DynamicCache)": None, "K0.5 V0.5": (0.5, 0.5), "K0.7 V0.7": (0.7, 0.7)}


def make_cache(sparsities, window: int, config):
    from transformers import DynamicCache

    from optimum_mosaic.sparse import SparseKVCache

    if sparsities is None:
        return DynamicCache()
    return SparseKVCache(*sparsities, window=window, config=config)


def heldout_windows(tokenizer, seqlen: int, count: int) -> torch.Tensor:
    from optimum_mosaic.calibration.data import bos_id, load_default_corpus, split_windows, tokenize

    windows = split_windows(tokenize(tokenizer, load_default_corpus("evaluation")), seqlen, bos_id(tokenizer))
    return windows[:count]


@torch.inference_mode()
def score_through_cache(model, ids: torch.Tensor, cache, prefill: int) -> dict:
    """Σ NLL of tokens prefill … L−1 (1-row ``ids``): prefill, then one token per step; step times."""
    logits = model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits[:, -1]
    nll, steps = F.cross_entropy(logits, ids[:, prefill]).item(), []
    for t in range(prefill, ids.shape[1] - 1):
        start = time.perf_counter()
        logits = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
        steps.append(time.perf_counter() - start)
        nll += F.cross_entropy(logits, ids[:, t + 1]).item()
    return {"nll": nll, "tokens": ids.shape[1] - prefill, "step_s": steps}


@torch.inference_mode()
def one_pass_nll(model, ids: torch.Tensor, prefill: int) -> float:
    logits = model(ids, use_cache=False).logits[0, prefill - 1 : -1]
    return F.cross_entropy(logits, ids[0, prefill:], reduction="sum").item()


@torch.inference_mode()
def greedy(model, prompt: torch.Tensor, cache, new_tokens: int) -> dict:
    start = time.perf_counter()
    logits = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]
    prefill_s = time.perf_counter() - start
    out, steps = [int(logits.argmax(-1))], []
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        logits = model(torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True).logits[:, -1]
        steps.append(time.perf_counter() - start)
        out.append(int(logits.argmax(-1)))
    return {"tokens": out, "prefill_s": prefill_s, "step_s": steps}


def memory(cache) -> dict:
    """Exact bytes; the window is stored dense, so the tail's dense equivalent is dense − window."""
    if not hasattr(cache, "memory_report"):
        return {}
    fp32, fp16 = cache.memory_report(), cache.memory_report(itemsize=2)
    return {
        "cache_mib_fp32": fp32["total"] / 2**20,
        "dense_mib_fp32": fp32["dense"] / 2**20,
        "bytes_vs_dense_fp32": fp32["ratio"],
        "bytes_vs_dense_fp16": fp16["ratio"],
        "tail_vs_dense_fp32": fp32["tail"] / (fp32["dense"] - fp32["window"]),
        "tail_vs_dense_fp16": fp16["tail"] / (fp16["dense"] - fp16["window"]),
    }


def run_config(name, sparsities, model, tokenizer, windows, args) -> dict:
    nll = tokens = 0.0
    steps, bytes_row = [], {}
    for row in windows:
        cache = make_cache(sparsities, args.window, model.config)
        scored = score_through_cache(model, row[None], cache, args.prefill)
        nll, tokens, steps = nll + scored["nll"], tokens + scored["tokens"], steps + scored["step_s"]
        bytes_row = bytes_row or memory(cache)  # after the first full window
    generation = greedy(model, windows[:1], make_cache(sparsities, args.window, model.config), args.new_tokens)
    result = {
        "config": name,
        "perplexity": math.exp(nll / tokens),
        "scored_tokens": int(tokens),
        "score_tokens_per_s": len(steps) / sum(steps),
        "decode_tokens_per_s": len(generation["step_s"]) / sum(generation["step_s"]),
        "prefill_s": generation["prefill_s"],
        **bytes_row,
        "generated": generation["tokens"],
        "text": tokenizer.decode(generation["tokens"], skip_special_tokens=True),
    }
    if sparsities is None:
        one_pass = sum(one_pass_nll(model, row[None], args.prefill) for row in windows)
        result["perplexity_one_forward_pass"] = math.exp(one_pass / tokens)
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per held-out window (and prompt of (c))")
    parser.add_argument("--windows", type=int, default=2, help="held-out windows scored per configuration")
    parser.add_argument("--prefill", type=int, default=64, help="dense prefill before token-by-token scoring")
    parser.add_argument("--window", type=int, default=32, help="dense window of the most recent tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated for (c)/(d)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="seqlen 128, 1 window, 6 new tokens (smoke check)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.seqlen, args.windows, args.prefill, args.new_tokens = 128, 1, 32, 6
    args.out = args.out or f"benchmarks/results/kv_cache{'_quick' if args.quick else ''}.json"
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from optimum_mosaic import Pruner
    from optimum_mosaic.report import format_table

    pruner = Pruner.from_pretrained(args.model)
    model, tokenizer = pruner.model.eval(), pruner.tokenizer
    windows = heldout_windows(tokenizer, args.seqlen, args.windows)
    rows = []
    for name, sparsities in CONFIGS.items():
        rows.append(run_config(name, sparsities, model, tokenizer, windows, args))
        print({k: v for k, v in rows[-1].items() if k != "generated"}, flush=True)
    for row in rows:
        row["greedy_match_dense"] = sum(a == b for a, b in zip(row["generated"], rows[0]["generated"], strict=True))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, ensure_ascii=False) + "\n")
    columns = ["config", "perplexity", "bytes_vs_dense_fp32", "bytes_vs_dense_fp16", "tail_vs_dense_fp16"]
    columns += ["score_tokens_per_s", "decode_tokens_per_s", "greedy_match_dense"]
    print(format_table(rows, columns))
    print(format_table([{**r, "text": r["text"].replace("\n", " ")} for r in rows], ["config", "text"]))


if __name__ == "__main__":
    main()
