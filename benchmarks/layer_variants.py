"""Kernel variants compared by ``layer_error.py``: name → ``fn(weight, stats, sparsity, nm=None) -> weight``.

Registered kernels with options, plus study-only variants built from the library's pieces: an exact per-row
least-squares refit (float64 Cholesky of every row's ``Hd_SS``, the reference the CG refits approach), ALPS
warm-started from SparseGPT, Wanda + refit, and "iterative hard thresholding" rounds (re-select the support
on ``B + η·(Y − B Hn)`` — the kept weights plus a gradient step — and refit). After a refit the gradient is zero
on the support, so with ``η = 1`` (unit diagonal) the re-selection compares ``|ŵ_i|`` of kept weights with ``|g_j|``
of pruned ones — the OBD-style cost of dropping one against the gain of freeing the other."""

from __future__ import annotations

from functools import partial

import torch

from optimum_mosaic.pruning.alps import _project, alps_prune
from optimum_mosaic.pruning.masks import kept_count as _kept
from optimum_mosaic.pruning.refit import masked_cg, normalized_problem, refit
from optimum_mosaic.pruning.sparsegpt import sparsegpt_prune
from optimum_mosaic.pruning.wanda import wanda_prune
from optimum_mosaic.registry import get_method


def kernel(name: str, **options):
    return partial(get_method("unstructured", name).fn, **options)


@torch.no_grad()
def exact_refit(weight, pruned, stats, dampening: float = 0.01, chunk: int = 32) -> torch.Tensor:
    """Per row ``ŵ_S = y_S (Hd_SS)⁻¹`` with ``y = w Hd`` in float64: the rows of a chunk are padded to the largest
    support of the chunk with identity rows/columns (zero right-hand side) and solved by batched Cholesky."""
    Wn, Y, Hn, x = normalized_problem(weight, stats, dampening)
    support, Hn, Y = pruned != 0, Hn.double(), Y.double()
    out = torch.zeros_like(Y)
    width = int(support.sum(1).max())
    order = torch.argsort((~support).to(torch.int8), dim=1, stable=True)[:, :width]  # kept inputs first
    for r0 in range(0, Y.shape[0], chunk):
        idx = order[r0 : r0 + chunk]
        kept = torch.gather(support[r0 : r0 + chunk], 1, idx)
        both = kept.unsqueeze(2) & kept.unsqueeze(1)
        A = Hn[idx.unsqueeze(2), idx.unsqueeze(1)] * both + torch.diag_embed((~kept).double())
        rhs = torch.gather(Y[r0 : r0 + chunk], 1, idx) * kept
        solution = torch.cholesky_solve(rhs.unsqueeze(2), torch.linalg.cholesky(A)).squeeze(2)
        out[r0 : r0 + chunk].scatter_(1, idx, solution * kept)
    return (out.float() / x).masked_fill(~support, 0.0).to(weight.dtype)


def then_exact(first):
    return lambda weight, stats, sparsity, nm=None: exact_refit(weight, first(weight, stats, sparsity, nm=nm), stats)


def then_refit(first, iterations: int):
    def fn(weight, stats, sparsity, nm=None):
        return refit(weight, first(weight, stats, sparsity, nm=nm), stats, iterations)

    return fn


def alps_from_sparsegpt(weight, stats, sparsity, nm=None, **options):
    return alps_prune(weight, stats, sparsity, nm=nm, start=sparsegpt_prune(weight, stats, sparsity, nm=nm), **options)


@torch.no_grad()
def sparsegpt_iht(weight, stats, sparsity, nm=None, rounds=3, step=1.0, cg_per_round=3, cg_final=10, dampening=0.01):
    """SparseGPT, refit; then ``rounds`` × (support ← P_k(B + step·(Y − B Hn)), refit ``cg_per_round``)."""
    Wn, Y, Hn, x = normalized_problem(weight, stats, dampening)
    k = _kept(weight.shape, sparsity, nm)
    B = sparsegpt_prune(weight, stats, sparsity, nm=nm).float() * x
    support = B != 0
    B, _ = masked_cg(Hn, Y, B, support, cg_per_round, 0.0)
    for _ in range(rounds):
        B, support = _project(B + step * (Y - B @ Hn), k, nm)
        B, _ = masked_cg(Hn, Y, B, support, cg_per_round, 0.0)
    B, _ = masked_cg(Hn, Y, B, support, cg_final - cg_per_round, 0.0)
    return (B / x).masked_fill(~support, 0.0).to(weight.dtype)


VARIANTS = {
    "wanda": kernel("wanda"),
    "wanda+refit10": then_refit(wanda_prune, 10),
    "sparsegpt": kernel("sparsegpt"),
    "apt": kernel("apt"),
    **{f"sparsegpt+refit{n}": kernel("sparsegpt_refit", cg_iterations=n) for n in (3, 5, 10, 20, 40)},
    "sparsegpt+exact": then_exact(sparsegpt_prune),
    "sparsegpt+iht3": sparsegpt_iht,
    "sparsegpt+iht6": partial(sparsegpt_iht, rounds=6),
    "alps": kernel("alps"),
    "alps+exact": then_exact(alps_prune),
    **{f"alps it{n}": kernel("alps", max_iterations=n) for n in (9, 15, 21)},
    **{f"alps cg{n}": kernel("alps", cg_iterations=n) for n in (0, 3)},
    "alps warm rho.1": partial(alps_from_sparsegpt, rho=0.1),
    "alps warm rho.3": partial(alps_from_sparsegpt, rho=0.3),
    **{f"alps warm rho.3 it{n}": partial(alps_from_sparsegpt, rho=0.3, max_iterations=n) for n in (6, 9, 15)},
    "alps warm rho.3 it9 cg3": partial(alps_from_sparsegpt, rho=0.3, max_iterations=9, cg_iterations=3),
    # the registered candidates with their defaults, and alps_warm's grid (ρ₀ × ADMM iterations, 3 CG steps)
    "sparsegpt_refit": kernel("sparsegpt_refit"),
    "alps_warm": kernel("alps_warm"),
    "alps_warm cg10": kernel("alps_warm", cg_iterations=10),
    **{
        f"alps_warm rho{rho} it{n}": kernel("alps_warm", rho=rho, max_iterations=n)
        for rho in (0.2, 0.3, 0.5, 0.7, 1.0)
        for n in (3, 6, 9, 12)
    },
}
