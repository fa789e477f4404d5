"""Image sources: what a dataset contains (a *listing*) and how to read one item of it.

A listing is the deterministic, sorted list of items a source contains, made on the driver before
anything is decoded: keys (stable ids shown to users), int64 labels (-1 = unlabeled), class names,
and every problem met while listing (nothing is silently ignored). Decoding one item happens later,
in worker processes, through an `ItemReader` built from the listing's JSON-serialisable `info`.

Kinds:
  class_folders  `<path>/[<split>/]<class>/<files>` (ImageNet layout), labels = sorted class folders
  folder         any tree of files; labels from an EDM `dataset.json`, from top-level subfolders, or none
  zip            the same as folder, inside one .zip file (members are keys)
  npy            a .npy/.npz file or a directory of them: image stacks or volumes sliced into images
  digits/shapes  the embedded data sets of `raygen.data.embedded`

Key formats: files `rel/path.jpg` (relative to `source.path`, posix separators); zip members by
name; npy `file.npy#<i>` (image i, or slice i of a single volume) and `file.npy#<n>/<s>` (slice s
of volume n of a 4-D stack); embedded `digits/<split>/<index:06d>`, `shapes/<split>/<index:06d>`.
"""
from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from raygen.config import ConfigError
from raygen.data import embedded
from raygen.data.transforms import ItemError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ItemReader",
    "Listing",
    "SourceConfig",
    "list_source",
    "resolve_kind",
    "write_image_folder",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
ARRAY_EXTENSIONS = frozenset({".npy", ".npz"})
PATH_KINDS = ("class_folders", "folder", "zip", "npy")
SHAPES_TEST_SEED_OFFSET = 1_000_003  # as raygen.data.images: the test split is a disjoint draw


@dataclass
class SourceConfig:
    kind: Literal["auto", "class_folders", "folder", "zip", "npy", "digits", "shapes"] = "digits"
    path: Optional[str] = None
    # class_folders: images in <path>/<split>/<class>/* (None: <path>/<class>/*); digits/shapes: train|test
    split: Optional[str] = None
    # folder/zip: auto = dataset.json if present, else subfolders if there are any, else none
    labels: Literal["auto", "dataset_json", "subfolders", "none"] = "auto"
    npy_axis: int = 0  # volumes are sliced along this axis of each volume (see list_source)
    # npy: fixed [lo, hi] window mapped to [0, 1]; None = global min/max over the whole source
    intensity: Optional[list[float]] = None
    resolution: int = 32  # digits/shapes: generated size
    num_images: int = 4096  # shapes
    seed: int = 0  # shapes

    def validate(self):
        kind = resolve_kind(self)  # checks path for the path-based kinds (and auto)
        if kind in PATH_KINDS:
            _validate_path(kind, self)
        if kind in ("digits", "shapes"):
            if self.split not in (None, "train", "test"):
                raise ConfigError(f"source.split must be train or test for source.kind={kind}, got {self.split!r}")
            if self.resolution < 4:
                raise ConfigError(f"source.resolution must be >= 4, got {self.resolution}")
            if kind == "shapes" and self.num_images < 1:
                raise ConfigError(f"source.num_images must be >= 1, got {self.num_images}")
        if self.labels == "dataset_json" and kind not in ("folder", "zip"):
            raise ConfigError(
                f"source.labels=dataset_json only applies to folder/zip sources, not {kind}; use source.labels=auto"
            )
        if not -3 <= self.npy_axis <= 2:
            raise ConfigError(f"source.npy_axis must be an axis of a [D,H,W] volume (-3..2), got {self.npy_axis}")
        if self.intensity is not None and (len(self.intensity) != 2 or not self.intensity[0] < self.intensity[1]):
            raise ConfigError(
                f"source.intensity must be [lo, hi] with lo < hi (e.g. source.intensity=[-1000,1000]) "
                f"or null for the global min/max, got {self.intensity}"
            )


