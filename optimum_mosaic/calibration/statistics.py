"""Pure accumulators of layer-input statistics. Everything is a sum over tokens, so shards of the
calibration set can be merged (or all-reduced across processes) by adding them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputStatistics:
    """For the inputs ``X`` (tokens × d) of one linear layer: ``sumsq_j = Σ_t x_tj²`` (Wanda's ‖X_j‖²),
    optionally ``hessian = XᵀX`` (SparseGPT's H up to a constant), and the token count."""

    sumsq: torch.Tensor
    hessian: torch.Tensor | None = None
    tokens: int = 0

    @classmethod
    def empty(cls, features: int, hessian: bool, device=None) -> InputStatistics:
        h = torch.zeros(features, features, dtype=torch.float32, device=device) if hessian else None
        return cls(torch.zeros(features, dtype=torch.float32, device=device), h, 0)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sumsq += x.square().sum(0)
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def merge(self, other: InputStatistics) -> None:
        self.sumsq += other.sumsq
        if self.hessian is not None:
            self.hessian += other.hessian
        self.tokens += other.tokens
