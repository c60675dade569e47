"""Where a multi-process prune spends its time: each process sums the wall time of the functions below (nested ones
overlap) around ``examples/distributed_prune.py`` and prints them; rank 0 writes
``benchmarks/results/distributed_breakdown_llama3-8b.json`` (or ``--breakdown-out``). ``--per-projection``: the
functions called while one projection is pruned are summed per projection name too (``"down:admm"``, and
``"down:total"`` for the whole ``_prune_one``).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/distributed_breakdown.py \\
        --model CHECKPOINT --nsamples 32 --seqlen 2048          # CHECKPOINT: scale.make_checkpoint("llama3-8b", 1, dir)
    OMP_NUM_THREADS=1 python benchmarks/distributed_breakdown.py --per-projection \\
        --breakdown-out benchmarks/results/distributed_breakdown_smollm2_1proc.json   # SmolLM2-135M, one process
"""

from __future__ import annotations

import collections
import functools
import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from optimum_mosaic import layer_walk  # noqa: E402
from optimum_mosaic.calibration import distributed, layerwise, statistics  # noqa: E402
from optimum_mosaic.pruning import alps, ridge, sparsegpt  # noqa: E402

SECONDS: dict[str, float] = collections.defaultdict(float)
WRAPPED = [
    (statistics.InputStatistics, "update", "stats.update"),
    (layerwise, "all_reduce_statistics", "all_reduce_statistics(layerwise)"),
    (distributed.RowShard, "gather", "RowShard.gather"),
    (ridge, "broadcast_tensor", "broadcast_tensor(swap)"),
    (distributed.RowShard, "sum", "RowShard.sum"),
    (sparsegpt, "inverse_hessian_factor", "inverse_hessian_factor"),
    (ridge.RidgeInverses, "__call__", "RidgeInverses"),
    (alps, "share_factorisations", "share_factorisations"),
    (alps, "split_warm_start", "split_warm_start"),
    (alps, "keep_top_k", "keep_top_k"),
    (layer_walk, "forward_layer", "forward_layer"),
    (layer_walk, "forward_pruning", "forward_pruning"),
    (ridge, "make_obs_factor", "make_obs_factor"),
    (alps, "admm", "admm"),
    (alps, "refit_on_support", "alps.refit_on_support(CG)"),
    (alps, "sparsegpt_prune", "sparsegpt_prune(warm)"),
    (layer_walk.LayerWalk, "_prune_one", "_prune_one"),
    (layer_walk, "broadcast_tensor", "broadcast_tensor"),
    (layer_walk.LayerWalk, "_solve", "_solve"),
]


PROJECTION: list[str | None] = [None]  # the projection being pruned (``--per-projection``)


def wrap(owner, name: str, label: str, per_projection: bool = False) -> None:
    fn = getattr(owner, name)
    outermost = owner is layer_walk.LayerWalk and name == "_prune_one"

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        if per_projection and outermost:
            PROJECTION[0] = args[6]  # (self, targets, plan, kernel, config, idx, proj, stats, ...)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            SECONDS[label] += elapsed
            if per_projection and PROJECTION[0] is not None:
                SECONDS[f"{PROJECTION[0]}:{'total' if outermost else label}"] += elapsed
                if outermost:
                    PROJECTION[0] = None

    setattr(owner, name, timed)


def main() -> None:
    out = ROOT / "benchmarks/results/distributed_breakdown_llama3-8b.json"
    if "--breakdown-out" in sys.argv:
        i = sys.argv.index("--breakdown-out")
        out = Path(sys.argv.pop(i + 1))
        sys.argv.pop(i)
    per_projection = "--per-projection" in sys.argv
    if per_projection:
        sys.argv.remove("--per-projection")
    for owner, name, label in WRAPPED:
        wrap(owner, name, label, per_projection)
    import distributed_prune

    start = time.perf_counter()
    distributed_prune.main()
    SECONDS["main"] = time.perf_counter() - start
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = {k: round(v, 1) for k, v in sorted(SECONDS.items(), key=lambda kv: -kv[1])}
    print(f"rank {rank}: {mine}", flush=True)
    every = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
    if dist.is_initialized():
        dist.all_gather_object(every, mine)
    if rank == 0:
        record = {"argv": sys.argv[1:], "seconds_per_process": {f"rank {r}": s for r, s in enumerate(every)}}
        out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
