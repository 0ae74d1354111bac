"""DDP process-group set-up for `torchrun` (gloo on CPU, NCCL on CUDA).

    torchrun --nproc_per_node=2 -m diffrep.cli ...   # sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*

Call `setup_distributed()` before `resolve_runtime()` (so the runtime picks the
rank's GPU) and `teardown_distributed()` when done. Without WORLD_SIZE>1 both
are no-ops, so the same entry point serves single-process runs. Resume reads
`ckpt_dir/last.pt` on every rank: across nodes, ckpt_dir must be on a shared
filesystem.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment; `device` as in runtime.device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if dist.is_initialized():
        return dist_info()
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} is set but {', '.join(missing)} is not: launch with torchrun "
                           "(or set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT yourself)")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available; set runtime.device: auto or cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # before init, so NCCL binds this rank to its own GPU
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return dist_info()


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