def _validate_path(kind: str, cfg: SourceConfig):
    p = Path(cfg.path)
    layouts = {
        "class_folders": "a directory <path>/[<split>/]<class>/<images>",
        "folder": "a directory of images (optionally with dataset.json or class subfolders)",
        "zip": "a .zip file of images",
        "npy": "a .npy/.npz file or a directory of them",
    }
    expect = f"source.kind={kind} expects {layouts[kind]}"
    if kind in ("class_folders", "folder") and not p.is_dir():
        raise ConfigError(f"source.path={cfg.path!r} is not a directory; {expect}")
    if kind == "zip" and not (p.is_file() and zipfile.is_zipfile(p)):
        raise ConfigError(f"source.path={cfg.path!r} is not a readable zip file; {expect}")
    if kind == "npy" and not (p.is_dir() or (p.is_file() and p.suffix.lower() in ARRAY_EXTENSIONS)):
        raise ConfigError(f"source.path={cfg.path!r} is not a .npy/.npz file or a directory; {expect}")
    if kind == "class_folders" and cfg.split is not None and not (p / cfg.split).is_dir():
        raise ConfigError(
            f"source.split={cfg.split!r}: {p / cfg.split} is not a directory; "
            f"set source.split to a sub-folder of source.path (e.g. train) or to null"
        )


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _only_arrays(root: Path) -> bool:
    """True if the tree holds at least one .npy/.npz and no other (non-hidden) files. Returns at the
    first other file, so an ImageNet-sized tree costs one directory read."""
    found = False
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        for f in filenames:
            if _hidden(f):
                continue
            if Path(f).suffix.lower() not in ARRAY_EXTENSIONS:
                return False
            found = True
    return found


def resolve_kind(cfg: SourceConfig) -> str:
    """The concrete kind for `source.kind=auto` (other kinds pass through):
    a .zip file -> zip; a .npy/.npz file or a directory holding only .npy/.npz -> npy;
    a directory whose (split) sub-directory holds only directories -> class_folders; else folder."""
    if cfg.kind != "auto":
        if cfg.kind in PATH_KINDS and not cfg.path:
            raise ConfigError(f"source.kind={cfg.kind} needs source.path=<{_path_hint(cfg.kind)}>")
        if cfg.kind in PATH_KINDS and not Path(cfg.path).exists():
            raise ConfigError(f"source.path={cfg.path!r} does not exist; point it at {_path_hint(cfg.kind)}")
        return cfg.kind
    if not cfg.path:
        raise ConfigError(
            "source.kind=auto needs source.path=<image folder, class-folder tree, .zip, .npy/.npz>; "
            "or set source.kind=digits|shapes for the embedded data"
        )
    p = Path(cfg.path)
    if not p.exists():
        raise ConfigError(f"source.path={cfg.path!r} does not exist; point it at an image folder, .zip or .npy/.npz")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".zip":
            return "zip"
        if suffix in ARRAY_EXTENSIONS:
            return "npy"
        raise ConfigError(
            f"source.path={cfg.path!r} is a file but not .zip/.npy/.npz ({suffix or 'no extension'}); "
            "source.kind=auto takes a directory, a .zip or a .npy/.npz file"
        )
    if _only_arrays(p):
        return "npy"
    base = p / cfg.split if cfg.split else p
    if not base.is_dir():
        raise ConfigError(f"source.split={cfg.split!r}: {base} is not a directory; set source.split to a sub-folder or null")
    try:
        entries = [e for e in os.scandir(base) if not _hidden(e.name)]
    except OSError as e:
        raise ConfigError(f"source.path={cfg.path!r} cannot be read ({e}); fix its permissions") from e
    if entries and all(e.is_dir() or (e.is_symlink() and not os.path.exists(e.path)) for e in entries):
        return "class_folders"
    return "folder"


