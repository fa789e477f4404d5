"""Image datasets as Ray Datasets with one batch path for every source: uint8 HWC `image` + int64
`label` rows, then `to_model_input` (float32 CHW in [-1, 1], optional horizontal flip) in
`map_batches`. The embedded digits/shapes and decoded JPEG folders all go through it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from raygen.config import ConfigError
from raygen.data import embedded


@dataclass
class ImageDataConfig:
    source: Literal["digits", "shapes", "image_folder", "latents"] = "digits"
    resolution: int = 16  # latents: taken from the store
    path: Optional[str] = None  # image_folder: <path>/<class_name>/*.{jpg,png,...}; latents: a store directory
    latent_flips: Literal["both", "plain"] = "both"  # latents with stored flipped copies: stream both or plain only
    num_images: int = 4096  # shapes: how many to generate
    seed: int = 0  # shapes: generator seed

    def validate(self):
        if self.resolution < 4:
            raise ConfigError(f"data.resolution must be >= 4, got {self.resolution}")
        if self.source == "image_folder":
            if not self.path:
                raise ConfigError("data.source=image_folder needs data.path=<dir with one sub-folder per class>")
            if not Path(self.path).is_dir():
                raise ConfigError(f"data.path={self.path!r} is not a directory; point it at a class-folder tree")
        if self.source == "latents" and not self.path:
            raise ConfigError("data.source=latents needs data.path=<store directory>; make one with "
                              "jobs/encode_latents.py")


def resolve_data(cfg: ImageDataConfig) -> ImageDataConfig:
    """`cfg` with the values its data decide (a store's resolution); `cfg` itself is not changed."""
    import dataclasses

    if cfg.source != "latents":
        return cfg
    if not (Path(cfg.path) / "meta.json").is_file():
        raise ConfigError(f"data.path={cfg.path!r} is not a store (no meta.json there); make one with "
                          "jobs/encode_latents.py")
    meta = store_meta(cfg)
    if meta["kind"] != "latents":
        raise ConfigError(f"data.path={cfg.path!r} holds {meta['kind']} embeddings, not VAE latents")
    return dataclasses.replace(cfg, resolution=meta["arrays"]["latent"]["shape"][-1])


def store_meta(cfg: ImageDataConfig) -> dict:
    import json

    return json.loads((Path(cfg.path) / "meta.json").read_text())


def channels(cfg: ImageDataConfig) -> int:
    if cfg.source == "latents":
        return store_meta(cfg)["arrays"]["latent"]["shape"][0]
    return 1 if cfg.source == "digits" else 3


def pixel_source(cfg: ImageDataConfig) -> Optional[ImageDataConfig]:
    """The pixel-space data a latent store was made from, when it is an embedded source (so FID and
    class accuracy work on decoded samples); the config itself for pixel sources."""
    if cfg.source != "latents":
        return cfg
    meta = store_meta(cfg)
    src = meta["source"]["resolved_kind"]
    if src not in ("digits", "shapes"):
        return None
    return ImageDataConfig(source=src, resolution=meta["preprocessing"]["resolution"],
                           num_images=meta["source"]["num_images"], seed=meta["source"]["seed"])


def class_names(cfg: ImageDataConfig) -> list[str]:
    if cfg.source == "latents":
        return store_meta(cfg)["class_names"]
    if cfg.source == "digits":
        return embedded.digits_class_names()
    if cfg.source == "shapes":
        return embedded.shapes_class_names()
    names = sorted(p.name for p in Path(cfg.path).iterdir() if p.is_dir())
    if not names:
        raise ConfigError(f"data.path={cfg.path!r} has no class sub-folders")
    return names


def arrays(cfg: ImageDataConfig, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N,H,W,C] images and int64 labels of an embedded source."""
    if cfg.source == "digits":
        return embedded.digits(cfg.resolution, split)
    if cfg.source == "shapes":
        # the test split is a disjoint draw from the same generator
        seed = cfg.seed if split == "train" else cfg.seed + 1_000_003
        n = cfg.num_images if split == "train" else max(1024, cfg.num_images // 4)
        return embedded.shapes(cfg.resolution, n, seed)
    raise ValueError(f"arrays() covers the embedded sources, not {cfg.source!r}")


def to_model_input(batch: dict) -> dict:
    """uint8 HWC -> float32 CHW in [-1, 1]; grayscale HW gets a channel axis."""
    img = batch["image"]
    if img.ndim == 3:
        img = img[..., None]
    x = img.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return {"image": np.ascontiguousarray(x), "label": batch["label"].astype(np.int64)}


def build_dataset(cfg: ImageDataConfig, split: str = "train"):
    """A Ray Dataset of model-ready {image: float32 [C,H,W], label: int64} rows."""
    import ray.data

    if cfg.source == "latents":
        from raygen.data.store import Store

        store = Store(cfg.path)
        ds = store.dataset(["latent"], flip_copies=cfg.latent_flips)
        ds = ds.map_batches(lambda b: {"image": b["latent"].astype(np.float32), "label": b["label"]},
                            batch_format="numpy")
        # a small store is read once into the object store: each epoch otherwise restarts the read
        # (~1 s here, which is most of an epoch of the digits store); a large one streams from disk
        a = store.meta["arrays"]["latent"]
        nbytes = len(store) * int(np.prod(a["shape"])) * 4 * (2 if cfg.latent_flips == "both" else 1)
        return ds.materialize() if nbytes < 1 << 30 else ds
    if cfg.source == "image_folder":
        names = class_names(cfg)
        index = {n: i for i, n in enumerate(names)}
        ds = ray.data.read_images(cfg.path, size=(cfg.resolution, cfg.resolution), mode="RGB", include_paths=True)
        ds = ds.map_batches(
            lambda b: {"image": b["image"], "label": np.array([index[Path(p).parent.name] for p in b["path"]])},
            batch_format="numpy",
        )
    else:
        images, labels = arrays(cfg, split)
        # few, large blocks: per-block task overhead dominates tiny in-memory datasets
        blocks = max(1, min(8, len(labels) // 2048))
        ds = ray.data.from_items([{"image": im, "label": int(lab)} for im, lab in zip(images, labels)],
                                 override_num_blocks=blocks)
    ds = ds.map_batches(to_model_input, batch_format="numpy")
    # an in-memory source is decoded once and kept in the object store; epochs then only read blocks
    return ds.materialize() if cfg.source != "image_folder" else ds
