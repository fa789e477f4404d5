"""Image sources: what a dataset contains (a *listing*) and how to read one item of it.

A listing is the deterministic, sorted list of items a source contains, made on the driver before
anything is decoded: keys (stable ids shown to users), int64 labels (-1 = unlabeled), class names,
and every problem met while listing (nothing is silently ignored). Decoding one item happens later,
in worker processes, through an `ItemReader` built from the listing's JSON-serialisable `info`.

Kinds:
  class_folders  `<path>/[<split>/]<class>/<files>` (ImageNet layout), labels = sorted class folders
  folder         any tree of files; labels from an EDM `dataset.json`, from top-level subfolders, or none
  zip            the same as folder, inside one .zip file (members are keys)
  npy            a .npy/.npz/.nii/.nii.gz file or a directory of them (NIfTI read with nibabel): image
                 stacks or volumes sliced into images, through one intensity window for the whole source
  digits/shapes  the embedded data sets of `raygen.data.embedded`
  fewshot        the embedded few-shot set (96 classes, `source.per_class` images each, class-major)

Key formats: files `rel/path.jpg` (relative to `source.path`, posix separators); zip members by
name; npy `file.npy#<i>` (image i, or slice i of a single volume) and `file.npy#<n>/<s>` (slice s
of volume n of a 4-D stack); NIfTI `file.nii.gz#<s>` (slice s) and `file.nii.gz#<t>/<s>` (slice s of
volume t of a 4-D time series); embedded `digits/<split>/<index:06d>`, `shapes/<split>/<index:06d>`,
`fewshot/all/<index:06d>` (one split: its classes are divided later, by `raygen.data.episodes`).

Modules: `common` (Listing, problems, decoding), `folders` (class_folders, folder), `edm_zip` (zip,
dataset.json labels), `arrays` (npy), `nifti` (its NIfTI files), `embedded_kind` (digits, shapes,
fewshot). This module holds the config, the kind resolution, `list_source` and `ItemReader`, which
dispatch to them.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from PIL import Image

from raygen.config import ConfigError
from raygen.data.sources.arrays import VOLUME_EXTENSIONS, array_suffix, list_npy, only_volume_files, read_npy
from raygen.data.sources.common import (
    DEFAULT_MAX_PIXELS,
    ARRAY_EXTENSIONS,
    IMAGE_EXTENSIONS,
    PATH_KINDS,
    Listing,
    Problems,
    is_hidden,
    path_hint,
)
from raygen.data.sources.edm_zip import list_zip, read_zip
from raygen.data.sources.embedded_kind import (
    EMBEDDED_KINDS,
    SHAPES_TEST_SEED_OFFSET,
    embedded_arrays,
    embedded_class_names,
    list_embedded,
    read_embedded,
)
from raygen.data.sources.folders import list_class_folders, list_folder, read_file

__all__ = [
    "ARRAY_EXTENSIONS",
    "EMBEDDED_KINDS",
    "IMAGE_EXTENSIONS",
    "PATH_KINDS",
    "SHAPES_TEST_SEED_OFFSET",
    "VOLUME_EXTENSIONS",
    "ItemReader",
    "Listing",
    "SourceConfig",
    "export_embedded",
    "list_source",
    "resolve_kind",
    "write_image_folder",
]


@dataclass
class SourceConfig:
    kind: Literal["auto", "class_folders", "folder", "zip", "npy", "digits", "shapes", "fewshot"] = "digits"
    path: Optional[str] = None
    # class_folders: images in <path>/<split>/<class>/* (None: <path>/<class>/*); digits/shapes: train|test;
    # fewshot: null or all (its classes are split into train/val/test by prepare_fewshot, not here)
    split: Optional[str] = None
    # folder/zip: auto = dataset.json if present, else subfolders if there are any, else none
    labels: Literal["auto", "dataset_json", "subfolders", "none"] = "auto"
    # npy: volumes are sliced along this axis of each volume, [D,H,W] for NPY, [X,Y,Z] as stored for
    # NIfTI (2 is usually axial there); see arrays.list_npy
    npy_axis: int = 0
    # npy: fixed [lo, hi] window mapped to [0, 1] (NIfTI: in scaled units, e.g. HU); None = global
    # min/max over the whole source. Never per slice.
    intensity: Optional[list[float]] = None
    resolution: int = 32  # digits/shapes/fewshot: generated size
    num_images: int = 4096  # shapes
    per_class: int = 100  # fewshot: images of each of its 96 classes
    seed: int = 0  # shapes/fewshot
    # images with more pixels are skipped with that reason, from the header, before decoding (a guard
    # against decompression bombs and accidental giant scans); null: no limit
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS

    def validate(self):
        self.check_unused()
        kind = resolve_kind(self)  # checks path for the path-based kinds (and auto)
        if kind in PATH_KINDS:
            _validate_path(kind, self)
        if kind in EMBEDDED_KINDS:
            if kind == "fewshot" and self.split not in (None, "all"):
                raise ConfigError(f"source.split={self.split!r}: source.kind=fewshot has one split (all); its classes "
                                  "are divided into train/val/test by jobs/prepare_fewshot.py (split=60/16/20); "
                                  "drop source.split")
            if kind != "fewshot" and self.split not in (None, "train", "test"):
                raise ConfigError(f"source.split must be train or test for source.kind={kind}, got {self.split!r}")
            if self.resolution < 4:
                raise ConfigError(f"source.resolution must be >= 4, got {self.resolution}")
            if kind == "shapes" and self.num_images < 1:
                raise ConfigError(f"source.num_images must be >= 1, got {self.num_images}")
            if kind == "fewshot" and self.per_class < 1:
                raise ConfigError(f"source.per_class must be >= 1, got {self.per_class}")
        if self.labels == "dataset_json" and kind not in ("folder", "zip"):
            raise ConfigError(
                f"source.labels=dataset_json only applies to folder/zip sources, not {kind}; use source.labels=auto"
            )
        if not -3 <= self.npy_axis <= 2:
            raise ConfigError(f"source.npy_axis must be an axis of a [D,H,W] NPY volume or an [X,Y,Z] NIfTI volume "
                              f"(-3..2; 2 is usually axial in NIfTI), got {self.npy_axis}")
        if self.intensity is not None and (len(self.intensity) != 2 or not self.intensity[0] < self.intensity[1]):
            raise ConfigError(
                f"source.intensity must be [lo, hi] with lo < hi (e.g. source.intensity=[-1000,1000]) "
                f"or null for the global min/max, got {self.intensity}"
            )


def unused_key_error(key: str, value, selector: str, selected: str, uses: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not used by {selector}={selected} ({uses}); drop {key}, or set "
                       f"{selector} to a kind that reads it")


def _check_unused(cfg: SourceConfig) -> None:
    """A key the chosen kind ignores is an error naming it and `source.kind`, never silently dropped
    (a non-default value is taken as set: the defaults are what every kind accepts)."""
    kind = cfg.kind
    embedded = kind in EMBEDDED_KINDS
    uses = {"digits": "the embedded digits", "shapes": "generated shapes",
            "fewshot": "the generated few-shot set"}.get(kind, f"{kind} files")
    checks = [
        ("source.path", cfg.path, embedded and cfg.path is not None),
        ("source.intensity", cfg.intensity, kind not in ("npy", "auto") and cfg.intensity is not None),
        ("source.npy_axis", cfg.npy_axis, kind not in ("npy", "auto") and cfg.npy_axis != 0),
        ("source.labels", cfg.labels, kind in ("class_folders", *EMBEDDED_KINDS) and cfg.labels != "auto"),
        ("source.num_images", cfg.num_images, kind != "shapes" and cfg.num_images != 4096),
        ("source.per_class", cfg.per_class, kind != "fewshot" and cfg.per_class != 100),
        ("source.seed", cfg.seed, kind not in ("shapes", "fewshot") and cfg.seed != 0),
        ("source.resolution", cfg.resolution, not embedded and cfg.resolution != 32),
    ]
    for key, value, unused in checks:
        if unused:
            raise unused_key_error(key, value, "source.kind", kind, uses)


SourceConfig.check_unused = _check_unused


def _validate_path(kind: str, cfg: SourceConfig):
    p = Path(cfg.path)
    layouts = {
        "class_folders": "a directory <path>/[<split>/]<class>/<images>",
        "folder": "a directory of images (optionally with dataset.json or class subfolders)",
        "zip": "a .zip file of images",
        "npy": "a .npy/.npz/.nii/.nii.gz file or a directory of them",
    }
    expect = f"source.kind={kind} expects {layouts[kind]}"
    if kind in ("class_folders", "folder") and not p.is_dir():
        raise ConfigError(f"source.path={cfg.path!r} is not a directory; {expect}")
    if kind == "zip" and not (p.is_file() and zipfile.is_zipfile(p)):
        raise ConfigError(f"source.path={cfg.path!r} is not a readable zip file; {expect}")
    if kind == "npy" and not (p.is_dir() or (p.is_file() and array_suffix(p.name) in VOLUME_EXTENSIONS)):
        raise ConfigError(f"source.path={cfg.path!r} is not a .npy/.npz/.nii/.nii.gz file or a directory; {expect}")
    if kind == "class_folders" and cfg.split is not None and not (p / cfg.split).is_dir():
        raise ConfigError(
            f"source.split={cfg.split!r}: {p / cfg.split} is not a directory; "
            f"set source.split to a sub-folder of source.path (e.g. train) or to null"
        )


def resolve_kind(cfg: SourceConfig) -> str:
    """The concrete kind for `source.kind=auto` (other kinds pass through):
    a .zip file -> zip; a .npy/.npz/.nii/.nii.gz file or a directory holding only such files -> npy;
    a directory whose (split) sub-directory holds only directories -> class_folders; else folder."""
    if cfg.kind != "auto":
        if cfg.kind in PATH_KINDS and not cfg.path:
            raise ConfigError(f"source.kind={cfg.kind} needs source.path=<{path_hint(cfg.kind)}>")
        if cfg.kind in PATH_KINDS and not Path(cfg.path).exists():
            raise ConfigError(f"source.path={cfg.path!r} does not exist; point it at {path_hint(cfg.kind)}")
        return cfg.kind
    if not cfg.path:
        raise ConfigError(
            "source.kind=auto needs source.path=<image folder, class-folder tree, .zip, .npy/.npz/.nii/.nii.gz>; "
            "or set source.kind=digits|shapes|fewshot for the embedded data"
        )
    p = Path(cfg.path)
    if not p.exists():
        raise ConfigError(f"source.path={cfg.path!r} does not exist; point it at an image folder, .zip, "
                          ".npy/.npz or NIfTI .nii/.nii.gz")
    if p.is_file():
        suffix = array_suffix(p.name)
        if suffix == ".zip":
            return "zip"
        if suffix in VOLUME_EXTENSIONS:
            return "npy"
        raise ConfigError(
            f"source.path={cfg.path!r} is a file but not .zip/.npy/.npz/.nii/.nii.gz ({suffix or 'no extension'}); "
            "source.kind=auto takes a directory, a .zip, a .npy/.npz file or a NIfTI volume"
        )
    if only_volume_files(p):
        return "npy"
    base = p / cfg.split if cfg.split else p
    if not base.is_dir():
        raise ConfigError(f"source.split={cfg.split!r}: {base} is not a directory; set source.split to a sub-folder or null")
    try:
        entries = [e for e in os.scandir(base) if not is_hidden(e.name)]
    except OSError as e:
        raise ConfigError(f"source.path={cfg.path!r} cannot be read ({e}); fix its permissions") from e
    if entries and all(e.is_dir() or (e.is_symlink() and not os.path.exists(e.path)) for e in entries):
        return "class_folders"
    return "folder"


# --------------------------------------------------------------------------- entry point


def list_source(cfg: SourceConfig, on_error: str = "skip") -> Listing:
    """The sorted listing of `cfg`. Listing-time problems (empty class folders, unreadable
    directories, dataset.json mismatches, hidden files, ...) are recorded in `problems` with
    on_error="skip", or raised as ConfigError naming the path and the fix with on_error="fail".
    A source without a single item is always a ConfigError."""
    problems = Problems(on_error)
    cfg.validate()
    kind = resolve_kind(cfg)
    if kind == "class_folders":
        listing = list_class_folders(cfg, problems)
    elif kind == "folder":
        listing = list_folder(cfg, problems)
    elif kind == "zip":
        listing = list_zip(cfg, problems)
    elif kind == "npy":
        listing = list_npy(cfg, problems)
    else:
        listing = list_embedded(cfg, kind)
    listing.problems = problems.items
    if not listing.keys:
        shown = "; ".join(f"{p['path']}: {p['reason']}" for p in problems.items[:5])
        raise ConfigError(
            f"source.path={cfg.path!r} (source.kind={kind}) has no usable items"
            + (f" ({shown})" if shown else "")
            + f"; check source.path and the layout it expects ({path_hint(kind) if kind in PATH_KINDS else kind})"
        )
    return listing


class ItemReader:
    """Reads one item of a listing by key. Cheap to construct and to pickle (it carries only the
    listing's info); open zip files, memory maps and embedded arrays are cached lazily per process."""

    def __init__(self, listing_kind: str, info: dict, cfg: SourceConfig):
        self.kind = listing_kind
        self.info = info
        self.cfg = cfg
        self._cache: dict = {}
        self._pid = os.getpid()

    def __getstate__(self):
        return {"kind": self.kind, "info": self.info, "cfg": self.cfg}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache, self._pid = {}, os.getpid()

    def _cached(self, key, make):
        if self._pid != os.getpid():  # forked: file handles are not shareable
            self._cache, self._pid = {}, os.getpid()
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def read(self, key: str) -> Image.Image:
        if self.kind in ("class_folders", "folder"):
            return read_file({**self.info, "max_pixels": self.cfg.max_pixels}, key)
        if self.kind == "zip":
            return read_zip({**self.info, "max_pixels": self.cfg.max_pixels}, key, self._cached)
        if self.kind == "npy":
            return read_npy(self.info, key, self._cached)
        if self.kind in EMBEDDED_KINDS:
            return read_embedded(self.info, key)
        raise ValueError(f"unknown listing kind {self.kind!r}")


# --------------------------------------------------------------------------- writing


def write_image_folder(images: np.ndarray, labels, class_names, out_dir, fmt: str = "jpeg", quality: int = 95,
                       split: Optional[str] = None) -> Path:
    """Write uint8 [N,H,W,C] images as an ImageNet-style tree
    `<out_dir>/[<split>/]<class>/<class>_<index:06d>.jpg` and return out_dir (the
    class_folders root). Every class gets a folder, even without images, so that the sorted folder
    order gives labels; note the listing orders classes by name, not by `class_names` order."""
    ext = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png"}.get(fmt.lower())
    if ext is None:
        raise ValueError(f"fmt must be jpeg or png, got {fmt!r}")
    out = Path(out_dir)
    base = out / split if split else out
    for name in class_names:
        if "/" in name or name.startswith(".") or not name:
            raise ValueError(f"class name {name!r} cannot be a folder name")
        (base / name).mkdir(parents=True, exist_ok=True)
    images = np.asarray(images)
    for i, (im, lab) in enumerate(zip(images, np.asarray(labels))):
        name = class_names[int(lab)]
        pil = Image.fromarray(im[..., 0] if im.ndim == 3 and im.shape[-1] == 1 else im)
        kwargs = {"quality": quality} if ext == ".jpg" else {}
        pil.save(base / name / f"{name}_{i:06d}{ext}", **kwargs)
    return out


def export_embedded(argv=None) -> Path:
    """`python -m raygen.data.sources digits|shapes|fewshot OUT [--resolution R] [--split S] [--num N]
    [--per-class K]`: write an embedded data set as an ImageNet-style JPEG tree (`OUT/<split>/<class>/*.jpg`),
    to try the file path of every tool without downloading anything. fewshot has one split: all of its
    images go under `OUT/<split>/` (a folder name only)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m raygen.data.sources", description=export_embedded.__doc__)
    p.add_argument("source", choices=EMBEDDED_KINDS)
    p.add_argument("out")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--num", type=int, default=4096, help="shapes: how many")
    p.add_argument("--per-class", type=int, default=100, help="fewshot: images per class")
    p.add_argument("--format", default="jpeg", choices=("jpeg", "png"))
    a = p.parse_args(argv)
    split = "all" if a.source == "fewshot" else a.split
    images, labels = embedded_arrays(a.source, split, a.resolution, a.num, 0, a.per_class)
    names = embedded_class_names(a.source)
    out = write_image_folder(images, labels, names, a.out, fmt=a.format, split=a.split)
    print(f"wrote {len(labels)} images to {Path(out) / a.split}")
    return out
