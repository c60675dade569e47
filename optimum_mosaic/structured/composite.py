"""Composite pruning: about β of the prunable parameters go as whole units (``structured/__init__.py``), the
rest of the target S is left to unstructured pruning; afterwards units that unstructured pruning emptied go."""

from __future__ import annotations

import torch

from ..allocation.fit import fit_to_target
from ..architectures import ArchSpec, decoder_layers, layer_projections
from ..plan import SparsityPlan
from . import apply_cuts
from .budget import MLP_ROWS


def remainder_plan(plan: SparsityPlan, dense_numel: dict, numel: dict, sparsity: float) -> SparsityPlan:
    """Unstructured sparsity for what structured pruning left, so the total over the dense model is S.

    Projection (l, p) should end with ``s_lp · n_lp`` zeros of its dense ``n_lp`` weights; ``n_lp − n'_lp``
    are already gone, so ``s'_lp = (s_lp n_lp − (n_lp − n'_lp)) / n'_lp``, then fitted to the exact
    remaining target ``(S·N − R) / (N − R)``.
    """
    removed = sum(dense_numel[k] - numel[k] for k in numel)
    total = sum(dense_numel[k] for k in numel)
    target = (sparsity * total - removed) / (total - removed)
    if target <= 0:
        return SparsityPlan({k: 0.0 for k in numel}, numel)
    raw = {k: (plan[k] * dense_numel[k] - (dense_numel[k] - numel[k])) / numel[k] for k in numel}
    return fit_to_target(raw, numel, target, lo=0.0, hi=0.98)


@torch.no_grad()
def remove_empty_units(model, spec: ArchSpec) -> int:
    """Lossless clean-up of every decoder layer (``remove_empty_units_in_layer``). Returns parameters removed."""
    before = sum(p.numel() for p in model.parameters())
    for layer in decoder_layers(model, spec):
        remove_empty_units_in_layer(layer, spec)
    return before - sum(p.numel() for p in model.parameters())


def remove_empty_units_in_layer(layer, spec: ArchSpec) -> None:
    """Drop MLP channels with an all-zero gate row, up row or down column, and key/value groups whose v rows are
    all zero (their heads output exactly zero). Zero q/k rows do not make a head removable: the softmax of zero
    scores is uniform, not zero. Only units the architecture can remove (``spec.structured_units``) and layers
    without biases qualify."""
    p = layer_projections(layer, spec)
    if not spec.structured_units or any(p[k].bias is not None for k in (*MLP_ROWS, "down", "v") if k in p):
        return
    live = (p["down"].weight != 0).any(0)
    for key in [k for k in MLP_ROWS if k in p]:
        live &= (p[key].weight != 0).any(1)
    head_dim = layer.get_submodule(spec.attention).head_dim
    live_groups = (p["v"].weight != 0).view(-1, head_dim * p["v"].in_features).any(1)
    live = live if "mlp" in spec.structured_units else torch.ones_like(live)
    live_groups = live_groups if "attention" in spec.structured_units else torch.ones_like(live_groups)
    if live.all() and live_groups.all() or not live.any() or not live_groups.any():
        return
    n_rep = p["q"].out_features // p["v"].out_features
    groups = torch.nonzero(live_groups).flatten()
    heads = (groups.view(-1, 1) * n_rep + torch.arange(n_rep, device=groups.device)).flatten()
    apply_cuts(layer, spec, {"channels": torch.nonzero(live).flatten(), "heads": heads, "groups": groups})


def restrict_statistics(stats, kept: torch.Tensor, unit_size: int = 1):
    """The statistics of the inputs a shrunk layer still reads: units ``kept`` of ``unit_size`` columns each."""
    from ..calibration.statistics import InputStatistics

    cols = (kept.view(-1, 1) * unit_size + torch.arange(unit_size)).flatten()
    hessian = None if stats.hessian is None else stats.hessian[cols][:, cols]
    total = None if stats.total is None else stats.total[cols]
    return InputStatistics(stats.sumsq[cols], hessian, stats.tokens, total)
