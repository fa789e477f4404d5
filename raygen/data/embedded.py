"""Embedded datasets that need no download: scikit-learn's bundled handwritten digits and
procedurally generated coloured shapes. Both return uint8 HWC images + int64 labels, the same
layout that decoded JPEGs have, so they enter the same Ray Data batch path as real image data."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # the split is fixed: FID reference statistics depend on it
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (230, 60, 50), "green": (60, 200, 80), "blue": (60, 110, 240)}


@lru_cache(maxsize=8)
def digits(resolution: int = 16, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 real 8x8 digits (values 0..16) upsampled bicubically to `resolution`,
    with a fixed stratified 80/20 train/test split. Returns ([N,H,W,1] uint8, [N] int64)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    labels = d.target.astype(np.int64)
    if split != "all":
        idx_train, idx_test = train_test_split(
            np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED
        )
        idx = np.sort(idx_train if split == "train" else idx_test)
        images, labels = images[idx], labels[idx]
    if resolution != 8:
        images = np.stack(
            [np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BICUBIC)) for im in images]
        )
    return images[..., None], labels


def digits_class_names() -> list[str]:
    return [str(i) for i in range(10)]


def shapes_class_names() -> list[str]:
    return [f"{c}_{s}" for s in SHAPES for c in COLOURS]


@lru_cache(maxsize=8)
def shapes(resolution: int = 32, num_images: int = 4096, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Coloured circles/squares/triangles on a dark noisy background; class = shape x colour (9).
    Position, size and rotation are jittered; deterministic in `seed`. ([N,H,W,3] uint8, [N] int64)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num_images, dtype=np.int64) % len(shapes_class_names())
    rng.shuffle(labels)
    colours = list(COLOURS.values())
    out = np.empty((num_images, resolution, resolution, 3), np.uint8)
    for i, lab in enumerate(labels):
        shape, colour = SHAPES[lab // len(colours)], colours[lab % len(colours)]
        bg = rng.integers(0, 40, size=3)
        im = Image.new("RGB", (resolution, resolution), tuple(int(v) for v in bg))
        draw = ImageDraw.Draw(im)
        r = resolution * rng.uniform(0.2, 0.35)
        cx, cy = rng.uniform(r, resolution - r, size=2)
        jitter = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in colour)
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
        elif shape == "square":
            a = rng.uniform(0, np.pi / 2)
            pts = [(cx + r * np.cos(a + k * np.pi / 2), cy + r * np.sin(a + k * np.pi / 2)) for k in range(4)]
            draw.polygon(pts, fill=jitter)
        else:
            a = rng.uniform(0, 2 * np.pi)
            pts = [(cx + r * np.cos(a + k * 2 * np.pi / 3), cy + r * np.sin(a + k * 2 * np.pi / 3)) for k in range(3)]
            draw.polygon(pts, fill=jitter)
        out[i] = np.asarray(im)
    return out, labels
