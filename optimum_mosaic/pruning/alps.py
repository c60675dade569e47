"""ALPS (Meng, Behdin, Wang, Mazumder; NeurIPS 2024, arXiv 2406.07831): ADMM layer-wise pruning with a
ρ schedule, then conjugate gradient on the fixed support. Follows ``mazumder-lab/ALPS`` ``ALPS_admm``.

Orientation: our weight is ``W`` (d_out × d_in) and ``H = XᵀX`` (d_in × d_in); the layer loss is
``‖XWᵀ − XŴᵀ‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ)``. The reference works on ``B = Wᵀ``; we keep rows (= its columns).

1. Ridge and normalisation: ``H ← H + δ·mean(diag H)·I`` (δ = ``dampening``), ``x = sqrt(diag H) + 1e-8``,
   ``Hn = H / (x xᵀ)`` (unit diagonal), ``Wn = W · x`` (column-scaled), ``Y = Wn Hn``. The problem is solved
   for ``Wn``: minimise ``tr((Ŵn − Wn) Hn (Ŵn − Wn)ᵀ)`` over sparse ``Ŵn``. ``Hn`` is built once per input group
   (``refit.normalized_hessian``, cached on ``stats.cache``).
2. ``(Hn + ρI)⁻¹`` for each ρ the schedule visits: a float32 Cholesky factorisation and inverse (``RidgeInverses``),
   cached on ``stats.cache`` and so shared by the projections of one input group (q, k, v; gate, up).
3. ADMM, ``D₀ = P_k(Wn)``, ``V₀ = 0``:  ``B ← (Y − V + ρD)(Hn + ρI)⁻¹`` (see (g));  ``D ← P_k(B + V/ρ)``;
   ``V ← V + ρ(B − D)``. ``P_k`` keeps the ``k`` largest ``|·|`` of the whole matrix (exact ``k =
   numel − round(s·numel)``) or, for N:M, zeroes the ``n`` smallest of every ``m`` consecutive inputs of a row.
4. Every 3 iterations, Δ = number of support flips since the last check, relative to ``k`` (kept weights):
   Δ/k > 0.1 → ρ×1.3; Δ/k > 0.005 → ρ×1.2; Δ ≥ 1 → ρ×1.1 once ρ has started growing, otherwise ρ/5 and
   restart (B, D, V back to ``Wn``, ``D₀``, 0); Δ = 0 → stop once growing, otherwise ρ/5. ρ ≤ 1e6.
   Stop when the iteration index (0-based) ≥ 30 and Δ/k < 3e-4, or after ``max_iterations``. See ``rho_step``.
5. Support ``S = P_k(B)``; conjugate gradient on ``b_S (Hn)_SS = y_S`` per row (residuals masked to ``S``),
   warm start ``P_k(B)``, ≤ ``cg_iterations`` steps, rtol 1e-4 (unit diag(Hn) = Jacobi preconditioning).
6. ``Ŵ = Ŵn / x``.

With ``stats.cross = X_dᵀX`` (``PrunedConfig.dense_target``: the dense model's inputs ``X_d``) the problem is
``‖XŴᵀ − X_dWᵀ‖²``: the same with ``Y = Wn Hn + W(C − H)/x`` (``refit.target_shift``), in the B-step, ``V₀`` and CG.

Deviations from the reference code: (a) CG keeps the reference's stopping test on the *unmasked* residual
``‖Y − B Hn‖`` per input coordinate (rtol against ``‖Y_{:,j}‖``), which a sparse support cannot meet, so in
practice all ``cg_iterations`` steps run; that residual is carried by the CG recurrence instead of a fresh
product (one matmul per step less). (b) ``P_k`` finds the threshold by selection (``masks.kth_smallest``) and
breaks ties by index (the reference uses ``topk``, ties unspecified, 5× slower on CPU); the support is a boolean
mask, not ``D == 0``. (c) ``(Hn + ρI)⁻¹`` comes from a float32 Cholesky per distinct ρ instead of one float64
``eigh`` re-assembled for each ρ: the same cost per ρ as a re-assembly, no ``eigh``, and closer to the float64
inverse than a float32 ``eigh``. ADMM's support is sensitive at the rounding level: against the ``eigh`` version
0.1–2.5 % of the weights, near the threshold, land on the other side — as many (0.1–2.5 %) as perturbing ``H`` by
1e-7 (relative) moves in the ``eigh`` version itself — and the layer error differs by at most 0.11 % (relative) per
projection (``benchmarks/alps_speed.py``: 1.40× faster per layer on one thread). The dual step is written ``V ← ρ(Z − D)`` with ``Z = B + V/ρ`` (= ``V + ρ(B − D)``).
(d) Dead inputs (``diag H = 0``) are handled like SparseGPT: their weights are zeroed and ``H_jj = 1`` before
the ridge. (e) ``k`` kept = ``numel − round(s·numel)`` so the zero count is exact (the reference keeps
``round((1 − s)·numel)``, equal except at .5 ties). (f) A matrix that already holds the target's zeros (a
re-prune of a pruned checkpoint) is returned as it is, dead inputs zeroed (``already_pruned``): it is its own
optimum, and ADMM + CG would only reproduce it up to float32 rounding, trading kept weights smaller than that
rounding for ±1e-6 weights at existing zeros.
(g) Fewer products by ``Hn`` and fewer inverses, for wide inputs (``d_in`` = 14336 on Llama-3-8B's ``down_proj``,
where one product costs ``2·d_out·d_in²`` flops and one inverse ``≈ 4/3·d_in³``): the B-step is formed without
``Y = Wn Hn`` (``b_step``), ``V₀ = (Wn − D₀)Hn`` and CG's start residual ``(Wn − B)Hn`` need no ``Y`` either, and
CG forms ``Y`` for its stopping test only once a bound no longer rules the test out (``refit.masked_cg``); from a
warm start the first B-step is ``D₀`` itself (not computed); an inverse is made when a B-step first needs it (the
ρ set by the last check never is), in place (one ``d_in × d_in`` buffer). ALPS-warm with its defaults: 10 products
instead of 12, 2 inverses instead of 3, and the same result up to rounding (``benchmarks/wide_projection.py``;
``results/wide_projection.json``). Working set at such an input: ADMM holds ``Wn, B, D, V`` between steps and at
most four ``d_out × d_in`` matrices inside one (``Wn, B, Z, P_k(Z)`` while it projects: no start iterates kept for a
restart — a cold restart recomputes them —, the B-step's operand written in ``D``'s memory and freed, ``Z`` formed in
``V``'s, the magnitudes ``|Z|`` taken one chunk at a time), CG three vectors and a scratch updated in place
(``Wn`` made again where its start reads it), and the last reader of an input group parks ``Hn`` in a temporary file
while ADMM iterates (``RidgeInverses.park``: ADMM reads it only to make inverses) and drops its ridge inverses before
CG; the bits are those of keeping them all.
Kept quirk: a restart in the same check that meets the stop rule ends with ``B = Wn`` (dense), so the support
is then ``P_k(Wn)`` refined by CG, exactly as in the reference.

Where the gain over SparseGPT comes from (``benchmarks/layer_error.py``, SmolLM2-135M layers 0/10/20/29, all seven
projections, relative layer error vs SparseGPT at 50 % / 70 %): ALPS 0.63 / 0.63; ALPS without its final CG the
same (ADMM ends least-squares on its support already); SparseGPT's mask with its kept weights re-solved exactly
0.75 / 0.78 — the refit is 58–68 % of ALPS's gain, the ADMM support the rest. ``alps_warm`` starts ADMM from
SparseGPT's solution with a larger ρ and a short schedule: with its defaults (ρ₀ 0.5, 6 iterations, 3 CG steps)
0.68 / 0.69 at ~31 % of ALPS's kernel time (``alps_warm rho0.5 it6`` rows of ``benchmarks/results/layer_error.json``).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from ..calibration.distributed import total
from ..registry import register_method
from . import masks
from .masks import already_pruned, kept_count, kth_smallest, whole_shape
from .refit import normalized_hessian, normalized_key, refit_on_support, scaled_weights, target_shift
from .ridge import RidgeInverses, share_factorisations, split_start_fits, split_warm_start
from .sparsegpt import sparsegpt_prune

RHO_MAX = 1e6
UPDATE_EVERY = 3
SWITCH_ITERATION = 30
STOP_RATIO = 3e-4
CG_RTOL = 1e-4
WARM_RHO, WARM_ITERATIONS, WARM_CG = 0.5, 6, 3  # alps_warm defaults: layer_error.py grid, then whole-model runs


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


def keep_top_k(scores: torch.Tensor, k: int, key=None, shard=None) -> torch.Tensor:
    """True at exactly the ``k`` largest ``scores`` of the whole tensor; among ties the higher indices are kept.
    ``key`` (elementwise, e.g. ``torch.abs``): of ``key(scores)``, applied one chunk at a time, so that no whole
    matrix of keys is made (0.22 GiB at a 4096 × 14336 projection). ``shard``: ``scores`` are this process's rows and
    the ``k`` are those of every process's rows — a large matrix is never gathered (``masks.kth_smallest`` exchanges
    samples and counts), a small one is (``masks.shared_selection``)."""
    if shard is not None and not masks.shared_selection(scores, shard):
        return shard.local(keep_top_k(shard.gather(scores), k, key))
    flat = scores.flatten()
    pruned = (flat.numel() if shard is None else sum(shard.sizes(flat.numel()))) - k
    if pruned <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    key = key or (lambda x: x)
    threshold = kth_smallest(flat, pruned, key, shard)
    keep, chunks = torch.empty_like(flat, dtype=torch.bool), flat.split(masks.CHUNK)
    for chunk, out in zip(chunks, keep.split(masks.CHUNK), strict=True):
        torch.gt(key(chunk), threshold, out=out)
    kept, after = int(torch.count_nonzero(keep)), 0  # not .sum(): that converts the whole mask to int64 first
    ties = None
    if shard is not None:  # every process's count of kept and tied entries, in one exchange
        ties = _positions(chunks, lambda c: key(c) == threshold)
        counts = shard.counts(kept, ties.numel())
        kept, after = sum(c[0] for c in counts), masks.neighbours([c[1] for c in counts], shard.rank)[1]
    if k > kept:  # ties at the threshold: the last ``k − kept`` of them
        ties = _positions(chunks, lambda c: key(c) == threshold) if ties is None else ties
        keep[masks.take_ties(ties, k - kept, after=after, last=True)] = True
    return keep.view_as(scores)


def _positions(chunks, test) -> torch.Tensor:
    """Flat positions (ascending) where ``test(chunk)`` holds, over consecutive ``chunks``."""
    starts = [0, *itertools.accumulate(c.numel() for c in chunks)]
    return torch.cat([test(c).nonzero().squeeze(1) + a for c, a in zip(chunks, starts, strict=False)])


def _project(Z: torch.Tensor, k: int, nm: tuple[int, int] | None, shard=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``P_k(Z)`` and its support (True = kept); with ``shard``, ``Z`` is this process's rows and the top-k is taken over
    every process's rows."""
    if nm:
        n, m = nm
        rows, cols = Z.shape
        groups = Z.abs().reshape(rows, cols // m, m)
        support = torch.ones_like(groups, dtype=torch.bool)
        support.scatter_(2, torch.argsort(groups, dim=2, stable=True)[..., :n], False)
        support = support.reshape(rows, cols)
    else:
        support = keep_top_k(Z, k, key=torch.abs, shard=shard)
    return Z * support, support


def b_step(Wn, D, V, rho: float, inv: torch.Tensor, overwrite: bool = False, shift=None) -> torch.Tensor:
    """ADMM's B-step ``(Y − V + ρD)(Hn + ρI)⁻¹`` with ``Y = Wn Hn``, written ``Wn + (ρ(D − Wn) − V)(Hn + ρI)⁻¹``
    (``Y(Hn + ρI)⁻¹ = Wn − ρWn(Hn + ρI)⁻¹``): one product, and ``Y`` is never formed. ``overwrite``: ``D``'s memory
    holds ``ρ(D − Wn) − V`` (D is garbage after; one ``d_out × d_in`` buffer less, the same bits)."""
    T = D.sub_(Wn) if overwrite else D - Wn
    T = T.mul_(rho).sub_(V)
    return torch.addmm(Wn, T if shift is None else T.add_(shift), inv)  # ``shift``: Y = Wn Hn + shift


def admm(Wn, k: int, nm, rho: float, max_iterations: int, inverse: RidgeInverses, start=None, shard=None, shift=None):
    """Steps 2–4 on the normalised problem (``Hn`` is ``inverse``'s, parked once ``V₀`` is made: see
    ``RidgeInverses.park``); returns the last primal ``B`` and the schedule's final state.

    ``start`` (a sparse ``Wn``-scaled matrix with ``k`` nonzeros; handed over in a one-element list, so that no caller
    holds it once the iterates move on) warm-starts at the fixed point of that support: ``D₀ = start``,
    ``V₀ = Y − D₀ Hn`` (the dual at which ``B = D₀`` solves the first B-step), and ρ counts as already growing (a still
    support stops the schedule instead of shrinking ρ, and so never restarts).

    The B-step is written without ``Y = Wn Hn``: ``Y(Hn + ρI)⁻¹ = Wn − ρWn(Hn + ρI)⁻¹``, so
    ``B = Wn + (ρ(D − Wn) − V)(Hn + ρI)⁻¹`` (one product per iteration; ``V₀ = (Wn − D₀)Hn``). From ``start`` the
    first B-step is ``D₀`` itself and is not computed, and an inverse is made only when a B-step needs it.

    Working set (what a ``d_in``-wide projection holds besides ``Hn`` and one inverse): ``Wn``, ``B``, ``D``, ``V``
    between steps — each iterate is dropped as soon as the next step no longer reads it, the B-step writes its
    operand into ``D``'s memory, and nothing is kept for a restart (a cold restart recomputes ``P_k(Wn)``).

    ``shard``: ``Wn`` (and ``start``) are this process's rows; projections and support changes count all rows."""

    def cold():
        D, support = _project(Wn, k, nm, shard)
        return Wn, D, torch.zeros_like(Wn), support

    warm = start is not None
    if isinstance(start, list):  # handed over: the list held the only reference
        start = start.pop()
    if warm:
        B, D, V, last_support = start, start, (Wn - start) @ inverse.hessian(), start != 0
        V = V if shift is None else V.add_(shift)
    else:
        B, D, V, last_support = cold()
    del start
    inverse.park()
    growing, restarts, ratio, done = warm, 0, float("nan"), 0
    solved = warm  # from a warm start, B = D₀ already solves the B-step from (D₀, V₀), whatever ρ
    for iteration in range(max_iterations):
        if not solved:
            B = None  # the B-step does not read the old primal: free it first
            B = b_step(Wn, D, V, rho, inverse(rho), overwrite=True, shift=shift)
            D = None  # garbage: the B-step wrote its operand there
        solved = False
        Z = torch.add(B, V, alpha=1.0 / rho, out=V)  # in V's memory: read by nothing after Z
        D = V = None
        D, support = _project(Z, k, nm, shard)
        V = Z.sub_(D).mul_(rho)  # V + ρ(B − D) = ρ(Z − D)
        del Z
        done = iteration + 1
        if done % UPDATE_EVERY:
            continue
        delta = total(int(torch.count_nonzero(support != last_support)), shard)
        ratio = delta / k
        step = rho_step(rho, delta, k, growing, iteration)
        rho, growing = step.rho, step.growing
        if step.restart:  # only before ρ ever grew, so only from a cold start
            restarts += 1
            B = D = V = None
            B, D, V, _ = cold()
        if step.stop:
            break
        last_support = support
    return B, dict(iterations=done, rho=rho, restarts=restarts, support_change=ratio, inverses=inverse.made)


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
    start: torch.Tensor | None = None,
    shard=None,
    **_,
) -> torch.Tensor:
    """ALPS; ``start`` (pruned weights with exactly the target's zeros, e.g. SparseGPT's) warm-starts ADMM at that
    support instead of ``P_k(Wn)`` (see ``admm``). ``info``: the schedule's state and CG steps; with
    ``info["measure_error"]`` also the damped relative errors after ADMM and after CG. ``shard`` (a ``RowShard``):
    ``weight`` and ``start`` are this process's rows of the matrix, and the result is those rows of the one-process
    result (the top-k and the schedule's counts are taken over every process's rows)."""
    starts = [] if start is None else [start]
    return _alps(weight, stats, sparsity, nm, info, rho, max_iterations, cg_iterations, dampening, starts, shard)


