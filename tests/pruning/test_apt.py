"""APT (reconstructed joint multi-weight OBS) against float64 brute-force references and SparseGPT."""

import pytest
import torch
from conftest import correlated_problem as problem
from conftest import hessian_stats as stats_from
from conftest import reconstruction_error as layer_error

from optimum_mosaic.pruning.apt import apt_prune
from optimum_mosaic.pruning.sparsegpt import sparsegpt_prune
from optimum_mosaic.pruning.wanda import wanda_prune

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(3, 8, generator=g)
    X = torch.randn(64, 8, generator=g) @ (torch.eye(8) + 0.5 * torch.randn(8, 8, generator=g))
    return W, stats_from(X)


def damped_inverse(H, damp=0.01):
    H = H.double()
    return torch.linalg.inv(H + damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype))


def joint_obs_reference(W, H, sparsity, block_size):
    """Explicit float64 inverses, blocks of columns in order: ``G = inv(Hd[≥i1, ≥i1])``; the block's prune set is
    the global-budget lowest ``w²/G_jj``; each row gets ``w −= w_Q inv(G_QQ) G_{Q,:}`` on the columns ``≥ i1``."""
    W = W.double().clone()
    rows, cols = W.shape
    Hd = torch.linalg.inv(damped_inverse(H))
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        G = torch.linalg.inv(Hd[i1:, i1:])
        b = i2 - i1
        scores = W[:, i1:i2] ** 2 / torch.diag(G)[:b]
        k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
        pruned = torch.zeros(rows * b, dtype=torch.bool)
        pruned[torch.argsort(scores.flatten(), stable=True)[:k]] = True
        pruned = pruned.view(rows, b)
        for r in range(rows):
            Q = pruned[r].nonzero().squeeze(1)
            if len(Q):
                w = W[r, i1:]
                W[r, i1:] = w - w[Q] @ torch.linalg.inv(G[Q][:, Q]) @ G[Q, :]
                W[r, i1 + Q] = 0.0
    return W


# -- references -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_block_equals_the_multi_weight_obs_formula(seed):
    W, stats = tiny(seed)
    out = apt_prune(W, stats, 0.5, block_size=128)
    Hinv = damped_inverse(stats.hessian)
    # the prune set: the 12 lowest OBS saliencies w²/Hinv_jj of the whole (only) block
    scores = W.double() ** 2 / torch.diag(Hinv)
    expected_mask = torch.zeros(24, dtype=torch.bool)
    expected_mask[torch.argsort(scores.flatten(), stable=True)[:12]] = True
    assert torch.equal(out == 0, expected_mask.view(3, 8))
    for r in range(3):
        Q = (out[r] == 0).nonzero().squeeze(1)
        w = W[r].double()
        expected = w - w[Q] @ torch.linalg.inv(Hinv[Q][:, Q]) @ Hinv[Q, :]
        torch.testing.assert_close(out[r].double(), expected, atol=1e-4, rtol=0)
        assert (expected[Q].abs() < 1e-9).all()  # the formula itself zeroes Q


@pytest.mark.parametrize(("sparsity", "block_size"), [(0.5, 4), (0.7, 3), (0.3, 2)])
def test_blocks_match_the_reference_with_trailing_inverses(sparsity, block_size):
    W, stats = tiny(3)
    out = apt_prune(W, stats, sparsity, block_size=block_size)
    ref = joint_obs_reference(W, stats.hessian, sparsity, block_size)
    assert torch.equal(out == 0, ref == 0)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_one_weight_per_row_is_the_single_weight_obs_update():
    W, stats = tiny(4)
    out = apt_prune(W, stats, 1 / 8, nm=(1, 8), block_size=8)
    Hinv = damped_inverse(stats.hessian)
    for r in range(3):
        w = W[r].double()
        q = int(torch.argmin(w**2 / torch.diag(Hinv)))
        expected = w - w[q] / Hinv[q, q] * Hinv[q]
        assert (out[r] == 0).nonzero().squeeze(1).tolist() == [q]
        torch.testing.assert_close(out[r].double(), expected, atol=1e-5, rtol=1e-5)


def test_one_column_blocks_equal_sparsegpt():
    # with one column per block the joint and the sequential update coincide (same budget, same saliency)
    W, stats = problem(5, rows=8, cols=16, tokens=64)
    a = apt_prune(W, stats, 0.5, block_size=1)
    b = sparsegpt_prune(W, stats, 0.5, block_size=1)
    assert torch.equal(a == 0, b == 0)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# -- contract -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("block_size", [8, 128])
def test_zero_count_is_exact(sparsity, block_size):
    W, stats = problem(1)
    out = apt_prune(W, stats, sparsity, block_size=block_size)
    assert (out == 0).sum().item() == round(sparsity * W.numel())


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_is_valid(nm):
    W, stats = problem(2)
    out = apt_prune(W, stats, nm[0] / nm[1], nm=nm, block_size=8)
    assert ((out == 0).reshape(16, 32 // nm[1], nm[1]).sum(-1) == nm[0]).all()


def test_nm_block_size_must_be_a_multiple_of_m():
    W, stats = problem(2)
    with pytest.raises(ValueError, match="multiple of M"):
        apt_prune(W, stats, 0.5, nm=(2, 4), block_size=6)


def test_input_untouched_deterministic_dtype_and_shape():
    W, stats = problem(3)
    W16 = W.half()
    before = W16.clone()
    a = apt_prune(W16, stats, 0.5, block_size=8)
    b = apt_prune(W16, stats, 0.5, block_size=8)
    assert torch.equal(W16, before)
    assert a.dtype == torch.float16 and a.shape == W.shape
    assert torch.equal(a, b)
    assert (a == 0).sum().item() == 256


def test_dead_inputs_are_zeroed():
    g = torch.Generator().manual_seed(4)
    W, X = torch.randn(8, 16, generator=g), torch.randn(64, 16, generator=g)
    X[:, 3] = 0
    out = apt_prune(W, stats_from(X), 0.5, block_size=8)
    assert (out[:, 3] == 0).all() and (out == 0).sum().item() == 64 and out.isfinite().all()


# -- quality --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_reconstructs_at_least_as_well_as_sparsegpt(sparsity):
    W, stats = problem(0)
    H = stats.hessian
    err_apt = layer_error(W, apt_prune(W, stats, sparsity), H)
    err_sgpt = layer_error(W, sparsegpt_prune(W, stats, sparsity), H)
    err_wanda = layer_error(W, wanda_prune(W, stats, sparsity), H)
    # measured (seed 0, one 32-column block, APT vs SparseGPT vs Wanda): 0.5 → 1.5e5 vs 2.6e5 vs 3.5e5;
    # 0.7 → 7.3e5 vs 9.3e5 vs 9.4e5. Not guaranteed with several blocks: with block_size=8 APT was worse than
    # SparseGPT on 10 of 30 (seed, sparsity) cases, by at most 19 % (greedy block-by-block choices).
    assert err_apt <= err_sgpt
    assert err_apt < err_wanda


def test_registered():
    from optimum_mosaic.registry import get_method

    method = get_method("unstructured", "apt")
    assert method.fn is apt_prune and method.needs == ("hessian",)
