"""Perplexity on held-out text: non-overlapping windows, ``ppl = exp(mean over windows of mean NLL)``.

(``evaluate``'s perplexity metric downloads its script from the Hub and scores strings one by one,
so the few lines are written here.)
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .calibration.data import CHUNK_CHARS, bos_id, load_default_corpus, split_windows, tokenize

LOGIT_BUDGET = 1 << 26  # fp32 logits held at once (256 MiB): 256 tokens of Gemma-3's 262,144-entry vocabulary


@torch.inference_mode()
def mean_nll(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> float:
    """Mean over windows of the mean next-token NLL (``windows``: [n, seqlen] token ids)."""
    device = next(model.parameters()).device
    total = 0.0
    starts = range(0, windows.shape[0], batch_size)
    for i in tqdm(starts, desc="Perplexity", disable=not progress):
        x = windows[i : i + batch_size].to(device)
        total += token_nll(model, x).mean(dim=1).sum().item()
    return total / windows.shape[0]


def token_nll(model, x: torch.Tensor, logit_budget: int = LOGIT_BUDGET) -> torch.Tensor:
    """Next-token NLL ``[b, seqlen-1]`` of ``x``; ``lm_head`` + cross-entropy run over chunks of positions
    so that at most ``logit_budget`` logits exist at once (a full ``[b, seqlen, vocab]`` tensor is GBs for
    large vocabularies). Models without a separable decoder / linear head fall back to one forward."""
    head, decoder = _split_head(model)
    if head is None:
        logits = model(x, use_cache=False).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    out = decoder(input_ids=x, use_cache=False)
    hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[:, :-1].flatten(0, 1)
    labels = x[:, 1:].flatten()
    cap = getattr(model.config, "final_logit_softcapping", None)
    step = max(1, logit_budget // head.out_features)
    nll = []
    for j in range(0, labels.numel(), step):
        logits = head(hidden[j : j + step]).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        nll.append(torch.nn.functional.cross_entropy(logits, labels[j : j + step], reduction="none"))
    return torch.cat(nll).view(x.shape[0], -1)


def _split_head(model):
    """``(lm_head, decoder)`` when logits are ``lm_head(decoder(x))`` (optionally soft-capped), else ``(None, None)``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(head, torch.nn.Linear) or decoder is None or decoder is model:
        return None, None
    return head, decoder


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
    windows = evaluation_windows(tokenizer, text, seqlen, max_windows)
    return math.exp(mean_nll(model, windows, batch_size, progress))


def evaluation_windows(tokenizer, text=None, seqlen: int = 2048, max_windows: int | None = None) -> torch.Tensor:
    """The ``[n, seqlen]`` windows ``perplexity`` evaluates: the first ``max_windows`` of the text (fewer when the
    text holds fewer; ``n`` is what a report must state). ``text``: a str, a text file (``os.PathLike``, read only
    as far as the windows reach), token ids, or None for the bundled novel."""
    chunk = None if text is None else CHUNK_CHARS  # the bundled novel is tokenised whole
    text = load_default_corpus("evaluation") if text is None else text
    if tokenizer is None and not isinstance(text, torch.Tensor):
        raise ValueError("evaluation text needs a tokenizer: pass one, or token ids (torch.Tensor)")
    bos = bos_id(tokenizer) if tokenizer is not None else None
    limit = None if max_windows is None else max_windows * (seqlen - (bos is not None))  # read only what is scored
    windows = split_windows(tokenize(tokenizer, text, limit, "evaluation text", chunk), seqlen, bos)
    if max_windows is not None:
        windows = windows[:max_windows]
    if windows.shape[0] == 0:
        raise ValueError(f"the text is shorter than one window of {seqlen} tokens")
    return windows
