"""Kernels against hand-worked values and brute-force references."""

import pytest
import torch

from optimum_mosaic.calibration.statistics import InputStatistics
from optimum_mosaic.pruning.magnitude import magnitude_prune
from optimum_mosaic.pruning.sparsegpt import sparsegpt_prune
from optimum_mosaic.pruning.wanda import wanda_prune


def stats_from(X: torch.Tensor, hessian: bool = True) -> InputStatistics:
    s = InputStatistics.empty(X.shape[1], hessian)
    s.update(X)
    return s


# -- Wanda ----------------------------------------------------------------------------------------
def test_wanda_uses_the_norm_not_its_square():
    # ‖X_0‖ = 2 (sumsq 4): scores |W|·‖X‖ = [2, 1.5, 3, 5] prune columns {1, 0};
    # the squared-norm variant would score [4, 1.5, 3, 5] and prune {1, 2}.
    W = torch.tensor([[1.0, 1.5, 3.0, 5.0]])
    stats = InputStatistics(sumsq=torch.tensor([4.0, 1.0, 1.0, 1.0]))
    out = wanda_prune(W, stats, 0.5)
    assert out.tolist() == [[0.0, 0.0, 3.0, 5.0]]


def test_wanda_compares_within_each_row_not_the_whole_matrix():
    # a matrix-wide ranking would empty the small first row; per-row keeps two weights in each row
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    out = wanda_prune(W, InputStatistics(sumsq=torch.ones(4)), 0.5)
    assert out.tolist() == [[0.0, 0.0, 3.0, 4.0], [0.0, 0.0, 30.0, 40.0]]


def test_wanda_matches_a_per_row_sort_reference():
    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(4, 8, generator=g), torch.randn(32, 8, generator=g) * torch.arange(1, 9)
    stats = stats_from(X, hessian=False)
    out = wanda_prune(W, stats, 0.5)
    norms = X.norm(dim=0)
    for r in range(4):
        order = sorted(range(8), key=lambda j: abs(W[r, j].item()) * norms[j].item())
        expected = W[r].clone()
        expected[order[:4]] = 0
        torch.testing.assert_close(out[r], expected)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_wanda_zero_count_is_exact(sparsity):
    W = torch.randn(10, 7, generator=torch.Generator().manual_seed(0))
    out = wanda_prune(W, InputStatistics(sumsq=torch.rand(7) + 0.1), sparsity)
    assert (out == 0).sum().item() == round(sparsity * 70)
    per_row = (out == 0).sum(1)
    assert per_row.max() - per_row.min() <= 1  # still a per-row comparison group


# -- magnitude ------------------------------------------------------------------------------------
def test_magnitude_is_matrix_wide_and_exact():
    W = torch.tensor([[1.0, -2.0, 3.0], [-0.5, 5.0, 0.1]])
    out = magnitude_prune(W, None, 0.5)
    assert out.tolist() == [[0.0, -2.0, 3.0], [0.0, 5.0, 0.0]]


# -- N:M ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", [magnitude_prune, wanda_prune, sparsegpt_prune])
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_is_valid(kernel, nm):
    g = torch.Generator().manual_seed(3)
    W, X = torch.randn(6, 16, generator=g), torch.randn(64, 16, generator=g)
    out = kernel(W, stats_from(X), nm[0] / nm[1], nm=nm, block_size=8)
    zeros_per_group = (out == 0).reshape(6, 16 // nm[1], nm[1]).sum(-1)
    assert (zeros_per_group == nm[0]).all()


# -- SparseGPT ------------------------------------------------------------------------------------
def obs_reference(W, H, sparsity, block_size, damp=0.01):
    """One column at a time, explicit inverse and Gaussian elimination in float64: the OBS update
    ``w_{>j} -= (w_j - q_j) / Hinv_jj · Hinv_{j,>j}`` with Hinv the inverse Hessian of the columns not
    yet processed; masks chosen at each block start by ``w² / Hinv_jj`` over the block."""
    W, H = W.double().clone(), H.double()
    rows, cols = W.shape
    Hinv = torch.linalg.inv(H + damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype))
    diag, row = [], []
    for j in range(cols):  # the eliminated inverses do not depend on W: precompute them
        diag.append(Hinv[j, j].item())
        row.append(Hinv[j].clone())
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]
    mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        if j % block_size == 0:
            i2 = min(j + block_size, cols)
            k = round(sparsity * rows * i2) - round(sparsity * rows * j)
            scores = W[:, j:i2] ** 2 / torch.tensor(diag[j:i2], dtype=W.dtype)
            flat = torch.argsort(scores.flatten(), stable=True)[:k]
            block = torch.zeros(scores.numel(), dtype=torch.bool)
            block[flat] = True
            mask[:, j:i2] = block.view_as(scores)
        q = torch.where(mask[:, j], torch.zeros_like(W[:, j]), W[:, j])
        err = (W[:, j] - q) / diag[j]
        W[:, j + 1 :] -= torch.outer(err, row[j][j + 1 :])
        W[:, j] = q
    return W


