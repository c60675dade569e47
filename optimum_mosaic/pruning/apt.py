"""APT-style joint multi-weight OBS pruning — a RECONSTRUCTION: the paper (Zhao et al., "Pruning Foundation Models
for High Accuracy without Retraining", EMNLP 2024 Findings, arXiv 2410.15567) has no released code
(``piuzha/APT`` holds only a README) and its text was not available to us; the maths below is standard
multi-weight OBS, not read from the paper. Its block layout, mask rule and defaults are our choices.

Legend: ``W`` (d_out × d_in), ``H = XᵀX + δ·mean(diag H)·I``, ``U`` upper Cholesky factor with ``UᵀU = H⁻¹``.
For one row ``w`` and a set ``Q`` of its weights removed at once, the optimal compensation of the others is
``δw = −w_Q [(H⁻¹)_QQ]⁻¹ (H⁻¹)_{Q,:}`` and the loss grows by ``½ w_Q [(H⁻¹)_QQ]⁻¹ w_Qᵀ``.

Per block ``[i1, i2)`` of ``block_size`` columns (earlier columns already fixed):

1. ``G = [H_{≥i1,≥i1}]⁻¹`` is the inverse Hessian of the columns still free; from the factor,
   ``G[i1:i2, i1:] = U[i1:i2, i1:i2]ᵀ U[i1:i2, i1:]`` (the trailing block of ``UᵀU``).
2. Mask: OBS saliency ``w_j² / G_jj`` of the current weights; unstructured: the ``k`` lowest of the whole block
   with SparseGPT's exact budget ``k = round(s·rows·i2) − round(s·rows·i1)``; N:M: the ``n`` lowest of every
   ``m`` consecutive columns of a row.
3. Joint update per row: ``e_Q = [G_QQ]⁻¹ w_Q`` (a batched float64 solve on the row's ``|Q|×|Q|`` submatrix,
   padded with identity to the largest ``|Q|`` of a row chunk), ``W[:, i1:] −= E G[i1:i2, i1:]`` with ``E`` the
   ``e_Q`` scattered into the block, then the pruned weights are set to exact zeros. The block's own columns
   are updated at once; the later columns receive the same product (SparseGPT's lazy batch update).

Difference from SparseGPT: SparseGPT prunes a block column by column, each step compensating only on the
columns to its right (``U[j, j:]``), so a kept weight left of a pruned one in the same block is never adjusted;
here every kept weight of the block and of the later columns is re-solved jointly for all of the row's pruned
weights of the block, which is the exact least-squares optimum for that block given the fixed earlier columns.
The mask is chosen once per block from the block-start weights (SparseGPT re-scores N:M groups as it goes).
The small solves run in float64 because ``G_QQ`` inherits the conditioning of the damped Hessian.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

from ..registry import register_method
from .masks import lowest_k_mask, nm_mask
from .sparsegpt import prepare_obs

logger = logging.get_logger(__name__)

ROW_CHUNK = 512  # rows solved together: the padded systems take ROW_CHUNK · |Q|max² float64


def joint_obs_coefficients(W1: torch.Tensor, G11: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``E`` with ``E[r, Q_r] = [G_QQ]⁻¹ w_Q`` and zeros elsewhere, for every row ``r`` of the block ``W1``
    (``Q_r`` = True entries of ``mask[r]``, ``G11`` the block's inverse Hessian)."""
    rows, width = W1.shape
    E = torch.zeros_like(W1)
    G64, W64 = G11.double(), W1.double()
    for r0 in range(0, rows, ROW_CHUNK):
        m = mask[r0 : r0 + ROW_CHUNK]
        counts = m.sum(1)
        q = int(counts.max()) if m.numel() else 0
        if q == 0:
            continue
        # per row, the pruned columns first (in column order), then the rest; keep the first q
        order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :q]
        valid = torch.arange(q, device=W1.device).unsqueeze(0) < counts.unsqueeze(1)
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        sub = G64[order.unsqueeze(2), order.unsqueeze(1)]
        eye = torch.eye(q, dtype=torch.float64, device=W1.device).expand_as(sub)
        A = torch.where(pair, sub, eye)
        rhs = torch.gather(W64[r0 : r0 + ROW_CHUNK], 1, order) * valid
        e = torch.linalg.solve(A, rhs.unsqueeze(2)).squeeze(2) * valid
        E[r0 : r0 + ROW_CHUNK].scatter_(1, order, e.float())
    return E


@torch.no_grad()
def apt_prune(
    weight: torch.Tensor,
    stats,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    dampening: float = 0.01,
    block_size: int = 128,
    info: dict | None = None,
    **_,
) -> torch.Tensor:
    W, _, U, _ = prepare_obs(weight, stats, dampening, nm, block_size, info, "APT")
    rows, cols = W.shape
    if nm and cols % nm[1]:
        raise ValueError(f"N:M pattern {nm[0]}:{nm[1]} needs the input size ({cols}) to be a multiple of {nm[1]}")

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        U1 = U[i1:i2, i1:i2]
        G = U1.T @ U[i1:i2, i1:]  # rows i1:i2 of [H_{≥i1,≥i1}]⁻¹, columns i1:
        G11 = G[:, : i2 - i1]
        W1 = W[:, i1:i2]
        saliency = W1.square() / torch.diag(G11)
        if nm:
            mask = nm_mask(saliency, *nm)
        else:
            mask = lowest_k_mask(saliency, round(sparsity * rows * i2) - round(sparsity * rows * i1))
        E = joint_obs_coefficients(W1, G11, mask)
        W[:, i1:] -= E @ G
        W[:, i1:i2].masked_fill_(mask, 0.0)  # exact zeros, not w − e·G_QQ
    return W.to(weight.dtype)


register_method("apt", "unstructured", apt_prune, needs=("hessian",))
