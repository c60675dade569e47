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
"""

import argparse
import os

import torch.distributed as dist

from optimum_mosaic import PrunedConfig, Pruner
from optimum_mosaic.calibration.distributed import barrier, world


def init_distributed() -> None:
    """Join the process group the launcher describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR/PORT``) over gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


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
    args = parser.parse_args(argv)
    text = open(args.text, encoding="utf-8").read() if args.text else None

    init_distributed()
    rank, size = world()
    if rank > 0:
        barrier()  # rank 0 fetches (and caches) a packaged model first
    pruner = Pruner.from_pretrained(args.model)
    if rank == 0:
        barrier()
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
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
