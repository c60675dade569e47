"""ALPS (Meng, Behdin, Wang, Mazumder; NeurIPS 2024, arXiv 2406.07831): ADMM layer-wise pruning with a
ρ schedule, then conjugate gradient on the fixed support. Follows ``mazumder-lab/ALPS`` ``ALPS_admm``.

Orientation: our weight is ``W`` (d_out × d_in) and ``H = XᵀX`` (d_in × d_in); the layer loss is
``‖XWᵀ − XŴᵀ‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ)``. The reference works on ``B = Wᵀ``; we keep rows (= its columns).

1. Ridge and normalisation: ``H ← H + δ·mean(diag H)·I`` (δ = ``dampening``), ``x = sqrt(diag H) + 1e-8``,
   ``Hn = H / (x xᵀ)`` (unit diagonal), ``Wn = W · x`` (column-scaled), ``Y = Wn Hn``. The problem is solved
   for ``Wn``: minimise ``tr((Ŵn − Wn) Hn (Ŵn − Wn)ᵀ)`` over sparse ``Ŵn``.
2. One ``torch.linalg.eigh`` (float64): ``Hn = Q Λ Qᵀ``, so ``(Hn + ρI)⁻¹ = Q diag(1/(Λ + ρ)) Qᵀ`` for every ρ
   (assembled in float32 whenever ρ changes).
3. ADMM, ``D₀ = P_k(Wn)``, ``V₀ = 0``:  ``B ← (Y − V + ρD)(Hn + ρI)⁻¹``;  ``D ← P_k(B + V/ρ)``;
   ``V ← V + ρ(B − D)``. ``P_k`` keeps the ``k`` largest ``|·|`` of the whole matrix (exact ``k =
   numel − round(s·numel)``) or, for N:M, zeroes the ``n`` smallest of every ``m`` consecutive inputs of a row.
4. Every 3 iterations, Δ = number of support flips since the last check, relative to ``k`` (kept weights):
   Δ/k > 0.1 → ρ×1.3; Δ/k > 0.005 → ρ×1.2; Δ ≥ 1 → ρ×1.1 once ρ has started growing, otherwise ρ/5 and
   restart (B, D, V back to ``Wn``, ``D₀``, 0); Δ = 0 → stop once growing, otherwise ρ/5. ρ ≤ 1e6.
   Stop when the iteration index (0-based) ≥ 30 and Δ/k < 3e-4, or after ``max_iterations``. See ``rho_step``.
5. Support ``S = P_k(B)``; conjugate gradient on ``b_S (Hn)_SS = y_S`` per row (residuals masked to ``S``),
   warm start ``P_k(B)``, ≤ ``cg_iterations`` steps, rtol 1e-4 (unit diag(Hn) = Jacobi preconditioning).
6. ``Ŵ = Ŵn / x``.

Deviations from the reference code: (a) CG keeps the reference's stopping test on the *unmasked* residual
``‖Y − B Hn‖`` per input coordinate (rtol against ``‖Y_{:,j}‖``), which a sparse support cannot meet, so in
practice all ``cg_iterations`` steps run; that residual is carried by the CG recurrence instead of a fresh
product (one matmul per step less). (b) ``P_k`` finds the threshold with ``kthvalue`` and breaks ties by index
(the reference uses ``topk``, ties unspecified, 5× slower on CPU); the support is a boolean mask, not ``D == 0``.
(c) ``(Hn + ρI)⁻¹`` is assembled in float32 from the float64 eigenpairs and only when ρ changed (the reference
assembles it in float64 at every check). (d) Dead inputs (``diag H = 0``) are handled like SparseGPT: their
weights are zeroed and ``H_jj = 1`` before the ridge. (e) ``k`` kept = ``numel − round(s·numel)`` so the zero
count is exact (the reference keeps ``round((1 − s)·numel)``, equal except at .5 ties).
Kept quirk: a restart in the same check that meets the stop rule ends with ``B = Wn`` (dense), so the support
is then ``P_k(Wn)`` refined by CG, exactly as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_method

RHO_MAX = 1e6
UPDATE_EVERY = 3
SWITCH_ITERATION = 30
STOP_RATIO = 3e-4
CG_RTOL = 1e-4


@dataclass(frozen=True)
class RhoStep:
    rho: float
    growing: bool
    restart: bool = False
    stop: bool = False


def rho_step(
    rho: float, delta: float, k: int, growing: bool, iteration: int, switch_iteration: int = SWITCH_ITERATION
) -> RhoStep:
    """One check of the ALPS ρ schedule: ``delta`` support flips since the last check, ``k`` kept weights,
    ``growing`` = ρ has already been increased once, ``iteration`` = 0-based index of the iteration just done."""
    ratio = delta / k
    restart = False
    if ratio > 0.1:
        rho, growing = rho * 1.3, True
    elif ratio > 0.005:
        rho, growing = rho * 1.2, True
    elif delta > 0.5:
        if growing:
            rho *= 1.1
        else:
            rho, restart = rho / 5, True
    elif growing:
        return RhoStep(rho, growing, stop=True)  # the support no longer moves
    else:
        rho /= 5
    stop = iteration >= switch_iteration and ratio < STOP_RATIO
    return RhoStep(min(rho, RHO_MAX), growing, restart, stop)


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at exactly the ``k`` largest ``scores`` of the whole tensor; among ties the higher indices are kept."""
    flat = scores.flatten()
    pruned = flat.numel() - k
    if pruned <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat, pruned).values
    keep = flat > threshold
    need = k - int(keep.sum())
    if need > 0:  # ties at the threshold
        keep[(flat == threshold).nonzero().squeeze(1)[-need:]] = True
    return keep.view_as(scores)


