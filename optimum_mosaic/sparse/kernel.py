"""The CPU kernel for ``y = x Wᵀ + b`` with ``W`` in the bitmap format: ``csrc/bitmap_kernel.cpp`` (and its two
headers), compiled on first use with ``torch.utils.cpp_extension.load`` (g++ and ninja; once per machine, torch
version, flags and source text, cached in the torch extensions directory, ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``). Nothing is compiled at install time. Without a compiler a one-line warning is
given and the plain-PyTorch path is used.

Loading (``_ops``): a library built before is loaded as it is (no compiler, no write: a read-only cache works).
Otherwise one process builds it while holding an ``flock`` on ``mosaic_build.lock`` in the build directory, which
the system releases when the process ends, killed or not; others wait for it at most ``BUILD_WAIT_S`` seconds, then
fall back. So torch's own ``lock`` found by the holder of that flock was left by a killed build (torch would wait
for it forever): it is removed and the build runs again.

Paths (``path=`` or ``$OPTIMUM_MOSAIC_SPARSE_KERNEL``): ``auto`` (the widest SIMD path; AVX2 on AMD), ``avx512``, ``avx2``,
``scalar`` (portable C++) and ``torch`` (decompress, then ``F.linear``; no compiler needed). The variable set to
``torch`` turns the C++ kernel off: nothing is built or loaded (nor ``torch.utils.cpp_extension`` imported), unless
it was loaded earlier in the process.
With ``DENSE_FROM`` tokens or more (prefill), the kernel expands blocks of rows and uses the dense GEMM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .format import BitmapTensor, check_consistent, decompress

ENV = "OPTIMUM_MOSAIC_SPARSE_KERNEL"
ISA = {"scalar": 0, "avx2": 1, "avx512": 2}
PATHS = ("auto", *ISA, "torch")
# Tokens from which a product goes through dense row blocks and the GEMM (``benchmarks/sparse_kernel.py``
# measures the crossover: the sparse path wins up to ~8 tokens on AVX-512/AVX2, the GEMM from ~16).
DENSE_FROM = 16
SOURCE = Path(__file__).with_name("csrc") / "bitmap_kernel.cpp"
CFLAGS, LDFLAGS = ("-O3", "-fopenmp"), ("-fopenmp",)  # tuples: torch appends its libraries to the lists it is given
BUILD_WAIT_S = 600.0  # the longest wait for another process's build (a first build takes about a minute)
BUILD_LOCK = "mosaic_build.lock"

_loaded: dict = {}


def _extension_name() -> str:
    """One build per torch version, flags and source text (the headers too, which torch's own check does not hash)."""
    import hashlib

    text = b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.[ch]*"))) + " ".join(CFLAGS + LDFLAGS).encode()
    version = torch.__version__.replace(".", "_").replace("+", "_")
    return f"optimum_mosaic_sparse_torch{version}_{hashlib.sha256(text).hexdigest()[:10]}"


def _disabled() -> bool:
    """``$OPTIMUM_MOSAIC_SPARSE_KERNEL=torch``: the C++ kernel is off. Read while nothing is loaded (so a later change
    of the variable counts), never cached; once the kernel is loaded, nothing is left to build."""
    return (os.environ.get(ENV) or "").lower() == "torch"


def _build_directory(name: str | None = None) -> Path:
    """``<extensions root>/<name>``, as torch builds it (created if missing)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name or _extension_name(), False))


@contextlib.contextmanager
def _build_lock(directory: Path, wait_s: float):
    """Hold an exclusive ``flock`` on ``directory/BUILD_LOCK`` (yields True), or yield False once another process
    has held it for ``wait_s`` seconds. Without ``fcntl`` (Windows) nothing is locked and True is yielded."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    with open(directory / BUILD_LOCK, "a") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.2)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_or_build() -> str | None:
    """Load the extension, built before or now (see the module docstring); None, or why it is not available."""
    from torch.utils.cpp_extension import LIB_EXT, load

    name = _extension_name()
    directory = _build_directory(name)
    library = directory / f"{name}{LIB_EXT}"
    if library.is_file() and not (directory / "lock").exists():  # built, and no build under way: load, write nothing
        with contextlib.suppress(OSError):  # unreadable or damaged: built again below
            torch.ops.load_library(str(library))
            return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r}) on PATH"
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    with _build_lock(directory, BUILD_WAIT_S) as held:
        if not held:
            return f"another process has been building it for over {BUILD_WAIT_S:g} s ({directory / BUILD_LOCK})"
        (directory / "lock").unlink(missing_ok=True)  # torch's, while we hold the flock: a killed build's
        load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=list(CFLAGS),  # copies: torch extends them in place, which would change the name's hash
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    return None


def _ops():
    """``torch.ops.mosaic_sparse`` once the extension is loaded, or None: with one warning saying why, or silently
    (and without building) under ``$OPTIMUM_MOSAIC_SPARSE_KERNEL=torch``."""
    if "ops" in _loaded:
        return _loaded["ops"]
    if _disabled():
        return None
    try:
        reason = _load_or_build()
    except Exception as err:  # a failed build must not break inference: fall back, say why
        reason = f"the build failed: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}"
    ops = torch.ops.mosaic_sparse if reason is None else None
    if ops is None:
        warnings.warn(
            f"optimum_mosaic.sparse: the C++ sparse kernel is not available ({reason}); using the slower plain-PyTorch path",
            stacklevel=3,
        )
    _loaded["ops"] = ops
    return ops


def _machine() -> tuple[list[str], str]:
    """(the paths this machine can run, slowest first; the one ``auto`` takes), computed once."""
    if "machine" not in _loaded and _disabled():
        return ["torch"], "torch"
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
    if path == "torch":  # needs no kernel: nothing is built
        return path
    paths, auto = _machine()
    if path == "auto":
        return auto
    if path not in paths:
        off = f" (${ENV}=torch turns the C++ kernel off)" if _disabled() else ""
        raise ValueError(f"this machine cannot run the {path!r} sparse kernel path; it has {paths}{off}")
    return path


def sparse_linear(
    x: torch.Tensor,
    weight: BitmapTensor,
    bias: torch.Tensor | None = None,
    path: str | None = None,
    dense_from: int | None = None,
) -> torch.Tensor:
    """``x @ Wᵀ + bias`` for ``W`` ``[out, in]`` in the bitmap format (fp32 or bf16 values, ``pad`` a power of 2).
    ``x`` ``[..., in]`` of any float dtype is computed in fp32 and returned in its own dtype. NaN or ±inf in ``x``
    give what the dense product gives (a pruned weight is 0, and 0 · NaN = 0 · inf = NaN), on every path.

    Inconsistent parts of ``weight`` raise: on the plain-PyTorch path a ``ValueError`` from
    ``format.check_consistent``, on the C++ paths a ``RuntimeError`` from the op's own checks (dtypes and sizes;
    per row, O(1): offsets in order and inside the values before it is computed, and the path's popcount-advanced
    position on the next offset after it; see ``csrc/bitmap_kernel.cpp``). Nothing is read out of bounds."""
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    path = resolve_path(path)
    if path == "torch" or x.device.type != "cpu" or weight.values.dtype not in (torch.float32, torch.bfloat16):
        check_consistent(weight)  # decompress alone would not notice wrong offsets, nor always a wrong value count
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
