"""Image datasets as Ray Datasets with one batch path for every source: uint8 HWC `image` + int64
`label` rows, then `to_model_input` (float32 CHW in [-1, 1], optional horizontal flip) in
`map_batches`. The embedded digits/shapes and decoded JPEG folders all go through it; a pixel store
(`jobs/encode_pixels.py`) holds uint8 CHW and only needs the scaling.

Sources:
  digits, shapes   the embedded data sets (train/test splits)
  store            a store directory: a pixel store (training in pixel space) or a latent store
  latents          a latent store (the older spelling of `store`; it refuses a pixel store)
  image_folder     `<path>/<class>/*` decoded on the fly; encode it into a pixel store instead for speed
  files            raw files (EDM zip, image folder, .npy/.nii volumes) that the recipe encodes once into a
                   pixel store before training (the U-Net recipes: raygen.recipes.diffusion)

`validate()` checks the config's own values; what only the files can tell (a store's resolution,
that it exists and holds the right kind) is `resolve_data(cfg)`, which callers run before building
anything from the config.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from raygen.config import ConfigError
from raygen.data import embedded

STORE_SOURCES = ("store", "latents")
TRAINABLE_STORE_KINDS = {"store": ("pixels", "latents"), "latents": ("latents",)}
STORE_ARRAY = {"pixels": "image", "latents": "latent"}  # the array a training row is read from
MAKE_STORE = "make one with jobs/encode_pixels.py (pixels) or jobs/encode_latents.py (latents)"


@dataclass
class ImageDataConfig:
    source: Literal["digits", "shapes", "image_folder", "store", "latents", "files"] = "digits"
    resolution: int = 16  # store/latents: set from the store by resolve_data
    path: Optional[str] = None  # image_folder: <path>/<class_name>/*.{jpg,png,...}; store/latents: a store directory
    latent_flips: Literal["both", "plain"] = "both"  # latents with stored flipped copies: stream both or plain only
    num_images: int = 4096  # shapes: how many to generate
    seed: int = 0  # shapes: generator seed
    # pixel store: size of the evaluation reference, an evenly spaced subset of the store (see `arrays`)
    reference_images: int = 10000

    def validate(self):
        if self.resolution < 4:
            raise ConfigError(f"data.resolution must be >= 4, got {self.resolution}")
        # a key the chosen source ignores is an error naming it and data.source, never silently dropped
        unused = [("data.path", self.path, self.source in ("digits", "shapes") and self.path is not None),
                  ("data.num_images", self.num_images, self.source != "shapes" and self.num_images != 4096),
                  ("data.seed", self.seed, self.source != "shapes" and self.seed != 0)]
        for key, value, bad in unused:
            if bad:
                raise ConfigError(f"{key}={value!r} is not used by data.source={self.source}; drop {key}, or set "
                                  f"data.source to a source that reads it")
        if self.reference_images < 1:
            raise ConfigError(f"data.reference_images must be >= 1, got {self.reference_images}")
        if self.source == "image_folder":
            if not self.path:
                raise ConfigError("data.source=image_folder needs data.path=<dir with one sub-folder per class>")
            # kept from before resolve_data existed (a stat, no read); stores are checked in resolve_data
            if not Path(self.path).is_dir():
                raise ConfigError(f"data.path={self.path!r} is not a directory; point it at a class-folder tree")
        if self.source in STORE_SOURCES and not self.path:
            raise ConfigError(f"data.source={self.source} needs data.path=<store directory with meta.json>; {MAKE_STORE}")


def resolve_data(cfg: ImageDataConfig) -> ImageDataConfig:
    """A new config with what the files decide: for store/latents sources, the store must exist, be
    finished and hold a trainable kind (pixels or latents; latents only for `source: latents`), and
    `resolution` becomes the stored arrays' size. Other sources are returned as a copy. Raises
    ConfigError naming `data.path` and the fix."""
    if cfg.source == "image_folder" and not Path(cfg.path).is_dir():
        raise ConfigError(f"data.path={cfg.path!r} is not a directory; point it at a class-folder tree")
    if cfg.source == "files":
        raise ConfigError("data.source=files (raw files encoded by the recipe) is read by the U-Net recipes (edm, sdd); "
                          f"for this one, encode {cfg.path or 'the files'} with jobs/encode_pixels.py and set "
                          "data.source=store data.path=<store>")
    if cfg.source not in STORE_SOURCES:
        return dataclasses.replace(cfg)
    meta = store_meta(cfg)
    shape = meta["arrays"][STORE_ARRAY[meta["kind"]]]["shape"]
    return dataclasses.replace(cfg, resolution=int(shape[-1]))


def store_meta(cfg: ImageDataConfig) -> dict:
    """The store's meta.json, checked: it exists, is finished, holds items, and its kind trains under
    `data.source` (ConfigError otherwise)."""
    if cfg.source not in STORE_SOURCES:
        raise ValueError(f"data.source={cfg.source} is not a store")
    if not cfg.path:
        raise ConfigError(f"data.source={cfg.source} needs data.path=<store directory with meta.json>; {MAKE_STORE}")
    p = Path(cfg.path)
    if not p.is_dir():
        raise ConfigError(f"data.path={cfg.path!r} is not a directory; point it at a store directory ({MAKE_STORE})")
    meta_file = p / "meta.json"
    if not meta_file.is_file():
        if (p / "shards").is_dir():
            raise ConfigError(f"data.path={cfg.path!r} is an unfinished store (no meta.json yet); run the same "
                              "ingest command again to complete it")
        raise ConfigError(f"data.path={cfg.path!r} has no meta.json, so it is not a store; {MAKE_STORE}")
    try:
        meta = json.loads(meta_file.read_text())
        kind = meta["kind"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"data.path={cfg.path!r}: meta.json cannot be read ({e}); re-run the ingest into a new "
                          "store.path") from None
    allowed = TRAINABLE_STORE_KINDS[cfg.source]
    if kind not in allowed:
        if cfg.source == "latents" and kind == "pixels":
            fix = "set data.source=store to train on a pixel store"
        else:
            fix = f"data.source={cfg.source} trains on {' or '.join(allowed)} stores; {MAKE_STORE}"
        raise ConfigError(f"data.path={cfg.path!r} holds a {kind} store; {fix}")
    if STORE_ARRAY[kind] not in meta.get("arrays", {}):
        raise ConfigError(f"data.path={cfg.path!r} holds no stored items (every item was skipped, see its "
                          "skipped.jsonl); fix the source and ingest it again")
    return meta


def store_kind(cfg: ImageDataConfig) -> Optional[str]:
    """"pixels" or "latents" for store sources (read from meta.json), None for the others."""
    return store_meta(cfg)["kind"] if cfg.source in STORE_SOURCES else None


def is_latent_store(cfg: ImageDataConfig) -> bool:
    return store_kind(cfg) == "latents"


def channels(cfg: ImageDataConfig) -> int:
    if cfg.source in STORE_SOURCES:
        meta = store_meta(cfg)
        return int(meta["arrays"][STORE_ARRAY[meta["kind"]]]["shape"][0])
    return 1 if cfg.source == "digits" else 3


def pixel_source(cfg: ImageDataConfig) -> Optional[ImageDataConfig]:
    """The pixel-space data a latent store was made from, when it is an embedded source (so FID and
    class accuracy work on decoded samples); the config itself for pixel sources, pixel stores
    included (their evaluation reference is `arrays(cfg, "test")`)."""
    if not is_latent_store(cfg):
        return cfg
    meta = store_meta(cfg)
    src = meta["source"]["resolved_kind"]
    if src not in ("digits", "shapes"):
        return None
    return ImageDataConfig(source=src, resolution=meta["preprocessing"]["resolution"],
                           num_images=meta["source"]["num_images"], seed=meta["source"]["seed"])


def class_names(cfg: ImageDataConfig) -> list[str]:
    if cfg.source in STORE_SOURCES:
        return store_meta(cfg)["class_names"]
    if cfg.source == "digits":
        return embedded.digits_class_names()
    if cfg.source == "shapes":
        return embedded.shapes_class_names()
    names = sorted(p.name for p in Path(cfg.path).iterdir() if p.is_dir())
    if not names:
        raise ConfigError(f"data.path={cfg.path!r} has no class sub-folders")
    return names


def reference_positions(n: int, k: int) -> np.ndarray:
    """min(n, k) evenly spaced store positions, always the same ones. Store positions follow the
    listing order (class by class for class folders), so the subset keeps the class proportions."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def store_labels(meta: dict, labels: np.ndarray) -> np.ndarray:
    """Training labels of store rows: an unlabeled store (class_names ["unlabeled"], labels -1) is one
    class, 0, so class-conditional code needs no special case."""
    labels = np.asarray(labels).astype(np.int64)
    return np.zeros_like(labels) if meta["class_names"] == ["unlabeled"] else labels


