"""Calibration and evaluation text → seeded token windows.

The default corpus ships with the package: Jane Austen's six novels (public domain), reflowed and
gzipped. *Persuasion* is the evaluation text; the other five novels are the calibration text.
"""

from __future__ import annotations

import gzip
from importlib import resources

import torch

from ..exceptions import CalibrationError

EVALUATION_NOVELS = ("persuasion",)
CALIBRATION_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility")


def load_default_corpus(split: str = "calibration") -> str:
    """The bundled text: ``split`` is ``"calibration"`` (five novels) or ``"evaluation"`` (*Persuasion*)."""
    names = {"calibration": CALIBRATION_NOVELS, "evaluation": EVALUATION_NOVELS}.get(split)
    if names is None:
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    folder = resources.files("optimum_mosaic") / "data" / "austen"
    return "\n\n".join(gzip.decompress((folder / f"{n}.txt.gz").read_bytes()).decode("utf-8") for n in names)


def bos_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer itself prepends one (Gemma does, SmolLM2 does not), else ``None``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def tokenize(tokenizer, data) -> torch.Tensor:
    """One 1-D stream of token ids from a string, a list of strings, a ``datasets.Dataset`` (column
    ``text``) or token ids (1-D, or 2-D rows that are concatenated)."""
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).long()
    if isinstance(data, str):
        texts = [data]
    elif hasattr(data, "column_names"):
        if "text" not in data.column_names:
            raise CalibrationError(f"the dataset needs a 'text' column; it has {data.column_names}")
        texts = list(data["text"])
    else:
        texts = list(data)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CalibrationError("the calibration data is empty: pass non-empty text, or None for the bundled corpus")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids


def split_windows(ids: torch.Tensor, seqlen: int, bos: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` in order; with ``bos`` each window is BOS + seqlen−1 tokens."""
    body = seqlen - (bos is not None)
    n = ids.numel() // body
    windows = ids[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], dim=1)
    return windows


def sample_windows(tokenizer, data, nsamples: int, seqlen: int, seed: int, holdout: int = 0):
    """``(calibration, held_out)`` windows drawn without overlap by a seeded permutation.

    ``data=None`` uses the bundled calibration corpus; 2-D token ids of at least ``seqlen`` columns
    are taken as windows already. Raises ``CalibrationError`` when the text holds
    fewer than ``nsamples + holdout`` windows of ``seqlen`` tokens.
    """
    if data is None:
        data = load_default_corpus("calibration")
    if isinstance(data, torch.Tensor) and data.dim() == 2 and data.shape[1] >= seqlen:
        windows = data[:, :seqlen].long()  # pre-made windows are used as they are
    else:
        windows = split_windows(tokenize(tokenizer, data), seqlen, bos_id(tokenizer) if tokenizer else None)
    need = nsamples + holdout
    if windows.shape[0] < need:
        raise CalibrationError(
            f"the calibration text holds {windows.shape[0]} windows of {seqlen} tokens, but nsamples={nsamples}"
            f" (+{holdout} held out for the λ/M search) were asked for: lower nsamples or seqlen, or pass more text"
        )
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))[:need]
    return windows[order[:nsamples]], windows[order[nsamples:]]
