"""`prepare`'s second pass: decode, resize, summarise and quantise the listed items chunk by chunk.

Chunks of `data.chunk_size` items run in a ProcessPoolExecutor of `data.workers`
processes (1: in this process, no pool). Each job decodes its slice of the
source (data/decode.py), computes the per-image statistics validation needs
(`validate.chunk_stats`) and, when prepare gives it output files, writes its
quantised rows straight into the memory-mapped `{split}_images.npy` at the rows
the split gives them. The parent keeps only the statistics (a few numbers per
image) and feeds the float pixels to the source's content hash in source order,
so neither the chunk size, the number of workers nor the order in which chunks
finish changes a byte of the output. At most 2 x workers chunks are in flight:
memory grows with the chunk size and the workers, not with the dataset.

An image folder's channels (1 if every image is greyscale) come from the files'
headers, probed in the same pool first; should a file decode to other channels
than its header said, the pass runs again with the right count.
"""
from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from diffrep.data.decode import dataset_channels
from diffrep.data.prepared import quantise
from diffrep.data.types import Listing, RawDataset
from diffrep.data.validate import ImageStats, chunk_stats


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


@dataclass
class Job:
    reader: object  # a slice of the listing's reader
    start: int  # index of its first item
    channels: int
    sides: np.ndarray | None = None  # int8 (n,): 0 train, 1 val, 2 test; None: nothing written
    rows: np.ndarray | None = None  # int64 (n,): row of each item in its split's file
    outputs: tuple[str, ...] = ()  # the train, val, test image files


@dataclass
class Result:
    start: int
    n: int
    images: np.ndarray  # float32 (n_ok, C, H, W): the parent hashes them in source order
    ok: np.ndarray  # bool (n,)
    failures: list[tuple[int, str]]
    channels: np.ndarray  # int8 (n_ok,)
    stats: tuple[np.ndarray, ...]  # mins, maxs, nonfinite, digests of the n_ok images


def run_job(job: Job) -> Result:
    d = job.reader.decode(job.channels)
    stats = chunk_stats(d.images)
    if job.outputs:
        q = quantise(d.images)
        ok = np.flatnonzero(d.ok)
        sides, rows = job.sides[ok], job.rows[ok]
        for k, path in enumerate(job.outputs):
            m = sides == k
            if m.any():
                out = np.load(path, mmap_mode="r+")
                out[rows[m]] = q[m]
                out.flush()
                del out
    return Result(job.start, len(d.ok), d.images, d.ok, d.failures, d.channels, stats)


