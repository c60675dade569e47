"""Prune with the calibration spread over several processes, then save from rank 0.

Each process runs the model over its share of the calibration windows; the statistics are sums (‖X_j‖², XᵀX),
all-reduced over gloo before use; each process then solves a share of every layer's projections and broadcasts
the results (a projection that outweighs a process's share, such as ``down_proj``, alone in its input group, is
solved by all processes, a block of its rows each), so every process ends with the same model. That
model (and its masks) is the one a single process produces only when every process and the single process use
the same number of torch threads: the float32 forwards round differently at another thread count, and weights
near the threshold then change sides. The launchers and a plain ``python`` run pick different counts when
``OMP_NUM_THREADS`` is unset, so set it for every run you compare:

OMP_NUM_THREADS=1 accelerate launch --config_file integrations/accelerate/cpu_2proc.yaml examples/distributed_prune.py --output out
OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/distributed_prune.py --output out
OMP_NUM_THREADS=1 python examples/distributed_prune.py --output out  # one process: the same model
OMP_NUM_THREADS=1 python examples/distributed_prune.py --procs 2 --output out  # no launcher: forked, on this machine
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from optimum_mosaic import PrunedConfig, Pruner
from optimum_mosaic.calibration.distributed import barrier, world
from optimum_mosaic.packaged_models import resolve_model_path


def init_distributed() -> None:
    """Join the process group the launcher describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR/PORT``) over gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


def launch_here(argv: list[str], procs: int) -> None:
    """Run ``main(argv)`` in ``procs`` processes forked from this one (gloo, a file rendezvous): no launcher to start
    or wait for, and the children start with every module imported."""
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{Path(tmp) / 'rendezvous'}"
        mp.start_processes(_forked, args=(argv, init, procs), nprocs=procs, start_method="fork")


def _forked(rank: int, argv: list[str], init: str, procs: int) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=procs)
    try:
        main(argv)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m", help="packaged alias or local checkpoint")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--structured-sparsity", type=float, default=0.0)
    parser.add_argument("--allocation", default=None, help="default: PrunedConfig's")
    parser.add_argument("--pruner", default=None, help="default: PrunedConfig's")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows, shared among the processes")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--text", default=None, help="calibration text (default: the bundled mixed corpus)")
    parser.add_argument("--output", default="smollm2-pruned")
    parser.add_argument("--procs", type=int, default=1, help="without a launcher: processes to fork on this machine")
    args = parser.parse_args(argv)
    text = open(args.text, encoding="utf-8").read() if args.text else None

    init_distributed()
    rank, size = world()
    if rank == 0:
        resolve_model_path(args.model)  # a packaged model is fetched (and cached) once, by rank 0
    barrier()
    pruner = Pruner.from_pretrained(args.model)  # every process loads at the same time
    methods = {k: v for k, v in (("allocation", args.allocation), ("pruner", args.pruner)) if v is not None}
    config = PrunedConfig(
        sparsity=args.sparsity,
        structured_sparsity=args.structured_sparsity,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        **methods,
    )
    pruner.prune(config, calibration_dataset=text, save_directory=args.output)  # rank 0 writes, the others wait
    report = pruner.report
    if rank == 0:
        print(
            f"{size} process(es): sparsity {report.achieved_sparsity:.4f}, calibration {report.timings['calibration_s']}s,"
            f" total {report.timings['total_s']}s, saved to {args.output}"
        )
    return {"report": report, "rank": rank, "world_size": size, "model": pruner.model}


if __name__ == "__main__":
    forks = argparse.ArgumentParser(add_help=False)
    forks.add_argument("--procs", type=int, default=1)
    procs = forks.parse_known_args()[0].procs
    if procs > 1 and "WORLD_SIZE" not in os.environ:
        launch_here(sys.argv[1:], procs)
    else:
        main()
    if dist.is_initialized():
        dist.destroy_process_group()