def _path_hint(kind: str) -> str:
    return {
        "class_folders": "dir with <split>/<class>/ image folders",
        "folder": "dir of images",
        "zip": "file.zip",
        "npy": "file.npy|file.npz|dir of them",
    }[kind]


# --------------------------------------------------------------------------- listing


@dataclass
class Listing:
    kind: str
    keys: list[str]
    labels: np.ndarray  # int64, -1 = unlabeled
    class_names: list[str]
    problems: list[dict] = field(default_factory=list)  # {"path": ..., "reason": ...}
    info: dict = field(default_factory=dict)  # JSON-serialisable; what ItemReader needs (goes into meta.json)

    def __len__(self) -> int:
        return len(self.keys)


class _Problems:
    """Collects listing problems, or raises at the first one when on_error=fail."""

    def __init__(self, on_error: str):
        if on_error not in ("skip", "fail"):
            raise ConfigError(f"on_error must be skip or fail, got {on_error!r}")
        self.fail = on_error == "fail"
        self.items: list[dict] = []

    def add(self, path: str, reason: str):
        if self.fail:
            raise ConfigError(
                f"{path}: {reason}; fix or remove it, or set ingest.on_error=skip to record it and go on"
            )
        self.items.append({"path": path, "reason": reason})


@dataclass
class _Tree:
    files: list[str]  # relative posix paths of regular files, hidden ones excluded
    top_dirs: list[str]  # non-hidden top-level directories, including unreadable ones
    unreadable: set  # relative paths of directories that could not be read


def _scan_dir(root: Path, problems: _Problems, prefix: str = "") -> _Tree:
    """Every regular file under root. Hidden entries, unreadable directories, broken links and
    special files become problems. `prefix` is prepended to problem paths (the split folder)."""
    tree = _Tree([], [], set())
    seen = set()  # (device, inode) of visited directories: a symlink to an ancestor must not loop
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            d = root / rel if rel else root
            if not rel:
                st = os.stat(d)
                seen.add((st.st_dev, st.st_ino))
            with os.scandir(d) as it:
                entries = list(it)
        except OSError as e:
            if not rel:
                raise ConfigError(f"source.path: cannot read {root} ({e}); fix its permissions or the path") from e
            problems.add(prefix + rel, f"unreadable directory: {e}")
            tree.unreadable.add(rel)
            continue
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            try:
                is_dir, is_file = e.is_dir(), e.is_file()
                st = e.stat() if is_dir else None
            except OSError as err:
                problems.add(prefix + r, f"unreadable entry: {err}")
                continue
            if _hidden(e.name):
                problems.add(prefix + r, "hidden directory" if is_dir else "hidden file")
            elif is_dir:
                if (st.st_dev, st.st_ino) in seen:
                    problems.add(prefix + r, "symbolic link loop (directory already listed)")
                    continue
                seen.add((st.st_dev, st.st_ino))
                stack.append(r)
                if not rel:
                    tree.top_dirs.append(e.name)
            elif is_file:
                tree.files.append(r)
            elif e.is_symlink() and not os.path.exists(e.path):
                # most often a class folder that was moved away: it keeps its class index
                try:
                    os.scandir(e.path).close()
                    reason = "broken symbolic link"
                except OSError as err:
                    reason = f"unreadable directory (broken symbolic link): {err}"
                problems.add(prefix + r, reason)
                if not rel:
                    tree.top_dirs.append(e.name)
                    tree.unreadable.add(r)
            else:
                problems.add(prefix + r, "not a regular file")
    tree.files.sort()
    return tree


def _scan_zip(zf: zipfile.ZipFile, problems: _Problems) -> _Tree:
    tree = _Tree([], [], set())
    tops = set()
    for zi in zf.infolist():
        name = zi.filename
        parts = [p for p in name.split("/") if p]
        if not parts:
            continue
        if any(_hidden(p) for p in parts):
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


