"""Sensitivity-aware mixed sparsity (Shao et al., ICASSP 2024, arXiv 2310.09499).

Sensitivity of a weight matrix = its average loss-Hessian trace, ``sen = Tr(∇²_W L) / n``:
- ``sensitivity`` (cheap proxy): the layer-wise reconstruction loss ‖XWᵀ − XŴᵀ‖² has Hessian 2·XᵀX per row,
  so ``sen ∝ mean_j ‖X_j‖² / tokens`` (the mean diagonal of the input Hessian, from the outlier pass);
- ``sensitivity_hutchinson``: Hutchinson's estimator ``Tr(H) = E_z[zᵀHz]``, z Rademacher, of the language-model
  loss Hessian, one Hessian-vector product (double backward) per sample gives every matrix's trace at once.

Allocation (the paper's Algorithm 1, rank-linear): rank the N matrices by sensitivity (r = 0 least sensitive);
``s_r = (S + α) − r · 2α / (N − 1)``, so the least sensitive matrix is pruned most; then shifted (and clamped into
``[S − |α|, S + |α|]``) so that the parameter-weighted total is exactly S at every S. (The reference code
hard-codes the lower keep bound 0.4 and is only right at S = 0.5.) α is ``PrunedConfig.lamda``; α < 0 reverses.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..plan import Key, SparsityPlan
from ..registry import register_method
from .fit import fit_to_target


def rank_linear_allocation(sensitivity: dict[Key, float], numel: dict[Key, int], sparsity: float, alpha: float):
    """Rank-linear sparsities in ``[S − |α|, S + |α|]`` (more sensitive → less sparse), exact weighted total S."""
    if not sensitivity:
        raise ValueError("no sensitivities: run the outlier pass (or the Hutchinson estimate) first")
    order = sorted(sensitivity, key=lambda k: (sensitivity[k], k))  # ties broken by (layer, projection)
    n = len(order)
    step = 2 * alpha / (n - 1) if n > 1 else 0.0
    raw = {key: sparsity + alpha - rank * step for rank, key in enumerate(order)}
    return fit_to_target(raw, numel, sparsity, lo=sparsity - abs(alpha), hi=sparsity + abs(alpha))


def input_hessian_proxy(sumsq: torch.Tensor, tokens: int) -> float:
    """Mean diagonal of the layer-input Hessian ``XᵀX / tokens`` (= mean_j ‖X_j‖² / tokens)."""
    return float(sumsq.double().mean()) / max(tokens, 1)


def hutchinson_traces(
    model, windows: torch.Tensor, weights: dict[Key, torch.Tensor], samples: int = 1, batch_size: int = 1, seed=0
) -> dict[Key, float]:
    """``{key: Tr(∇²_W L) / numel(W)}`` by Hutchinson's estimator over ``samples`` Rademacher vectors per batch.

    L is the mean next-token cross-entropy of ``model`` on ``windows``; only ``weights`` need gradients
    (their ``requires_grad`` is restored afterwards). Cost: one forward and a double backward per sample.
    A weight may be a view of a parameter (a row block of a fused weight): its trace sums over its own entries.
    """
    generator = torch.Generator().manual_seed(seed)
    keys, views = list(weights), [weights[k] for k in weights]
    params = list({id(p): p for p in map(_leaf, views)}.values())  # row blocks of a fused weight share one
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    owner = [next(i for i, p in enumerate(params) if p is _leaf(v)) for v in views]
    totals = torch.zeros(len(views), dtype=torch.float64)
    batches = windows.split(batch_size)
    try:
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no double backward
            _accumulate(model, batches, params, (owner, views), samples, generator, totals)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    totals /= len(batches) * samples
    return {key: float(totals[i]) / views[i].numel() for i, key in enumerate(keys)}


def _leaf(weight: torch.Tensor) -> torch.Tensor:
    """The parameter a weight is, or is a view of (a row block of a fused projection)."""
    return weight if weight._base is None else weight._base


def _region(full: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """The entries of ``full`` (shaped and laid out like ``view``'s contiguous parameter) that ``view`` covers."""
    if view._base is None:
        return full
    offset = view.storage_offset() - view._base.storage_offset()
    return full.contiguous().as_strided(view.shape, view.stride(), offset)


def _accumulate(model, batches, params, blocks, samples, generator, totals) -> None:
    """``totals[i] += Σ (z ⊙ ∇²L z)`` over weight i's entries, for every batch and Rademacher sample (z over
    all matrices at once)."""
    owner, views = blocks
    device = params[0].device
    for batch in tqdm(batches, desc="Hutchinson trace"):
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for _ in range(samples):
            zs = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p in params]
            hvs = torch.autograd.grad(grads, params, grad_outputs=zs, retain_graph=True)
            products = [z * hv for z, hv in zip(zs, hvs, strict=True)]
            totals += torch.stack(
                [_region(products[i], v).sum().double().cpu() for i, v in zip(owner, views, strict=True)]
            )


def sensitivity_allocation(profile, sparsity: float, lamda: float, **_) -> SparsityPlan:
    return rank_linear_allocation(profile.sensitivity, profile.numel, sparsity, float(lamda))


register_method("sensitivity", "allocation", sensitivity_allocation, needs=("outliers",))
register_method("sensitivity_hutchinson", "allocation", sensitivity_allocation, needs=("outliers", "loss_hessian"))
