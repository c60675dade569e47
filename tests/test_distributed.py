"""calibration/distributed.py: on 2 gloo processes (torch.multiprocessing, forked) the shards cover the windows
once, all-reduced statistics equal those of one process over every window, and ``collect_statistics`` reduces
its inputs in one order on every process, whatever order each process lists them in."""

import contextlib
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


@contextlib.contextmanager
def _gloo(rank: int, init_file: str, timeout: int = 60):
    """This forked process as ``rank`` of 2 gloo processes, one torch thread, for the block."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=timeout)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _on_two_processes(worker, tmp_path):
    """What ``worker(rank, init_file, out)``, run on 2 forked processes (the children start with the modules already
    imported), saved to ``out`` from rank 0."""
    out = tmp_path / "two.pt"
    mp.start_processes(worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, start_method="fork")
    return torch.load(out)


def _worker(rank: int, init_file: str) -> None:
    with _gloo(rank, init_file):
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
    "dense target": dict(dense_target=True),
}


def _tiny_prune(options: dict, calls: list | None = None):
    from test_architectures import SMALL, X, tiny

    from optimum_mosaic import PrunedConfig, Pruner
    from optimum_mosaic.layer_walk import LayerWalk

    original = LayerWalk._prune_one

    def counted(self, targets, plan, kernel, config, idx, proj, stats, shard=None):
        if calls is not None and plan[(idx, proj)] > 0:
            calls.append(f"{idx}.{proj}" + ("" if shard is None else f" rows {shard.start}:{shard.stop}"))
        return original(self, targets, plan, kernel, config, idx, proj, stats, shard)

    model = tiny("llama")
    LayerWalk._prune_one = counted
    try:
        Pruner(model, None).prune(PrunedConfig(sparsity=0.5, **{**SMALL, **options}), calibration_dataset=X)
    finally:
        LayerWalk._prune_one = original
    return {k: v for k, v in model.state_dict().items()}


def _prune_worker(rank: int, init_file: str, out: str) -> None:
    with _gloo(rank, init_file, 120):
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


def test_two_processes_share_the_solves_and_match_one_process(tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(distributed, "ROWS_MIN", 0)  # the tiny model's o and down are shared however small
    two = _on_two_processes(_prune_worker, tmp_path)
    for name, options in PRUNES.items():
        one_calls = []
        one = _tiny_prune(options, one_calls)
        weights, (first, second) = two[name]
        # a projection alone in its input group (o, down) is solved by both, a block of rows each (64 = 32 + 32)
        shared = sorted(c.split()[0] for c in first if " rows " in c)
        assert shared == sorted(c.split()[0] for c in second if " rows " in c), name
        assert all(c.endswith("rows 0:32") for c in first if " rows " in c), name
        assert all(c.endswith("rows 32:64") for c in second if " rows " in c), name
        first, second = ([c for c in calls if " rows " not in c] for calls in (first, second))
        assert set(first).isdisjoint(second) and sorted(first + second + shared) == sorted(one_calls), name
        assert first and second, f"{name}: one process solved everything ({first} / {second})"
        if options.get("sequential") != "layer":
            assert {c.split(".")[1] for c in shared} == {"o", "down"}, name
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


def test_split_solves_shares_the_rows_of_a_projection_that_outweighs_a_process():
    from optimum_mosaic.calibration.distributed import ROWS, RowShard, split_solves

    llama3 = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
              "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}  # fmt: skip
    owners = split_solves(llama3, 2, rows=True)  # down: 3.8e12 of 4.9e12 → rows; the other six balanced beside it
    assert owners["down"] == ROWS and sorted(owners[p] for p in ("gate", "up")) == [0, 1]
    assert split_solves({"down": (4096, 14336)}, 2, rows=True) == {"down": ROWS}  # alone in its input group
    assert split_solves({"gate": (14336, 4096), "up": (14336, 4096)}, 2, rows=True) == {"gate": 0, "up": 1}
    smol = {"q": (576, 576), "k": (192, 576), "v": (192, 576)}  # q is less than half: whole projections, as before
    assert split_solves(smol, 2, rows=True) == split_solves(smol, 2) == {"q": 0, "k": 1, "v": 1}
    assert split_solves({"down": (4096, 14336)}, 1, rows=True) == {"down": 0}  # one process: nothing to share
    assert split_solves({"tiny": (1, 8)}, 2, rows=True) == {"tiny": 0}  # fewer rows than processes
    assert split_solves({"o": (576, 576)}, 2, rows=True) == {"o": 0}  # SmolLM2's o: below ROWS_MIN entries
    assert split_solves({"down": (576, 1536)}, 2, rows=True) == {"down": ROWS}
    assert [RowShard(r, 2, 37).bounds(r) for r in range(2)] == [(0, 19), (19, 37)]
    assert [RowShard(r, 3, 7).bounds(r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]


# -- the kernels on a block of rows: 37 rows (19 + 18 on 2 processes), gathered, equal the one-process result --
ROW_KERNELS = {
    "sparsegpt": dict(block_size=8),
    "sparsegpt isc": dict(block_size=8, saliency="isc", name="sparsegpt"),
    "sparsegpt 2:4": dict(block_size=8, nm=(2, 4), name="sparsegpt"),
    "sparsegpt_refit": dict(block_size=8, cg_iterations=4),
    "alps": dict(max_iterations=40, cg_iterations=5),
    "alps 2:4": dict(max_iterations=12, nm=(2, 4), name="alps"),
    "alps_warm": dict(block_size=8),  # process 0 runs SparseGPT whole, process 1 makes the ridge inverses ahead
    "alps_warm, shared sweep": dict(block_size=8, name="alps_warm", split_start=False),  # as for a wide input:
    # processes 0 and 1 each make one factorisation and broadcast it, and each sweeps its rows
    "alps_warm, last reader": dict(block_size=8, name="alps_warm", final=True),  # H's memory becomes Hn
}


def _row_problem():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 24, generator=g) * torch.linspace(0.2, 3.0, 24)
    x[:, 5] = 0.0  # a dead input
    return torch.randn(37, 24, generator=g), _stats(x.view(8, 32, 24)).finalize()


def _row_kernel_results(shard):
    from optimum_mosaic.pruning import ridge
    from optimum_mosaic.registry import get_method

    weight, stats = _row_problem()
    results = {}
    for label, options in ROW_KERNELS.items():
        options = dict(options)
        method = get_method("unstructured", options.pop("name", label))
        final = options.pop("final", False)
        ahead = ridge.SPLIT_START_BYTES if options.pop("split_start", True) else 0
        sparsity = 0.5 if "nm" in options else 0.6
        for start in ("dense", "pruned"):
            w = weight if start == "dense" else results[(label, "dense")][0]
            info, stats = {}, _row_problem()[1]
            stats.final_read = final
            local = w if shard is None else shard.local(w)
            saved, ridge.SPLIT_START_BYTES = ridge.SPLIT_START_BYTES, ahead
            try:
                out = method.fn(local, stats, sparsity, info=info, shard=shard, **options)
            finally:
                ridge.SPLIT_START_BYTES = saved
            results[(label, start)] = (out if shard is None else shard.gather(out), info)
    return results


def _check_shared_factorisations(shard) -> None:
    """Process 0 makes SparseGPT's factor, process 1 the ridge inverse; each ends with both, equal to its own."""
    from optimum_mosaic.pruning import alps, refit, ridge, sparsegpt

    made, original = [], ridge.make_obs_factor
    ridge.make_obs_factor = lambda *a, **k: made.append("U") or original(*a, **k)
    try:
        stats = _row_problem()[1]
        stats.final_read = True  # process 1 builds Hn in H's memory
        ridge.share_factorisations(stats, 0.01, 0.5, torch.device("cpu"), shard)
    finally:
        ridge.make_obs_factor = original
    assert made == (["U"] if shard.rank == 0 else []) and (stats.hessian is None) == (shard.rank == 1)
    fresh = _row_problem()[1]
    mine = stats.cache[sparsegpt.obs_key(0.01, "cpu")]
    made_here = original(fresh, 0.01, "cpu")
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(mine, made_here, strict=True))
    assert mine[2].stride() == (1, 24)  # the layout of the factor process 0 made, so its products round alike
    inverse = alps.RidgeInverses(refit.normalized_hessian(fresh, 0.01, "cpu").Hn, {}, ("fresh",))(0.5)
    assert torch.equal(stats.cache[("ridge_inverses", 0.01, "cpu")][0.5], inverse)


