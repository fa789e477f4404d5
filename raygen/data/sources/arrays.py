"""The `npy` kind: a .npy/.npz/.nii/.nii.gz file or a directory of them, holding image stacks or
volumes that are sliced into images. Arrays are memory-mapped (uncompressed .npz members in place,
uncompressed NIfTI through nibabel), so a volume larger than RAM lists and reads in bounded memory.
Non-uint8 data, and all NIfTI data (scaled by its header's scl_slope/scl_inter), goes through ONE
intensity window for the whole source, fixed (`source.intensity`) or the global min/max over every
file: a slice keeps its place on the source's intensity scale (e.g. Hounsfield units), never
stretched to its own min/max. NIfTI specifics live in `nifti` (imported only when a source holds
NIfTI files: nibabel costs a quarter of a second to import)."""
from __future__ import annotations

import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
from PIL import Image

from raygen.config import ConfigError
from raygen.data.sources.common import (
    ARRAY_EXTENSIONS,
    NIFTI_EXTENSIONS,
    Listing,
    Problems,
    Tree,
    by_subfolder,
    is_hidden,
    unlabeled,
)
from raygen.data.sources.folders import scan_dir
from raygen.data.transforms import ItemError

if TYPE_CHECKING:
    from raygen.data.sources import SourceConfig

__all__ = ["VOLUME_EXTENSIONS", "array_layout", "array_suffix", "list_npy", "only_volume_files", "open_array",
           "read_npy", "windowed"]

VOLUME_EXTENSIONS = ARRAY_EXTENSIONS | NIFTI_EXTENSIONS  # every file the npy kind lists
# what reading a damaged array file raises (numpy, zipfile, gzip/zlib; nibabel's own errors are
# turned into ValueError by `nifti`)
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, IndexError, zlib.error, zipfile.BadZipFile)


def array_suffix(name: str) -> str:
    """The extension a file is classified by: `.nii.gz` as one, else the last suffix (lower case)."""
    low = name.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else os.path.splitext(low)[1]


def only_volume_files(root: Path) -> bool:
    """True if the tree holds at least one .npy/.npz/.nii/.nii.gz and no other (non-hidden) files.
    Returns at the first other file, so an ImageNet-sized tree costs one directory read."""
    found = False
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        for f in filenames:
            if is_hidden(f):
                continue
            if array_suffix(f) not in VOLUME_EXTENSIONS:
                return False
            found = True
    return found


def _nifti():
    from raygen.data.sources import nifti

    return nifti


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


def array_layout(shape: tuple) -> Optional[str]:
    """The explicit dimension rule: ndim 2 = one image [H,W]; ndim 3 = one volume [D,H,W];
    ndim 4 with last dim 1 or 3 = images [N,H,W,C]; other ndim 4 = volumes [N,D,H,W]."""
    if len(shape) == 2:
        return "image"
    if len(shape) == 3:
        return "volume"
    if len(shape) == 4:
        return "images" if shape[-1] in (1, 3) else "volumes"
    return None


def windowed(layout: str, dtype: np.dtype) -> bool:
    """uint8 images are already display values; everything else goes through the intensity window."""
    return not (layout in ("image", "images") and dtype == np.uint8)


def _is_windowed(meta: dict) -> bool:
    """NIfTI voxels are always windowed: their header scaling makes even uint8 storage physical values."""
    return meta.get("format") == "nifti" or windowed(meta["layout"], np.dtype(meta["dtype"]))


def open_array(path: Path, meta: dict):
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