def _probe(reader) -> np.ndarray:
    return reader.probe()


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # the pool is the parallelism; one intra-op thread per worker


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """`workers` processes for the whole stage (probe and decode share them); None for 1: run in this process."""
    if workers <= 1:
        yield None
        return
    # forkserver: workers fork from a clean server process, not from a parent that has run torch threads;
    # as with any non-fork start method, a script that calls prepare needs an `if __name__ == "__main__":` guard
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["diffrep.data.chunks"])  # imported once in the server, not per worker
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ordered_map(fn: Callable, jobs: Iterable, pool: ProcessPoolExecutor | None, window: int = 2) -> Iterator:
    """fn over jobs, results in job order; in the pool at most `window` jobs in flight (2 x workers)."""
    if pool is None:
        yield from map(fn, jobs)
        return
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(fn, job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass
class PassResult:
    """The pass's outcome: statistics for validation, the content hash, which items failed."""

    stats: ImageStats
    ok: np.ndarray  # bool (N,) over the listed items
    content_sha256: str | None  # of the float images and labels, in source order; None when an item failed
    chunks: int
    passes: int
    images: list[np.ndarray] | None  # the float chunks, when collected


def _slices(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]


def probe_channels(listing: Listing, chunk_size: int, pool: tuple) -> int:
    if listing.channels is not None:
        return listing.channels
    probes = ordered_map(_probe, (listing.reader[a:b] for a, b in _slices(len(listing), chunk_size)), *pool)
    return dataset_channels(c for p in probes for c in p.tolist() if c)


def image_shape(listing: Listing, channels: int) -> tuple[int, int, int]:
    r = listing.reader
    return (channels, *r.images.shape[2:]) if hasattr(r, "images") else (channels, r.size, r.size)


def decode_all(listing: Listing, chunk_size: int, workers: int, outputs: Callable | None = None,
               sides: np.ndarray | None = None, rows: np.ndarray | None = None, collect: bool = False) -> PassResult:
    """Run the second pass. `outputs(shape)` creates the image files and returns their paths (None: write none)."""
    with worker_pool(workers) as pool:
        return _decode_all(listing, chunk_size, (pool, 2 * workers), outputs, sides, rows, collect)


def _decode_all(listing, chunk_size, pool, outputs, sides, rows, collect) -> PassResult:
    n = len(listing)
    channels = probe_channels(listing, chunk_size, pool)
    for passes in (1, 2):
        shape = image_shape(listing, channels)
        paths = tuple(str(p) for p in outputs(shape)) if outputs else ()
        jobs = (Job(listing.reader[a:b], a, channels, None if sides is None else sides[a:b],
                    None if rows is None else rows[a:b], paths) for a, b in _slices(n, chunk_size))
        ok = np.zeros(n, bool)
        mins, maxs, nonfinite = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, np.int64)
        digests = np.zeros((n, 32), np.uint8)
        failures, seen, images, h = [], set(), [], hashlib.sha256()
        for r in ordered_map(run_job, jobs, *pool):
            ok[r.start : r.start + r.n] = r.ok
            idx = r.start + np.flatnonzero(r.ok)
            mins[idx], maxs[idx], nonfinite[idx], digests[idx] = r.stats
            failures += [(r.start + i, why) for i, why in r.failures]
            seen.update(r.channels.tolist())
            if not failures:
                h.update(np.ascontiguousarray(r.images).tobytes())
            if collect:
                images.append(r.images)
        actual = dataset_channels(seen) if listing.channels is None else channels
        if actual == channels:
            break
        channels = actual  # a header said otherwise than the pixels: once more with the decoded count
    labels = listing.labels[ok]
    h.update(np.ascontiguousarray(labels).tobytes())
    keep = np.flatnonzero(ok)
    ids = listing.ids if len(keep) == n else [listing.ids[i] for i in keep]
    stats = ImageStats(listing.source, shape, ids, labels, listing.class_names, mins[keep], maxs[keep],
                       nonfinite[keep], digests[keep], _merge_unreadable(listing, failures), listing.empty_classes)
    return PassResult(stats, ok, None if failures else h.hexdigest(), len(_slices(n, chunk_size)), passes,
                      images if collect else None)


def _merge_unreadable(listing: Listing, failures: list[tuple[int, str]]) -> list[tuple[str, str]]:
    """Refusals from the listing and decode failures, in the order the source was walked."""
    keyed = [((before, 0, k), i, why) for k, (before, i, why) in enumerate(listing.unreadable)]
    keyed += [((pos, 1, 0), listing.ids[pos], why) for pos, why in failures]
    return [(i, why) for _, i, why in sorted(keyed, key=lambda t: t[0])]


def materialise(listing: Listing, chunk_size: int = 2048, workers: int = 1) -> RawDataset:
    """Every readable item decoded into one float array (small data and tests; prepare streams instead)."""
    d = decode_all(listing, chunk_size, workers, collect=True)
    shape = d.stats.shape
    images = np.concatenate(d.images) if d.images else np.zeros((0, *shape), np.float32)
    keep = np.flatnonzero(d.ok)
    pick = (lambda a: None if a is None else a[keep])
    return RawDataset(listing.source, images, d.stats.labels, listing.class_names, d.stats.ids,
                      d.stats.unreadable, listing.empty_classes, pick(listing.factors), listing.factor_names,
                      pick(listing.poses), listing.pose_layout, pick(listing.object_ids))


def create_image_files(out: Path, counts: dict[str, int], shape: tuple[int, int, int]) -> list[Path]:
    """Empty `{split}_images.npy` files of the final size (np.save's header), to be filled by the jobs."""
    paths = []
    for split, n in counts.items():
        p = Path(out) / f"{split}_images.npy"
        if n == 0:  # an empty file cannot be mapped
            np.save(p, np.zeros((0, *shape), np.uint8), allow_pickle=False)
        else:
            np.lib.format.open_memmap(p, mode="w+", dtype=np.uint8, shape=(n, *shape)).flush()
            reserve(p)
        paths.append(p)
    return paths


def reserve(path: Path) -> None:
    """Give the (sparse) file its disk blocks now. On a full disk this raises ENOSPC here, as an error
    `atomic_dir` reports, instead of a SIGBUS later when a worker writes to a mapped page that has no
    block behind it. Filesystems without fallocate keep the sparse file."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
