"""Inconsistent bitmap buffers raise (never crash), and the kernel build never hangs or writes where it cannot.

Buffers are refused on every path that sets or reads them: ``SparseLinear.load_packed``, ``load_state_dict``,
``sparse_linear`` and a direct call of the registered ops. The build: a stale ``lock`` left by a killed build is
cleared, a live builder is waited for a bounded time, ``OPTIMUM_MOSAIC_SPARSE_KERNEL=torch`` builds nothing, and a
read-only cache holding the built library loads it without writing."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_sparse_kernel import PATHS, assert_matches_dense, pruned
from torch import nn

from optimum_mosaic.sparse import SparseLinear, kernel
from optimum_mosaic.sparse.format import BitmapTensor, compress

REPO = Path(__file__).resolve().parents[1]


def corrupted(packed: BitmapTensor) -> dict[str, tuple[BitmapTensor, str, str]]:
    """Broken copies of ``packed`` (rows of 100 columns): name → (tensor, what the Python check says, what the
    C++ op says)."""
    b, v, o, shape = packed.bitmaps, packed.values, packed.offsets, packed.shape
    far, negative, shifted = o.clone(), o.clone(), o.clone()
    far[3] = 10**9
    negative[2] = -(10**6)
    shifted[1:] += 1
    extra_bits, middle, beyond = b.clone(), b.clone(), b.clone()
    extra_bits[-2] = 0xFF  # the last row's first tile full: more values than stored
    middle[8] = 0xFF  # the same in row 4, far from the end of the values (found after the row is read)
    beyond[1, 7] |= 0x80  # column 127 of row 0 (only 100 columns), with its value and the offsets after it
    beyond_values = torch.cat([v[: o[1]], torch.ones(1), v[o[1] :]])
    row = "inconsistent bitmap weight: row"
    return {
        "values truncated": (BitmapTensor(b, v[:10], o, shape), "stored values but 10 are present", row),
        "offset far out": (BitmapTensor(b, v, far, shape), r"not monotone: offsets\[3\] = 1000000000", row),
        "offset negative": (BitmapTensor(b, v, negative, shape), r"not monotone: offsets\[1\]", row),
        "offsets not monotone": (BitmapTensor(b, v, o.flip(0), shape), "must start at 0", "must start at 0"),
        "offsets shifted": (BitmapTensor(b, v, shifted, shape), r"do not match the bitmaps: offsets\[1\]", row),
        "bitmaps claim more values": (BitmapTensor(extra_bits, v, o, shape), "stored values", row),
        "a middle row claims more values": (BitmapTensor(middle, v, o, shape), "stored values", row),
        "bits beyond the last column": (BitmapTensor(beyond, beyond_values, o + (o > 0), shape), "beyond", "beyond"),
        "offsets int64": (BitmapTensor(b, v, o.long(), shape), "offsets are .* torch.int64", "int32"),
        "one offset missing": (BitmapTensor(b, v, o[:-1], shape), r"offsets are \(15,\)", "do not split into rows"),
        "bitmaps 1-D": (BitmapTensor(b.flatten(), v, o, shape), "bitmaps are", "bitmaps must be"),
    }


PACKED = compress(pruned(16, 100, 0.5, seed=7))
CASES = corrupted(PACKED)


# -- item 7: validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_load_packed_refuses_inconsistent_parts_and_keeps_the_weight(case):
    module = SparseLinear(100, 16, bias=False)
    module.load_packed(PACKED)
    broken, says, _ = CASES[case]
    with pytest.raises(ValueError, match=says):
        module.load_packed(broken)
    x = torch.randn(2, 100)
    assert torch.equal(module.weight, PACKED.to_dense())
    assert_matches_dense(module(x), x, PACKED.to_dense())


@pytest.mark.parametrize("case", list(CASES))
def test_load_state_dict_refuses_and_keeps_the_previous_weight(case):
    module = SparseLinear.from_linear(nn.Linear(100, 16))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    broken, says, _ = CASES[case]
    state = dict(before, weight_bitmaps=broken.bitmaps, weight_values=broken.values, weight_offsets=broken.offsets)
    with pytest.raises(RuntimeError, match=says):
        module.load_state_dict(state)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
    reference = SparseLinear(100, 16)
    reference.load_state_dict(before)
    x = torch.randn(3, 100)
    assert torch.equal(module(x), reference(x))


def test_load_state_dict_checks_a_partial_update_against_the_kept_parts():
    module = SparseLinear.from_linear(nn.Linear(100, 16))
    with pytest.raises(RuntimeError, match="values"):
        module.load_state_dict({"weight_values": module.weight_values[:-5]}, strict=False)
    module.load_state_dict({"weight_values": module.weight_values * 2}, strict=False)  # same pattern: accepted


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_sparse_linear_refuses_inconsistent_parts(path, case):
    broken, says, op_says = CASES[case]
    for tokens in (1, 20):  # 20: the dense-block (prefill) route
        with pytest.raises(ValueError if path == "torch" else RuntimeError, match=says if path == "torch" else op_says):
            kernel.sparse_linear(torch.randn(tokens, 100), broken, path=path)


@pytest.mark.parametrize("path", PATHS[1:])
@pytest.mark.parametrize("case", list(CASES))
def test_the_registered_ops_check_bounds(path, case):
    """A direct call of ``torch.ops.mosaic_sparse`` (no Python checks in front) raises a RuntimeError."""
    broken, _, says = CASES[case]
    ops, isa = kernel._ops(), kernel.ISA[path]
    for tokens in (1, 9, 20):
        with pytest.raises(RuntimeError, match=says):
            ops.linear(torch.randn(tokens, 100), broken.bitmaps, broken.values, broken.offsets, None, 100, 1, isa, 16)
    with pytest.raises(RuntimeError, match=says):
        ops.expand(broken.bitmaps, broken.values, broken.offsets, 100, 1, 0, 16, isa)


# -- item 8: the build ----------------------------------------------------------------------------------------------
def build_directory() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(kernel._extension_name(), False))


def run_python(code: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=timeout, capture_output=True, text=True)


def test_a_stale_lock_of_a_killed_build_does_not_hang(tmp_path):
    """A build killed mid-compile leaves torch's ``lock``: the next process clears it and builds (here: finds the
    objects up to date), instead of waiting forever."""
    built = build_directory()
    cache = tmp_path / "extensions"
    shutil.copytree(built, cache / built.name)  # copy2: mtimes kept, so ninja has nothing to redo
    (cache / built.name / "lock").touch()
    code = "from optimum_mosaic.sparse import kernel; print(kernel.available_paths())"
    start = time.monotonic()
    done = run_python(code, {"TORCH_EXTENSIONS_DIR": str(cache)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'scalar'" in done.stdout and "not available" not in done.stderr
    assert not (cache / built.name / "lock").exists() and time.monotonic() - start < 120


def test_a_build_leaves_the_extension_name_as_it_was(tmp_path, monkeypatch):
    """torch's ``load`` appends its libraries to the ``extra_ldflags`` list it is given (seen with torch 2.13): the
    flags that name the build must not be those lists, or every later lookup in the process (locks, the library's
    path, the tests' copies of the build) would go to another directory."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    before = kernel._extension_name()

    def load_like_torch(name, sources, extra_cflags, extra_ldflags, build_directory, **_):
        extra_cflags.append("-fPIC")
        extra_ldflags += ["-L/somewhere/torch/lib", "-ltorch"]
        (Path(build_directory) / f"{name}.so").write_bytes(b"")  # the library, as a build leaves it

    monkeypatch.setattr("torch.utils.cpp_extension.load", load_like_torch)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: None)
    assert kernel._load_or_build() is None
    assert kernel._extension_name() == before
    assert (tmp_path / before / f"{before}.so").exists()


