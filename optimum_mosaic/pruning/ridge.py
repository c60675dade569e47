"""The factorisations of the Hessian the ALPS kernels read (``alps.py``): ridge inverses ``(Hn + ρI)⁻¹`` per ρ, cached
for the projections of one input group, and — when processes share a projection's rows — the first two
factorisations a warm solve needs, made once each on two processes and swapped, or at a small input the inverses
made ahead on one process while the other runs SparseGPT (``split_warm_start``)."""

from __future__ import annotations

import torch

from .. import copies
from ..calibration.distributed import broadcast_object, broadcast_tensor
from .refit import normalized_hessian
from .sparsegpt import make_obs_factor, obs_key, sparsegpt_prune

CACHE_BYTES = 1 << 30  # ridge inverses kept per input group (the oldest dropped first)


class RidgeInverses:
    """``(Hn + ρI)⁻¹`` for the ρ values a schedule visits: one float32 Cholesky factorisation and inverse per distinct
    ρ, cached on ``stats.cache`` so projections sharing an input (q, k, v; gate, up) reuse the ones they have in
    common (at most ``CACHE_BYTES`` of them per input group, the oldest dropped first: for a 576-wide input that is
    every ρ of a schedule; for a very wide one, whose group has one member, sharing does not matter).

    Replaces the reference's one float64 ``eigh`` + float32 re-assembly ``Q diag(1/(Λ+ρ)) Qᵀ`` per ρ: a Cholesky
    inverse costs about one re-assembly (``d³`` flops against ``2d³``), the ``eigh`` itself (≈ 10 re-assemblies in
    float64) disappears, and on the real layers it is closer to the float64 inverse (relative error ≤ 7e-5 at
    ρ = 0.004 against 2e-3 for a float32 ``eigh``)."""

    def __init__(self, Hn: torch.Tensor, cache: dict, key, parkable: bool = False):
        self.Hn, (self.store, self.shared) = Hn, self._tables(cache, key)
        self.made, self.parkable, self.parked = 0, parkable, None
        self.shape, self.dtype, self.device = Hn.shape, Hn.dtype, Hn.device

    def park(self) -> None:
        """``Hn`` leaves device memory until ``hessian()`` when it is larger than ``copies.IN_MEMORY_BYTES`` and this
        object holds the only reference the solve keeps (``parkable``: the last reader of its statistics): from a CPU
        to a temporary file, from a GPU to host memory; each ridge inverse made meanwhile is read from there into its
        own buffer. ADMM reads ``Hn`` only to make inverses: ``d_in²`` floats fewer while it iterates (0.77 GiB at
        Llama-3-8B's ``down_proj``), for one write and one more read (CG's; the inverses' reads replace the copy they
        made from memory): on this project's CPU VM 10.6 s and 0.5 s of a 227 s layer (``benchmarks/park_timing.py``)."""
        if self.parkable and self.Hn is not None and self.Hn.numel() * self.Hn.element_size() > copies.IN_MEMORY_BYTES:
            host = None if self.device.type == "cpu" else self.Hn.numel() * self.Hn.element_size()
            self.parked, self.Hn = copies.copy_tensors({"Hn": self.Hn}, "the normalised Hessian", host), None

    def hessian(self) -> torch.Tensor:
        """``Hn``, read back into memory (its file deleted) if it was parked."""
        if self.parked is not None:
            self.Hn = self._fill(torch.empty(self.shape, dtype=self.dtype, device=self.device))
            copies.close_copy(self.parked)
            self.parked = None
        return self.Hn

    def _fill(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` (any layout or dtype) ← ``Hn``, from memory or from where it is parked."""
        return out.copy_(self.Hn) if self.Hn is not None else copies.read_into(self.parked, "Hn", out)

    @staticmethod
    def _tables(cache: dict, key) -> tuple[dict, set]:
        """The cache's inverses per ρ for ``key``, and the ρ whose inverse another process made for this solve."""
        return cache.setdefault(("ridge_inverses", *key), {}), cache.setdefault(("ridge_shared", *key), set())

    @classmethod
    def adopt(cls, cache: dict, key, rho: float, inverse: torch.Tensor) -> None:
        """Cache ``inverse`` — made by another process — for ρ, to be counted as made by the solve that reads it."""
        store, shared = cls._tables(cache, key)
        store[rho] = inverse
        shared.add(rho)

    def __call__(self, rho: float) -> torch.Tensor:
        if rho in self.shared:  # counted as made here, as it would be in one process
            self.shared.discard(rho)
            self.made += 1
        if rho not in self.store:
            n = self.shape[0]
            while self.store and (len(self.store) + 1) * n * n * self.dtype.itemsize > CACHE_BYTES:
                self.store.pop(next(iter(self.store)))
            # column-major, LAPACK's layout: into a row-major ``out=`` torch factorises (and inverts) a column-major
            # copy and copies it back — one d × d temporary more per call (0.77 GiB at 14336), the same bits
            A = self._fill(torch.empty_strided((n, n), (1, n), dtype=self.dtype, device=self.device))
            A.diagonal().add_(rho)
            failed = torch.empty((), dtype=torch.int32, device=A.device)
            torch.linalg.cholesky_ex(A, out=(A, failed))  # in place: one d × d buffer for A, L and the inverse
            if failed:
                A = None
                A = self._fill(torch.empty((n, n), dtype=torch.float64, device=self.device))
                A.diagonal().add_(rho)
                A = torch.linalg.inv(A).float()
            else:
                torch.cholesky_inverse(A, out=A)  # symmetric (both triangles written): its transpose is itself,
                A = A.mT  # and that view is the row-major matrix the products expect
            self.store[rho] = A
            self.made += 1
        return self.store[rho]


def share_factorisations(stats, dampening: float, rho: float, device, shard) -> None:
    """The two factorisations of ``H`` a warm solve needs before its first ADMM product — SparseGPT's ``U`` and
    ``(Hn + ρ₀I)⁻¹``, each ``≈ n³`` flops that every process sharing the rows would otherwise repeat — made once each,
    on processes 0 and 1 at the same time, and broadcast: the same bits as making both (one LAPACK call on the same
    inputs), cached where ``prepare_obs`` and ``RidgeInverses`` look for them. Costs each process one more ``n × n``
    buffer during SparseGPT's sweep (the inverse is held from the start)."""
    obs_src, ridge_src = 0, 1
    n, key = stats.hessian.shape[0], obs_key(dampening, device)
    if shard.rank == obs_src:
        factor = stats.cache.get(key) or make_obs_factor(stats, dampening, device, "ALPS-warm")
        U_t, damp = factor[2].mT, torch.tensor([factor[3]], dtype=torch.float64, device=device)
    else:  # the factor's diagonal and dead inputs, taken before ``normalized_hessian`` may reuse H's memory
        h = torch.diag(stats.hessian).to(device, torch.float32)
        dead = h == 0
        U_t, damp = torch.empty((n, n), device=device), torch.zeros(1, dtype=torch.float64, device=device)
    ridge = (dampening, str(device))
    if shard.rank == ridge_src:
        inverse = RidgeInverses(normalized_hessian(stats, dampening, device).Hn, stats.cache, ridge)(rho)
    else:
        inverse = torch.empty((n, n), device=device)
    broadcast_tensor(U_t, obs_src)  # U is column-major (LAPACK's): its transpose is the dense row-major buffer
    broadcast_tensor(damp, obs_src)
    broadcast_tensor(inverse, ridge_src)
    if shard.rank != obs_src:
        factor = (h.masked_fill(dead, 1.0), dead, U_t.mT, float(damp))
    stats.cache[key] = factor
    RidgeInverses.adopt(stats.cache, ridge, rho, inverse)


SPLIT_START_BYTES = 64 << 20  # inverses made ahead by process 1 while process 0 runs SparseGPT (two: n ≤ 2896)


def split_warm_start(weight, stats, sparsity, nm, dampening, block_size, info, saliency, rhos, shard) -> torch.Tensor:
    """A warm solve's start when processes share a small projection's rows (``len(rhos)`` inverses within
    ``SPLIT_START_BYTES``): process 0 runs SparseGPT on the whole matrix — at such sizes its column-by-column sweep
    is bound by per-column dispatch and costs about as much on a block of rows — while process 1 makes
    ``(Hn + ρI)⁻¹`` for each ρ of ``rhos`` (the start's, and the one the schedule's first check picks when the
    support moves by more than 10 %, as it does from SparseGPT's); then process 0 scatters the start's rows and its
    ``info``, process 1 broadcasts the inverses. Returns this process's rows of the start; the bits of one process.
    An inverse made ahead and never read is not counted as made (``RidgeInverses.adopt``)."""
    device, n = weight.device, weight.shape[1]
    whole = shard.gather_to(weight, 0)
    noted = dict(info) if info is not None else None
    start = None
    if shard.rank == 0:
        start = sparsegpt_prune(whole, stats, sparsity, nm, dampening, block_size, info, saliency)
    del whole
    ridge = (dampening, str(device))
    if shard.rank == 1:
        made = RidgeInverses(normalized_hessian(stats, dampening, device).Hn, stats.cache, ridge)
        inverses = [made(rho) for rho in rhos]
    else:
        inverses = [torch.empty((n, n), device=device) for _ in rhos]
    local = shard.scatter_from(start, 0, weight)
    del start
    if info is not None:
        info.update(broadcast_object({k: v for k, v in info.items() if k not in noted or noted[k] != v}, 0))
    for rho, inverse in zip(rhos, inverses, strict=True):
        broadcast_tensor(inverse, 1)
        RidgeInverses.adopt(stats.cache, ridge, rho, inverse)
    return local


def split_start_fits(n: int, rhos) -> bool:
    """Whether ``split_warm_start`` may make ``len(rhos)`` inverses of an ``n``-wide input ahead."""
    return len(rhos) * n * n * 4 <= SPLIT_START_BYTES