def list_npy(cfg: SourceConfig, problems: Problems) -> Listing:
    """.npy/.npz files, see `array_layout` for how the array's ndim decides images vs volumes, and
    .nii/.nii.gz files, see `nifti` ([X,Y], [X,Y,Z], or [X,Y,Z,T] time series sliced per volume).

    `source.npy_axis` counts within one volume [D,H,W]: for a 3-D array it is the array's axis,
    for a 4-D [N,D,H,W] stack it is axis 1 + npy_axis of the array (N is never sliced); for NIfTI
    it is the axis of [X,Y,Z] as stored (T is never sliced).
    Labels: class sub-folders (every slice of a file gets its folder's label); else an .npz
    `labels` array of length N (images or volumes; 1 for a single volume/image); else unlabeled.
    A file that cannot be read (corrupt, truncated, not an array) is a listing problem naming it.
    """
    p = Path(cfg.path)
    axis = cfg.npy_axis % 3
    if p.is_file():
        root, tree = p.parent, Tree([p.name], [], set())
    else:
        root, tree = p, scan_dir(p, problems)
        for f in [f for f in tree.files if array_suffix(f) not in VOLUME_EXTENSIONS]:
            problems.add(f, "not a .npy/.npz/.nii/.nii.gz file")
        tree.files = [f for f in tree.files if array_suffix(f) in VOLUME_EXTENSIONS]
    mode = cfg.labels
    if mode == "auto":
        mode = "subfolders" if tree.top_dirs else "none"
    if mode == "subfolders":
        files, file_labels, class_names = by_subfolder(tree, problems)
    else:
        files, file_labels, class_names = unlabeled(tree.files)

    metas, keys, labels, npz_labels = [], [], [], False
    lo, hi = np.inf, -np.inf
    for rel, file_label in zip(files, file_labels):
        path = root / rel
        nii = array_suffix(rel) in NIFTI_EXTENSIONS
        try:
            meta, item_labels = (_nifti().nifti_meta(path, rel), None) if nii else _npy_meta(path, rel)
        except _READ_ERRORS as e:
            problems.add(rel, f"unreadable {'NIfTI' if nii else 'array'} file: {e}")
            continue
        layout = meta["layout"]
        if layout is None:
            expected = "[X,Y], [X,Y,Z] or [X,Y,Z,T]" if nii else "[H,W], [D,H,W], [N,H,W,C] or [N,D,H,W]"
            problems.add(rel, f"unsupported {'NIfTI' if nii else 'array'} shape {tuple(meta['shape'])} "
                              f"(expected {expected})")
            continue
        if _is_windowed(meta) and cfg.intensity is None:
            try:
                a_lo, a_hi = _nifti().nifti_extremes(path, meta) if nii else _minmax(open_array(path, meta))
            except _READ_ERRORS as e:
                problems.add(rel, f"unreadable {'NIfTI' if nii else 'array'} data: {e}")
                continue
            lo, hi = min(lo, a_lo), max(hi, a_hi)
        shape = tuple(meta["shape"])
        ids = _nifti().nifti_item_ids(layout, shape, axis) if nii else _item_count(layout, shape, axis)
        n_outer = 1 if layout in ("image", "volume") else shape[0]
        per_item = np.full(len(ids), int(file_label), np.int64)
        if item_labels is not None and mode != "subfolders" and cfg.labels != "none":
            if item_labels.ndim != 1 or len(item_labels) != n_outer:
                problems.add(rel, f"labels array has shape {item_labels.shape}, expected ({n_outer},); file kept unlabeled")
            else:
                per_item = np.repeat(item_labels.astype(np.int64), len(ids) // n_outer)
                npz_labels = True
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
    elif any(_is_windowed(m) for m in metas):
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
    meta.update(shape=[int(s) for s in shape], dtype=dtype.str, layout=array_layout(tuple(shape)))
    return meta, item_labels



def _window(x: np.ndarray, window) -> np.ndarray:
    lo, hi = window
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    y = (np.asarray(x, dtype=np.float32) - np.float32(lo)) * np.float32(scale)
    return np.clip(np.nan_to_num(y), 0.0, 1.0).astype(np.float32)


def read_npy(info: dict, key: str, cached: Callable) -> Image.Image:
    """Item `file.npy#<i>`, `file.npy#<n>/<s>`, `file.nii.gz#<s>` or `file.nii.gz#<t>/<s>` of an
    npy listing, windowed into a float image (mode F) in [0, 1]; `cached(name, make)` keeps memory
    maps, NIfTI headers and the last decompressed .nii.gz volume per process (see ItemReader)."""
    rel, _, index = key.rpartition("#")
    meta = info["files"].get(rel)
    if meta is None:
        raise ItemError(f"{rel} is not in the listing")
    path = Path(info["root"]) / rel
    try:
        if meta.get("format") == "nifti":
            x = _nifti().read_nifti_slice(path, meta, index, info["axis"], cached)
        else:
            arr = cached(rel, lambda: open_array(path, meta))
            x = _npy_slice(arr, meta["layout"], index, info["axis"])
    except FileNotFoundError as e:
        raise ItemError(f"missing file (deleted after listing?): {e}") from e
    except _READ_ERRORS as e:
        raise ItemError(f"unreadable array item: {e}") from e
    if not _is_windowed(meta):
        return Image.fromarray(np.ascontiguousarray(x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x))
    y = _window(x, info["window"])
    if y.ndim == 3 and y.shape[-1] == 3:  # PIL has no float RGB mode: quantise to 8 bits
        return Image.fromarray(np.rint(y * 255).astype(np.uint8))
    return Image.fromarray(np.ascontiguousarray(y[..., 0] if y.ndim == 3 else y))


def _npy_slice(arr, layout: str, index: str, axis: int) -> np.ndarray:
    if layout == "image":
        return np.asarray(arr)
    if layout == "images":
        return np.asarray(arr[int(index)])
    if layout == "volume":
        return np.asarray(np.take(arr, int(index), axis=axis))
    n, s = index.split("/")
    return np.asarray(np.take(arr[int(n)], int(s), axis=axis))
