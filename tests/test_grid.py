"""eval/grid.py: the tile layout (white padding, row-major, a short last row keeps its width) and the PNG."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffrep.eval.grid import interleave, save_grid, tile

W = 255  # padding and empty slots


def grey(*values: float) -> torch.Tensor:
    """1x1 grey images with these uint8 levels, as (N, 1, 1, 1) in [-1, 1]."""
    return (torch.tensor(values, dtype=torch.float32) / 127.5 - 1).view(-1, 1, 1, 1)


def test_tile_is_row_major_with_white_padding_and_a_full_width_last_row():
    out = tile(grey(0, 10, 20), ncol=2, pad=1)
    assert out.shape == (5, 5, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], [[W, W, W, W, W],
                                                [W, 0, W, 10, W],
                                                [W, W, W, W, W],
                                                [W, 20, W, W, W],
                                                [W, W, W, W, W]])


def test_tile_fewer_images_than_columns_and_a_lone_image():
    assert tile(grey(40), ncol=3, pad=1)[..., 0].tolist() == [[W] * 7, [W, 40, W, W, W, W, W], [W] * 7]
    assert tile(grey(40), ncol=1, pad=2)[..., 0].tolist() == [[W] * 5] * 2 + [[W, W, 40, W, W]] + [[W] * 5] * 2


def test_tile_upscales_and_keeps_colour_channels():
    x = torch.stack([torch.full((2, 2), v) for v in (-1.0, 0.0, 1.0)])[None]  # one RGB image (1, 3, 2, 2)
    out = tile(x, ncol=1, pad=0, upscale=3)
    assert out.shape == (6, 6, 3)
    assert (out[..., 0] == 0).all() and (out[..., 1] == 128).all() and (out[..., 2] == 255).all()
    with pytest.raises(ValueError, match="ncol"):
        tile(x, ncol=0)


def test_save_grid_writes_the_tiled_png(tmp_path):
    path = save_grid(tmp_path / "g.png", grey(0, 10, 20), ncol=2, upscale=1)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), tile(grey(0, 10, 20), ncol=2)[..., 0])
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temp file left behind


def test_interleave_orders_row_by_row():
    a, b = torch.arange(3.0).view(3, 1, 1, 1), 10 + torch.arange(3.0).view(3, 1, 1, 1)
    assert interleave(a, b).flatten().tolist() == [0, 10, 1, 11, 2, 12]
