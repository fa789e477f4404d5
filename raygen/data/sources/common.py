"""What every source kind shares: the `Listing` it produces, the problem collector, the scanned
file tree, the labelling rules that only look at paths (class sub-folders, unlabeled), and the
image decoder used for files and zip members alike."""
from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from raygen.config import ConfigError
from raygen.data.transforms import ItemError

__all__ = [
    "ARRAY_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "NIFTI_EXTENSIONS",
    "PATH_KINDS",
    "Listing",
    "Problems",
    "Tree",
    "by_subfolder",
    "decode_image",
    "is_hidden",
    "path_hint",
    "unlabeled",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
ARRAY_EXTENSIONS = frozenset({".npy", ".npz"})
NIFTI_EXTENSIONS = frozenset({".nii", ".nii.gz"})  # a compound suffix: match with arrays.array_suffix
PATH_KINDS = ("class_folders", "folder", "zip", "npy")


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def path_hint(kind: str) -> str:
    return {
        "class_folders": "dir with <split>/<class>/ image folders",
        "folder": "dir of images",
        "zip": "file.zip",
        "npy": "file.npy|file.npz|file.nii[.gz]|dir of them",
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


class Problems:
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
class Tree:
    files: list[str]  # relative posix paths of regular files, hidden ones excluded
    top_dirs: list[str]  # non-hidden top-level directories, including unreadable ones
    unreadable: set  # relative paths of directories that could not be read


def by_subfolder(tree: Tree, problems: Problems, prefix: str = ""):
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


def unlabeled(files: list[str], prefix: str = ""):
    return [prefix + f for f in files], np.full(len(files), -1, np.int64), ["unlabeled"]


# --------------------------------------------------------------------------- decoding


DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb warning size (about 0.25 GB of RGB)


def decode_image(name: str, data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decoded image (`load()`, so truncation is an error here, not a grey band later). An image
    of more than `max_pixels` pixels is refused from its header, before any decoding: a file that
    decodes to gigabytes (a decompression bomb, or a scan far larger than intended) is skipped with
    that reason instead of taking a worker's memory."""
    ext = os.path.splitext(name)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ItemError(f"not an image file ({ext or 'no extension'})")
    if not data:
        raise ItemError("zero-byte file")
    try:
        with warnings.catch_warnings():  # the size is checked below, against source.max_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ItemError(f"image too large to decode safely ({e}); raise source.max_pixels to accept it") from e
    except UnidentifiedImageError as e:
        raise ItemError(f"corrupt or unrecognised image data ({ext}): cannot identify image file") from e
    except Exception as e:  # PIL raises assorted types on malformed headers
        raise ItemError(f"corrupt image header ({ext}): {e}") from e
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ItemError(f"image of {w}x{h} = {w * h:,} pixels is over source.max_pixels={max_pixels:,}; raise "
                        "source.max_pixels to accept it")
    fmt = img.format or ext.lstrip(".").upper()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError as e:
        raise ItemError(f"image too large to decode safely: {e}") from e
    except Exception as e:  # OSError "image file is truncated", SyntaxError, ValueError, struct.error
        raise ItemError(f"truncated or corrupt {fmt}: {e}") from e
    return img
