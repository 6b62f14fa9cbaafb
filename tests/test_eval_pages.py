"""Evaluation grids are split into pages of at most 64 images, in order."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from learner.driver.evaluation import PAGE_SIZE, save_pages


def test_pages_hold_at_most_64_images_in_order(tmp_path):
    images = torch.arange(130, dtype=torch.uint8).view(130, 1, 1, 1).expand(130, 4, 4, 3).contiguous()
    paths = save_pages(images, tmp_path, "iter-000007")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["iter-000007-p1.png", "iter-000007-p2.png", "iter-000007-p3.png"]
    seen = []
    for path in paths:
        grid = np.asarray(Image.open(path))
        cols = grid.shape[1] // 4
        tiles = [grid[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] for r in range(grid.shape[0] // 4) for c in range(cols)]
        n = min(PAGE_SIZE, 130 - len(seen))
        assert all((t == t[0, 0, 0]).all() for t in tiles[:n])
        seen += [int(t[0, 0, 0]) for t in tiles[:n]]
    assert seen == list(range(130))
    assert np.asarray(Image.open(paths[0])).shape == (32, 32, 3)  # 64 images: 8 x 8 tiles of 4 px


def test_a_single_page_keeps_the_plain_name(tmp_path):
    paths = save_pages(torch.zeros(3, 4, 4, 3, dtype=torch.uint8), tmp_path, "iter-000001")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["iter-000001.png"]
