"""OWL layer allocation (Yin et al., ICML 2024, arXiv 2310.05175).

``c_l = 2λ (D_l - min D) / (max D - min D)``, ``s_l = S - (c_l - mean_l c)``: layers with more
outliers keep more weights; every projection of layer l gets ``s_l``. The result is re-fitted to the
parameter-weighted target (a no-op when all layers have equal size and nothing clamps).
"""

from ..registry import register_method
from .fit import fit_to_target, normalise


def owl_allocation(profile, sparsity: float, lamda: float, outlier_threshold: float, **_):
    c = normalise(profile.layer[float(outlier_threshold)], lamda)
    mean_c = sum(c.values()) / len(c)
    raw = {(layer, proj): sparsity - (c[layer] - mean_c) for (layer, proj) in profile.numel}
    return fit_to_target(raw, profile.numel, sparsity, lo=0.0, hi=1.0)


register_method("layer", "allocation", owl_allocation, needs=("outliers",))
