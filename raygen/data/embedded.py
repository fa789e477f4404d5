"""Embedded datasets that need no download: scikit-learn's bundled handwritten digits, procedurally
generated coloured shapes, and a procedurally generated few-shot set of 96 classes (shape x colour x
texture) whose classes can be split into disjoint train/test classes. All return uint8 HWC images +
int64 labels, the same layout that decoded JPEGs have, so they enter the same Ray Data batch path as
real image data."""
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


FEWSHOT_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "bar")
FEWSHOT_COLOURS = {"red": (225, 45, 40), "green": (45, 185, 65), "blue": (50, 95, 240), "yellow": (235, 205, 35)}
FEWSHOT_TEXTURES = ("solid", "outline", "stripes", "checker")


def fewshot_class_names() -> list[str]:
    """The 96 classes of `fewshot` in label order: `<colour>_<shape>_<texture>` (e.g. red_circle_stripes),
    colour outermost, texture innermost."""
    return [f"{c}_{s}_{t}" for c in FEWSHOT_COLOURS for s in FEWSHOT_SHAPES for t in FEWSHOT_TEXTURES]


def fewshot_labels(per_class: int = 100) -> np.ndarray:
    """The labels of `fewshot(..., per_class)` without drawing any image: class-major, image i is of
    class i // per_class (the same for every resolution and seed)."""
    return np.repeat(np.arange(len(fewshot_class_names()), dtype=np.int64), per_class)


def _shape_sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (in units of the shape's radius, negative inside) to `shape` centred at the
    origin of the shape's own frame; exact inside the shape, which is what the outline needs."""
    if shape == "circle":
        return np.sqrt(u * u + v * v) - 0.95
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.82
    if shape == "diamond":  # a tall rhombus: with the small rotations used it never looks like a square
        a, b = 0.72, 1.05
        return (np.abs(u) / a + np.abs(v) / b - 1.0) / np.hypot(1.0 / a, 1.0 / b)
    if shape == "triangle":  # apex up, the base at v = 0.6
        s3 = np.sqrt(3.0)
        side = (s3 * np.abs(u) - v - 0.8) / 2.0  # the two slanted edges through the apex (0, -0.8)
        return np.maximum(side, v - 0.6)
    if shape == "cross":
        arm, half = 0.4, 1.0
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - half, av - arm), np.maximum(au - arm, av - half))
    if shape == "bar":
        return np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.42)
    raise ValueError(f"unknown fewshot shape {shape!r}")


def _fewshot_class(label: int, resolution: int, n: int, seed: int) -> np.ndarray:
    """`n` images of one class, [n,H,W,3] uint8. Drawn from generators of its own (seed, label), one row
    of parameters (and of background noise) per image, so class c's first k images are the same
    whatever `per_class` is, and whatever the other classes are."""
    names = fewshot_class_names()
    colour_name, shape, texture = names[label].split("_")
    p = np.random.default_rng([seed, label]).random((n, 9))
    noise = np.random.default_rng([seed, label, 1]).integers(0, 14, size=(n, resolution, resolution, 3))
    # supersampling (smooth edges, then a box filter down to the resolution) on a grid of at most 64x64
    ss = min(4, max(1, 64 // resolution))
    size = resolution * ss
    coords = (np.arange(size, dtype=np.float32) + 0.5) / ss  # in output pixels
    y, x = coords[None, :, None], coords[None, None, :]
    r = resolution * (0.27 + 0.09 * p[:, 0])  # radius of the shape, output pixels
    cx = resolution * (0.5 + 0.08 * (2 * p[:, 1] - 1))
    cy = resolution * (0.5 + 0.08 * (2 * p[:, 2] - 1))
    theta = np.deg2rad(16.0 * (2 * p[:, 3] - 1))  # small rotations keep square and diamond apart
    rs, c, s = (a.astype(np.float32)[:, None, None] for a in (r, np.cos(theta), np.sin(theta)))
    dx, dy = x - cx.astype(np.float32)[:, None, None], y - cy.astype(np.float32)[:, None, None]
    u, v = (c * dx + s * dy) / rs, (-s * dx + c * dy) / rs
    sdf = _shape_sdf(shape, u, v) * rs  # output pixels
    # colour: per-channel jitter and an overall brightness change
    base = np.asarray(FEWSHOT_COLOURS[colour_name], np.float32)
    jitter = 22.0 * (2 * p[:, 4:7] - 1) + (0.85 + 0.25 * p[:, 7:8] - 1.0) * base
    colour = np.clip(base + jitter, 0, 255).astype(np.float32)[:, None, None, :]
    band = max(1, resolution // 8)  # texture cell, aligned to the output pixel grid: crisp at any size
    on, level = sdf <= 0, np.float32(1.0)
    if texture == "outline":
        on &= sdf > -np.maximum(1.0, 0.2 * rs)
    elif texture in ("stripes", "checker"):  # the other cells at 30%: the silhouette stays visible
        cell_y, cell_x = np.floor(y / band).astype(np.int64), np.floor(x / band).astype(np.int64)
        pattern = (cell_y % 2 == 0) if texture == "stripes" else ((cell_x + cell_y) % 2 == 0)
        level = np.where(pattern, 1.0, 0.3).astype(np.float32)
    cover = (on * level).reshape(n, resolution, ss, resolution, ss).mean(axis=(2, 4))[..., None]
    bg = (10.0 + 22.0 * p[:, 8]).astype(np.float32)[:, None, None, None] + noise
    out = bg * (1.0 - np.minimum(cover, 1.0)) + colour * cover
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@lru_cache(maxsize=8)
def fewshot(resolution: int = 16, per_class: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The few-shot set: 96 classes = 6 shapes x 4 colours x 4 textures (`fewshot_class_names`), `per_class`
    images each, ordered class-major (labels = `fewshot_labels(per_class)`). Position, size, rotation,
    colour and background are jittered per image, the textures are aligned to the pixel grid so that
    solid, outline, stripes and checker stay apart at 16x16. Deterministic in `seed`.
    ([N,H,W,3] uint8, [N] int64)."""
    if resolution < 4 or per_class < 1:
        raise ValueError(f"fewshot needs resolution >= 4 and per_class >= 1, got {resolution}, {per_class}")
    classes = len(fewshot_class_names())
    out = np.empty((classes * per_class, resolution, resolution, 3), np.uint8)
    for label in range(classes):
        out[label * per_class:(label + 1) * per_class] = _fewshot_class(label, resolution, per_class, seed)
    return out, fewshot_labels(per_class)
