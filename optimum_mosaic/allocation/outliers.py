"""Outlier statistics of Wanda scores, the input of the OWL and Mosaic allocations.

Wanda score of a weight: ``A_ij = |W_ij| · ‖X_j‖₂``. Outlier ratio of a group G of scores:
``D(G) = #{a ∈ G : a > M · mean(G)} / |G|`` (a fraction, not a percentage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..plan import Key


def wanda_scores(weight: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """``|W| · sqrt(Σ_t x_tj²)``, broadcasting the input-channel norm over the output rows."""
    return weight.abs().float() * sumsq.float().sqrt().unsqueeze(0)


@dataclass
class OutlierProfile:
    """Per-(layer, projection) parameter counts and outlier ratios for each threshold M.

    ``projection[M][(l, p)]`` = D over projection p of layer l alone;
    ``layer[M][l]`` = D over the concatenated scores of all projections of layer l (OWL's statistic).
    """

    numel: dict[Key, int]
    projection: dict[float, dict[Key, float]] = field(default_factory=dict)
    layer: dict[float, dict[int, float]] = field(default_factory=dict)
    sensitivity: dict[Key, float] = field(default_factory=dict)  # average Hessian trace per weight (sensitivity.py)

    def add_layer(self, layer_idx: int, scores: dict[str, torch.Tensor], thresholds) -> None:
        """Record the ratios of one layer's projection scores for every threshold M."""
        total = sum(s.sum().item() for s in scores.values())
        count = sum(s.numel() for s in scores.values())
        for m in thresholds:
            m = float(m)
            above = 0
            for proj, s in scores.items():
                self.projection.setdefault(m, {})[(layer_idx, proj)] = (s > m * s.mean()).float().mean().item()
                above += (s > m * total / count).sum().item()
            self.layer.setdefault(m, {})[layer_idx] = above / count
