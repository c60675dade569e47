"""Least-squares refit of the kept weights on a fixed support, and the normalised problem ALPS works on.

Legend: ``W`` (d_out × d_in) dense weights, ``H = XᵀX``, ``Hd = H + δ·mean(diag H)·I`` (δ = ``dampening``).
For a support ``S`` (per output row ``r``: the inputs it keeps) the layer loss

    min_Ŵ  tr((Ŵ − W) Hd (Ŵ − W)ᵀ)   subject to  Ŵ_rj = 0 for j ∉ S_r

separates into rows, and the gradient ``2 (ŵ − w) Hd`` vanishes on ``S``: ``ŵ_S Hd_SS = y_S`` with ``y = w Hd``,
i.e. ``ŵ_S = y_S (Hd_SS)⁻¹`` — the exact masked least squares (the pruned weights are not "set to zero and
forgotten": every kept weight of the row moves to compensate them). Solving ``|S|×|S|`` systems per row costs
``O(d_out·|S|³)``; instead all rows are solved together by conjugate gradient with the residual masked to the
support (each step one ``(d_out × d_in)·(d_in × d_in)`` product), on the unit-diagonal problem

    x = sqrt(diag Hd),  Hn = Hd / (x xᵀ),  Wn = W·x,  Yn = Wn Hn   (columns scaled: Jacobi preconditioning),

warm-started from the weights the mask came with. ``Hn`` is cached on ``stats.cache``, so the projections
that share an input (q, k, v; gate, up) build it once. Dead inputs (``diag H = 0``) are handled as in
SparseGPT: their weights are zeroed and ``H_jj = 1`` before the ridge.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..calibration.distributed import total, whole
from ..registry import register_method
from .sparsegpt import sparsegpt_prune


@dataclass(frozen=True)
class NormalizedHessian:
    Hn: torch.Tensor  # Hd / (x xᵀ), unit diagonal
    x: torch.Tensor  # sqrt(diag Hd) + 1e-8
    dead: torch.Tensor  # inputs never active (diag H = 0)


def normalized_hessian(stats, dampening: float, device) -> NormalizedHessian:
    """The ridge-damped, unit-diagonal ``Hn`` of ``stats.hessian`` (cached on ``stats.cache``).

    For the last projection reading the statistics (``stats.final_read``, set by the walk) ``Hn`` is built in the
    memory of ``stats.hessian``, which is then set to None: no one reads ``H`` after that kernel, and at a wide input
    this is one ``d_in²`` buffer less (0.82 GB at Llama-3-8B's ``down_proj``) while ``Hn`` and a ridge inverse live."""
    key = normalized_key(dampening, device)
    if key not in stats.cache:
        H = stats.hessian
        consume = getattr(stats, "final_read", False) and H.dtype == torch.float32 and H.device == torch.device(device)
        if consume:
            stats.hessian = None
        else:
            H = H.to(device, torch.float32, copy=True)
        # statistics gathered under inference mode are inference tensors: updated in place only inside it
        with torch.inference_mode() if H.is_inference() else contextlib.nullcontext():
            dead = torch.diag(H) == 0
            H[dead, dead] = 1.0
            H.diagonal().add_(dampening * torch.diag(H).mean())
            x = torch.diag(H).sqrt() + 1e-8
            stats.cache[key] = NormalizedHessian(H.div_(x.unsqueeze(0)).div_(x.unsqueeze(1)), x, dead)
    return stats.cache[key]


def normalized_key(dampening: float, device) -> tuple:
    """Where ``normalized_hessian`` caches its result on ``stats.cache``."""
    return ("normalized_hessian", dampening, str(device))


def scaled_weights(weight: torch.Tensor, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``Wn = W·x``: the column-scaled fp32 weights, dead inputs zeroed."""
    return weight.detach().float().masked_fill(dead, 0.0) * x


def target_shift(weight: torch.Tensor, stats) -> torch.Tensor | None:
    """``W(C − H)`` with ``C = stats.cross = X_dᵀX`` (None without one): the linear term of ``‖XŴᵀ − X_dWᵀ‖²`` is
    ``WC`` where that of ``‖XŴᵀ − XWᵀ‖²`` is ``WH``, so the dense-target problem is the usual one with ``Y`` shifted
    by this (÷ ``x`` per column once normalised; the ridge cancels). Dead inputs (``H_jj = 0``) contribute nothing."""
    if getattr(stats, "cross", None) is None:
        return None
    H = stats.hessian.to(weight.device, torch.float32)
    W = weight.detach().float().masked_fill(torch.diag(H) == 0, 0.0)
    return W @ (stats.cross.to(weight.device, torch.float32) - H)


def normalized_weights(weight: torch.Tensor, stats, dampening: float):
    """``(Wn, Hn, x)``: ``scaled_weights``, ``Hn`` and ``x``."""
    norm = normalized_hessian(stats, dampening, weight.device)
    return scaled_weights(weight, norm.x, norm.dead), norm.Hn, norm.x


def normalized_problem(weight: torch.Tensor, stats, dampening: float):
    """``(Wn, Yn, Hn, x)``: ``normalized_weights`` and ``Yn = Wn Hn``."""
    Wn, Hn, x = normalized_weights(weight, stats, dampening)
    return Wn, Wn @ Hn, Hn, x


def masked_cg(
    A: torch.Tensor, Y: torch.Tensor | None, B: torch.Tensor, support: torch.Tensor, iterations: int, rtol: float,
    stop: str = "masked", W: torch.Tensor | None = None, shard=None,
) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Solve ``b_S A_SS = y_S`` for every row (``A`` symmetric positive definite) by conjugate gradient with the
    residual masked to the row's support ``S``; warm start ``B`` (zero off ``S``), updated in place. Returns (B, steps
    taken). Besides ``A`` and ``B`` it holds three ``d_out × d_in`` buffers (residual, direction, direction·A — whose
    memory holds the masked residual once the residual is updated) and one scratch, all updated in place.

    ``stop="masked"``: stop once every row's masked residual ``‖(y − bA)_S‖ ≤ rtol·‖y_S‖`` (true convergence;
    ``rtol=0`` runs all steps). ``stop="unmasked"`` is ALPS's reference test: the *unmasked* residual ``Y − B A`` of
    every input coordinate (a column) within ``rtol`` of the norm of that column of ``Y`` — a sparse support
    cannot meet it, so in practice all steps run; that residual is carried by the CG recurrence.

    ``Y = W A`` may be given as ``W`` instead (``Y=None``): the start residual is then ``(W − B) A`` and ``Y`` is
    never formed unless a stopping test needs it — for the unmasked test only once the bound
    ``‖Y_{:,j}‖ ≤ ‖W‖_F ‖A_{:,j}‖`` no longer rules it out (one product by ``A`` fewer). ``W`` may be a function
    that makes it: it is then held only while it is read (at the start, and by that test if it ever runs).

    With ``shard`` the rows are this process's block: the steps are row by row, and the stopping tests (all rows,
    column norms) are taken over every process's rows."""
    if Y is not None:
        full = Y - B @ A  # unmasked residual, kept by the same recurrence
    else:
        w = held(W)
        full = (w - B) @ A
        if stop == "masked" and rtol > 0:
            Y = w @ A
        elif stop == "unmasked":
            test = UnmaskedStop(A, None, W, rtol, shard, w)
        del w
    if stop == "masked":
        tol2 = (rtol**2) * (Y * support).square().sum(1) if rtol > 0 else torch.zeros(B.shape[0], device=B.device)
    elif Y is not None:
        test = UnmaskedStop(A, Y, W, rtol, shard)
    P = full * support  # the first direction: the masked residual
    rr = (P * P).sum(1)
    steps = 0
    AP, S = None, torch.empty_like(P)  # P·A and a scratch buffer, allocated once: every update below is in place
    for _ in range(iterations):
        if stop == "masked" and total(int(torch.count_nonzero(~(rr <= tol2))), shard) == 0:
            break
        AP = torch.matmul(P, A, out=AP) if AP is not None else P @ A
        den = torch.mul(P, AP, out=S).sum(1)
        alpha = torch.where(den > 0, rr / den.where(den > 0, torch.ones_like(den)), torch.zeros_like(den))
        B.add_(torch.mul(P, alpha.unsqueeze(1), out=S))
        full.sub_(torch.mul(AP, alpha.unsqueeze(1), out=S))
        R = torch.mul(full, support, out=AP)  # AP is spent: the masked residual takes its memory
        rr_new = torch.mul(R, R, out=S).sum(1)
        beta = torch.where(rr > 0, rr_new / rr.where(rr > 0, torch.ones_like(rr)), torch.zeros_like(rr))
        P.mul_(beta.unsqueeze(1)).add_(R)
        rr = rr_new
        steps += 1
        if stop == "unmasked" and test.met(full):
            break
    return B, steps


MARGIN = 1e-3  # relative: far above the rounding of an fp32 column norm (≤ 3e-5 at 576 rows)


class UnmaskedStop:
    """ALPS's stopping test: every column of the unmasked residual within ``rtol`` of that column's norm in ``Y``.
    Given ``W`` instead of ``Y = W A``, the bound ``‖Y_{:,j}‖ ≤ ‖W‖_F ‖A_{:,j}‖`` is tried first and ``Y`` formed
    only once it passes. With ``shard`` (this process's rows) a column whose norm over one process's rows alone
    exceeds a float64 estimate of the bound by ``MARGIN`` settles the test with one flag exchanged; otherwise the
    rows are gathered and the test is the one process's, bit for bit."""

    def __init__(self, A, Y, W, rtol: float, shard, w=None):
        self.A, self.Y, self.W, self.rtol, self.shard = A, Y, W, rtol, shard
        self.exact, self.tol, self.bound = Y is not None, None, None
        if shard is None:
            self.tol = self._first_tol(w)
        elif Y is not None:
            self.bound = rtol * column_norms(Y, shard)
        else:
            self.bound = rtol * math.sqrt(total(float(w.double().square().sum()), shard)) * A.norm(dim=0)

    def _first_tol(self, w=None) -> torch.Tensor:
        if self.Y is not None:
            return self.rtol * whole(self.Y, self.shard).norm(dim=0)
        w = held(self.W) if w is None else w
        return self.rtol * float(whole(w, self.shard).norm()) * self.A.norm(dim=0)

    def met(self, full: torch.Tensor) -> bool:
        if self.shard is not None and exceeds(full, self.bound, self.shard):
            return False
        if self.tol is None:
            self.tol = self._first_tol()
        norms = whole(full, self.shard).norm(dim=0)
        if not self.exact and bool((norms <= self.tol).all()):
            self.tol, self.exact = self.rtol * whole(held(self.W) @ self.A, self.shard).norm(dim=0), True
        return bool((norms <= self.tol).all())


def column_norms(M: torch.Tensor, shard) -> torch.Tensor:
    """The column norms of the whole matrix (``M``: this process's rows), summed in float64 over the processes (the
    last bits differ from one process's ``norm(dim=0)``: for bounds, not for decisions)."""
    return shard.sum_in_place(M.double().square().sum(0)).sqrt().float()


def exceeds(full: torch.Tensor, bound: torch.Tensor, shard) -> bool:
    """Whether some column of the whole ``full`` (this process's rows) is certainly longer than ``bound``: its norm
    over one process's rows alone exceeds it by ``MARGIN``. One flag exchanged instead of the rows."""
    return total(int(bool((full.norm(dim=0) > bound * (1 + MARGIN)).any())), shard) > 0


def held(W):
    """``W`` itself, or — for a function — the matrix it makes (rebuilt where it is read instead of held)."""
    return W() if callable(W) else W


def relative_error(Hn: torch.Tensor, B: torch.Tensor, Wn: torch.Tensor, base: float, shard=None) -> float:
    """``tr((B − Wn) Hn (B − Wn)ᵀ) / base`` — the damped layer loss, relative to ``base = tr(Wn Hn Wnᵀ)`` (with
    ``shard``: summed over every process's rows)."""
    E = B - Wn
    return total(float(((E @ Hn) * E).sum()), shard) / base if base > 0 else 0.0


def refit_on_support(
    Wn, Y, Hn, B, support, iterations: int, rtol: float, info: dict | None, before: str, stop="masked", shard=None
):
    """Masked CG from ``B`` on ``support`` (``info``: steps taken); ``Y = Wn Hn`` may be None, ``Wn`` a function
    (see ``masked_cg``).
    With ``info["measure_error"]`` also the damped relative errors ``info[before]`` and ``info["error"]``: products
    by ``Hn`` a prune does not need."""
    measure = info is not None and info.get("measure_error", False)
    if measure:  # products a prune does not need, measured on a held ``Wn``
        Wn = held(Wn)
    if measure and Y is None:
        Y = Wn @ Hn
    base = total(float((Wn * Y).sum()), shard) if measure else 0.0
    if measure:
        info[before] = relative_error(Hn, B, Wn, base, shard)
    B, steps = masked_cg(Hn, Y, B, support, iterations, rtol, stop=stop, W=Wn, shard=shard)
    if info is not None:
        info["cg_iterations"] = steps
    if measure:
        info["error"] = relative_error(Hn, B, Wn, base, shard)
    return B


@torch.no_grad()
def refit(
    weight: torch.Tensor,
    pruned: torch.Tensor,
    stats,
    iterations: int = 10,
    dampening: float = 0.01,
    rtol: float = 1e-6,
    info: dict | None = None,
    shard=None,
) -> torch.Tensor:
    """Re-solve the nonzeros of ``pruned`` (the support) for the dense ``weight`` by masked CG, warm-started from
    ``pruned``; at most ``iterations`` steps (``info``: steps taken; with ``info["measure_error"]`` also the damped
    relative error before and after)."""
    Wn, Y, Hn, x = normalized_problem(weight, stats, dampening)
    support = pruned != 0
    B = refit_on_support(
        Wn, Y, Hn, pruned.float() * x, support, iterations, rtol, info, "error_before_refit", shard=shard
    )
    return (B / x).masked_fill(~support, 0.0).to(weight.dtype)


@torch.no_grad()
def sparsegpt_refit_prune(
    weight: torch.Tensor,
    stats,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    dampening: float = 0.01,
    block_size: int = 128,
    saliency: str = "obs",
    cg_iterations: int = 10,
    info: dict | None = None,
    shard=None,
    **_,
) -> torch.Tensor:
    """SparseGPT's mask and weights, then the kept weights re-solved jointly on that mask (``refit``).

    SparseGPT compensates each pruned weight only on the columns to its right (its sweep is one pass of
    sequential OBS), so the kept weights are not the least-squares optimum for the final mask; ``cg_iterations``
    masked-CG steps from SparseGPT's weights move them towards it (the exact optimum in the limit)."""
    pruned = sparsegpt_prune(weight, stats, sparsity, nm, dampening, block_size, info, saliency, shard=shard)
    return refit(weight, pruned, stats, cg_iterations, dampening, info=info, shard=shard)


register_method("sparsegpt_refit", "unstructured", sparsegpt_refit_prune, needs=("hessian",), rows=True)
