"""The masked least-squares refit against an exact per-row solve, and SparseGPT + refit against SparseGPT."""

import pytest
import torch
from conftest import correlated_problem, hessian_stats
from conftest import reconstruction_error as layer_error

from optimum_mosaic.pruning import refit as refit_module
from optimum_mosaic.pruning.refit import masked_cg, normalized_hessian, refit, sparsegpt_refit_prune
from optimum_mosaic.pruning.sparsegpt import sparsegpt_prune
from optimum_mosaic.registry import get_method

pytestmark = pytest.mark.usefixtures("one_thread")


def small_problem(seed: int, rows: int = 6, cols: int = 16):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(128, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    return W, hessian_stats(X)


def least_squares_reference(W: torch.Tensor, H: torch.Tensor, support: torch.Tensor, dampening: float = 0.01):
    """Row by row in float64: ``ŵ_S = y_S (Hd_SS)⁻¹`` with ``y = w Hd``, ``Hd = H + δ·mean(diag H)·I``, zero off ``S``."""
    H = H.double()
    Hd = H + dampening * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    out = torch.zeros_like(W, dtype=torch.float64)
    for r in range(W.shape[0]):
        S = support[r].nonzero().squeeze(1)
        y = W[r].double() @ Hd
        out[r, S] = torch.linalg.solve(Hd[S][:, S], y[S])  # Hd_SS is symmetric: y_S Hd_SS⁻¹ = (Hd_SS⁻¹ y_Sᵀ)ᵀ
    return out


def random_support(shape, density: float, seed: int, nm=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(shape, generator=g)
    if nm:
        n, m = nm
        groups = scores.reshape(shape[0], -1, m)
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(2, groups.argsort(2)[..., :n], False)
        return keep.reshape(shape)
    return scores < density


@pytest.mark.parametrize(("density", "nm"), [(0.5, None), (0.3, None), (0.8, None), (0.5, (2, 4)), (0.5, (4, 8))])
def test_refit_is_the_least_squares_solution_on_its_support(density, nm):
    W, stats = small_problem(0)
    support = random_support(W.shape, density, 1, nm)
    start = W * support  # plain masking: far from the optimum
    out = refit(W, start, stats, iterations=40)
    expected = least_squares_reference(W, stats.hessian, support)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    assert torch.equal(out != 0, support)
    assert layer_error(W, out, stats.hessian) < layer_error(W, start, stats.hessian)


@pytest.mark.parametrize(("sparsity", "nm"), [(0.5, None), (0.7, None), (0.5, (2, 4)), (0.5, (4, 8))])
def test_sparsegpt_refit_keeps_sparsegpts_mask_and_solves_on_it(sparsity, nm):
    W, stats = small_problem(2, rows=8, cols=32)
    base = sparsegpt_prune(W, stats, sparsity, nm=nm, block_size=16)
    out = sparsegpt_refit_prune(W, stats, sparsity, nm=nm, block_size=16, cg_iterations=64)
    assert torch.equal(out != 0, base != 0)
    expected = least_squares_reference(W, stats.hessian, base != 0)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


def test_sparsegpt_weights_are_not_least_squares_and_the_refit_gains():
    """SparseGPT compensates only to the right of each pruned column: the refit lowers the layer error.
    Measured (seed 0, 16 × 32, correlated inputs): 0.5 → 2.6e5 vs 1.7e5; 0.7 → 9.3e5 vs 7.9e5."""
    W, stats = correlated_problem(0)
    for sparsity in (0.5, 0.7):
        err_sgpt = layer_error(W, sparsegpt_prune(W, stats, sparsity), stats.hessian)
        err_refit = layer_error(W, sparsegpt_refit_prune(W, stats, sparsity), stats.hessian)
        assert err_refit < 0.9 * err_sgpt


def test_refit_reports_errors_and_zero_iterations_change_nothing():
    W, stats = small_problem(3)
    base = sparsegpt_prune(W, stats, 0.5)
    info = {"measure_error": True}
    out = sparsegpt_refit_prune(W, stats, 0.5, info=info)
    assert info["error"] < info["error_before_refit"] and 1 <= info["cg_iterations"] <= 10
    torch.testing.assert_close(sparsegpt_refit_prune(W, stats, 0.5, cg_iterations=0), base, atol=1e-6, rtol=1e-6)
    assert out.dtype == W.dtype


def test_masked_cg_stops_when_every_row_converged():
    W, stats = small_problem(4)
    norm = normalized_hessian(stats, 0.01, "cpu")
    Wn = W * norm.x
    support = random_support(W.shape, 0.5, 5)
    Y = Wn @ norm.Hn
    _, steps = masked_cg(norm.Hn, Y, Wn * support, support, 100, 1e-5)
    assert 1 < steps < 100  # converged before the cap ...
    _, capped = masked_cg(norm.Hn, Y, Wn * support, support, 3, 1e-5)
    assert capped == 3


def test_an_input_group_builds_one_normalised_hessian_and_one_sparsegpt_factor(monkeypatch):
    calls = []
    cholesky_ex = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **k: calls.append(1) or cholesky_ex(*a, **k))
    built = []
    original = refit_module.NormalizedHessian
    monkeypatch.setattr(refit_module, "NormalizedHessian", lambda *a: built.append(1) or original(*a))
    W, stats = small_problem(6)
    for scale in (1.0, 2.0, 3.0):  # q, k, v
        sparsegpt_refit_prune(W * scale, stats, 0.5)
    assert len(calls) == 1 and len(built) == 1


def test_dead_inputs_stay_zero():
    g = torch.Generator().manual_seed(7)
    W, X = torch.randn(6, 16, generator=g), torch.randn(64, 16, generator=g)
    X[:, 3] = 0
    out = sparsegpt_refit_prune(W, hessian_stats(X), 0.5)
    assert (out[:, 3] == 0).all() and out.isfinite().all() and int((out == 0).sum()) == 48


def test_registered():
    method = get_method("unstructured", "sparsegpt_refit")
    assert method.fn is sparsegpt_refit_prune and method.needs == ("hessian",)
