"""Sample grids as PNG files.

`to_uint8` is the single [-1, 1] -> [0, 255] quantization used by both the grids and the FID
extractors, so FID measures exactly the pixels a saved sample holds.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raygen.core.files import atomic_write

PAD_VALUE = 255  # white separators stay visible between dark backgrounds (e.g. MNIST digits)


def to_uint8(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 in [0, 255], rounded to nearest and clamped (out-of-range samples saturate)."""
    x = torch.as_tensor(images).detach().float()
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_grid(
    images: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    nrow: int | None = None,
    pad: int = 1,
    upscale: int = 1,
) -> Path:
    """Tile N images [N, C, H, W] (C = 1 or 3, values in [-1, 1]) into one PNG and return its path.

    `nrow` images per row (default ceil(sqrt(N)), at most N); with `ncol = min(nrow, N)` and
    `rows = ceil(N / ncol)` the PNG is `ncol * (W * upscale + pad) + pad` pixels wide and
    `rows * (H * upscale + pad) + pad` high, with `pad` white pixels between and around tiles.
    `upscale` repeats pixels (nearest neighbour) so 16x16 samples are legible without blurring them.
    Grayscale stays a single-channel 'L' PNG.
    """
    u8 = to_uint8(images).cpu().numpy()
    if u8.ndim != 4 or u8.shape[1] not in (1, 3) or len(u8) == 0:
        raise ValueError(f"save_grid expects [N>0, C in (1, 3), H, W] images, got shape {tuple(u8.shape)}")
    if upscale < 1 or pad < 0:
        raise ValueError(f"need upscale >= 1 and pad >= 0, got upscale={upscale}, pad={pad}")
    u8 = u8.repeat(upscale, axis=2).repeat(upscale, axis=3)
    n, c, h, w = u8.shape
    ncol = min(nrow or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), PAD_VALUE, np.uint8)
    for i, img in enumerate(u8):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = img.transpose(1, 2, 0)
    with atomic_write(path) as f:
        Image.fromarray(grid[..., 0] if c == 1 else grid).save(f, format="PNG")
    return Path(path)