def arrays(cfg: ImageDataConfig, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N,H,W,C] images and int64 labels of an embedded source or a pixel store.

    A pixel store has no split of its own: `train` is the whole store, `test` (the evaluation
    reference) is `reference_positions(len, data.reference_images)` of the same store, i.e. FID is
    measured against training images, as EDM (arXiv:2206.00364) measures against its training-set
    statistics. For a held-out reference, encode the held-out split into a second store and evaluate
    with data.path pointing at it."""
    if cfg.source in STORE_SOURCES:
        from raygen.data.store import Store

        meta = store_meta(cfg)
        if meta["kind"] != "pixels":
            raise ValueError("arrays() reads pixels; a latent store's pixel data is pixel_source(cfg)")
        store = Store(cfg.path)
        pos = np.arange(len(store)) if split == "train" else reference_positions(len(store), cfg.reference_images)
        images = store.array("image")[pos]
        return np.ascontiguousarray(images.transpose(0, 2, 3, 1)), store_labels(meta, store.labels[pos])
    if cfg.source == "digits":
        return embedded.digits(cfg.resolution, split)
    if cfg.source == "shapes":
        # the test split is a disjoint draw from the same generator
        seed = cfg.seed if split == "train" else cfg.seed + 1_000_003
        n = cfg.num_images if split == "train" else max(1024, cfg.num_images // 4)
        return embedded.shapes(cfg.resolution, n, seed)
    raise ValueError(f"arrays() covers the embedded sources and pixel stores, not {cfg.source!r}")


def to_model_input(batch: dict) -> dict:
    """uint8 HWC -> float32 CHW in [-1, 1]; grayscale HW gets a channel axis."""
    img = batch["image"]
    if img.ndim == 3:
        img = img[..., None]
    x = img.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return {"image": np.ascontiguousarray(x), "label": batch["label"].astype(np.int64)}


def pixel_store_input(batch: dict) -> dict:
    """A pixel store's uint8 CHW -> float32 CHW in [-1, 1] (the same scaling as `to_model_input`)."""
    x = batch["image"].astype(np.float32) / 127.5 - 1.0
    return {"image": np.ascontiguousarray(x), "label": batch["label"].astype(np.int64)}


