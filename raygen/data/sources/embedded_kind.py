"""The `digits` and `shapes` kinds: the embedded data sets of `raygen.data.embedded` as a listing
(keys `digits/<split>/<index:06d>`, `shapes/<split>/<index:06d>`) and their items as PIL images."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from raygen.data import embedded
from raygen.data.sources.common import Listing

if TYPE_CHECKING:
    from raygen.data.sources import SourceConfig

__all__ = ["SHAPES_TEST_SEED_OFFSET", "embedded_arrays", "list_embedded", "read_embedded"]

SHAPES_TEST_SEED_OFFSET = 1_000_003  # as raygen.data.images: the test split is a disjoint draw


def list_embedded(cfg: SourceConfig, kind: str) -> Listing:
    split = cfg.split or "train"
    images, labels = embedded_arrays(kind, split, cfg.resolution, cfg.num_images, cfg.seed)
    names = embedded.digits_class_names() if kind == "digits" else embedded.shapes_class_names()
    keys = [f"{kind}/{split}/{i:06d}" for i in range(len(labels))]
    info = {"split": split, "resolution": cfg.resolution, "num_images": cfg.num_images, "seed": cfg.seed}
    return Listing(kind, keys, labels.astype(np.int64), names, info=info)


def embedded_arrays(kind: str, split: str, resolution: int, num_images: int, seed: int):
    if kind == "digits":
        return embedded.digits(resolution, split)
    if split == "test":
        return embedded.shapes(resolution, max(1024, num_images // 4), seed + SHAPES_TEST_SEED_OFFSET)
    return embedded.shapes(resolution, num_images, seed)


def read_embedded(info: dict, key: str) -> Image.Image:
    kind, split, index = key.split("/")
    images, _ = embedded_arrays(kind, split, info["resolution"], info["num_images"], info["seed"])
    im = images[int(index)]
    return Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
