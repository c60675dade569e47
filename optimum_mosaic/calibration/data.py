"""Calibration and evaluation text → seeded token windows.

Two corpora ship with the package (``data/README.md`` records sources and licences):

- ``"austen"``: Jane Austen's six novels (public domain), reflowed and gzipped. *Persuasion* is the evaluation
  text; the other five novels are the calibration text.
- ``"mixed"``: fiction (the five calibration novels), Python code and technical prose, drawn in the fixed shares
  ``MIXED_SHARES`` of the windows (a part too small for its share leaves the rest to fiction).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from importlib import resources
from pathlib import Path

import torch

from ..exceptions import CalibrationError
from ..packaged_models import cache_dir

EVALUATION_NOVELS = ("persuasion",)
CALIBRATION_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility")
CHUNK_CHARS = 1 << 20  # characters per tokenizer call (~25 bytes of memory each); the bundled corpus is one call
MIXED_SHARES = {"fiction": 0.5, "code": 0.25, "prose": 0.25}
CORPUS_NAMES = {
    "austen": "bundled Austen novels",
    "mixed": "the mixed corpus bundled with optimum-mosaic (fiction, Python code, technical prose)",
}
CORPORA = tuple(CORPUS_NAMES)
POOL = 2  # text beyond the first chunk is read only until it holds POOL × the windows asked for


def load_default_corpus(split: str = "calibration") -> str:
    """The bundled text: ``split`` is ``"calibration"`` (five novels) or ``"evaluation"`` (*Persuasion*)."""
    names = {"calibration": CALIBRATION_NOVELS, "evaluation": EVALUATION_NOVELS}.get(split)
    if names is None:
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    folder = resources.files("optimum_mosaic") / "data" / "austen"
    return "\n\n".join(gzip.decompress((folder / f"{n}.txt.gz").read_bytes()).decode("utf-8") for n in names)


def load_mixed_part(part: str) -> str:
    """One part of the mixed corpus: ``"fiction"`` (the five calibration novels), ``"code"`` or ``"prose"``."""
    if part == "fiction":
        return load_default_corpus("calibration")
    if part not in MIXED_SHARES:
        raise ValueError(f"part must be one of {sorted(MIXED_SHARES)}, got {part!r}")
    path = resources.files("optimum_mosaic") / "data" / "mixed" / f"{part}.txt.gz"
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def _shares(total: int, shares: dict[str, float]) -> dict[str, int]:
    """``total`` split by ``shares`` with largest remainders (ties in the dict's order)."""
    exact = {k: total * v for k, v in shares.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def mixed_windows(tokenizer, nsamples: int, seqlen: int, seed: int, holdout: int = 0):
    """``(calibration, held_out)`` windows of the mixed corpus: each part gives its share of both (largest
    remainders), drawn by one seeded permutation per part; a part with too few windows gives all it has and
    fiction the rest. The calibration windows are then put in one seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    bos = bos_id(tokenizer) if tokenizer else None
    pools = {p: split_windows(part_ids(tokenizer, p), seqlen, bos) for p in MIXED_SHARES}
    calib, held = _shares(nsamples, MIXED_SHARES), _shares(holdout, MIXED_SHARES)
    for part in ("code", "prose"):  # short parts hand their deficit to fiction
        for counts in (calib, held):
            spare = pools[part].shape[0] - calib[part] - held[part]
            if spare < 0:
                cut = min(-spare, counts[part])
                counts[part] -= cut
                counts["fiction"] += cut
    out_calib, out_held = [], []
    for part, pool in pools.items():
        need = calib[part] + held[part]
        if pool.shape[0] < need:
            raise CalibrationError(
                f"the mixed corpus holds {pool.shape[0]} {part} windows of {seqlen} tokens, {need} are needed:"
                " lower nsamples or seqlen"
            )
        order = torch.randperm(pool.shape[0], generator=generator)[:need]
        out_calib.append(pool[order[: calib[part]]])
        out_held.append(pool[order[calib[part] :]])
    calibration = torch.cat(out_calib)
    calibration = calibration[torch.randperm(calibration.shape[0], generator=generator)]
    return calibration, torch.cat(out_held)


def token_cache() -> Path:
    """Where ``part_ids`` keeps the bundled corpus's token ids: ``cache_dir()/tokens``."""
    return cache_dir() / "tokens"


def part_ids(tokenizer, part: str) -> torch.Tensor:
    """The token ids of one part of the mixed corpus, tokenised whole (``tokenize(…, chunk=None)``), kept on disk
    per tokenizer: tokenising the fiction part (3.6 M characters) whole takes seconds, on every run otherwise. The file is
    ``token_cache()/<part>-<digest>.pt``, the digest of the tokenizer's serialised state and the part's text;
    written to a temporary file and renamed. A file that cannot be read is made again; a cache that cannot be
    written is passed over. A tokenizer without a serialised state (not a fast one) is not cached."""
    text = load_mixed_part(part)
    state = getattr(getattr(tokenizer, "backend_tokenizer", None), "to_str", None)
    if state is None:
        return tokenize(tokenizer, text, chunk=None)
    digest = hashlib.sha256(f"{type(tokenizer).__name__}\0{state()}\0{text}".encode()).hexdigest()[:32]
    path = token_cache() / f"{part}-{digest}.pt"
    try:
        return torch.load(path, weights_only=True).long()
    except Exception:  # noqa: BLE001 - missing or unreadable: made again below
        pass
    ids = tokenize(tokenizer, text, chunk=None)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{part}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(ids.int(), f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return ids


def bos_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer itself prepends one (Gemma does, SmolLM2 does not), else ``None``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def tokenize(
    tokenizer, data, limit: int | None = None, what: str = "calibration text", chunk: int | None = CHUNK_CHARS
) -> torch.Tensor:
    """One 1-D stream of token ids from a string, a list of strings, a ``datasets.Dataset`` (column ``text``),
    a text file (``os.PathLike``, read in pieces) or token ids (1-D, or 2-D rows that are concatenated).

    Text is tokenised in pieces of at most ``chunk`` characters, cut after a line break: a text up to that long is
    one tokenizer call, as if tokenised whole (``chunk=None``: always whole, for the bundled corpus). ``limit``: stop
    reading once this many tokens are read (the first piece is always read whole), so that memory is bounded
    whatever the size of the text.
    """
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).long()
    ids, total, blank = [], 0, True
    for text in _chunks(_pieces(data), chunk):
        blank = blank and text.isspace()
        ids.append(tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0])
        total += ids[-1].numel()
        if limit is not None and total >= limit:
            break
    if blank:
        default = "the bundled novel" if what.startswith("evaluation") else "the bundled corpus"
        raise CalibrationError(f"the {what} is empty: pass non-empty text, or None for {default}")
    return ids[0] if len(ids) == 1 else torch.cat(ids)


def _pieces(data):
    """The text of ``data`` in order: a file in pieces, the entries of a list or dataset joined by a blank line
    (blank entries skipped)."""
    if isinstance(data, os.PathLike):
        path = Path(data)
        try:
            with open(path, encoding="utf-8") as f:
                while piece := f.read(CHUNK_CHARS):
                    yield piece
        except UnicodeDecodeError as err:
            raise CalibrationError(f"{path} is not UTF-8 text ({err})") from None
        return
    if isinstance(data, str):
        rows = [data]
    elif hasattr(data, "column_names"):
        if "text" not in data.column_names:
            raise CalibrationError(f"the dataset needs a 'text' column; it has {data.column_names}")
        rows = (
            (t for batch in data.iter(batch_size=1024) for t in batch["text"])
            if hasattr(data, "iter")
            else data["text"]
        )
    else:
        rows = data
    first = True
    for text in rows:
        if text and text.strip():
            if not first:
                yield "\n\n"
            yield text
            first = False


def _chunks(pieces, chunk: int | None = CHUNK_CHARS):
    """The concatenated ``pieces`` as strings of at most ``chunk`` characters, each cut after the last line break
    (else space) in it; a text of at most ``chunk`` characters (any text if ``chunk`` is None) is one string."""
    pending, size = [], 0
    for piece in pieces:
        pending.append(piece)
        size += len(piece)
        if chunk is None or size <= chunk:
            continue
        text, start = "".join(pending), 0
        while len(text) - start > chunk:
            end = start + chunk
            cut = text.rfind("\n", start, end) + 1 or text.rfind(" ", start, end) + 1 or end
            yield text[start:cut]
            start = cut
        pending, size = [text[start:]], len(text) - start
    if size:
        yield "".join(pending)


def split_windows(ids: torch.Tensor, seqlen: int, bos: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` in order; with ``bos`` each window is BOS + seqlen−1 tokens."""
    body = seqlen - (bos is not None)
    n = ids.numel() // body
    windows = ids[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], dim=1)
    return windows


def sample_windows(tokenizer, data, nsamples: int, seqlen: int, seed: int, holdout: int = 0, corpus="austen"):
    """``(calibration, held_out)`` windows drawn without overlap by a seeded permutation.

    ``data=None`` uses the bundled calibration corpus ``corpus`` (``"austen"`` or ``"mixed"``: ``mixed_windows``); 2-D token ids of at least ``seqlen`` columns
    are taken as windows already. Text is drawn from a bounded prefix: its first ``CHUNK_CHARS`` characters, and
    beyond them only as much as holds ``POOL × (nsamples + holdout)`` windows (so a text of any size takes bounded
    memory; a text up to ``CHUNK_CHARS`` long, and the bundled corpus, are used whole, as before). Raises
    ``CalibrationError`` when the text holds fewer than ``nsamples + holdout`` windows of ``seqlen`` tokens.
    """
    if data is None and corpus == "mixed":
        return mixed_windows(tokenizer, nsamples, seqlen, seed, holdout)
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    chunk = None if data is None else CHUNK_CHARS  # the bundled corpus (3.6 M characters) is tokenised whole
    if data is None:
        data = load_default_corpus("calibration")
    need = nsamples + holdout
    if isinstance(data, torch.Tensor) and data.dim() == 2 and data.shape[1] >= seqlen:
        windows = data[:, :seqlen].long()  # pre-made windows are used as they are
    else:
        bos = bos_id(tokenizer) if tokenizer else None
        limit = POOL * need * (seqlen - (bos is not None))
        windows = split_windows(tokenize(tokenizer, data, limit, chunk=chunk), seqlen, bos)
    if windows.shape[0] < need:
        raise CalibrationError(
            f"the calibration text holds {windows.shape[0]} windows of {seqlen} tokens, but nsamples={nsamples}"
            f" (+{holdout} held out for the λ/M search) were asked for: lower nsamples or seqlen, or pass more text"
        )
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))[:need]
    return windows[order[:nsamples]], windows[order[nsamples:]]
