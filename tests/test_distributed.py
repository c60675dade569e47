"""calibration/distributed.py: on 2 gloo processes (torch.multiprocessing, forked) the shards cover the windows
once, all-reduced statistics equal those of one process over every window, and ``collect_statistics`` reduces
its inputs in one order on every process, whatever order each process lists them in."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from optimum_mosaic.calibration import distributed
from optimum_mosaic.calibration.distributed import all_reduce_scalar, all_reduce_statistics, shard_windows, world
from optimum_mosaic.calibration.layerwise import Activations, collect_statistics
from optimum_mosaic.calibration.statistics import InputStatistics


def _inputs(windows: int = 6, seqlen: int = 16, d: int = 8) -> torch.Tensor:
    return torch.randn(windows, seqlen, d, generator=torch.Generator().manual_seed(0))


def _stats(x: torch.Tensor) -> InputStatistics:
    stats = InputStatistics.empty(x.shape[-1], True, dtype=torch.float64)
    stats.update(x)
    return stats


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        assert world() == (rank, 2)
        ids = torch.arange(9).view(9, 1)
        shards = [None, None]
        dist.all_gather_object(shards, shard_windows(ids))
        assert [s.shape[0] for s in shards] == [5, 4] and torch.equal(torch.cat(shards), ids)

        x = _inputs()
        local = all_reduce_statistics(_stats(shard_windows(x))).finalize()
        full = _stats(x).finalize()
        assert local.tokens == full.tokens == 6 * 16
        assert torch.equal(local.sumsq, full.sumsq) and torch.equal(local.hessian, full.hessian)
        assert all_reduce_scalar(rank + 0.5) == 2.0

        torch.manual_seed(0)
        layer = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 8))
        inputs = {"first": layer[0], "second": layer[1]}
        if rank == 1:  # another order on the other process (the sizes differ: a mismatch would fail)
            inputs = dict(reversed(inputs.items()))
        shard = shard_windows(x)
        stats, out = collect_statistics(layer, Activations(shard, [{}], 1), 0, inputs, hessian=True)
        assert torch.equal(stats["first"].hessian, full.hessian) and stats["first"].tokens == 6 * 16
        assert stats["second"].hessian.shape == (12, 12)
        torch.testing.assert_close(stats["second"].hessian, _stats(layer[0](x)).finalize().hessian)
        assert torch.equal(out, layer(shard))
    finally:
        dist.destroy_process_group()


def test_two_processes_reduce_to_the_one_process_statistics(tmp_path):
    # fork: the children start with the modules already imported (a spawned child re-imports transformers)
    mp.start_processes(_worker, args=(str(tmp_path / "init"),), nprocs=2, start_method="fork")


def test_single_process_is_a_no_op():
    assert world() == (0, 1)
    x = _inputs()
    assert shard_windows(x) is x
    stats = _stats(x)
    assert all_reduce_statistics(stats) is stats and stats.tokens == 6 * 16
    assert all_reduce_scalar(1.5) == 1.5
    distributed.barrier()


def test_fewer_windows_than_processes(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: (0, 4))
    with pytest.raises(ValueError, match="3 calibration windows cannot be shared by 4 processes"):
        shard_windows(torch.zeros(3, 8))


# -- a whole prune on 2 processes: each solves a share of the projections, all end with the one-process weights --
PRUNES = {
    "default (projection walk)": dict(),
    "sparsegpt, layer walk": dict(pruner="sparsegpt", sequential="layer"),
    "composite": dict(structured_sparsity=0.2),
}


def _tiny_prune(options: dict, calls: list | None = None):
    from test_architectures import SMALL, X, tiny

    from optimum_mosaic import PrunedConfig, Pruner
    from optimum_mosaic.layer_walk import LayerWalk

    original = LayerWalk._prune_one

    def counted(self, targets, plan, kernel, config, idx, proj, stats):
        if calls is not None and plan[(idx, proj)] > 0:
            calls.append(f"{idx}.{proj}")
        return original(self, targets, plan, kernel, config, idx, proj, stats)

    model = tiny("llama")
    LayerWalk._prune_one = counted
    try:
        Pruner(model, None).prune(PrunedConfig(sparsity=0.5, **{**SMALL, **options}), calibration_dataset=X)
    finally:
        LayerWalk._prune_one = original
    return {k: v for k, v in model.state_dict().items()}


def _prune_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    try:
        results = {}
        for name, options in PRUNES.items():
            calls = []
            weights = _tiny_prune(options, calls)
            shares = [None, None]
            dist.all_gather_object(shares, calls)
            results[name] = (weights, shares)
        mine = {n: w for n, (w, _) in results.items()}
        theirs = [mine]
        dist.broadcast_object_list(theirs, 0)  # every process holds rank 0's weights
        assert all(torch.equal(mine[n][k], theirs[0][n][k]) for n in mine for k in mine[n])
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_share_the_solves_and_match_one_process(tmp_path, one_thread):
    out = tmp_path / "two.pt"
    mp.start_processes(_prune_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, start_method="fork")
    two = torch.load(out)
    for name, options in PRUNES.items():
        one_calls = []
        one = _tiny_prune(options, one_calls)
        weights, (first, second) = two[name]
        assert set(first).isdisjoint(second) and sorted(first + second) == sorted(one_calls), name
        assert first and second, f"{name}: one process solved everything ({first} / {second})"
        assert one.keys() == weights.keys()
        different = [k for k in one if not torch.equal(one[k], weights[k])]
        assert not different, f"{name}: {different[:4]}"


def test_split_solves_balances_by_cost():
    from optimum_mosaic.calibration.distributed import solve_cost, split_solves

    llama3 = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
              "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}  # fmt: skip
    owners = split_solves(llama3, 2)  # down (14336² Hessian) alone outweighs the other six together
    loads = [sum(solve_cost(llama3[p]) for p in llama3 if owners[p] == r) for r in range(2)]
    assert owners == {p: 0 if p == "down" else 1 for p in llama3} and loads[0] > loads[1]
    even = split_solves({"a": (8, 8), "b": (8, 8), "c": (8, 8), "d": (8, 8)}, 2)
    assert sorted(even.values()) == [0, 0, 1, 1] and split_solves({"a": (8, 8)}, 1) == {"a": 0}
