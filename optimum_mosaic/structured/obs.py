"""Structured OBS: remove whole groups of input columns of a linear layer and refit the columns it keeps.

For ``Y = W X`` (``W``: d_out × n) and the damped input Hessian ``H = X Xᵀ + δ·mean(diag H)·I``, removing the
column set ``P`` costs ``ε_P = tr(W_:,P ([H⁻¹]_PP)⁻¹ W_:,Pᵀ)`` and the kept columns are compensated by
``ΔW = −W_:,P ([H⁻¹]_PP)⁻¹ [H⁻¹]_P,:`` (structured OBS: ZipLM, SlimGPT). That is the least-squares refit
``W_:,K ← W H_:,K H_KK⁻¹``. Afterwards ``H⁻¹ ← H⁻¹ − [H⁻¹]_:,P ([H⁻¹]_PP)⁻¹ [H⁻¹]_P,:`` is the inverse on the kept
columns (zero on ``P``), so removals chain and the costs of a greedy sequence add up to the cost of removing
their union at once.

Units here are MLP channels (one column of ``down``) and attention heads (``head_dim`` columns of ``o``);
query heads go under the GQA rule: a key/value group goes only with all of its query heads, and every group
keeps the same number of query heads.

With ``intercept`` (FLAP-style bias compensation) the input gets a constant column: ``H`` gains the row and column
``[Σ_t x_t, n]`` and ``W`` the bias as its last column. That column is never removed, so the same refit also moves
the bias (least squares with an intercept).
"""

from __future__ import annotations

import math

import torch


class StructuredOBS:
    """The float64 state ``(W, H⁻¹)`` of one linear layer while units are removed from its input columns."""

    def __init__(
        self,
        weight: torch.Tensor,
        hessian: torch.Tensor,
        dampening: float = 0.01,
        intercept: tuple[torch.Tensor, int, torch.Tensor | None] | None = None,
    ):
        """``intercept``: (``Σ_t x_t``, token count ``n``, current bias or None) appends the constant input."""
        self.units = weight.shape[1]  # removable columns; a constant column (if any) follows them
        H = hessian.to(torch.float64, copy=True)
        if intercept is not None:
            total, tokens, bias = intercept
            total = total.to(torch.float64).view(-1, 1)
            H = torch.cat([torch.cat([H, total], 1), torch.cat([total.T, H.new_full((1, 1), float(tokens))], 1)])
            bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.detach()
            weight = torch.cat([weight.detach(), bias.to(weight.dtype).view(-1, 1)], 1)
        dead = torch.diag(H) == 0  # inputs never active: H_jj = 1, as in SparseGPT
        H[dead, dead] = 1.0
        H.diagonal().add_(dampening * torch.diag(H).mean())
        self.W = weight.detach().to(torch.float64, copy=True)
        self.W[:, dead] = 0.0
        self.Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
        self.cost = 0.0  # Σ ε of everything removed so far

    @property
    def weight(self) -> torch.Tensor:
        return self.W[:, : self.units]

    @property
    def bias(self) -> torch.Tensor | None:
        """The compensated bias (``intercept`` given), else None."""
        return self.W[:, self.units] if self.W.shape[1] > self.units else None

    def clone(self) -> StructuredOBS:
        new = object.__new__(StructuredOBS)
        new.W, new.Hinv, new.cost, new.units = self.W.clone(), self.Hinv.clone(), self.cost, self.units
        return new

    def costs(self, units: torch.Tensor) -> torch.Tensor:
        """``ε`` of removing each unit alone; ``units``: [u, k] column indices (k columns per unit)."""
        if units.shape[1] == 1:
            cols = units[:, 0]
            return self.W[:, cols].square().sum(0) / torch.diag(self.Hinv)[cols]
        block = self.Hinv[units.unsqueeze(2), units.unsqueeze(1)]  # [u, k, k], positive definite
        Wt = self.W.T[units].contiguous()  # [u, k, d_out]
        solved = torch.cholesky_solve(Wt, torch.linalg.cholesky(block))
        return (Wt * solved).sum((1, 2))

    def remove(self, columns: torch.Tensor) -> float:
        """Remove ``columns`` jointly, compensate the rest, downdate ``H⁻¹``; returns ``ε`` of this step."""
        P = columns.flatten()
        rows = self.Hinv[P]  # [|P|, n]
        factor = torch.linalg.cholesky(rows[:, P])  # of [H⁻¹]_PP
        coef = torch.cholesky_solve(self.W.T[P].contiguous(), factor)  # ([H⁻¹]_PP)⁻¹ W_:,Pᵀ
        step = float((self.W.T[P] * coef).sum())
        self.W.addmm_(coef.T, rows, alpha=-1.0)
        self.W[:, P] = 0.0  # exact zeros (the update gives them up to rounding)
        self.Hinv.addmm_(rows.T, torch.cholesky_solve(rows, factor), alpha=-1.0)
        self.Hinv[P] = 0.0
        self.Hinv[:, P] = 0.0
        self.Hinv[P, P] = 1.0  # keeps the removed diagonal harmless in later cost quotients
        self.cost += step
        return step


def greedy_channels(state: StructuredOBS, remove: int, steps: int = 64) -> tuple[torch.Tensor, list[tuple[int, float]]]:
    """Remove ``remove`` single columns, cheapest first, in at most ``steps`` batches (a batch is removed jointly,
    chosen by the single-column costs, as SlimGPT does). Returns (kept columns ascending, [(count, ε)] per batch)."""
    live = torch.ones(state.units, dtype=torch.bool)
    batch = max(1, math.ceil(remove / steps))
    curve, done = [], 0
    while done < remove:
        idx = live.nonzero().squeeze(1)
        take = min(batch, remove - done)
        costs = state.costs(idx.unsqueeze(1))
        chosen = idx[torch.topk(costs, take, largest=False).indices]
        curve.append((take, state.remove(chosen)))
        live[chosen] = False
        done += take
    return live.nonzero().squeeze(1), curve


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[len(heads), head_dim] column indices of the given heads."""
    return heads.view(-1, 1) * head_dim + torch.arange(head_dim)


def greedy_heads(
    state: StructuredOBS, head_dim: int, kv_heads: int, groups_keep: int, heads_per_group: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Reach ``groups_keep`` key/value groups × ``heads_per_group`` query heads each, removing in order:
    (1) whole groups, the one whose remaining heads cost least jointly; (2) then one query head from every kept
    group per step (each group's cheapest, removed jointly). Returns (heads kept, groups kept, Σ ε)."""
    n_heads = state.units // head_dim
    n_rep = n_heads // kv_heads
    members = {g: list(range(g * n_rep, (g + 1) * n_rep)) for g in range(kv_heads)}
    total = 0.0
    while len(members) > groups_keep:  # every group still has all n_rep heads here: equal-size units
        groups = sorted(members)
        cols = torch.stack([head_columns(torch.tensor(members[g]), head_dim).flatten() for g in groups])
        g = groups[int(torch.argmin(state.costs(cols)))]
        total += state.remove(head_columns(torch.tensor(members.pop(g)), head_dim))
    while len(members) and len(next(iter(members.values()))) > heads_per_group:
        drop = []
        for heads in members.values():
            costs = state.costs(head_columns(torch.tensor(heads), head_dim))
            drop.append(heads.pop(int(torch.argmin(costs))))
        total += state.remove(head_columns(torch.tensor(drop), head_dim))
    kept = sorted(h for heads in members.values() for h in heads)
    return torch.tensor(kept, dtype=torch.long), torch.tensor(sorted(members), dtype=torch.long), total
