"""NIfTI volumes (`.nii`, `.nii.gz`) for the `npy` kind, read with nibabel.

A NIfTI file stores its voxels as one raw array (always Fortran order) behind a 348/540-byte header;
the header's `scl_slope`/`scl_inter` turn the stored values into physical ones (CT: Hounsfield
units = stored * slope + inter). Every value this module hands out is scaled, so the source's one
intensity window is applied to physical values, the same scale in every slice and every file.

Layouts (trailing axes of length 1 past the third are ignored, as many tools write [X,Y,Z,1]):
  [X,Y]      one image                 key `file.nii#0`
  [X,Y,Z]    one volume                key `file.nii#<s>`, s along `source.npy_axis` of [X,Y,Z]
  [X,Y,Z,T]  a time series of volumes  key `file.nii#<t>/<s>`, every volume t sliced the same way

The slicing axis is an axis of the array as stored (no reorientation to RAS): axis 2 is usually
the axial one. A slice keeps the remaining array axes in order, so an axial slice is [X,Y] with X
as rows (a radiological viewer shows it transposed and flipped).

Cost: an uncompressed `.nii` is memory-mapped by nibabel and a slice read touches only that slice.
A `.nii.gz` can only be decompressed from its start, so the reader decompresses a volume once and
keeps the most recent one per reader process (one volume of the stored dtype in memory per decode
worker); keys are sorted and a decode batch is a run of consecutive keys, so a volume is
decompressed at most once per batch, not once per slice. The global
min/max streams the raw data once per file, in bounded memory, and scales only the two extremes
(the scaling is affine, so they map to the scaled extremes).
"""
from __future__ import annotations

from math import prod
from pathlib import Path
from typing import Callable, Optional

import nibabel
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import Opener
from nibabel.spatialimages import HeaderDataError
from nibabel.volumeutils import apply_read_scaling

__all__ = ["nifti_extremes", "nifti_item_ids", "nifti_layout", "nifti_meta", "read_nifti_slice"]

_LAST_GZ_VOLUME = "nifti: last decompressed volume"  # the reader-cache slot of the one kept .nii.gz volume


def nifti_layout(shape: tuple) -> Optional[str]:
    """image [X,Y], volume [X,Y,Z], volumes [X,Y,Z,T]; None for anything else."""
    core = list(shape)
    while len(core) > 3 and core[-1] == 1:
        core.pop()
    return {2: "image", 3: "volume", 4: "volumes"}.get(len(core))


def nifti_item_ids(layout: str, shape: tuple, axis: int) -> list[str]:
    if layout == "image":
        return ["0"]
    if layout == "volume":
        return [str(s) for s in range(shape[axis])]
    return [f"{t}/{s}" for t in range(shape[3]) for s in range(shape[axis])]


def _load(path: Path):
    """The image with its header parsed and its data untouched (nibabel reads voxels lazily)."""
    try:
        img = nibabel.load(str(path))
    except (ImageFileError, HeaderDataError) as e:  # OSError (a missing file, bad gzip) passes as it is
        raise ValueError(f"nibabel cannot read it ({e})") from e
    if not isinstance(img, nibabel.Nifti1Image):  # Nifti2Image is a subclass
        raise ValueError(f"nibabel reads it as {type(img).__name__}, not a NIfTI-1/2 volume")
    return img


def nifti_meta(path: Path, rel: str) -> dict:
    """The listing's record of one NIfTI file (JSON-serialisable), from its header alone; an
    uncompressed file shorter than its header promises is refused here."""
    proxy = _load(path).dataobj
    shape, dtype = tuple(int(s) for s in proxy.shape), np.dtype(proxy.dtype)
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ValueError(f"unsupported NIfTI data type {dtype} (expected integer or float voxels)")
    compressed = path.name.lower().endswith(".gz")
    if not compressed:
        need = int(proxy.offset) + prod(shape) * dtype.itemsize
        have = path.stat().st_size
        if have < need:
            raise ValueError(f"truncated NIfTI file: {have:,} bytes, the header describes {need:,}")
    return {"path": rel, "format": "nifti", "compressed": compressed, "member": None, "offset": int(proxy.offset),
            "fortran": True, "slope": float(proxy.slope), "inter": float(proxy.inter), "shape": list(shape),
            "dtype": dtype.str, "layout": nifti_layout(shape)}


def nifti_extremes(path: Path, meta: dict, chunk_bytes: int = 64 << 20) -> tuple[float, float]:
    """(min, max) of the scaled voxels, NaN ignored: one streaming pass over the raw data
    (`chunk_bytes` at a time, through gzip for .nii.gz), then the affine scaling of the two raw
    extremes, swapped when the slope is negative."""
    dtype = np.dtype(meta["dtype"])
    total = prod(meta["shape"])
    per = max(1, chunk_bytes // dtype.itemsize)
    lo, hi, done = np.inf, -np.inf, 0
    with Opener(str(path), "rb") as f:
        f.seek(meta["offset"])
        while done < total:
            want = min(per, total - done) * dtype.itemsize
            buf = f.read(want)
            if len(buf) < want:
                raise ValueError(f"truncated NIfTI data: the file ends after {done + len(buf) // dtype.itemsize:,} "
                                 f"of {total:,} voxels")
            chunk = np.frombuffer(buf, dtype)
            if dtype.kind == "f":
                chunk = chunk[~np.isnan(chunk)]
            if chunk.size:
                lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
            done += want // dtype.itemsize
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return lo, hi  # no finite voxel: the caller decides
    ends = np.array([lo, hi]) * meta["slope"] + meta["inter"]
    return float(ends.min()), float(ends.max())


def _slicer(meta: dict, index: str, axis: int) -> tuple:
    """The array index of item `index`: `slice(None)` on the kept axes, an integer elsewhere."""
    layout, ndim = meta["layout"], len(meta["shape"])
    if layout == "image":
        head = [slice(None), slice(None)]
    else:
        volume, _, s = index.rpartition("/")
        head = [slice(None)] * 3
        head[axis] = int(s)
        if layout == "volumes":
            head.append(int(volume))
    return tuple(head + [0] * (ndim - len(head)))


def read_nifti_slice(path: Path, meta: dict, index: str, axis: int, cached: Callable) -> np.ndarray:
    """Item `index` as scaled values (physical units): a lazy read of one slice for .nii, a slice
    of the per-process decompressed volume for .nii.gz."""
    slicer = _slicer(meta, index, axis)
    img = cached(("nifti", meta["path"]), lambda: _load(path))
    proxy = img.dataobj
    if not meta["compressed"]:
        return np.asarray(proxy[slicer])  # nibabel applies scl_slope/scl_inter
    kept = cached(_LAST_GZ_VOLUME, dict)  # {path: raw volume}, at most one entry
    if meta["path"] not in kept:
        kept.clear()  # free the previous volume before decompressing the next
        kept[meta["path"]] = np.asarray(proxy.get_unscaled())
    return apply_read_scaling(kept[meta["path"]][slicer], proxy.slope, proxy.inter)
