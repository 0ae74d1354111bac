"""Small helpers shared by several test files (plain functions; fixtures live in conftest.py)."""
from __future__ import annotations

import torch


def perturb(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its (partly zero) init, so outputs are not trivially zero and depend on the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model