def _alps(
    weight, stats, sparsity, nm, info, rho, max_iterations, cg_iterations, dampening, starts: list, shard=None,
    checked: bool = False, shift=None,
):  # fmt: skip
    """``alps_prune``'s body; ``starts`` holds the warm start (or nothing) and is emptied, so a start made for this
    call (``alps_warm``'s SparseGPT weights) is held by nothing once it is scaled. ``checked``: the caller has
    already asked ``already_pruned``. ``shift``: ``refit.target_shift``'s, when the caller made it."""
    shape = whole_shape(weight, shard)
    k = kept_count(shape, sparsity, nm)
    if k == shape[0] * shape[1] or k == 0:
        return weight.clone() if k else torch.zeros_like(weight)
    held = None if checked else already_pruned(weight, stats, sparsity, nm, info, dampening, shard)
    if held is not None:
        return held
    final = getattr(stats, "final_read", False)  # no later projection reads these statistics
    shift = target_shift(weight, stats) if shift is None else shift  # None unless the statistics hold X_dᵀX
    norm = normalized_hessian(stats, dampening, weight.device)
    if final:  # the solve's references are the only ones: ``inverse`` may park Hn while ADMM iterates
        stats.cache.pop(normalized_key(dampening, weight.device))
    x, dead = norm.x, norm.dead
    Wn = scaled_weights(weight, x, dead)
    inverse = RidgeInverses(norm.Hn, stats.cache, (dampening, str(weight.device)), parkable=final)
    del norm
    box = [starts.pop().float() * x] if starts else None  # ADMM frees the scaled start once its iterates move on
    shift = None if shift is None else shift.div_(x)
    B, state = admm(Wn, k, nm, rho, max_iterations, inverse, box, shard, shift)
    B, support = _project(B, k, nm, shard)
    if final:  # CG needs no inverse
        inverse.store.clear()
    Hn = inverse.hessian()
    del inverse
    if info is not None:
        info.update(state, dampening=dampening)
    Wn = functools.partial(scaled_weights, weight, x, dead)  # CG reads Wn only at its start: made again, not held
    Y = None if shift is None else torch.addmm(shift, Wn(), Hn)
    B = refit_on_support(Wn, Y, Hn, B, support, cg_iterations, CG_RTOL, info, "error_admm", "unmasked", shard)
    del Hn
    return (B / x).masked_fill(~support, 0.0).to(weight.dtype)