def _row_kernel_worker(rank: int, init_file: str, out: str) -> None:
    from optimum_mosaic.calibration.distributed import RowShard
    from optimum_mosaic.pruning import alps

    calls = []
    for name in ("split_warm_start", "share_factorisations"):  # which start each alps_warm label took
        original = getattr(alps, name)
        setattr(alps, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    with _gloo(rank, init_file):
        _check_shared_factorisations(RowShard(rank, 2, 37))
        results = _row_kernel_results(RowShard(rank, 2, 37))
        assert sorted(set(calls)) == ["share_factorisations", "split_warm_start"], calls
        if rank == 0:
            torch.save(results, out)


def test_row_kernels_on_two_processes_equal_one_process(tmp_path, one_thread):
    from optimum_mosaic.registry import get_method

    two, one = _on_two_processes(_row_kernel_worker, tmp_path), _row_kernel_results(None)
    assert two.keys() == one.keys()
    for key, (weight, info) in one.items():
        assert torch.equal(two[key][0], weight), key
        assert two[key][1] == info, key  # the schedule (iterations, ρ, flips) and CG steps too
        kept = 37 * 24 // 2 if "2:4" in key[0] else 37 * 24 - round(0.6 * 37 * 24)
        assert int(torch.count_nonzero(weight)) == kept and not weight[:, 5].any(), key
    assert one[("alps", "dense")][1]["iterations"] > 3  # ADMM ran: the support test counted every row
    assert one[("alps_warm", "pruned")][1].get("existing_zeros")  # the count of existing zeros spans both blocks
    assert all(get_method("unstructured", m).rows for m in ("sparsegpt", "sparsegpt_refit", "alps", "alps_warm"))
    assert not get_method("unstructured", "wanda").rows  # whole-row selections: nothing to share


# -- selections and CG's stopping test over blocks of rows, without gathering a large matrix --
def _selection_problem():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(1025, 640, generator=g)  # 656,000 entries (> SHARED_SELECTION): rows 0:513 and 513:1025
    scores[500:530] = 0.25  # 19,200 ties that straddle the two blocks
    below = int((scores.abs() < 0.25).sum())
    return scores, below


def _check_selections(shard) -> None:
    from optimum_mosaic.pruning import masks
    from optimum_mosaic.pruning.alps import keep_top_k

    scores, below = _selection_problem()
    local = shard.local(scores)
    assert masks.shared_selection(local, shard)
    n = scores.numel()
    for j in (1, below + 5000, n // 2, n):  # the 5000th tie, a median, the extremes
        assert masks.kth_smallest(local.flatten(), j, torch.abs, shard) == scores.abs().flatten().kthvalue(j).values
    for k in (below + 5000, n - below - 5000, 1, n - 1):  # thresholds inside the ties: the first / last of them
        mine = masks.lowest_k_mask(local.abs(), k, shard)
        assert torch.equal(shard.gather(mine), masks.lowest_k_mask(scores.abs(), k))
        assert torch.equal(shard.gather(keep_top_k(local, k, torch.abs, shard)), keep_top_k(scores, k, torch.abs))
    original = masks._bracket
    masks._bracket = lambda sample, q: (sample[-1], sample[-1])  # a bracket that misses: the full selection
    try:
        assert masks.kth_smallest(local.flatten(), n // 3, None, shard) == scores.flatten().kthvalue(n // 3).values
    finally:
        masks._bracket = original


def _cg_problem(dense: bool):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(400, 24, generator=g)
    A = x.T @ x / 400 + 0.5 * torch.eye(24)
    W = torch.randn(37, 24, generator=g)
    support = torch.ones_like(W, dtype=torch.bool) if dense else torch.rand(37, 24, generator=g) > 0.5
    return A, W, support


def _cg_results(shard):
    from optimum_mosaic.pruning.refit import masked_cg

    out = {}
    local = (lambda t: t) if shard is None else shard.local
    for dense in (True, False):  # converges (the gathered test stops it) / cannot (a flag settles each step)
        for given in (False, True):  # W (the bound ‖W‖·‖A_j‖ first) or Y = W A (its column norms)
            A, W, support = _cg_problem(dense)
            Y = local(W @ A) if given else None
            B, steps = masked_cg(A, Y, local(W * support), local(support), 30, 1e-4, "unmasked", local(W), shard)
            out[dense, given] = (B if shard is None else shard.gather(B), steps)
    return out


def _selection_worker(rank: int, init_file: str, out: str) -> None:
    from optimum_mosaic.calibration.distributed import RowShard

    with _gloo(rank, init_file):
        _check_selections(RowShard(rank, 2, 1025))
        results = _cg_results(RowShard(rank, 2, 37))
        if rank == 0:
            torch.save(results, out)


def test_selections_and_cg_stop_over_two_processes_equal_one_process(tmp_path, one_thread):
    two, one = _on_two_processes(_selection_worker, tmp_path), _cg_results(None)
    for given in (False, True):  # the dense support converges, the sparse one runs every step
        assert one[True, given][1] < 30 and one[False, given][1] == 30
    assert one.keys() == two.keys() and len(one) == 4
    for key in one:
        assert torch.equal(two[key][0], one[key][0]) and two[key][1] == one[key][1], key
