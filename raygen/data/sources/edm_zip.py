"""EDM-style data sets (arXiv:2206.00364, its `dataset_tool.py` output): a `.zip` of images, or the
same tree as a folder, optionally with a `dataset.json` whose `labels` list pairs every member with
its class. The `zip` kind lists and reads the archive's members (member names are the keys); the
dataset.json labelling rule is shared with the `folder` kind."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

from raygen.config import ConfigError
from raygen.data.sources.common import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    Listing,
    Problems,
    Tree,
    by_subfolder,
    decode_image,
    is_hidden,
    unlabeled,
)
from raygen.data.transforms import ItemError

if TYPE_CHECKING:
    from raygen.data.sources import SourceConfig

__all__ = ["by_dataset_json", "label_tree", "list_zip", "read_zip", "scan_zip"]


def scan_zip(zf: zipfile.ZipFile, problems: Problems) -> Tree:
    tree = Tree([], [], set())
    tops = set()
    for zi in zf.infolist():
        name = zi.filename
        parts = [p for p in name.split("/") if p]
        if not parts:
            continue
        if any(is_hidden(p) for p in parts):
            if not zi.is_dir():
                problems.add(name, "hidden file")
            continue
        if zi.is_dir() or len(parts) > 1:
            tops.add(parts[0])
        if not zi.is_dir():
            tree.files.append(name)
    tree.top_dirs = sorted(tops)
    tree.files.sort()
    return tree



def by_dataset_json(tree: Tree, text: bytes | str, problems: Problems, where: str):
    """EDM's dataset.json: {"labels": [[relpath, label or null], ...]} or {"labels": null}."""
    fix = "fix dataset.json or set source.labels=subfolders|none"
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{where}: dataset.json is not valid JSON ({e}); {fix}") from e
    if not isinstance(doc, dict) or "labels" not in doc:
        raise ConfigError(f'{where}: dataset.json has no "labels" key (EDM format {{"labels": [[path, label], ...]}}); {fix}')
    entries = doc["labels"]
    if entries is None:
        return unlabeled(tree.files)
    if not isinstance(entries, list):
        raise ConfigError(f'{where}: dataset.json "labels" must be a list of [path, label] pairs or null; {fix}')
    present = set(tree.files)
    listed: dict[str, int] = {}
    for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ConfigError(f"{where}: dataset.json entry {entry!r} is not a [path, label] pair; {fix}")
        rel, label = entry[0].replace("\\", "/").removeprefix("./"), entry[1]
        if label is None:
            label = -1
        elif isinstance(label, bool) or not isinstance(label, int) or label < 0:
            problems.add(rel, f"dataset.json label must be an integer >= 0 or null, got {label!r}")
            continue
        if rel in listed:
            problems.add(rel, "listed twice in dataset.json")
        elif rel not in present:
            problems.add(rel, "listed in dataset.json but missing")
        else:
            listed[rel] = label
    for f in tree.files:
        if f not in listed:
            problems.add(f, "not listed in dataset.json")
    keys = sorted(listed)
    labels = np.array([listed[k] for k in keys], np.int64)
    top = int(labels.max()) if len(labels) else -1
    class_names = [str(i) for i in range(top + 1)] if top >= 0 else ["unlabeled"]
    return keys, labels, class_names


def label_tree(cfg: SourceConfig, tree: Tree, problems: Problems, dataset_json, where: str):
    """folder/zip labels: dataset.json, subfolders or none (auto picks in that order)."""
    tree.files = [f for f in tree.files if f != "dataset.json"]
    mode = cfg.labels
    if mode == "auto":
        mode = "dataset_json" if dataset_json is not None else ("subfolders" if tree.top_dirs else "none")
    if mode == "dataset_json":
        if dataset_json is None:
            raise ConfigError(f"source.labels=dataset_json but {where} has no dataset.json; set source.labels=auto")
        return by_dataset_json(tree, dataset_json, problems, where)
    if mode == "subfolders":
        if not tree.top_dirs:
            raise ConfigError(f"source.labels=subfolders but {where} has no sub-folders; set source.labels=none")
        return by_subfolder(tree, problems)
    return unlabeled(tree.files)



def list_zip(cfg: SourceConfig, problems: Problems) -> Listing:
    try:
        with zipfile.ZipFile(cfg.path) as zf:
            tree = scan_zip(zf, problems)
            text = zf.read("dataset.json") if "dataset.json" in tree.files else None
    except (OSError, zipfile.BadZipFile) as e:
        raise ConfigError(f"source.path={cfg.path!r} cannot be read as a zip ({e}); re-create the archive") from e
    keys, labels, names = label_tree(cfg, tree, problems, text, f"source.path={cfg.path!r}")
    return Listing("zip", keys, labels, names, info={"root": str(Path(cfg.path).resolve())})



def read_zip(info: dict, key: str, cached: Callable) -> Image.Image:
    """One member of the archive at `info["root"]`; `cached(name, make)` keeps the open ZipFile
    per process (see ItemReader)."""
    ext = os.path.splitext(key)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ItemError(f"not an image file ({ext or 'no extension'})")
    try:
        zf = cached("zip", lambda: zipfile.ZipFile(info["root"]))
        data = zf.read(key)
    except KeyError as e:
        raise ItemError("missing from the zip (changed after listing?)") from e
    except (OSError, zipfile.BadZipFile, RuntimeError) as e:
        raise ItemError(f"unreadable zip member: {e}") from e
    return decode_image(key, data, info.get("max_pixels", DEFAULT_MAX_PIXELS))