@torch.no_grad()
def alps_warm_prune(
    weight: torch.Tensor,
    stats,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    info: dict | None = None,
    rho: float = WARM_RHO,
    max_iterations: int = WARM_ITERATIONS,
    cg_iterations: int = WARM_CG,
    dampening: float = 0.01,
    block_size: int = 128,
    saliency: str = "obs",
    shard=None,
    **_,
) -> torch.Tensor:
    """ALPS warm-started from SparseGPT: SparseGPT's weights are the first ADMM split ``D₀`` (with the dual
    ``V₀ = Y − D₀ Hn`` that makes ``B = D₀`` its first primal step), ρ starts at ``rho`` instead of 0.1, and the
    schedule runs ``max_iterations`` iterations (ALPS from a dense start needs ~33 to anneal ρ from 0.1); then the
    same masked-CG refit. The first D-step, ``P_k(D₀ + (Y − D₀Hn)/ρ)``, is a projected gradient step of length
    1/ρ from SparseGPT's solution: ADMM starts by exchanging SparseGPT's weakest kept weights for the pruned
    weights with the largest gradient, and the schedule (ρ×1.2–1.3 while the support still moves) settles it.

    Defaults (ρ₀ 0.5, 6 iterations, 3 CG steps): the grid ρ₀ ∈ {0.2, 0.3, 0.5, 0.7, 1} × {3, 6, 9, 12} iterations in
    ``benchmarks/results/layer_error.json`` (``vs sparsegpt``: layer error under the calibration Hessian, relative to
    SparseGPT's) puts ρ₀ 0.3 / 12 iterations lowest
    (0.65× SparseGPT's layer error) and ρ₀ 0.5 / 6 iterations at 0.68–0.69× for ~70 % of its kernel time; on the whole
    SmolLM2 (``results/defaults_smollm2.json``) the two give held-out calibration NLL 3.753 / 3.770 at 50 % and
    4.358 / 4.428 at 70 %, and only the shorter schedule stays within 1.5× of SparseGPT's prune time. Too few
    iterations at a small ρ₀ move the support too far (ρ₀ 0.3 with 3 iterations is worse than SparseGPT at 70 %).
    """
    shape = whole_shape(weight, shard)
    checked, starts = 0 < kept_count(shape, sparsity, nm) < shape[0] * shape[1], []
    shift = None
    if checked:
        held = already_pruned(weight, stats, sparsity, nm, info, dampening, shard)
        if held is not None:
            return held
        shift = target_shift(weight, stats)  # before a start or a shared factorisation may consume H
        if shard is not None and shard.size > 1 and max_iterations > 1:
            k = kept_count(shape, sparsity, nm)  # ahead: ρ₀, and the first check's ρ when the support moves (Δ = k)
            rhos = (rho, rho_step(rho, k, k, True, UPDATE_EVERY - 1).rho)[: 1 + (max_iterations > UPDATE_EVERY)]
            if split_start_fits(shape[1], rhos):  # a small input: SparseGPT whole on one process (see ridge.py)
                starts.append(
                    split_warm_start(weight, stats, sparsity, nm, dampening, block_size, info, saliency, rhos, shard)
                )
            else:
                share_factorisations(stats, dampening, rho, weight.device, shard)
    if not starts:
        starts.append(sparsegpt_prune(weight, stats, sparsity, nm, dampening, block_size, info, saliency, shard=shard))
    args = (info, rho, max_iterations, cg_iterations, dampening, starts, shard, checked, shift)
    return _alps(weight, stats, sparsity, nm, *args)


register_method("alps", "unstructured", alps_prune, needs=("hessian",), rows=True)
register_method("alps_warm", "unstructured", alps_warm_prune, needs=("hessian",), rows=True)
