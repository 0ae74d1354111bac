"""`diffrep stage X` starts its own DDP workers: runtime.nproc_per_node / nnodes through torch's elastic launcher.

    runtime: {nproc_per_node: 8}                              # one machine, 8 GPUs: `dvc repro` uses all
    runtime: {nproc_per_node: 8, nnodes: 2, rdzv_endpoint: "node0:29400"}   # run `diffrep stage soda` on both

The parent process only launches: it runs `python -m diffrep.cli stage X ...` once per worker with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), waits, and exits non-zero if any worker failed
(max_restarts=0: a failed worker is not silently retried; the engine's checkpoints make a re-run resume).
A worker sees WORLD_SIZE in its environment and never launches again. Only training stages are launched;
the others (prepare, evaluation) run in this process as before.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from diffrep.config import RuntimeConfig

DDP_STAGES = ("soda", "ul_stage1", "ul_stage2", "ldae", "feature_net")


class LaunchError(RuntimeError):
    """A launched DDP worker failed (its own error is printed above by the worker)."""


def workers_per_node(rt: RuntimeConfig) -> int:
    if rt.nproc_per_node:
        return rt.nproc_per_node
    import torch

    return max(1, torch.cuda.device_count()) if rt.device != "cpu" else 1


def should_launch(stage: str, rt: RuntimeConfig, environ=os.environ) -> bool:
    """True in the parent of a multi-worker training stage; False inside a worker (WORLD_SIZE set) or for 1 worker."""
    if "WORLD_SIZE" in environ or stage not in DDP_STAGES:
        return False
    return rt.nnodes > 1 or workers_per_node(rt) > 1


def launch_stage(stage: str, rt: RuntimeConfig, params: str, root: str | Path, extra: list[str] = ()) -> None:
    """Run `diffrep stage <stage>` in nproc_per_node workers on this node (one node of nnodes); raises LaunchError."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n = workers_per_node(rt)
    cfg = LaunchConfig(min_nodes=rt.nnodes, max_nodes=rt.nnodes, nproc_per_node=n, run_id=rt.rdzv_id,
                       rdzv_backend="c10d", rdzv_endpoint=rt.rdzv_endpoint, max_restarts=0,
                       rdzv_configs={"timeout": 600}, monitor_interval=0.2)
    args = ["-m", "diffrep.cli", "stage", stage, "--params", str(params), "--root", str(root), *extra]
    print(f"[{stage}] launching {n} worker(s) on this node, {rt.nnodes} node(s), rendezvous {rt.rdzv_endpoint}",
          file=sys.stderr, flush=True)
    try:
        elastic_launch(cfg, entrypoint=sys.executable)(*args)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        raise LaunchError(f"stage {stage}: {len(e.failures)} of {n * rt.nnodes} DDP worker(s) failed (exit "
                          f"{', '.join(map(str, codes))}); see the worker's error above. Re-run to resume from the "
                          "last checkpoint, or set runtime.nproc_per_node: 1 to run in one process") from None
