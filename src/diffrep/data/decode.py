"""Pixels: decoding, resizing, and the readers `prepare`'s second pass runs chunk by chunk.

A reader knows how to turn its items into float32 (n, C, S, S) images in [0, 1]
(the resize policy of data/sources.py). `reader[a:b]` is a reader of items a..b-1
only, small and picklable, so a chunk can be sent to a worker process: an image
folder's slice is a list of relative paths, a torchvision array's slice its
uint8 rows, shapes' slice its factor rows, an embedded array's slice its rows.
`decode(channels)` returns a `Decoded`; per-image results do not depend on how
the items are chunked (every operation is per image), so the prepared bytes do
not depend on data.chunk_size or data.workers.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N"}
_CHUNK = 256  # images decoded before one batched resize: bounds memory for large photos


# ---------------------------------------------------------------- resizing
def square_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size): centre square crop, antialiased bilinear."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[..., top : top + s, left : left + s]
    if s == size or x.shape[0] == 0:
        return x.contiguous()
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# ---------------------------------------------------------------- PIL decoding
def pil_to_array(img) -> np.ndarray:
    """A PIL image -> float32 (H, W, 1) for greyscale modes, (H, W, 3) otherwise, in [0, 1]."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in GREY_MODES:
        if mode == "1":
            img, mode = img.convert("L"), "L"
        if mode == "LA":
            a = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 2)
            return a[..., :1] * a[..., 1:]  # composite on black
        a = np.asarray(img)
        scale = 255.0 if a.dtype == np.uint8 else 65535.0  # I / I;16 come from 16-bit PNGs
        return (a.astype(np.float32) / scale)[..., None]
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    a = np.asarray(img.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    if has_alpha:
        return a[..., :3] * a[..., 3:]  # composite on black
    return a


class Refused(Exception):
    """A file that decodes but is not used (the message says why)."""


def decode_file(f) -> np.ndarray:
    """One image file -> pil_to_array; raises Refused or PIL's own errors."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit is refused, not warned
        try:
            img = Image.open(f)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Refused(f"decompression bomb refused ({e}); raise PIL.Image.MAX_IMAGE_PIXELS "
                          f"(now {Image.MAX_IMAGE_PIXELS}) only if you trust the file") from None
    with img:
        frames = getattr(img, "n_frames", 1)
        if frames > 1 and img.format != "MPO":
            raise Refused(f"{img.format} with {frames} frames (animated or multi-page): save the frame "
                          "you want as a single image")
        img.load()  # decodes now: a truncated file raises here, not later
        return pil_to_array(img)


def dataset_channels(decoded_channels) -> int:
    """1 if every image is greyscale, else 3 (greyscale images are then repeated)."""
    return 1 if all(c == 1 for c in decoded_channels) else 3


class Resizer:
    """Collects decoded images of any size; resizes them in batches of equal crop size."""

    def __init__(self, size: int):
        self.size = size
        self.pending: list[tuple[int, np.ndarray]] = []
        self.done: dict[int, torch.Tensor] = {}  # position -> (C, S, S)

    def add(self, pos: int, arr: np.ndarray) -> None:
        self.pending.append((pos, arr))
        if len(self.pending) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        groups: dict[tuple[int, int, int], list[tuple[int, np.ndarray]]] = {}
        for pos, a in self.pending:
            s = min(a.shape[:2])
            top, left = (a.shape[0] - s) // 2, (a.shape[1] - s) // 2
            groups.setdefault((s, s, a.shape[2]), []).append((pos, a[top : top + s, left : left + s]))
        for items in groups.values():
            x = torch.from_numpy(np.stack([a for _, a in items])).permute(0, 3, 1, 2)  # (n, C, s, s)
            x = square_resize(x, self.size)
            for (pos, _), xi in zip(items, x):
                self.done[pos] = xi
        self.pending = []

    def stack(self, n: int, channels: int) -> np.ndarray:
        self.flush()
        out = np.empty((n, channels, self.size, self.size), dtype=np.float32)
        for pos, xi in self.done.items():
            out[pos] = xi.expand(channels, -1, -1).numpy()  # grey -> RGB by repetition
        return out


# ---------------------------------------------------------------- readers
@dataclass
class Decoded:
    images: np.ndarray  # float32 (n_ok, C, H, W) in [0, 1] (NaN/Inf kept for validation)
    ok: np.ndarray  # bool (n,): which items decoded; `images` holds those, in order
    failures: list[tuple[int, str]]  # (item index in the slice, why it is unreadable)
    channels: np.ndarray  # int8 (n_ok,): channels each image decoded to, before repetition


def _all_ok(x: np.ndarray) -> Decoded:
    return Decoded(x, np.ones(len(x), bool), [], np.full(len(x), x.shape[1], np.int8))


@dataclass
class ArrayReader:
    """Images already in memory at their final size (the embedded mnist5k / digits arrays)."""

    images: np.ndarray  # float32 (N, C, H, W)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, s: slice) -> "ArrayReader":
        return ArrayReader(self.images[s])

    def decode(self, channels: int) -> Decoded:
        return _all_ok(np.ascontiguousarray(self.images, dtype=np.float32))


@dataclass
class ShapesReader:
    """Factor rows rendered by data/shapes.py (a pure function of each row)."""

    factors: np.ndarray  # float32 (N, 7)
    size: int

    def __len__(self) -> int:
        return len(self.factors)

    def __getitem__(self, s: slice) -> "ShapesReader":
        return replace(self, factors=self.factors[s])

    def decode(self, channels: int) -> Decoded:
        from diffrep.data.shapes import render_factors

        return _all_ok(render_factors(self.factors, self.size)[0])


@dataclass
class FileReader:
    """Image files `root/rel` (an image folder); unreadable ones are reported, not raised."""

    root: str
    rels: list[str]
    size: int

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, s: slice) -> "FileReader":
        return replace(self, rels=self.rels[s])

    def probe(self) -> np.ndarray:
        """int8 channels each file will decode to, read from its header only (0: cannot open)."""
        from PIL import Image

        out = np.zeros(len(self.rels), np.int8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decode_file refuses it by name
            for i, rel in enumerate(self.rels):
                try:
                    with Image.open(os.path.join(self.root, rel)) as img:
                        out[i] = 1 if img.mode in GREY_MODES else 3
                except Exception:  # decoded (and reported) in the second pass
                    pass
        return out

    def decode(self, channels: int) -> Decoded:
        resizer, ok, failures, chans = Resizer(self.size), np.zeros(len(self.rels), bool), [], []
        for i, rel in enumerate(self.rels):
            try:
                arr = decode_file(os.path.join(self.root, rel))
            except Refused as e:
                failures.append((i, str(e)))
                continue
            except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
                failures.append((i, f"cannot decode image: {type(e).__name__}: {e}"))
                continue
            resizer.add(len(chans), arr)
            ok[i] = True
            chans.append(arr.shape[2])
        return Decoded(resizer.stack(len(chans), channels), ok, failures, np.asarray(chans, np.int8))


def _to_nchw(data: np.ndarray, layout: str) -> np.ndarray:
    return {"NHW": lambda a: a[:, None], "NHWC": lambda a: a.transpose(0, 3, 1, 2), "NCHW": lambda a: a}[layout](data)


@dataclass
class TorchvisionArrayReader:
    """uint8 arrays a torchvision dataset keeps in memory (MNIST, CIFAR, SVHN, ...), splits one after another."""

    parts: list[tuple[np.ndarray, str]]  # (data as torchvision stores it, its layout: NHW | NHWC | NCHW)
    size: int

    def __len__(self) -> int:
        return sum(len(d) for d, _ in self.parts)

    def __getitem__(self, s: slice) -> "TorchvisionArrayReader":
        a, b, _ = s.indices(len(self))
        parts, offset = [], 0
        for d, layout in self.parts:
            lo, hi = max(a - offset, 0), min(b - offset, len(d))
            if lo < hi:
                parts.append((d[lo:hi], layout))
            offset += len(d)
        return replace(self, parts=parts)

    def decode(self, channels: int) -> Decoded:
        xs = []
        for d, layout in self.parts:
            x = square_resize(torch.from_numpy(_to_nchw(d, layout)).float().div_(255.0), self.size).numpy()
            xs.append(np.repeat(x, channels // x.shape[1], axis=1))  # a grey split beside an RGB one -> RGB
        x = np.concatenate(xs) if xs else np.zeros((0, channels, self.size, self.size), np.float32)
        return Decoded(x, np.ones(len(x), bool), [], np.full(len(x), channels, np.int8))


_DATASETS: dict[tuple, Any] = {}  # (name, root, split) -> torchvision dataset, one per process


def torchvision_dataset(name: str, root: str, split: str, kwargs: dict):
    key = (name, root, split)
    if key not in _DATASETS:
        import torchvision.datasets as tvd

        ds = getattr(tvd, name)(root, download=False, **kwargs)
        ds.transform = None
        _DATASETS[key] = ds
    return _DATASETS[key]


@dataclass
class TorchvisionItemReader:
    """A torchvision dataset without an array (ImageFolder-like): one PIL image per item, datasets per process."""

    name: str
    root: str
    splits: list[tuple[str, dict, int]]  # (split, constructor kwargs, length), in order
    size: int
    start: int = 0
    stop: int | None = None

    def __len__(self) -> int:
        total = sum(n for *_, n in self.splits)
        return len(range(total)[self.start : self.stop])

    def __getitem__(self, s: slice) -> "TorchvisionItemReader":
        a, b, _ = s.indices(len(self))
        return replace(self, start=self.start + a, stop=self.start + b)

    def decode(self, channels: int) -> Decoded:
        resizer, chans, pos, offset = Resizer(self.size), [], 0, 0
        lo, hi = self.start, self.start + len(self)
        for split, kwargs, n in self.splits:
            ds = torchvision_dataset(self.name, self.root, split, kwargs)
            for i in range(max(lo - offset, 0), min(hi - offset, n)):
                arr = pil_to_array(ds[i][0])
                resizer.add(pos, arr)
                pos += 1
                chans.append(arr.shape[2])
            offset += n
        return Decoded(resizer.stack(pos, channels), np.ones(pos, bool), [], np.asarray(chans, np.int8))
