"""Pure accumulators of layer-input statistics. Everything is a sum over tokens, so shards of the
calibration set can be merged (or all-reduced across processes) by adding them.

Sums are kept in float64 and fed one calibration window at a time (fp32 products per window): the
result then does not depend on how the windows were batched or split across processes, which is what
makes a multi-process calibration give the masks of a single process. ``finalize`` hands fp32 to the
kernels.

``XᵀX`` is symmetric, so only its lower triangle is multiplied, in row strips ``X[:, a:b]ᵀ X[:, :b]``: ``(n+1)/2n``
of the full product's flops for ``n`` strips (0.54 at a 14336-wide input; full products were 31 % of a Llama-3-8B
layer's prune time at 128 × 2048 tokens), and no ``d × d`` temporary. The upper triangle is copied from the lower after every ``update``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GRAM_ROWS = 1024  # rows of one strip of XᵀX's lower triangle; one strip's product and its fp64 conversion (CPU's
# ``fp64 += fp32`` converts the whole operand first) are the only temporaries: 0.16 GiB at 14336 (the whole fp32
# product alone was 0.77 GiB)


@dataclass
class InputStatistics:
    """For the inputs ``X`` (tokens × d) of one linear layer: ``sumsq_j = Σ_t x_tj²`` (Wanda's ‖X_j‖²),
    optionally ``hessian = XᵀX`` (SparseGPT's H up to a constant) with ``total = Σ_t x_t``, and the token count.
    With the dense model's inputs ``X_d`` of the same tokens (``update(x, dense=…)``), also ``cross = X_dᵀX``: the
    linear term of ``‖XŴᵀ − X_dWᵀ‖²``, the error against the dense model's outputs (``PrunedConfig.dense_target``)."""

    sumsq: torch.Tensor
    hessian: torch.Tensor | None = None
    tokens: int = 0
    total: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # derived data (e.g. factors)
    # set by the walk before the last projection that reads these statistics: kernels need not cache for later readers
    final_read: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def empty(cls, features: int, hessian: bool, device=None, dtype=torch.float32, cross=False) -> InputStatistics:
        h = torch.zeros(features, features, dtype=dtype, device=device) if hessian else None
        total = torch.zeros(features, dtype=dtype, device=device) if hessian else None
        c = torch.zeros(features, features, dtype=dtype, device=device) if cross else None
        return cls(torch.zeros(features, dtype=dtype, device=device), h, 0, total, c)

    @torch.no_grad()
    def update(self, x: torch.Tensor, seqlen: int | None = None, dense: torch.Tensor | None = None) -> None:
        """Add the inputs ``x`` ([..., seqlen, d] or [tokens, d]) one window at a time: the last-but-one axis, or
        ``seqlen`` rows of a flattened input (OPT flattens its MLP's; without it, one window of all rows). ``dense``:
        the dense model's inputs of the same tokens, same shape (for ``cross``)."""
        self.cache.clear()
        windows, dense_windows = _windows(x, seqlen), None if dense is None else _windows(dense, seqlen)
        if (dense_windows is None) != (self.cross is None):
            raise ValueError("dense inputs are needed exactly when the statistics keep a cross term")
        for i, w in enumerate(windows):
            if dense_windows is not None:
                self.cross += dense_windows[i].float().T @ w.float()
            w = w.float()
            self.sumsq += w.square().sum(0)
            if self.hessian is not None:
                for a in range(0, w.shape[1], GRAM_ROWS):
                    b = a + GRAM_ROWS
                    self.hessian[a:b, :b] += w[:, a:b].T @ w[:, :b]
                self.total += w.sum(0)
            self.tokens += w.shape[0]
        if self.hessian is not None:
            copy_lower_to_upper(self.hessian)

    def merge(self, other: InputStatistics) -> None:
        self.cache.clear()
        self.sumsq += other.sumsq
        if self.hessian is not None:
            self.hessian += other.hessian
            self.total += other.total
        if self.cross is not None:
            self.cross += other.cross
        self.tokens += other.tokens

    def finalize(self) -> InputStatistics:
        """The same sums in float32 (what the kernels read)."""
        self.cache.clear()
        self.sumsq = self.sumsq.float()
        self.hessian = self.hessian.float() if self.hessian is not None else None
        self.total = self.total.float() if self.total is not None else None
        self.cross = self.cross.float() if self.cross is not None else None
        return self


def _windows(x: torch.Tensor, seqlen: int | None) -> torch.Tensor:
    if x.dim() > 2:
        return x.reshape(-1, x.shape[-2], x.shape[-1])
    if seqlen and x.shape[0] % seqlen == 0:
        return x.reshape(-1, seqlen, x.shape[-1])
    return x.unsqueeze(0)


def copy_lower_to_upper(H: torch.Tensor) -> None:
    """``H[i, j] = H[j, i]`` for ``i < j``, in place, strip by strip (no ``d × d`` temporary)."""
    d = H.shape[0]
    for a in range(0, d, GRAM_ROWS):
        b = min(a + GRAM_ROWS, d)
        H[a:b, b:].copy_(H[b:, a:b].T)
        diagonal = H[a:b, a:b]
        upper = torch.ones(b - a, b - a, dtype=torch.bool, device=H.device).triu_(1)
        diagonal.copy_(torch.where(upper, diagonal.T, diagonal))