def test_a_live_builder_is_waited_for_a_bounded_time(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(kernel, "_loaded", {})
    monkeypatch.setattr(kernel, "BUILD_WAIT_S", 0.5, raising=False)
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda *a, **k: pytest.fail("built while locked"))
    directory = kernel._build_directory()
    with kernel._build_lock(directory, wait_s=0) as held:  # another builder, alive
        assert held
        start = time.monotonic()
        with pytest.warns(UserWarning, match="another process.*plain-PyTorch"):
            assert kernel.available_paths() == ["torch"]
        assert time.monotonic() - start < 10


def test_the_torch_path_builds_nothing(monkeypatch):
    monkeypatch.setenv(kernel.ENV, "torch")
    monkeypatch.setattr(kernel, "_loaded", {})
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda *a, **k: pytest.fail("the kernel was built"))
    monkeypatch.setattr(torch.ops, "load_library", lambda *a: pytest.fail("the kernel was loaded"))
    module = SparseLinear.from_linear(nn.Linear(100, 16))
    x = torch.randn(2, 100)
    assert kernel.resolve_path() == "torch" and kernel.available_paths() == ["torch"]
    assert_matches_dense(module(x), x, module.weight, module.bias)
    assert kernel._loaded == {}  # nothing cached: the variable may change later in the process
    code = (
        "import sys, torch; from torch import nn; from optimum_mosaic.sparse import SparseLinear, sparse_linear\n"
        "m = SparseLinear.from_linear(nn.Linear(70, 9)); m(torch.randn(2, 70))\n"
        "sparse_linear(torch.randn(3, 70), m.packed)\n"
        "print('cpp_extension' if 'torch.utils.cpp_extension' in sys.modules else 'no build machinery')"
    )
    done = run_python(code, {kernel.ENV: "torch"}, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "no build machinery", done.stdout + done.stderr


READ_ONLY = """
import os, sys
root = os.path.realpath(os.environ["TORCH_EXTENSIONS_DIR"])
writes = []
def read_only(event, args):  # the cache is read-only: every write under it fails, and is recorded
    if event in ("open", "os.mkdir", "os.remove", "os.rename", "os.replace", "os.rmdir", "os.chmod", "os.utime"):
        path = args[0]
        if not isinstance(path, (str, bytes, os.PathLike)) or not os.path.realpath(os.fsdecode(path)).startswith(root):
            return
        if event == "open":
            mode, flags = args[1] or "", args[2] or 0
            if not (any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                return
        elif event == "os.mkdir" and os.path.isdir(path):
            return
        writes.append((event, os.fsdecode(path)))
        raise PermissionError(13, "Read-only file system", os.fsdecode(path))
sys.addaudithook(read_only)
import warnings; warnings.simplefilter("error")
import torch
from optimum_mosaic.sparse import kernel
from optimum_mosaic.sparse.format import compress
W = torch.randn(9, 70); W[W.abs() < 0.5] = 0
x = torch.randn(2, 70)
y = kernel.sparse_linear(x, compress(W), path="scalar")
assert torch.allclose(y, x @ W.T, atol=1e-5)
print(kernel.available_paths(), writes)
"""


def test_a_read_only_cache_with_the_built_library_loads_it(tmp_path):
    built = build_directory()
    cache = tmp_path / "extensions"
    (cache / built.name).mkdir(parents=True)
    library = f"{built.name}.so"
    shutil.copy2(built / library, cache / built.name / library)  # the library only: nothing to build from
    done = run_python(READ_ONLY, {"TORCH_EXTENSIONS_DIR": str(cache), "PATH": "/nonexistent"}, timeout=120)
    done_args = done.stdout + done.stderr
    assert done.returncode == 0, done_args
    assert "'scalar'" in done.stdout and done.stdout.strip().endswith("[]"), done_args
    assert sorted(p.name for p in (cache / built.name).iterdir()) == [library]


# -- item 13a: non-finite inputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tokens", [1, 3, 9, 20])
def test_non_finite_inputs_give_what_the_dense_product_gives(path, tokens):
    """0 · NaN = 0 · inf = NaN: a pruned weight times a NaN or an infinite input poisons the row, as in ``x @ Wᵀ``
    (NaN in a tile with stored values, in an all-zero tile, in a row without values; an infinity)."""
    W = pruned(40, 200, 0.6, seed=8, zero_rows=(5,))
    W[:, 64:128] = 0  # an all-zero tile in every row
    W[7, 10] = 0
    W[9, 10] = 1.5
    x = torch.randn(tokens, 200)
    x[0, 10] = float("nan")
    if tokens > 1:
        x[1, 70] = float("nan")  # inside the all-zero tiles
        x[2, 150] = float("inf")
    bias = torch.randn(40)
    y = kernel.sparse_linear(x, compress(W), bias, path=path)
    expected = torch.nn.functional.linear(x, W, bias)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(y[finite], expected[finite], rtol=1e-5, atol=1e-5)
