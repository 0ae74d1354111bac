"""Device, precision and thread settings resolved from the `runtime` params."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from diffrep.config import RuntimeConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32
    attention: str  # backend name as configured; resolved per call (see nn.attention)
    compile: bool
    channels_last: bool

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def resolve_runtime(cfg: RuntimeConfig) -> Runtime:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available; set runtime.device: auto or cpu")
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda" and torch.distributed.is_available() and torch.distributed.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        dtype = torch.bfloat16
    else:
        dtype = None
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, dtype, cfg.attention, cfg.compile, cfg.channels_last)
