"""The bitmap weight format and the sparse CPU kernel: every path this machine runs equals dense ``x @ Wᵀ``."""

import pytest
import torch

from optimum_mosaic.sparse import kernel
from optimum_mosaic.sparse.format import BitmapTensor, check_consistent, compress, decompress, tile_nbytes

PATHS = kernel.available_paths()  # torch, then scalar / avx2 / avx512 as far as this CPU goes (builds once)


def pruned(rows: int, cols: int, sparsity: float, seed: int = 0, zero_rows=()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W[torch.rand(rows, cols, generator=g) < sparsity] = 0
    W[list(zero_rows)] = 0
    return W


def assert_matches_dense(y: torch.Tensor, x: torch.Tensor, W: torch.Tensor, bias=None):
    """|y − x Wᵀ| ≤ 1e-5 · (|x| |W|ᵀ) element by element, against a float64 reference: 1e-5 relative to the size
    of the terms, which only a change of summation order may move."""
    ref = x.double() @ W.double().T
    scale = x.double().abs() @ W.double().abs().T
    if bias is not None:
        ref, scale = ref + bias.double(), scale + bias.double().abs()
    assert y.shape == ref.shape and y.dtype == torch.float32
    error = (y.double() - ref).abs()
    assert bool((error <= 1e-5 * scale + 1e-30).all()), f"max error {error.max().item():.3g}"


def test_the_machine_has_the_compiled_paths():
    assert PATHS[0] == "torch" and "scalar" in PATHS, "the C++ kernel did not build here"
    assert kernel.resolve_path("auto") in PATHS


# -- the format ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 150), (64, 64), (3, 1), (0, 70), (2, 3, 130)])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
def test_weight_format_round_trip_and_bytes(shape, sparsity):
    W = pruned(int(torch.tensor(shape[:-1]).prod()), shape[-1], sparsity).reshape(shape)
    packed = compress(W)
    assert torch.equal(decompress(packed), W) and packed.pad == 1
    rows, tiles = packed.num_rows, -(-shape[-1] // 64)
    nnz = int((W != 0).sum())
    # no padding: bitmaps 8 B per tile, the non-zeros, one int32 offset per row, 8 B per dimension
    assert packed.values.numel() == nnz
    assert packed.nbytes == rows * tiles * 8 + nnz * 4 + rows * 4 + 8 * len(shape)
    check_consistent(packed)


def test_seventy_percent_fp32_is_a_third_of_dense():
    packed = compress(pruned(576, 576, 0.7))
    nnz = packed.values.numel()
    assert packed.nbytes == 576 * 9 * 8 + nnz * 4 + 576 * 4 + 16
    assert 0.32 < packed.nbytes / packed.dense_nbytes < 0.345  # 0.3 + 1/32 + 1/576 at exactly 70 %
    assert tile_nbytes(19, 4) == 8 + 19 * 4


def test_nonzero_counts_of_any_bitmap_view():
    """The per-tile popcount (64-bit SWAR) equals counting the unpacked bits, also for a view at an odd offset."""
    flat = torch.randint(0, 256, (8 * 50 + 3,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flat[:16] = 255
    for bitmaps in (flat[:400].view(50, 8), flat[3:].view(50, 8), flat[:0].view(0, 8)):
        packed = BitmapTensor(bitmaps, torch.zeros(0), torch.zeros(50, dtype=torch.int32), (50, 64))
        expected = [sum(bin(int(byte)).count("1") for byte in tile) for tile in bitmaps]
        assert packed.nonzero_counts().tolist() == expected


def test_inconsistent_parts_are_refused():
    packed = compress(pruned(8, 100, 0.5))
    with pytest.raises(ValueError, match="stored values"):
        check_consistent(BitmapTensor(packed.bitmaps, packed.values[:-1], packed.offsets, packed.shape))
    with pytest.raises(ValueError, match="row offsets"):
        check_consistent(BitmapTensor(packed.bitmaps, packed.values, packed.offsets.flip(0), packed.shape))
    bits = packed.bitmaps.clone()
    bits[1, 7] |= 0x80  # column 127 of row 0: beyond the 100 columns
    with pytest.raises(ValueError):
        check_consistent(
            BitmapTensor(bits, torch.cat([packed.values, packed.values[:1]]), packed.offsets, packed.shape)
        )


# -- the kernel ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.99, 1.0])
@pytest.mark.parametrize("shape", [(37, 150), (65, 129), (64, 64), (3, 7), (130, 200)])
def test_kernel_equals_dense(path, sparsity, shape):
    W = pruned(*shape, sparsity, zero_rows=(0, shape[0] - 1))  # rows entirely zero, first and last
    bias = torch.randn(shape[0])
    packed = compress(W)
    for tokens in (1, 2, 3, 9):  # 9: a group of 8 and a group of 1
        x = torch.randn(tokens, shape[1])
        assert_matches_dense(kernel.sparse_linear(x, packed, path=path), x, W)
        assert_matches_dense(kernel.sparse_linear(x, packed, bias, path=path), x, W, bias)


@pytest.mark.parametrize("path", PATHS)
def test_kernel_bf16_values_and_inputs(path):
    W = pruned(70, 300, 0.7, seed=1)
    packed = compress(W.bfloat16())
    x = torch.randn(4, 300)
    assert_matches_dense(kernel.sparse_linear(x, packed, path=path), x, W.bfloat16().float())  # exact widening
    y = kernel.sparse_linear(x.bfloat16(), compress(W), path=path)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 70)
    torch.testing.assert_close(y.float(), x.bfloat16().float() @ W.T, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("path", PATHS[1:])
def test_prefill_goes_through_dense_blocks(path):
    W = pruned(300, 130, 0.7, seed=2)
    bias = torch.randn(300)
    x = torch.randn(2, 11, 130)  # leading dimensions are kept
    packed = compress(W)
    for dense_from in (1, 22, 23):  # 22 tokens: the GEMM for 1 and 22, the sparse path for 23
        y = kernel.sparse_linear(x, packed, bias, path=path, dense_from=dense_from)
        assert y.shape == (2, 11, 300)
        assert_matches_dense(y.reshape(22, 300), x.reshape(22, 130), W, bias)
    expanded = kernel._ops().expand(packed.bitmaps, packed.values, packed.offsets, 130, 1, 5, 17, kernel.ISA[path])
    assert torch.equal(expanded, W[5:17])


@pytest.mark.parametrize("path", PATHS[1:])
def test_padded_tiles_of_the_kv_layout(path):
    W = pruned(40, 128, 0.6, seed=3)
    packed = compress(W, pad=8)
    assert packed.values.numel() % 8 == 0
    x = torch.randn(3, 128)
    assert_matches_dense(kernel.sparse_linear(x, packed, path=path), x, W)


def test_paths_are_chosen_by_argument_or_environment(monkeypatch):
    monkeypatch.setenv(kernel.ENV, "scalar")
    assert kernel.resolve_path() == "scalar" and kernel.resolve_path("torch") == "torch"
    monkeypatch.setenv(kernel.ENV, "sse9")
    with pytest.raises(ValueError, match="unknown"):
        kernel.resolve_path()
    if "avx512" not in PATHS:
        with pytest.raises(ValueError, match="cannot run"):
            kernel.resolve_path("avx512")


def test_without_a_compiler_one_warning_and_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no library built before (that would need no compiler)
    monkeypatch.setattr(kernel, "_loaded", {})
    monkeypatch.setattr(kernel.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="not available.*no C\\+\\+ compiler.*plain-PyTorch") as caught:
        assert kernel.available_paths() == ["torch"] and kernel.resolve_path() == "torch"
        W, x = pruned(9, 70, 0.5), torch.randn(2, 70)
        assert_matches_dense(kernel.sparse_linear(x, compress(W)), x, W)
    assert len(caught) == 1
