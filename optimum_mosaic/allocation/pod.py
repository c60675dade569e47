"""Mosaic projection allocation from the projection outlier distribution (POD), arXiv 2504.06323.

Per projection type p, over layers l: ``c_lp = 2λ (D_lp - min_l D_·p) / (max_l D_·p - min_l D_·p)``,
``s_lp = S - (c_lp - mean_l c_·p)``, clamped into ``[S-|λ|, S+|λ|]`` and shifted so that the
parameter-weighted mean is exactly S (``projection``). λ > 0 is the paper's direction (denser outliers,
lower sparsity); λ < 0 reverses it, which the λ search picks on SmolLM2-135M (see the README).

``projection_official`` reproduces the released code's ``adjust_ratio``:
``s_lp = S - c_l + mean_l c_·p`` with ``c_l`` OWL's layer term — OWL plus a constant offset per
projection type; values <= 0 become 0.01 and the global total is not corrected (it is reported).
"""

from __future__ import annotations

from ..registry import register_method
from .fit import fit_to_target, normalise


def pod_allocation(profile, sparsity: float, lamda: float, outlier_threshold: float, **_):
    ratios = profile.projection[float(outlier_threshold)]
    raw = {}
    for proj in sorted({p for _, p in ratios}):
        c = normalise({k: v for k, v in ratios.items() if k[1] == proj}, lamda)
        mean_c = sum(c.values()) / len(c)
        raw.update({k: sparsity - (v - mean_c) for k, v in c.items()})
    return fit_to_target(raw, profile.numel, sparsity, lo=sparsity - abs(lamda), hi=sparsity + abs(lamda))


def pod_official_allocation(profile, sparsity: float, lamda: float, outlier_threshold: float, **_):
    from ..plan import SparsityPlan

    m = float(outlier_threshold)
    c_layer = normalise(profile.layer[m], lamda)
    ratios = profile.projection[m]
    type_mean = {}
    for proj in sorted({p for _, p in ratios}):
        c = normalise({k: v for k, v in ratios.items() if k[1] == proj}, lamda)
        type_mean[proj] = sum(c.values()) / len(c)
    plan = {}
    for layer, proj in profile.numel:
        s = sparsity - c_layer[layer] + type_mean[proj]
        plan[(layer, proj)] = 0.01 if s <= 0 else s
    return SparsityPlan(plan, profile.numel)


register_method("projection", "allocation", pod_allocation, needs=("outliers",))
register_method("projection_official", "allocation", pod_official_allocation, needs=("outliers",))
