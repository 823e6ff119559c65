"""The dmlray training loop under plain torchrun (no Ray): the peer of bench_scaling.py.

torchrun --nproc_per_node 2 bench/torchrun_worker.py CONFIG.yaml OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dmlray.config import load_config
from dmlray.jobs.worker import WorkerContext, run_worker


def main(config_path: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(config_path)
    torch.set_num_threads(cfg.run.threads_per_worker)
    history: list[dict] = []

    def report(record, hist, state):
        history[:] = hist

    run_worker(
        cfg,
        WorkerContext(
            rank=rank, world_size=dist.get_world_size(), report=report, wrap_model=lambda m: DistributedDataParallel(m)
        ),
    )
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(history, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
