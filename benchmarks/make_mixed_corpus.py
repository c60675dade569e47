"""Builds the bundled mixed calibration corpus: ``optimum_mosaic/data/mixed/{code,prose}.txt.gz``.

    python benchmarks/make_mixed_corpus.py          # from the checkout and the packages installed in .venv

Fiction (and its dialogue) is the five Austen calibration novels already bundled. This script freezes the two
other parts, so that the corpus does not change when the code or the environment does:

- ``code``: the Python source of this project (``optimum_mosaic/``, ``integrations/``, ``examples/``; Apache-2.0,
  ours), one file after another under a ``# file: <path>`` line;
- ``prose``: technical prose: this project's documentation (Apache-2.0, ours) and the README (the wheel's long
  description) of the Hugging Face / PyTorch packages named in ``PROSE_PACKAGES``, all under Apache-2.0, MIT or
  BSD licences, which allow redistribution with their notice (recorded in ``data/README.md``). Markdown images,
  badges and raw HTML lines are dropped.

None of it overlaps the evaluation domains of ``optimum_mosaic.domains`` (Python's standard library, CPython's
reference docs, Shakespeare, *Persuasion*).
"""

from __future__ import annotations

import gzip
import importlib.metadata as md
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "optimum_mosaic" / "data" / "mixed"
CODE_DIRS = ("optimum_mosaic", "integrations", "examples")
DOCS = ("README.md", "docs/details.md", "CONTRIBUTING.md", "model_cards/README.md", "integrations/README.md")
PROSE_PACKAGES = ("transformers", "accelerate", "peft", "datasets", "huggingface_hub", "optimum", "torch",
                  "safetensors", "bitsandbytes", "lm_eval", "evaluate", "tokenizers")  # fmt: skip
_DROP = re.compile(r"^\s*(<|!\[|\[!\[)|shields\.io|badge", re.IGNORECASE)


def code_text() -> str:
    files = sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    return "\n\n".join(f"# file: {p.relative_to(ROOT)}\n{p.read_text(encoding='utf-8').strip()}" for p in files)


def _clean(markdown: str) -> str:
    lines = [line for line in markdown.splitlines() if not _DROP.search(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def prose_text() -> tuple[str, list[str]]:
    parts = [_clean((ROOT / doc).read_text(encoding="utf-8")) for doc in DOCS]
    credits = []
    for name in PROSE_PACKAGES:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        body = dist.metadata.get_payload() or ""
        licence = dist.metadata.get("License-Expression") or dist.metadata.get("License") or "see the package"
        if body.strip():
            parts.append(_clean(body))
            credits.append(f"{dist.metadata['Name']} {dist.version} ({licence.splitlines()[0][:60]})")
    return "\n\n".join(parts), credits


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    prose, credits = prose_text()
    for name, text in (("code", code_text()), ("prose", prose)):
        # mtime=0: the same text gives the same bytes
        (OUT / f"{name}.txt.gz").write_bytes(gzip.compress(text.encode("utf-8"), 9, mtime=0))
        print(f"{name}: {len(text):,} characters")
    print("prose from:", "; ".join(credits))


if __name__ == "__main__":
    main()