def _by_subfolder(tree: _Tree, problems: _Problems, prefix: str = ""):
    """Label = index of the top-level folder in sorted order. Empty (or unreadable) folders keep
    their index so that labels always match the folder order, whatever is missing."""
    class_names = sorted(set(tree.top_dirs))
    index = {n: i for i, n in enumerate(class_names)}
    pairs, counts = [], Counter()
    for f in tree.files:
        head, sep, rest = f.partition("/")
        if not sep:
            problems.add(prefix + f, "not in a class folder (expected <class>/<file>)")
            continue
        counts[head] += 1
        pairs.append((index[head], rest, prefix + f))
    for n in class_names:
        if counts[n] == 0 and n not in tree.unreadable:
            problems.add(prefix + n, "empty class folder")
    pairs.sort()
    keys = [k for _, _, k in pairs]
    labels = np.array([lab for lab, _, _ in pairs], np.int64)
    return keys, labels, class_names


def _unlabeled(files: list[str], prefix: str = ""):
    return [prefix + f for f in files], np.full(len(files), -1, np.int64), ["unlabeled"]


def _by_dataset_json(tree: _Tree, text: bytes | str, problems: _Problems, where: str):
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
        return _unlabeled(tree.files)
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


def _label_tree(cfg: SourceConfig, tree: _Tree, problems: _Problems, dataset_json, where: str):
    """folder/zip labels: dataset.json, subfolders or none (auto picks in that order)."""
    tree.files = [f for f in tree.files if f != "dataset.json"]
    mode = cfg.labels
    if mode == "auto":
        mode = "dataset_json" if dataset_json is not None else ("subfolders" if tree.top_dirs else "none")
    if mode == "dataset_json":
        if dataset_json is None:
            raise ConfigError(f"source.labels=dataset_json but {where} has no dataset.json; set source.labels=auto")
        return _by_dataset_json(tree, dataset_json, problems, where)
    if mode == "subfolders":
        if not tree.top_dirs:
            raise ConfigError(f"source.labels=subfolders but {where} has no sub-folders; set source.labels=none")
        return _by_subfolder(tree, problems)
    return _unlabeled(tree.files)


def _list_class_folders(cfg: SourceConfig, problems: _Problems) -> Listing:
    root = Path(cfg.path)
    prefix = f"{cfg.split}/" if cfg.split else ""
    tree = _scan_dir(root / cfg.split if cfg.split else root, problems, prefix)
    if not tree.top_dirs:
        raise ConfigError(
            f"source.path={cfg.path!r}: no class folders in {root / (cfg.split or '')}; "
            "source.kind=class_folders expects <path>/[<split>/]<class>/<images> (set source.split or source.kind=folder)"
        )
    if cfg.labels == "none":
        keys, labels, names = _unlabeled(tree.files, prefix)
    else:
        keys, labels, names = _by_subfolder(tree, problems, prefix)
    return Listing("class_folders", keys, labels, names, info={"root": str(root.resolve())})


def _list_folder(cfg: SourceConfig, problems: _Problems) -> Listing:
    root = Path(cfg.path)
    tree = _scan_dir(root, problems)
    dj = root / "dataset.json"
    text = dj.read_bytes() if dj.is_file() else None
    keys, labels, names = _label_tree(cfg, tree, problems, text, f"source.path={cfg.path!r}")
    return Listing("folder", keys, labels, names, info={"root": str(root.resolve())})


def _list_zip(cfg: SourceConfig, problems: _Problems) -> Listing:
    try:
        with zipfile.ZipFile(cfg.path) as zf:
            tree = _scan_zip(zf, problems)
            text = zf.read("dataset.json") if "dataset.json" in tree.files else None
    except (OSError, zipfile.BadZipFile) as e:
        raise ConfigError(f"source.path={cfg.path!r} cannot be read as a zip ({e}); re-create the archive") from e
    keys, labels, names = _label_tree(cfg, tree, problems, text, f"source.path={cfg.path!r}")
    return Listing("zip", keys, labels, names, info={"root": str(Path(cfg.path).resolve())})


