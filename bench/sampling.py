"""Sampling throughput at the default sampler steps: what generation_eval and `diffrep sample` pay.

Randomly initialised models of the default config: the cost of a DDIM step
does not depend on the weights. Each timing follows one tiny untimed call
(allocator, thread pool, first-call dispatch).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bench.machine import sync
from diffrep.config import Config


@dataclass
class SampleBench:
    what: str
    device: str
    n: int  # images per call (one batch)
    steps: dict[str, int]  # sampler steps per network
    network_evals: int  # network forward passes per call (guidance batches the null and the conditional together)
    wall_s: float
    img_per_s: float


def _timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def soda_steps(cfg: Config) -> int:
    return cfg.soda.diffusion.sample_steps  # what the soda stage reconstructs with


def ul_steps(cfg: Config) -> tuple[int, int]:
    return (cfg.eval.base_steps or cfg.ul.stage2.diffusion.sample_steps,
            cfg.eval.decoder_steps or cfg.ul.stage1.decoder_diffusion.sample_steps)


@torch.no_grad()
def bench_soda_reconstruct(soda, n: int, steps: int, device: torch.device, autocast) -> SampleBench:
    """encode + DDIM decode with guidance (SODA's reconstruction, as in the soda and generation_eval stages)."""
    soda = soda.to(device)
    x = (torch.rand((n, *soda.image_shape), generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    g = torch.Generator().manual_seed(0)
    with autocast():
        soda.reconstruct(x[:2], steps=2, generator=g)
        wall = _timed(lambda: soda.reconstruct(x, steps=steps, generator=g), device)
    return SampleBench("soda_reconstruct", str(device), n, {"decoder": steps}, steps, round(wall, 4),
                       round(n / wall, 2))


@torch.no_grad()
def bench_ul_generate(stage1, base, n: int, base_steps: int, decoder_steps: int, device: torch.device,
                      autocast) -> SampleBench:
    """Base model -> z0 -> decoder (models/ul.generate, what `diffrep sample ul` and generation_eval run)."""
    from diffrep.models.ul import generate

    stage1, base = stage1.to(device), base.to(device)
    with autocast():
        generate(stage1, base, 2, seed=0, base_steps=2, decoder_steps=2, device=device)
        wall = _timed(lambda: generate(stage1, base, n, seed=0, base_steps=base_steps, decoder_steps=decoder_steps,
                                       device=device), device)
    return SampleBench("ul_generate", str(device), n, {"base": base_steps, "decoder": decoder_steps},
                       base_steps + decoder_steps, round(wall, 4), round(n / wall, 2))
