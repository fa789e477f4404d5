"""The one way raygen writes a file that something else may read: to a temporary name in the same
directory, then `os.replace`, so a reader (another Ray worker, a resumed run, a user) sees either the
old file or the whole new one, never half of it."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file next to `path` that replaces `path` only if the block finishes.

    Created with `open(..., "xb")` rather than `tempfile` so the result gets normal umask permissions;
    flushed to disk before the rename so a crash cannot leave an empty file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text.encode())


def write_json(path: str | os.PathLike, obj) -> None:
    import json

    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_torch(obj, path: str | os.PathLike) -> None:
    """`torch.save` through `atomic_write`."""
    import torch

    with atomic_write(path) as f:
        torch.save(obj, f)


def cache_dir() -> Path:
    """Where downloaded weights and derived caches go: `$RAYGEN_CACHE`, else `~/.cache/raygen`."""
    return Path(os.environ.get("RAYGEN_CACHE") or Path.home() / ".cache" / "raygen")