def _list_embedded(cfg: SourceConfig, kind: str) -> Listing:
    split = cfg.split or "train"
    images, labels = _embedded_arrays(kind, split, cfg.resolution, cfg.num_images, cfg.seed)
    names = embedded.digits_class_names() if kind == "digits" else embedded.shapes_class_names()
    keys = [f"{kind}/{split}/{i:06d}" for i in range(len(labels))]
    info = {"split": split, "resolution": cfg.resolution, "num_images": cfg.num_images, "seed": cfg.seed}
    return Listing(kind, keys, labels.astype(np.int64), names, info=info)


def _embedded_arrays(kind: str, split: str, resolution: int, num_images: int, seed: int):
    if kind == "digits":
        return embedded.digits(resolution, split)
    if split == "test":
        return embedded.shapes(resolution, max(1024, num_images // 4), seed + SHAPES_TEST_SEED_OFFSET)
    return embedded.shapes(resolution, num_images, seed)


# --------------------------------------------------------------------------- npy


def _npz_header(path: Path, member: str) -> tuple[tuple, np.dtype, bool, Optional[int]]:
    """(shape, dtype, fortran, data offset) of one .npz member without reading its data. The offset
    is set only for stored (uncompressed) members, which can then be memory-mapped in place."""
    with zipfile.ZipFile(path) as zf:
        zi = zf.getinfo(member + ".npy")
        with zf.open(zi) as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = _read_header(f, version)
            header_len = f.tell()
    offset = None
    if zi.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as raw:
            raw.seek(zi.header_offset)
            local = raw.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            offset = zi.header_offset + 30 + name_len + extra_len + header_len
    return tuple(shape), dtype, fortran, offset


def _read_header(f, version):
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _npz_members(path: Path) -> tuple[str, Optional[str]]:
    """(image member, labels member or None): `images` if present, else the first other array."""
    with zipfile.ZipFile(path) as zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    if not names:
        raise ValueError("the .npz holds no arrays")
    others = [n for n in names if n != "labels"]
    if not others:
        raise ValueError("the .npz holds only a 'labels' array")
    image = "images" if "images" in names else others[0]
    return image, ("labels" if "labels" in names else None)


def _layout(shape: tuple) -> Optional[str]:
    """The explicit dimension rule: ndim 2 = one image [H,W]; ndim 3 = one volume [D,H,W];
    ndim 4 with last dim 1 or 3 = images [N,H,W,C]; other ndim 4 = volumes [N,D,H,W]."""
    if len(shape) == 2:
        return "image"
    if len(shape) == 3:
        return "volume"
    if len(shape) == 4:
        return "images" if shape[-1] in (1, 3) else "volumes"
    return None


def _windowed(layout: str, dtype: np.dtype) -> bool:
    """uint8 images are already display values; everything else goes through the intensity window."""
    return not (layout in ("image", "images") and dtype == np.uint8)


def _open_array(path: Path, meta: dict):
    """A memory map of the array (never the whole volume in RAM), except for compressed .npz
    members, which numpy can only decompress in full."""
    if meta["member"] is None:
        return np.load(path, mmap_mode="r")
    if meta["offset"] is not None:
        order = "F" if meta["fortran"] else "C"
        return np.memmap(path, np.dtype(meta["dtype"]), "r", offset=meta["offset"], shape=tuple(meta["shape"]), order=order)
    with np.load(path) as z:
        return z[meta["member"]]


def _minmax(arr, chunk_bytes: int = 64 << 20) -> tuple[float, float]:
    """Streaming nan-min/max over the first axis, so a 100 GB volume costs 64 MB of RAM at a time."""
    n = arr.shape[0]
    per = max(1, chunk_bytes // max(1, arr.itemsize * int(np.prod(arr.shape[1:]))))
    lo, hi = np.inf, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN chunk
        for s in range(0, n, per):
            c = np.asarray(arr[s:s + per])
            lo, hi = min(lo, float(np.nanmin(c))), max(hi, float(np.nanmax(c)))
    return lo, hi


def _item_count(layout: str, shape: tuple, axis: int) -> list[str]:
    if layout == "image":
        return ["0"]
    if layout == "images":
        return [str(i) for i in range(shape[0])]
    if layout == "volume":
        return [str(s) for s in range(shape[axis])]
    return [f"{n}/{s}" for n in range(shape[0]) for s in range(shape[1 + axis])]


def _list_npy(cfg: SourceConfig, problems: _Problems) -> Listing:
    """.npy/.npz files, see `_layout` for how the array's ndim decides images vs volumes.

    `source.npy_axis` counts within one volume [D,H,W]: for a 3-D array it is the array's axis,
    for a 4-D [N,D,H,W] stack it is axis 1 + npy_axis of the array (N is never sliced).
    Labels: class sub-folders (every slice of a file gets its folder's label); else an .npz
    `labels` array of length N (images or volumes; 1 for a single volume/image); else unlabeled.
    """
    p = Path(cfg.path)
    axis = cfg.npy_axis % 3
    if p.is_file():
        root, tree = p.parent, _Tree([p.name], [], set())
    else:
        root, tree = p, _scan_dir(p, problems)
        for f in [f for f in tree.files if Path(f).suffix.lower() not in ARRAY_EXTENSIONS]:
            problems.add(f, "not a .npy/.npz file")
        tree.files = [f for f in tree.files if Path(f).suffix.lower() in ARRAY_EXTENSIONS]
    mode = cfg.labels
    if mode == "auto":
        mode = "subfolders" if tree.top_dirs else "none"
    if mode == "subfolders":
        files, file_labels, class_names = _by_subfolder(tree, problems)
    else:
        files, file_labels, class_names = _unlabeled(tree.files)

    metas, keys, labels, npz_labels = [], [], [], False
    lo, hi = np.inf, -np.inf
    for rel, file_label in zip(files, file_labels):
        path = root / rel
        try:
            meta, item_labels = _npy_meta(path, rel)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            problems.add(rel, f"unreadable array file: {e}")
            continue
        layout = meta["layout"]
        if layout is None:
            problems.add(rel, f"unsupported array shape {tuple(meta['shape'])} (expected [H,W], [D,H,W], [N,H,W,C] or [N,D,H,W])")
            continue
        ids = _item_count(layout, tuple(meta["shape"]), axis)
        n_outer = 1 if layout in ("image", "volume") else meta["shape"][0]
        per_item = np.full(len(ids), int(file_label), np.int64)
        if item_labels is not None and mode != "subfolders" and cfg.labels != "none":
            if item_labels.ndim != 1 or len(item_labels) != n_outer:
                problems.add(rel, f"labels array has shape {item_labels.shape}, expected ({n_outer},); file kept unlabeled")
            else:
                per_item = np.repeat(item_labels.astype(np.int64), len(ids) // n_outer)
                npz_labels = True
        if _windowed(layout, np.dtype(meta["dtype"])) and cfg.intensity is None:
            a_lo, a_hi = _minmax(_open_array(path, meta))
            lo, hi = min(lo, a_lo), max(hi, a_hi)
        metas.append(meta)
        keys.extend(f"{rel}#{i}" for i in ids)
        labels.append(per_item)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if npz_labels:
        class_names = [str(i) for i in range(int(labels.max()) + 1)] if labels.max() >= 0 else ["unlabeled"]
    if cfg.intensity is not None:
        window = [float(cfg.intensity[0]), float(cfg.intensity[1])]
    elif np.isfinite(lo) and np.isfinite(hi):
        window = [lo, hi]
    elif any(_windowed(m["layout"], np.dtype(m["dtype"])) for m in metas):
        raise ConfigError(
            f"source.path={cfg.path!r}: the arrays hold no finite values to take a min/max from; set source.intensity=[lo,hi]"
        )
    else:
        window = None
    info = {"root": str(root.resolve()), "axis": axis, "window": window, "files": {m["path"]: m for m in metas}}
    return Listing("npy", keys, labels, class_names, info=info)


def _npy_meta(path: Path, rel: str) -> tuple[dict, Optional[np.ndarray]]:
    meta = {"path": rel, "member": None, "offset": None, "fortran": False}
    item_labels = None
    if path.suffix.lower() == ".npz":
        member, labels_member = _npz_members(path)
        shape, dtype, fortran, offset = _npz_header(path, member)
        meta.update(member=member, offset=offset, fortran=bool(fortran))
        if labels_member is not None:
            with np.load(path) as z:
                item_labels = np.asarray(z[labels_member])
    else:
        arr = np.load(path, mmap_mode="r")
        shape, dtype = arr.shape, arr.dtype
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ValueError(f"unsupported dtype {dtype}")
    meta.update(shape=[int(s) for s in shape], dtype=dtype.str, layout=_layout(tuple(shape)))
    return meta, item_labels


# --------------------------------------------------------------------------- entry point


def list_source(cfg: SourceConfig, on_error: str = "skip") -> Listing:
    """The sorted listing of `cfg`. Listing-time problems (empty class folders, unreadable
    directories, dataset.json mismatches, hidden files, ...) are recorded in `problems` with
    on_error="skip", or raised as ConfigError naming the path and the fix with on_error="fail".
    A source without a single item is always a ConfigError."""
    problems = _Problems(on_error)
    cfg.validate()
    kind = resolve_kind(cfg)
    if kind == "class_folders":
        listing = _list_class_folders(cfg, problems)
    elif kind == "folder":
        listing = _list_folder(cfg, problems)
    elif kind == "zip":
        listing = _list_zip(cfg, problems)
    elif kind == "npy":
        listing = _list_npy(cfg, problems)
    else:
        listing = _list_embedded(cfg, kind)
    listing.problems = problems.items
    if not listing.keys:
        shown = "; ".join(f"{p['path']}: {p['reason']}" for p in problems.items[:5])
        raise ConfigError(
            f"source.path={cfg.path!r} (source.kind={kind}) has no usable items"
            + (f" ({shown})" if shown else "")
            + f"; check source.path and the layout it expects ({_path_hint(kind) if kind in PATH_KINDS else kind})"
        )
    return listing


# --------------------------------------------------------------------------- reading


def _decode(name: str, data: bytes) -> Image.Image:
    """Fully decoded image (`load()`, so truncation is an error here, not a grey band later)."""
    ext = os.path.splitext(name)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ItemError(f"not an image file ({ext or 'no extension'})")
    if not data:
        raise ItemError("zero-byte file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ItemError(f"corrupt or unrecognised image data ({ext}): cannot identify image file") from e
    except Exception as e:  # PIL raises assorted types on malformed headers
        raise ItemError(f"corrupt image header ({ext}): {e}") from e
    fmt = img.format or ext.lstrip(".").upper()
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise ItemError(f"image too large to decode safely: {e}") from e
    except Exception as e:  # OSError "image file is truncated", SyntaxError, ValueError, struct.error
        raise ItemError(f"truncated or corrupt {fmt}: {e}") from e
    return img


def _window(x: np.ndarray, window) -> np.ndarray:
    lo, hi = window
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    y = (np.asarray(x, dtype=np.float32) - np.float32(lo)) * np.float32(scale)
    return np.clip(np.nan_to_num(y), 0.0, 1.0).astype(np.float32)


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
            return self._read_file(key)
        if self.kind == "zip":
            return self._read_zip(key)
        if self.kind == "npy":
            return self._read_npy(key)
        if self.kind in ("digits", "shapes"):
            return self._read_embedded(key)
        raise ValueError(f"unknown listing kind {self.kind!r}")

    def _read_file(self, key: str) -> Image.Image:
        path = Path(self.info["root"]) / key
        ext = path.suffix.lower()
        if ext not in IMAGE_EXTENSIONS:
            raise ItemError(f"not an image file ({ext or 'no extension'})")
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise ItemError(f"missing file (deleted after listing?): {e}") from e
        except OSError as e:
            raise ItemError(f"unreadable file: {e}") from e
        return _decode(key, data)

    def _read_zip(self, key: str) -> Image.Image:
        ext = os.path.splitext(key)[1].lower()
        if ext not in IMAGE_EXTENSIONS:
            raise ItemError(f"not an image file ({ext or 'no extension'})")
        try:
            zf = self._cached("zip", lambda: zipfile.ZipFile(self.info["root"]))
            data = zf.read(key)
        except KeyError as e:
            raise ItemError("missing from the zip (changed after listing?)") from e
        except (OSError, zipfile.BadZipFile, RuntimeError) as e:
            raise ItemError(f"unreadable zip member: {e}") from e
        return _decode(key, data)

    def _read_npy(self, key: str) -> Image.Image:
        rel, _, index = key.rpartition("#")
        meta = self.info["files"].get(rel)
        if meta is None:
            raise ItemError(f"{rel} is not in the listing")
        try:
            arr = self._cached(rel, lambda: _open_array(Path(self.info["root"]) / rel, meta))
            x = self._npy_slice(arr, meta["layout"], index)
        except FileNotFoundError as e:
            raise ItemError(f"missing file (deleted after listing?): {e}") from e
        except (OSError, ValueError, IndexError, zipfile.BadZipFile) as e:
            raise ItemError(f"unreadable array item: {e}") from e
        if not _windowed(meta["layout"], np.dtype(meta["dtype"])):
            return Image.fromarray(np.ascontiguousarray(x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x))
        y = _window(x, self.info["window"])
        if y.ndim == 3 and y.shape[-1] == 3:  # PIL has no float RGB mode: quantise to 8 bits
            return Image.fromarray(np.rint(y * 255).astype(np.uint8))
        return Image.fromarray(np.ascontiguousarray(y[..., 0] if y.ndim == 3 else y))

    def _npy_slice(self, arr, layout: str, index: str) -> np.ndarray:
        axis = self.info["axis"]
        if layout == "image":
            return np.asarray(arr)
        if layout == "images":
            return np.asarray(arr[int(index)])
        if layout == "volume":
            return np.asarray(np.take(arr, int(index), axis=axis))
        n, s = index.split("/")
        return np.asarray(np.take(arr[int(n)], int(s), axis=axis))

    def _read_embedded(self, key: str) -> Image.Image:
        kind, split, index = key.split("/")
        info = self.info
        images, _ = _embedded_arrays(kind, split, info["resolution"], info["num_images"], info["seed"])
        im = images[int(index)]
        return Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)


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
    """`python -m raygen.data.sources digits|shapes OUT [--resolution R] [--split S] [--num N]`: write an
    embedded data set as an ImageNet-style JPEG tree (`OUT/<split>/<class>/*.jpg`), to try the file
    path of every tool without downloading anything."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m raygen.data.sources", description=export_embedded.__doc__)
    p.add_argument("source", choices=("digits", "shapes"))
    p.add_argument("out")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--num", type=int, default=4096, help="shapes: how many")
    p.add_argument("--format", default="jpeg", choices=("jpeg", "png"))
    a = p.parse_args(argv)
    images, labels = _embedded_arrays(a.source, a.split, a.resolution, a.num, 0)
    names = embedded.digits_class_names() if a.source == "digits" else embedded.shapes_class_names()
    out = write_image_folder(images, labels, names, a.out, fmt=a.format, split=a.split)
    print(f"wrote {len(labels)} images to {Path(out) / a.split}")
    return out


if __name__ == "__main__":
    export_embedded()
