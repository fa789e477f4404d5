"""Directory sources: `class_folders` (`<path>/[<split>/]<class>/<files>`, the ImageNet layout) and
`folder` (any tree of files, labelled by an EDM `dataset.json`, by top-level sub-folders, or not
at all). The directory scan here is also what the npy kind lists a directory of arrays with."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

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
from raygen.data.sources.edm_zip import label_tree
from raygen.data.transforms import ItemError

if TYPE_CHECKING:
    from raygen.data.sources import SourceConfig

__all__ = ["list_class_folders", "list_folder", "read_file", "scan_dir"]


def scan_dir(root: Path, problems: Problems, prefix: str = "") -> Tree:
    """Every regular file under root. Hidden entries, unreadable directories, broken links and
    special files become problems. `prefix` is prepended to problem paths (the split folder)."""
    tree = Tree([], [], set())
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
            if is_hidden(e.name):
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
                    target = os.readlink(e.path)
                except OSError:
                    target = "?"
                problems.add(prefix + r, f"dangling symbolic link: its target {target} does not exist")
                if not rel:
                    tree.top_dirs.append(e.name)
                    tree.unreadable.add(r)
            else:
                problems.add(prefix + r, "not a regular file")
    tree.files.sort()
    return tree


def list_class_folders(cfg: SourceConfig, problems: Problems) -> Listing:
    root = Path(cfg.path)
    prefix = f"{cfg.split}/" if cfg.split else ""
    tree = scan_dir(root / cfg.split if cfg.split else root, problems, prefix)
    if not tree.top_dirs:
        raise ConfigError(
            f"source.path={cfg.path!r}: no class folders in {root / (cfg.split or '')}; "
            "source.kind=class_folders expects <path>/[<split>/]<class>/<images> (set source.split or source.kind=folder)"
        )
    if cfg.labels == "none":
        keys, labels, names = unlabeled(tree.files, prefix)
    else:
        keys, labels, names = by_subfolder(tree, problems, prefix)
    return Listing("class_folders", keys, labels, names, info={"root": str(root.resolve())})


def list_folder(cfg: SourceConfig, problems: Problems) -> Listing:
    root = Path(cfg.path)
    tree = scan_dir(root, problems)
    dj = root / "dataset.json"
    text = dj.read_bytes() if dj.is_file() else None
    keys, labels, names = label_tree(cfg, tree, problems, text, f"source.path={cfg.path!r}")
    return Listing("folder", keys, labels, names, info={"root": str(root.resolve())})


def read_file(info: dict, key: str) -> Image.Image:
    """One file of a class_folders/folder listing (`key` is relative to `info["root"]`)."""
    path = Path(info["root"]) / key
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ItemError(f"not an image file ({ext or 'no extension'})")
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ItemError(f"missing file (deleted after listing?): {e}") from e
    except OSError as e:
        raise ItemError(f"unreadable file: {e}") from e
    return decode_image(key, data, info.get("max_pixels", DEFAULT_MAX_PIXELS))
