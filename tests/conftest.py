"""Shared fixtures: tiny configs, PNG folders written with PIL, one prepared `digits` root per session."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny tensors: intra-op threads only add OpenMP spin-waits (20-60x slower on a
    busy 2-core machine), and exact-resume checks need the same thread count in both runs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cfg(**data):
    """A full Config whose data section is `data` (other sections default)."""
    from diffrep.config import parse_config

    return parse_config({"seed": 0, "data": data}, "test")


def write_image(path: Path, mode: str = "L", size: tuple[int, int] = (8, 8), seed: int = 0,
                fmt: str | None = None) -> Path:
    """A random (so never duplicate) image of `mode` and (width, height) `size` written by PIL."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode if mode != "P" else "RGB"]
    a = rng.integers(0, 256, size=(size[1], size[0], bands), dtype=np.uint8)
    img = Image.fromarray(a[..., 0] if bands == 1 else a)
    if mode == "P":
        img = img.convert("P")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_imagefolder(root: Path, counts: dict[str, int], mode: str = "L", size=(8, 8)) -> Path:
    """root/<class>/<i>.png with `counts[class]` random images each."""
    seed = 0
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            seed += 1
            write_image(root / cls / f"{i:03d}.png", mode, size, seed)
    return root


@pytest.fixture(scope="session")
def digits_raw():
    """digits at 8x8 (no resize): load once, copy per test (tests mutate it)."""
    from diffrep.data.sources import load_digits

    return load_digits(8)


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory):
    """One successful `prepare` on digits (8x8) shared by the read-only tests: (root, metrics)."""
    from diffrep.stages.prepare import run

    root = tmp_path_factory.mktemp("prepared_digits")
    metrics = run(make_cfg(source="digits", image_size=8), root)
    return root, metrics


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One temporary Prefect server for the whole session (10-30 s to start on 2 cores); yields its API URL."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        mp.setenv("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.5")
        mp.setenv("DVC_NO_ANALYTICS", "1")
        mp.setenv("DVC_SITE_CACHE_DIR", str(tmp_path_factory.mktemp("dvc-site")))
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            yield PREFECT_API_URL.value()