@pytest.mark.parametrize("block_size", [3, 4, 8])
def test_sparsegpt_matches_one_column_at_a_time_obs(block_size):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 8, generator=g)
    X = torch.randn(64, 8, generator=g) @ (torch.eye(8) + 0.5 * torch.randn(8, 8, generator=g))
    stats = stats_from(X)
    out = sparsegpt_prune(W, stats, 0.5, block_size=block_size)
    ref = obs_reference(W, stats.hessian, 0.5, block_size)
    assert torch.equal(out == 0, ref == 0)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_sparsegpt_prunes_exactly_k_not_k_plus_one(sparsity):
    g = torch.Generator().manual_seed(5)
    W, X = torch.randn(16, 40, generator=g), torch.randn(128, 40, generator=g)
    out = sparsegpt_prune(W, stats_from(X), sparsity, block_size=16)
    assert (out == 0).sum().item() == round(sparsity * W.numel())


def test_sparsegpt_reconstructs_better_than_masking_alone():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(32, 64, generator=g)
    X = torch.randn(512, 64, generator=g) @ (torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g))
    stats = stats_from(X)
    obs = sparsegpt_prune(W, stats, 0.6, block_size=16)
    wanda = wanda_prune(W, stats, 0.6)
    error = lambda Wp: ((W - Wp) @ X.T).norm().item()  # noqa: E731
    assert error(obs) < 0.9 * error(wanda)


def test_sparsegpt_zeroes_dead_inputs_and_is_deterministic():
    g = torch.Generator().manual_seed(4)
    W, X = torch.randn(8, 16, generator=g), torch.randn(64, 16, generator=g)
    X[:, 3] = 0
    stats = stats_from(X)
    a = sparsegpt_prune(W, stats, 0.5, block_size=8)
    b = sparsegpt_prune(W, stats, 0.5, block_size=8)
    assert (a[:, 3] == 0).all() and torch.equal(a, b)
    assert (a == 0).sum().item() == 64


def test_sparsegpt_retries_with_more_dampening():
    W = torch.randn(4, 8)
    stats = InputStatistics(sumsq=torch.ones(8), hessian=torch.ones(8, 8) - 0.05 * torch.eye(8))
    info = {}
    sparsegpt_prune(W, stats, 0.5, block_size=4, info=info)
    assert info["dampening"] == pytest.approx(0.1)


@pytest.mark.parametrize("n", [7, 300, 1100])  # 1100: more than one block of FLIP_ROWS reversed rows
def test_the_in_place_factor_has_the_bits_of_the_plain_formula(n):
    """``inverse_hessian_factor`` builds ``JHJ``, factorises and inverts in place in column-major buffers; the
    result must be bit for bit (values and layout, which later GEMMs' rounding depends on) the out-of-place
    ``J · solve_triangular(cholesky(JHJ + δI), I) · J``, and so must the δ retries."""
    from optimum_mosaic.pruning import sparsegpt

    torch.manual_seed(n)
    X = torch.randn(n + 40, n) * torch.rand(n) ** 3
    for H, dampening in ((X.T @ X, 0.01), (X[: n // 2].T @ X[: n // 2], 1e-9)):  # the second needs retries
        got, damp = sparsegpt.inverse_hessian_factor(H, dampening)
        expected_damp = dampening
        while True:
            A = H.flip(0, 1)
            A.diagonal().add_(expected_damp * torch.diag(H).mean())
            L, failed = torch.linalg.cholesky_ex(A)
            if not failed:
                break
            expected_damp *= 10
        expected = torch.linalg.solve_triangular(L, torch.eye(n), upper=False).flip(0, 1)
        assert damp == expected_damp and torch.equal(got, expected) and got.stride() == expected.stride()
