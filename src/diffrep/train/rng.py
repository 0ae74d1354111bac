"""Per-step randomness that is the same after a kill/resume and for any DDP world size.

Every training step gets a fresh `BatchRNG` seeded from (seed, step) only, so
no generator state has to survive a restart. Each draw is made for the whole
*global* batch and sliced to this rank's rows: a 1-process run at global
batch 8 and a 2-process run at 4 + 4 see the same per-sample noise.

The generator lives on the run's device (CPU generator on CPU, a Philox CUDA
generator on CUDA), so drawing the global batch costs nothing measurable and
needs no host-to-device copy. Draws are identical across world sizes and
restarts on the same device type; a CPU run and a CUDA run draw different
numbers.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from a tuple of keys; stable across processes (unlike `hash`)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _shape(shape: tuple) -> tuple[int, ...]:
    # accept both rng.randn(3, 8, 8) and rng.randn((3, 8, 8)) / rng.randn(x.shape[1:])
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    return tuple(int(s) for s in shape)


class BatchRNG:
    """Randomness for one training step, drawn for the global batch, returned for this rank.

    Every method returns a tensor of shape (local_batch, *item_shape) on `device`.
    All ranks must make the same sequence of calls (they run the same code), so
    the generator stays in step across ranks. `generator` may be used directly
    for draws that are shared by the whole batch (they are identical on every rank).
    """

    def __init__(self, seed: int, step: int, global_batch: int, offset: int = 0,
                 local_batch: int | None = None, device: torch.device | str = "cpu"):
        local_batch = global_batch if local_batch is None else local_batch
        if not (0 <= offset and local_batch >= 1 and offset + local_batch <= global_batch):
            raise ValueError(f"BatchRNG: rows [{offset}, {offset + local_batch}) "
                             f"do not fit in a global batch of {global_batch}")
        self.seed, self.step = int(seed), int(step)
        self.global_batch, self.offset, self.local_batch = global_batch, offset, local_batch
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(derive_seed("batch", self.seed, self.step))

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.offset : self.offset + self.local_batch]

    def randn(self, *item_shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = torch.randn(self.global_batch, *_shape(item_shape), generator=self.generator, device=self.device, dtype=dtype)
        return self._local(g)

    def rand(self, *item_shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = torch.rand(self.global_batch, *_shape(item_shape), generator=self.generator, device=self.device, dtype=dtype)
        return self._local(g)

    def uniform(self, low: float, high: float, *item_shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return low + (high - low) * self.rand(*item_shape, dtype=dtype)

    def randint(self, high: int, *item_shape, low: int = 0) -> torch.Tensor:
        g = torch.randint(low, high, (self.global_batch, *_shape(item_shape)), generator=self.generator, device=self.device)
        return self._local(g)

    def bernoulli(self, p: float, *item_shape) -> torch.Tensor:
        """Boolean mask, True with probability p."""
        return self.rand(*item_shape) < p

    def __repr__(self) -> str:
        return (f"BatchRNG(seed={self.seed}, step={self.step}, rows={self.offset}:{self.offset + self.local_batch}"
                f" of {self.global_batch}, device={self.device})")
