"""Calibration over several processes: every process takes a shard of the calibration windows, and the
statistics, being sums, are all-reduced before anything is decided from them. Works with any launcher
that initialises ``torch.distributed`` (``accelerate launch``, ``torchrun``; the gloo backend on CPU).
The solves are shared too: each process prunes a share of each layer's projections (``split_solves``) and
broadcasts its results, so all processes end with the same model; a projection that outweighs a process's share
(Llama-3-8B's ``down_proj``) is solved by all of them, each a block of its rows (``RowShard``), with every
selection over the whole matrix made as one process makes it (on the gathered matrix, or for a large one from
exchanged samples and counts: ``masks.kth_smallest``), so the result is that of one process."""

from __future__ import annotations

from dataclasses import dataclass

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
    for part in (stats.hessian, stats.total, stats.cross):
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


ROWS = -1  # split_solves: every process solves a block of the projection's rows
ROWS_MIN = 1 << 19  # entries below which sharing a projection's rows costs in exchanges what it splits


def split_solves(shapes: dict[str, tuple[int, int]], size: int, rows: bool = False) -> dict[str, int]:
    """The process that solves each projection: longest first, each to the least loaded process (ties: the lower
    rank). Depends only on the shapes and their order, so every process computes the same split.

    ``rows`` (the kernel can solve a block of rows, ``RowShard``): a projection costing more than a process's fair
    share (``total / size``) is solved by all processes, each a block of its rows (owner ``ROWS``), which costs each
    ``rows·cols²/size + cols³`` (the factorisation is repeated); the others are balanced on top. E.g. ``o`` or
    ``down`` alone in its input group, or ``down`` among all seven at a Llama-3-8B layer. Not below ``ROWS_MIN``
    entries: each exchange costs a fixed latency, and SmolLM2's 576 × 576 ``o`` took longer shared by two processes
    than whole on one (``results/distributed_breakdown_smollm2_{1proc,2proc}.json``), its 576 × 1536 ``down`` less."""
    load = [0] * size
    owners = {}
    total = sum(solve_cost(s) for s in shapes.values())
    for name in sorted(shapes, key=lambda n: -solve_cost(shapes[n])):  # stable: equal costs keep their order
        height, width = shapes[name]
        if (
            rows
            and size > 1
            and height >= size
            and height * width >= ROWS_MIN
            and solve_cost(shapes[name]) * size > total
        ):
            owners[name] = ROWS
            load = [x + height * width * width // size + width**3 for x in load]
            continue
        rank = min(range(size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += solve_cost(shapes[name])
    return owners


@dataclass(frozen=True)
class RowShard:
    """Rows ``[start, stop)`` of a ``rows``-row matrix that ``size`` processes solve together, each a contiguous block
    in rank order (the first ``rows mod size`` one row longer). Selections over the whole matrix (a top-k, a block
    threshold, column norms) are made on ``gather``'s whole matrix, identical on every process and to one process's
    (products are row by row, and the CPU BLAS gives a row the same bits in a block of rows as in the whole matrix:
    ``tests/test_distributed.py`` checks the kernels' results bit for bit)."""

    rank: int
    size: int
    rows: int

    def bounds(self, rank: int) -> tuple[int, int]:
        base, extra = divmod(self.rows, self.size)
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)

    @property
    def start(self) -> int:
        return self.bounds(self.rank)[0]

    @property
    def stop(self) -> int:
        return self.bounds(self.rank)[1]

    def local(self, whole: torch.Tensor) -> torch.Tensor:
        """This process's rows of ``whole``."""
        return whole[self.start : self.stop]

    def _padded(self, block: torch.Tensor) -> torch.Tensor:
        """``block`` with zero rows appended up to the longest block's height (gloo exchanges equal sizes)."""
        width = -(-self.rows // self.size)
        if block.shape[0] < width:
            block = torch.cat([block, block.new_zeros((width - block.shape[0], *block.shape[1:]))])
        return block.contiguous()

    def _unpadded(self, stacked: torch.Tensor) -> torch.Tensor:
        """The whole matrix from every process's padded block, stacked in rank order."""
        if self.rows % self.size == 0:
            return stacked
        width = -(-self.rows // self.size)
        return torch.cat(
            [stacked[r * width : r * width + b - a] for r, (a, b) in enumerate(map(self.bounds, range(self.size)))]
        )

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole matrix from every process's block of rows, in row order, on every process."""
        local = self._padded(local)
        out = local.new_empty((self.size * local.shape[0], *local.shape[1:]))
        torch.distributed.all_gather(list(out.split(local.shape[0])), local)
        return self._unpadded(out)

    def gather_to(self, local: torch.Tensor, dst: int) -> torch.Tensor | None:
        """The whole matrix on process ``dst`` (None on the others): half the traffic of ``gather``."""
        local = self._padded(local)
        out = local.new_empty((self.size * local.shape[0], *local.shape[1:])) if self.rank == dst else None
        torch.distributed.gather(local, list(out.split(local.shape[0])) if out is not None else None, dst)
        return None if out is None else self._unpadded(out)

    def scatter_from(self, whole: torch.Tensor | None, src: int, like: torch.Tensor) -> torch.Tensor:
        """This process's rows of process ``src``'s ``whole`` (``like``: this process's block of a matrix of the same
        shape and dtype, e.g. of the input)."""
        out = self._padded(like.new_empty(like.shape))
        parts = [self._padded(whole[a:b]) for a, b in map(self.bounds, range(self.size))] if self.rank == src else None
        torch.distributed.scatter(out, parts, src)
        return out[: self.stop - self.start]

    def sizes(self, local_numel: int) -> list[int]:
        """Every process's number of entries, from this process's ``local_numel`` (each part is a block of rows of
        one matrix): no exchange."""
        width = local_numel // (self.stop - self.start)
        return [(b - a) * width for a, b in map(self.bounds, range(self.size))]

    def concat(self, local: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
        """Every process's 1-D ``local`` concatenated in rank order, on every process: one all-gather when the
        ``lengths`` are given, two when they are not (they are exchanged first)."""
        dist = torch.distributed
        if lengths is None:
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
            dist.all_gather(sizes, torch.tensor([local.numel()]))
            lengths = [int(s) for s in sizes]
        width = max(lengths)
        if width == 0:
            return local.new_empty(0)
        if local.numel() < width:  # gloo gathers equal sizes
            local = torch.cat([local, local.new_zeros(width - local.numel())])
        parts = [local.new_empty(width) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat([part[:count] for part, count in zip(parts, lengths, strict=True)])

    def counts(self, *values: int) -> list[list[int]]:
        """Every process's ``values`` (integers), in rank order: one all-gather."""
        rows = self.concat(torch.tensor(values, dtype=torch.int64), [len(values)] * self.size)
        return rows.view(self.size, len(values)).tolist()

    def sum_in_place(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes, in place (e.g. per-column float64 partial sums)."""
        torch.distributed.all_reduce(tensor)
        return tensor

    def sum(self, value: float) -> float:
        """``value`` summed over the processes (counts are exact; float sums in rank order)."""
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())


def row_shard(rows: int) -> RowShard:
    """This process's share of a ``rows``-row solve."""
    rank, size = world()
    return RowShard(rank, size, rows)


def whole(local: torch.Tensor, shard: RowShard | None) -> torch.Tensor:
    """The whole matrix: ``local`` itself in one process (``shard`` None), else gathered from every process."""
    return local if shard is None else shard.gather(local)


def total(value, shard: RowShard | None):
    """``value`` (a count or a float) summed over the processes sharing the rows; ``value`` itself in one process."""
    return value if shard is None else type(value)(shard.sum(value))


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
