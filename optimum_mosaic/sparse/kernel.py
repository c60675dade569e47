"""The CPU kernel for ``y = x Wᵀ + b`` with ``W`` in the bitmap format: ``csrc/bitmap_kernel.cpp`` (and its two
headers), compiled on first use with ``torch.utils.cpp_extension.load`` (g++ and ninja; once per machine, torch
version and source text, cached in the torch extensions directory, ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``). Nothing is compiled at install time. Without a compiler a one-line warning is
given and the plain-PyTorch path is used.

Paths (``path=`` or ``$OPTIMUM_MOSAIC_SPARSE_KERNEL``): ``auto`` (the widest SIMD path; AVX2 on AMD), ``avx512``, ``avx2``,
``scalar`` (portable C++) and ``torch`` (decompress, then ``F.linear``; no compiler needed).
With ``DENSE_FROM`` tokens or more (prefill), the kernel expands blocks of rows and uses the dense GEMM.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .format import BitmapTensor, decompress

ENV = "OPTIMUM_MOSAIC_SPARSE_KERNEL"
ISA = {"scalar": 0, "avx2": 1, "avx512": 2}
PATHS = ("auto", *ISA, "torch")
# Tokens from which a product goes through dense row blocks and the GEMM (``benchmarks/sparse_kernel.py``
# measures the crossover: the sparse path wins up to ~8 tokens on AVX-512/AVX2, the GEMM from ~16).
DENSE_FROM = 16
SOURCE = Path(__file__).with_name("csrc") / "bitmap_kernel.cpp"

_loaded: dict = {}


def _extension_name() -> str:
    """One build per torch version and source text (the headers too, which torch's own check does not hash)."""
    import hashlib

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.[ch]*")))).hexdigest()[:10]
    version = torch.__version__.replace(".", "_").replace("+", "_")
    return f"optimum_mosaic_sparse_torch{version}_{digest}"


def _ops():
    """``torch.ops.mosaic_sparse`` once the extension is built and loaded, or None (with one warning)."""
    if "ops" in _loaded:
        return _loaded["ops"]
    ops, reason = None, None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        reason = f"no C++ compiler ({compiler!r}) on PATH"
    elif shutil.which("ninja") is None:
        reason = "ninja is not installed (pip install ninja)"
    else:
        try:
            from torch.utils.cpp_extension import load

            load(
                name=_extension_name(),
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
            ops = torch.ops.mosaic_sparse
        except Exception as err:  # a failed build must not break inference: fall back, say why
            reason = (
                f"the build failed: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}"
            )
    if ops is None:
        warnings.warn(
            f"optimum_mosaic.sparse: the C++ sparse kernel is not available ({reason}); using the slower plain-PyTorch path",
            stacklevel=3,
        )
    _loaded["ops"] = ops
    return ops


def _machine() -> tuple[list[str], str]:
    """(the paths this machine can run, slowest first; the one ``auto`` takes), computed once."""
    if "machine" not in _loaded:
        ops = _ops()
        if ops is None:
            _loaded["machine"] = (["torch"], "torch")
        else:
            names = {level: name for name, level in ISA.items()}
            best = int(ops.best_isa())
            _loaded["machine"] = (["torch", *[names[i] for i in range(best + 1)]], names[int(ops.auto_isa())])
    return _loaded["machine"]


def available_paths() -> list[str]:
    """The paths this machine can run, slowest first: ``torch`` always, then ``scalar``, ``avx2``, ``avx512``
    as far as the CPU goes (none of them without a compiler)."""
    return list(_machine()[0])


def resolve_path(path: str | None = None) -> str:
    """``path``, else ``$OPTIMUM_MOSAIC_SPARSE_KERNEL``, else ``auto``, made concrete for this machine (``auto``:
    the widest SIMD path, but AVX2 on AMD CPUs, where it measured faster)."""
    path = (path or os.environ.get(ENV) or "auto").lower()
    if path not in PATHS:
        raise ValueError(f"sparse kernel path {path!r} unknown: choose one of {PATHS} (argument or ${ENV})")
    paths, auto = _machine()
    if path == "auto":
        return auto
    if path not in paths:
        raise ValueError(f"this machine cannot run the {path!r} sparse kernel path; it has {paths}")
    return path


def sparse_linear(
    x: torch.Tensor,
    weight: BitmapTensor,
    bias: torch.Tensor | None = None,
    path: str | None = None,
    dense_from: int | None = None,
) -> torch.Tensor:
    """``x @ Wᵀ + bias`` for ``W`` ``[out, in]`` in the bitmap format (fp32 or bf16 values, ``pad`` a power of 2).
    ``x`` ``[..., in]`` of any float dtype is computed in fp32 and returned in its own dtype."""
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    path = resolve_path(path)
    if path == "torch" or x.device.type != "cpu" or weight.values.dtype not in (torch.float32, torch.bfloat16):
        dense = decompress(weight).to(device=x.device, dtype=torch.float32)
        y = F.linear(x.float(), dense, None if bias is None else bias.float())
        return y.to(x.dtype)
    flat = x.reshape(-1, in_features)
    if flat.dtype != torch.float32:
        flat = flat.float()
    dense_from = DENSE_FROM if dense_from is None else dense_from
    op = _ops().linear
    y = op(flat, weight.bitmaps, weight.values, weight.offsets, bias, in_features, weight.pad, ISA[path], dense_from)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.view(*x.shape[:-1], out_features)