def unlabeled_to_zero(batch: dict) -> dict:
    return {**batch, "label": np.zeros_like(batch["label"])}


def build_dataset(cfg: ImageDataConfig, split: str = "train"):
    """A Ray Dataset of model-ready {image: float32 [C,H,W], label: int64} rows. Stores stream every
    stored item whatever `split` says (a store is one split; see `arrays` for evaluation)."""
    import ray.data

    if cfg.source in STORE_SOURCES:
        from raygen.data.store import Store

        meta = store_meta(cfg)
        store = Store(cfg.path)
        if meta["kind"] == "pixels":
            ds = store.dataset(["image"], flip_copies="plain").map_batches(pixel_store_input, batch_format="numpy")
            copies = 1
        else:
            ds = store.dataset(["latent"], flip_copies=cfg.latent_flips)
            ds = ds.map_batches(lambda b: {"image": b["latent"].astype(np.float32), "label": b["label"]},
                                batch_format="numpy")
            copies = 2 if cfg.latent_flips == "both" else 1
        if meta["class_names"] == ["unlabeled"]:
            ds = ds.map_batches(unlabeled_to_zero, batch_format="numpy")
        # a small store is read once into the object store: each epoch otherwise restarts the read
        # (~1 s here, which is most of an epoch of the digits store); a large one streams from disk
        a = meta["arrays"][STORE_ARRAY[meta["kind"]]]
        nbytes = len(store) * int(np.prod(a["shape"])) * 4 * copies
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
        # converted here, in the driver, and handed to Ray as ready blocks: they live in the driver's
        # object store, never only on a worker node whose loss would leave them to be recomputed by a
        # task that a restarted worker group (holding every CPU) never lets run. Few, large blocks:
        # per-block overhead dominates tiny in-memory datasets.
        blocks = max(1, min(8, len(labels) // 2048))
        x = to_model_input({"image": images, "label": labels})
        return ray.data.from_items([{"image": im, "label": int(lab)} for im, lab in zip(x["image"], x["label"])],
                                   override_num_blocks=blocks)
    return ds.map_batches(to_model_input, batch_format="numpy")  # image folders stream from disk
