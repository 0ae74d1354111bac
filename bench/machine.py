"""The machine a run was measured on, and its matmul rate: the yardstick for every model's FLOP/s."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Machine:
    cpu_model: str
    cores: int  # logical CPUs the process may run on (affinity), not the host's total
    torch: str
    threads: int  # intra-op threads every CPU measurement of this run used
    device: str  # "cpu", or the CUDA device name when one was benchmarked too
    cuda_available: bool
    cuda: dict | None  # name, capability, memory, bf16 support
    git: dict  # commit and dirty flag, as in the lineage blocks (dirty = src/, flows/, pyproject.toml changed)
    python: str
    host: str
    load_avg_start: list[float]  # a busy machine is the first suspect when numbers move
    load_avg_end: list[float] = field(default_factory=list)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_info() -> dict | None:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(), "bf16": torch.cuda.is_bf16_supported()}


def describe(root: Path, threads: int) -> Machine:
    from diffrep.lineage import git_state

    cuda = cuda_info()
    return Machine(
        cpu_model=cpu_model(), cores=len(os.sched_getaffinity(0)), torch=torch.__version__, threads=threads,
        device=f"cpu + cuda ({cuda['name']})" if cuda else "cpu", cuda_available=cuda is not None, cuda=cuda,
        git=git_state(root), python=platform.python_version(), host=platform.node(),
        load_avg_start=[round(x, 2) for x in os.getloadavg()],
    )


@dataclass
class MatmulRate:
    device: str
    dtype: str
    threads: int
    gflops: float  # best over sizes and reps: what the hardware can do at this thread count
    by_size: dict[str, float]  # "n" -> best GFLOP/s at n x n @ n x n
    reps: int
    tf32: bool | None = None  # CUDA only: fp32 matmuls may run as TF32 (runtime.resolve_runtime enables it)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timer measures the work and not its launch (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                sizes: tuple[int, ...] = (1024, 2048), reps: int = 3) -> MatmulRate:
    """Best-of-`reps` rate of square matmuls (2 n^3 FLOPs each); one untimed call per size first."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    by_size = {}
    for n in sizes:
        a = torch.randn(n, n, generator=g, device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)  # first call: thread pool start-up, allocation, cuBLAS heuristics
        # small matrices finish in microseconds: repeat inside one timing so timer noise does not dominate
        inner = max(1, int(2e9 // (2 * n**3))) if device.type == "cpu" else max(1, int(2e13 // (2 * n**3)))
        best = 0.0
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b, out=out)
            sync(device)
            best = max(best, 2 * n**3 * inner / (time.perf_counter() - t) / 1e9)
        by_size[str(n)] = round(best, 2)
    tf32 = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" and dtype == torch.float32 else None
    return MatmulRate(str(device), str(dtype).removeprefix("torch."), torch.get_num_threads(),
                      max(by_size.values()), by_size, reps, tf32)
