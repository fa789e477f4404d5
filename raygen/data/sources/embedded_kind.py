"""The `digits`, `shapes` and `fewshot` kinds: the embedded data sets of `raygen.data.embedded` as a
listing (keys `digits/<split>/<index:06d>`, `shapes/<split>/<index:06d>`, `fewshot/all/<index:06d>`)
and their items as PIL images."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from raygen.data import embedded
from raygen.data.sources.common import Listing

if TYPE_CHECKING:
    from raygen.data.sources import SourceConfig

__all__ = ["EMBEDDED_KINDS", "SHAPES_TEST_SEED_OFFSET", "embedded_arrays", "embedded_class_names", "list_embedded",
           "read_embedded"]

EMBEDDED_KINDS = ("digits", "shapes", "fewshot")
SHAPES_TEST_SEED_OFFSET = 1_000_003  # as raygen.data.images: the test split is a disjoint draw
FEWSHOT_PER_CLASS = 100  # SourceConfig.per_class's default: listings made without the key read as before


def embedded_class_names(kind: str) -> list[str]:
    return {"digits": embedded.digits_class_names, "shapes": embedded.shapes_class_names,
            "fewshot": embedded.fewshot_class_names}[kind]()


def list_embedded(cfg: SourceConfig, kind: str) -> Listing:
    names = embedded_class_names(kind)
    if kind == "fewshot":  # the labels are known without drawing a single image
        split = "all"
        labels = embedded.fewshot_labels(cfg.per_class)
        info = {"split": split, "resolution": cfg.resolution, "per_class": cfg.per_class, "seed": cfg.seed}
    else:
        split = cfg.split or "train"
        _, labels = embedded_arrays(kind, split, cfg.resolution, cfg.num_images, cfg.seed)
        info = {"split": split, "resolution": cfg.resolution, "num_images": cfg.num_images, "seed": cfg.seed}
    keys = [f"{kind}/{split}/{i:06d}" for i in range(len(labels))]
    return Listing(kind, keys, labels.astype(np.int64), names, info=info)


def embedded_arrays(kind: str, split: str, resolution: int, num_images: int, seed: int,
                    per_class: int = FEWSHOT_PER_CLASS):
    if kind == "digits":
        return embedded.digits(resolution, split)
    if kind == "fewshot":
        return embedded.fewshot(resolution, per_class, seed)
    if split == "test":
        return embedded.shapes(resolution, max(1024, num_images // 4), seed + SHAPES_TEST_SEED_OFFSET)
    return embedded.shapes(resolution, num_images, seed)


def read_embedded(info: dict, key: str) -> Image.Image:
    kind, split, index = key.split("/")
    images, _ = embedded_arrays(kind, split, info["resolution"], info.get("num_images", 0), info["seed"],
                                info.get("per_class", FEWSHOT_PER_CLASS))
    im = images[int(index)]
    return Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