def _project(Z: torch.Tensor, k: int, nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``P_k(Z)`` and its support (True = kept)."""
    if nm:
        n, m = nm
        rows, cols = Z.shape
        groups = Z.abs().reshape(rows, cols // m, m)
        support = torch.ones_like(groups, dtype=torch.bool)
        support.scatter_(2, torch.argsort(groups, dim=2, stable=True)[..., :n], False)
        support = support.reshape(rows, cols)
    else:
        support = keep_top_k(Z.abs(), k)
    return Z * support, support


def _inverse(Q: torch.Tensor, L: torch.Tensor, rho: float) -> torch.Tensor:
    return (Q * (1.0 / (L + rho)).float()) @ Q.T


def masked_cg(A: torch.Tensor, Y: torch.Tensor, B: torch.Tensor, support: torch.Tensor, iterations: int, rtol: float):
    """Solve ``b_S A_SS = y_S`` for every row (``A`` symmetric positive definite) by conjugate gradient with the
    residual masked to the row's support ``S``; warm start ``B`` (zero off ``S``). Returns (B, steps taken).

    Stopping test as in the reference: the *unmasked* residual ``Y − B A`` of every input coordinate (a column
    here) within ``rtol`` of the norm of that column of ``Y``."""
    full = Y - B @ A  # unmasked residual, kept by the same recurrence
    R = full * support
    tol = rtol * Y.norm(dim=0)
    P = R.clone()
    rr = (R * R).sum(1)
    steps = 0
    for _ in range(iterations):
        AP = P @ A
        den = (P * AP).sum(1)
        alpha = torch.where(den > 0, rr / den.where(den > 0, torch.ones_like(den)), torch.zeros_like(den))
        B = B + alpha.unsqueeze(1) * P
        full = full - alpha.unsqueeze(1) * AP
        R = full * support
        rr_new = (R * R).sum(1)
        beta = torch.where(rr > 0, rr_new / rr.where(rr > 0, torch.ones_like(rr)), torch.zeros_like(rr))
        P = R + beta.unsqueeze(1) * P
        rr = rr_new
        steps += 1
        if bool((full.norm(dim=0) <= tol).all()):
            break
    return B, steps


def _relative_error(Hn: torch.Tensor, B: torch.Tensor, Wn: torch.Tensor, base: float) -> float:
    E = B - Wn
    return float(((E @ Hn) * E).sum()) / base if base > 0 else 0.0


def admm(Wn: torch.Tensor, Y: torch.Tensor, Hn: torch.Tensor, k: int, nm, rho: float, max_iterations: int):
    """Steps 2–4 on the normalised problem; returns the last primal ``B`` and the schedule's final state."""
    L, Q = torch.linalg.eigh(Hn.double())  # the one eigendecomposition of the layer
    Q = Q.float()
    inv, inv_rho = _inverse(Q, L, rho), rho
    D0, last_support = _project(Wn, k, nm)
    D, V, B = D0.clone(), torch.zeros_like(Wn), Wn.clone()
    growing, restarts, ratio, done = False, 0, float("nan"), 0
    for iteration in range(max_iterations):
        B = (Y - V + rho * D) @ inv
        D, support = _project(B + V / rho, k, nm)
        V += rho * (B - D)
        done = iteration + 1
        if done % UPDATE_EVERY:
            continue
        delta = int((support != last_support).sum())
        ratio = delta / k
        step = rho_step(rho, delta, k, growing, iteration)
        rho, growing = step.rho, step.growing
        if step.restart:
            restarts += 1
            B, D, V = Wn.clone(), D0.clone(), torch.zeros_like(Wn)
        if step.stop:
            break
        last_support = support
        if rho != inv_rho:
            inv, inv_rho = _inverse(Q, L, rho), rho
    return B, dict(iterations=done, rho=rho, restarts=restarts, support_change=ratio)


def _kept(shape: tuple[int, int], sparsity: float, nm) -> int:
    rows, cols = shape
    if not nm:
        return rows * cols - int(round(sparsity * rows * cols))
    n, m = nm
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input size ({cols}) to be a multiple of {m}")
    return rows * cols - n * (rows * cols // m)


@torch.no_grad()
def alps_prune(
    weight: torch.Tensor,
    stats,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    info: dict | None = None,
    rho: float = 0.1,
    max_iterations: int = 300,
    cg_iterations: int = 10,
    dampening: float = 0.01,
    **_,
) -> torch.Tensor:
    k = _kept(weight.shape, sparsity, nm)
    if k == weight.numel() or k == 0:
        return weight.clone() if k else torch.zeros_like(weight)
    W = weight.detach().clone().float()
    H = stats.hessian.to(W.device, torch.float32, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(dampening * torch.diag(H).mean())
    x = torch.diag(H).sqrt() + 1e-8
    Hn = H / x.unsqueeze(0) / x.unsqueeze(1)
    Wn = W * x
    Y = Wn @ Hn

    B, state = admm(Wn, Y, Hn, k, nm, rho, max_iterations)
    B, support = _project(B, k, nm)
    base = float((Wn * Y).sum())
    if info is not None:
        info.update(state, dampening=dampening, error_admm=_relative_error(Hn, B, Wn, base))
    B, steps = masked_cg(Hn, Y, B, support, cg_iterations, CG_RTOL)
    if info is not None:
        info.update(cg_iterations=steps, error=_relative_error(Hn, B, Wn, base))
    return (B / x).masked_fill(~support, 0.0).to(weight.dtype)


register_method("alps", "unstructured", alps_prune, needs=("hessian",))
