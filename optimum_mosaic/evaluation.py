"""Perplexity on held-out text: non-overlapping windows, ``ppl = exp(mean over windows of mean NLL)``.

(``evaluate``'s perplexity metric downloads its script from the Hub and scores strings one by one,
so the few lines are written here.)
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .calibration.data import bos_id, load_default_corpus, split_windows, tokenize


@torch.inference_mode()
def mean_nll(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> float:
    """Mean over windows of the mean next-token NLL (``windows``: [n, seqlen] token ids)."""
    device = next(model.parameters()).device
    total = 0.0
    starts = range(0, windows.shape[0], batch_size)
    for i in tqdm(starts, desc="Perplexity", disable=not progress):
        x = windows[i : i + batch_size].to(device)
        logits = model(x, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        total += nll.mean(dim=1).sum().item()
    return total / windows.shape[0]


def perplexity(
    model,
    tokenizer,
    text=None,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``text`` (default: the bundled evaluation novel, *Persuasion*)."""
    text = load_default_corpus("evaluation") if text is None else text
    windows = split_windows(tokenize(tokenizer, text), seqlen, bos_id(tokenizer))
    if max_windows is not None:
        windows = windows[:max_windows]
    if windows.shape[0] == 0:
        raise ValueError(f"the text is shorter than one window of {seqlen} tokens")
    return math.exp(mean_nll(model, windows, batch_size, progress))
