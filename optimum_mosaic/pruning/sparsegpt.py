"""SparseGPT (Frantar & Alistarh, ICML 2023, arXiv 2301.00774): blocked OBS with lazy updates.

Legend: ``W`` (d_out × d_in) weights, ``H = XᵀX`` input Hessian (up to a constant), ``U`` the upper
Cholesky factor of ``(H + δ·mean(diag H)·I)⁻¹`` (``UᵀU = H⁻¹``). Per block of columns the mask is
the ``k`` lowest ``w² / U_jj²`` over the whole block (N:M: per row, every M columns); then, column by
column, ``err = (w_j − q_j) / U_jj`` and ``W[:, j:] −= err ⊗ U[j, j:]``, the rest of the matrix
catching up once per block. ``k`` is exact: blocks get ``round(s·rows·i2) − round(s·rows·i1)`` zeros.
With ``shard`` (a ``RowShard``) this process sweeps its block of rows and each block's mask is chosen on the
gathered scores of all rows: the rows of the one-process result.
Deviation: the reference thresholds with ``<=`` at index k, pruning k+1 (or more on ties).
``saliency="isc"`` scores the mask with ``w²·(H_jj + 1/U_jj²)`` (Shao et al., ICASSP 2024) instead.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

from ..registry import register_method
from .masks import lowest_k_mask, nm_mask

logger = logging.get_logger(__name__)

SUB_BLOCK = 16  # columns updated one by one before a GEMM catches the rest of the block up
FLIP_ROWS = 1024  # rows of H reversed per copy while building JHJ


def inverse_hessian_factor(H: torch.Tensor, dampening: float, max_retries: int = 4) -> tuple[torch.Tensor, float]:
    """``U`` with ``UᵀU = (H + δ·mean(diag H)·I)⁻¹``; δ grows ×10 on a failed Cholesky, at most ``max_retries`` times.

    One Cholesky and one triangular inverse: with ``J`` the reversal permutation and ``JHJ = LLᵀ``,
    ``H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`` and ``J L⁻¹ J`` is upper triangular with a positive diagonal. Both run in place
    in column-major buffers (LAPACK's layout, so the bits are those of the out-of-place calls): two ``n × n``
    buffers besides ``H`` instead of four — 1.6 GB less at a 14336-wide input."""
    n = H.shape[0]
    mean_diag = torch.diag(H).mean()
    damp = dampening
    failed = torch.empty((), dtype=torch.int32, device=H.device)
    A = torch.empty_strided((n, n), (1, n), dtype=H.dtype, device=H.device)
    for _ in range(max_retries + 1):
        for i in range(0, n, FLIP_ROWS):  # A = JHJ, without a full-size temporary
            j = min(i + FLIP_ROWS, n)
            A[i:j] = H[n - j : n - i].flip(0, 1)
        A.diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(A, out=(A, failed))
        if not failed:
            inverse = torch.zeros_like(A)  # column-major too
            inverse.diagonal().fill_(1.0)
            torch.linalg.solve_triangular(A, inverse, upper=False, out=inverse)
            del A
            return inverse.flip(0, 1), damp
        damp *= 10
    raise torch.linalg.LinAlgError(
        f"SparseGPT: H is not positive definite even with dampening {damp / 10:g}; "
        "use more calibration samples or a larger `dampening`."
    )


def make_obs_factor(stats, dampening: float, device, method: str = "SparseGPT") -> tuple:
    """``(diag H, dead, U, δ)`` from ``stats.hessian``: the diagonal with never-active inputs set to ``H_jj = 1`` (their
    weights are useless and would make H singular), those inputs, the factor ``U`` and the dampening it needed."""
    H = stats.hessian.to(device, torch.float32)
    dead = torch.diag(H) == 0
    if dead.any():
        H = H.clone()
        H[dead, dead] = 1.0
    U, damp = inverse_hessian_factor(H, dampening)
    if damp != dampening:
        logger.warning("%s: Cholesky needed dampening %g instead of %g", method, damp, dampening)
    return torch.diag(H).clone(), dead, U, damp


def obs_key(dampening: float, device) -> tuple:
    return ("obs_factor", dampening, str(device))


def prepare_obs(weight, stats, dampening: float, nm, block_size: int, info: dict | None, method: str):
    """``(W, diag H, U, δ)`` shared by the OBS kernels: an fp32 copy of the weight (never-active inputs zeroed), the
    diagonal of ``H`` and the factor ``U`` (``make_obs_factor``) and the dampening actually used (recorded in
    ``info``). The factor is cached on ``stats``, so projections that share an input (q, k, v; gate, up) pay for one
    factorisation; the last of them (``stats.final_read``) takes it out of the cache, so it is freed with this call."""
    if nm and block_size % nm[1]:
        raise ValueError(f"block_size {block_size} must be a multiple of M={nm[1]} for an N:M pattern")
    key = obs_key(dampening, weight.device)
    final = getattr(stats, "final_read", False)
    factor = stats.cache.pop(key, None) if final else stats.cache.get(key)
    if factor is None:
        factor = make_obs_factor(stats, dampening, weight.device, method)
        if not final:
            stats.cache[key] = factor
    h, dead, U, damp = factor
    W = weight.detach().clone().float()
    W[:, dead] = 0.0
    if info is not None:
        info["dampening"] = damp
    return W, h, U, damp


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    stats,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    dampening: float = 0.01,
    block_size: int = 128,
    info: dict | None = None,
    saliency: str = "obs",
    shard=None,
    **_,
) -> torch.Tensor:
    W, h, U, damp = prepare_obs(weight, stats, dampening, nm, block_size, info, "SparseGPT")
    cols = W.shape[1]
    rows = W.shape[0] if shard is None else shard.rows
    h_diag = h + damp * h.mean()  # the damped H_jj, for the ISC score

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        d, h1 = torch.diag(U1), h_diag[i1:i2]
        if nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            mask1 = lowest_k_mask(mask_scores(W1, d, h1, saliency), k, shard)
        Err1 = torch.empty_like(W1)
        # two-level lazy updates: column by column inside a sub-block, one GEMM for the rest of the block
        sub = -(-SUB_BLOCK // nm[1]) * nm[1] if nm else SUB_BLOCK
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            for i in range(j1, j2):
                if nm and i % nm[1] == 0:
                    group = slice(i, i + nm[1])
                    mask1[:, group] = nm_mask(mask_scores(W1[:, group], d[group], h1[group], saliency), *nm)
                m = mask1[:, i]
                err = torch.where(m, W1[:, i], 0.0).div_(d[i])
                W1[:, i:j2].addr_(err, U1[i, i:j2], alpha=-1.0)
                W1[:, i].masked_fill_(m, 0.0)  # exact zeros, not w − (w/d)·d
                Err1[:, i] = err
            W1[:, j2:].addmm_(Err1[:, j1:j2], U1[j1:j2, j2:], alpha=-1.0)
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    return W.to(weight.dtype)


def mask_scores(W: torch.Tensor, d: torch.Tensor, h_diag: torch.Tensor, kind: str = "obs") -> torch.Tensor:
    """OBS ``w² / U_jj²`` (``U_jj² = [H⁻¹]_jj`` of the columns not yet pruned), or ISC (Shao et al., Eq. 4), which adds
    the OBD term: ``w² · (H_jj + 1/U_jj²)`` with the damped ``H_jj``."""
    if kind == "obs":
        return W.square() / d.square()
    if kind == "isc":
        return W.square() * (h_diag + 1.0 / d.square())
    raise ValueError(f"saliency must be 'obs' or 'isc', got {kind!r}")


register_method("sparsegpt", "unstructured", sparsegpt_prune, needs=("hessian",), rows=True)
