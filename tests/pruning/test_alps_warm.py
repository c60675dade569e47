"""ALPS-warm's final refit (3 masked-CG steps) against the exact least squares on its support, and ALPS on a matrix
that already holds the target's zeros (they stay exact zeros)."""

import pytest
import torch
from conftest import correlated_problem as problem
from conftest import hessian_stats

from optimum_mosaic.pruning import alps
from optimum_mosaic.pruning.alps import alps_prune, alps_warm_prune

pytestmark = pytest.mark.usefixtures("one_thread")


def least_squares_on_support(W, H, support, dampening=0.01):
    """Row by row in float64: ``ŵ_S = w Hd_:,S (Hd_SS)⁻¹``, zero off ``S``, ``Hd = H + δ·mean(diag H)·I``."""
    H = H.double()
    Hd = H + dampening * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    out = torch.zeros_like(W, dtype=torch.float64)
    for r in range(W.shape[0]):
        S = support[r].nonzero().squeeze(1)
        out[r, S] = torch.linalg.solve(Hd[S][:, S], Hd[S] @ W[r].double())
    return out, Hd


def energy(A, B, Hd) -> float:
    E = A.double() - B.double()
    return torch.trace(E @ Hd @ E.T).item()


@pytest.mark.parametrize(("sparsity", "nm"), [(0.5, None), (0.7, None), (0.5, (2, 4))])
def test_warm_refit_moves_towards_least_squares_on_its_support(sparsity, nm):
    """The refit runs after the support is fixed, so every CG budget gives the same support; on it, each CG step
    brings the weights closer (in the damped layer loss) to the exact least-squares solution, 3 steps (the
    default) get most of the way, and many steps reach it."""
    W, stats = problem(13, rows=24, cols=64, tokens=512)
    runs = {c: alps_warm_prune(W, stats, sparsity, nm=nm, cg_iterations=c) for c in (0, 1, 2, 3, 60)}
    info = {}
    default = alps_warm_prune(W, stats, sparsity, nm=nm, info=info)
    assert alps.WARM_CG == 3 and info["cg_iterations"] == 3 and torch.equal(default, runs[3])
    support = runs[0] != 0
    assert all(torch.equal(out != 0, support) for out in runs.values())
    reference, Hd = least_squares_on_support(W, stats.hessian, support)
    gap = [energy(runs[c], reference, Hd) for c in (0, 1, 2, 3)]
    assert all(b < 0.9 * a for a, b in zip(gap, gap[1:], strict=False)), gap  # strictly down, step by step
    assert gap[3] < 0.2 * gap[0], gap
    torch.testing.assert_close(runs[60].double(), reference, atol=1e-5 * W.abs().max().item(), rtol=0)
    # the layer loss itself follows: refit weights beat the un-refit ones on the plain (undamped) loss too
    H = stats.hessian.double()
    assert energy(runs[3], W, H) < energy(runs[0], W, H)


# -- a matrix that already holds the target's zeros ---------------------------------------------------
def _pre_pruned(seed, sparsity=0.5, nm=None, spread=0.0):
    """A weight with exactly the zeros of ``sparsity`` (or of the N:M pattern) already in place; ``spread``
    makes the kept magnitudes heavy-tailed (some tiny, as in real checkpoints)."""
    W, stats = problem(seed)
    g = torch.Generator().manual_seed(seed)
    W = W * torch.exp(spread * torch.randn(W.shape, generator=g))
    if nm:
        n, m = nm
        order = torch.rand(16, 32 // m, m, generator=g).argsort(2)
        keep = torch.ones(16, 32 // m, m, dtype=torch.bool).scatter_(2, order[..., :n], False).reshape(16, 32)
    else:
        keep = torch.rand(16, 32, generator=g).flatten().argsort().argsort().view(16, 32) >= round(sparsity * 512)
    return W * keep, stats


@pytest.mark.parametrize("method", [alps_prune, alps_warm_prune])
@pytest.mark.parametrize(("nm", "spread"), [(None, 3.0), ((2, 4), 3.0), (None, 0.0)])
def test_existing_zeros_stay_exact_zeros(method, nm, spread):
    """Already at the target: the matrix is its own optimum (loss 0), returned as it is — no weight appears at
    an existing zero and no small kept weight is traded for rounding noise."""
    W, stats = _pre_pruned(1, nm=nm, spread=spread)
    out = method(W, stats, 0.5, nm=nm)
    assert torch.equal(out, W)


@pytest.mark.parametrize("method", [alps_prune, alps_warm_prune])
def test_existing_zeros_stay_with_a_dead_input(method):
    """A dead input (never active) has its weights zeroed as usual; the other zeros stay exact zeros instead of
    becoming ±1e-6 (the support used to be filled up from rounding noise)."""
    W, _ = _pre_pruned(2)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)
    X[:, 3] = 0
    out = method(W, hessian_stats(X), 0.5)
    assert torch.equal(out, W.masked_fill(torch.arange(32) == 3, 0.0))


@pytest.mark.parametrize("method", [alps_prune, alps_warm_prune])
def test_more_zeros_than_the_target_are_kept(method):
    W, stats = _pre_pruned(4, sparsity=0.6)
    out = method(W, stats, 0.5)
    assert torch.equal(out, W) and (out == 0).sum() == round(0.6 * 512)


def test_fewer_zeros_than_the_target_still_prune_to_the_target():
    W, stats = _pre_pruned(5, sparsity=0.3)
    out = alps_prune(W, stats, 0.5)
    assert (out == 0).sum() == 256 and not torch.equal(out, W)
