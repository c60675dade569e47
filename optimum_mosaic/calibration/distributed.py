"""Calibration over several processes: every process takes a shard of the calibration windows, and the
statistics, being sums, are all-reduced before anything is decided from them. Works with any launcher
that initialises ``torch.distributed`` (``accelerate launch``, ``torchrun``; the gloo backend on CPU).
The solves are shared too: each process prunes a share of each layer's projections (``split_solves``) and
broadcasts its results, so all processes end with the same model."""

from __future__ import annotations

import torch

from .statistics import InputStatistics


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_windows(windows: torch.Tensor) -> torch.Tensor:
    """This process's windows: a contiguous block, the first ``n mod world`` ranks one more."""
    rank, size = world()
    if size == 1:
        return windows
    if windows.shape[0] < size:
        raise ValueError(f"{windows.shape[0]} calibration windows cannot be shared by {size} processes")
    base, extra = divmod(windows.shape[0], size)
    start = rank * base + min(rank, extra)
    return windows[start : start + base + (rank < extra)]


def all_reduce_statistics(stats: InputStatistics) -> InputStatistics:
    """Sum ``stats`` over all processes, in place (a no-op in a single process)."""
    if world()[1] == 1:
        return stats
    dist = torch.distributed
    dist.all_reduce(stats.sumsq)
    for part in (stats.hessian, stats.total):
        if part is not None:
            dist.all_reduce(part)
    tokens = torch.tensor([stats.tokens], dtype=torch.float64, device=stats.sumsq.device)
    dist.all_reduce(tokens)
    stats.tokens = int(tokens.item())
    stats.cache.clear()
    return stats


def barrier() -> None:
    """Wait for every process (a no-op in a single process); e.g. until rank 0 has written a checkpoint."""
    if world()[1] > 1:
        torch.distributed.barrier()


def all_reduce_scalar(value: float) -> float:
    """Sum of ``value`` over all processes (e.g. held-out losses)."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item())


def residual_energy(hidden: torch.Tensor) -> float:
    """``Σ‖h‖²`` over every calibration token of all processes, rounded to float32 so that one process and a
    sharded run (whose float64 partial sums round differently in the last bits) agree."""
    return float(torch.tensor(all_reduce_scalar(float(hidden.double().square().sum()))).float())


def solve_cost(shape: tuple[int, int]) -> int:
    """Relative cost of one layer-wise solve of a ``rows × cols`` weight: ``rows·cols² + cols³`` (the sweep or
    ADMM products over the rows, and the factorisation of the ``cols × cols`` Hessian)."""
    rows, cols = shape
    return rows * cols * cols + cols**3


def split_solves(shapes: dict[str, tuple[int, int]], size: int) -> dict[str, int]:
    """The process that solves each projection: longest first, each to the least loaded process (ties: the lower
    rank). Depends only on the shapes and their order, so every process computes the same split."""
    load = [0] * size
    owners = {}
    for name in sorted(shapes, key=lambda n: -solve_cost(shapes[n])):  # stable: equal costs keep their order
        rank = min(range(size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += solve_cost(shapes[name])
    return owners


def broadcast_tensor(tensor: torch.Tensor, src: int) -> None:
    """Overwrite ``tensor`` on every process with ``src``'s, in place (a no-op in a single process)."""
    if world()[1] > 1:
        torch.distributed.broadcast(tensor, src)


def broadcast_object(obj, src: int):
    """``src``'s ``obj`` on every process (picklable; a no-op in a single process)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src)
    return box[0]
