"""The encoded-data store: NPY shards + `meta.json`, written by the ingest pipeline and read back by
training as a streaming Ray Dataset or as memory-mapped arrays with random access by index and class.

```
<store>/
  meta.json          encoder, scaling factor, mean-or-sample, preprocessing, arrays, counts, class names
  listing.npz        every source item: key (relative path / member / file#slice) and label
  skipped.jsonl      every item not in the store, with the reason
  config.yaml        the command's resolved config
  shards/part-<first>-<last>/  index.npy label.npy <array>.npy ... skipped.json
```

A shard is written under a temporary name and renamed when complete, so a crash leaves only whole
shards; a re-run encodes exactly the listing indices no shard holds yet. Why NPY and not Parquet:
`bench/store_read.py` measured random-access reads (what class-balanced batching does) and
streaming reads; its numbers are in the README.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from raygen.core.files import write_text

SHARDS = "shards"
META = "meta.json"
LISTING = "listing.npz"
SKIPPED = "skipped.jsonl"


class StoreError(ValueError):
    pass


class StoreWriteError(RuntimeError):
    """A shard could not be written (full disk, permissions); the message names the directory."""


# ---------------------------------------------------------------- writing


def write_shard(store_dir: Path, arrays: dict[str, np.ndarray], skipped: list[dict]) -> str:
    """One complete shard, atomically: files go to a hidden temp directory that is renamed into place."""
    index = np.concatenate([arrays["index"], [s["index"] for s in skipped]]).astype(np.int64)
    name = f"part-{index.min():09d}-{index.max():09d}"
    final = Path(store_dir) / SHARDS / name
    tmp = final.parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for key, arr in arrays.items():
            with open(tmp / f"{key}.npy", "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
        write_text(tmp / "skipped.json", json.dumps(skipped))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return name


def write_rows(batch: dict, store_dir: str, arrays: list[str], crash_after: int = 0) -> dict:
    """The ingest's shard writer (a Ray task; numpy only, so its worker starts fast): encoded rows ->
    arrays, failed rows (non-empty `error`) -> the shard's skipped list."""
    failed = batch["error"] != ""
    ok = ~failed
    data = {"index": batch["index"][ok].astype(np.int64), "label": batch["label"][ok].astype(np.int64)}
    order = np.argsort(data["index"])
    data = {k: v[order] for k, v in data.items()}
    for name in arrays:
        data[name] = np.ascontiguousarray(batch[name][ok][order])
    skipped = [{"index": int(i), "path": str(k), "reason": str(r)}
               for i, k, r in zip(batch["index"][failed], batch["key"][failed], batch["error"][failed])]
    try:
        write_shard(Path(store_dir), data, skipped)
    except OSError as e:
        raise StoreWriteError(f"cannot write a shard in {store_dir}: {e.strerror or e}; free space or fix permissions, "
                              "then run the same command again (finished shards are kept)") from None
    if crash_after and len(shard_dirs(Path(store_dir))) >= crash_after:
        raise RuntimeError(f"injected crash after {crash_after} shards (ingest.crash_after_shards)")
    return {"written": np.array([int(ok.sum())]), "skipped": np.array([int(failed.sum())])}


def shard_dirs(store_dir: Path) -> list[Path]:
    root = Path(store_dir) / SHARDS
    return sorted(p for p in root.iterdir() if p.name.startswith("part-")) if root.is_dir() else []


def done_indices(store_dir: Path) -> np.ndarray:
    """Listing indices already in a complete shard (encoded or recorded as skipped)."""
    parts = []
    for d in shard_dirs(store_dir):
        parts.append(np.load(d / "index.npy"))
        parts.append(np.array([s["index"] for s in json.loads((d / "skipped.json").read_text())], np.int64))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def remove_temp_shards(store_dir: Path) -> int:
    root = Path(store_dir) / SHARDS
    stale = list(root.glob(".tmp-*")) if root.is_dir() else []
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return len(stale)


def collect_skipped(store_dir: Path) -> list[dict]:
    out = []
    for d in shard_dirs(store_dir):
        out.extend(json.loads((d / "skipped.json").read_text()))
    return sorted(out, key=lambda s: s["index"])


# ---------------------------------------------------------------- reading


class ShardedArray:
    """A read-only array over one named array of every shard, in listing order, memory-mapped.
    Supports len, shape, dtype and indexing by int, slice or integer array (fancy indexing reads
    each touched shard once)."""

    def __init__(self, parts: list[np.ndarray], order: np.ndarray, shard_of: np.ndarray, offset: np.ndarray):
        self.parts, self.order, self.shard_of, self.offset = parts, order, shard_of, offset
        self.dtype = parts[0].dtype if parts else np.dtype("float32")
        item = parts[0].shape[1:] if parts else ()
        self.shape = (len(order), *item)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            i = self.order[idx]
            return np.asarray(self.parts[self.shard_of[i]][self.offset[i]])
        rows = self.order[idx] if isinstance(idx, slice) else self.order[np.asarray(idx, np.int64)]
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        shards = self.shard_of[rows]
        for s in np.unique(shards):
            sel = np.nonzero(shards == s)[0]
            local = self.offset[rows[sel]]
            # sorted reads are sequential on disk; scatter back to the caller's order
            perm = np.argsort(local, kind="stable")
            out[sel[perm]] = self.parts[s][local[perm]]
        return out

    def __array__(self, dtype=None, copy=None):
        a = self[slice(None)]
        return a.astype(dtype) if dtype is not None else a


def class_index(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Positions of each class in `labels`, in order: one stable argsort, then the class boundaries."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[k]:bounds[k + 1]] for k in range(num_classes)]


class Store:
    """Open a finished store: `meta`, `labels`, `keys`, `array(name)`, `class_indices(c)`,
    `sample_class_balanced()`, `dataset()`. Positions 0..len-1 follow the listing order (skipped items are absent)."""

    def __init__(self, path):
        self.path = Path(path)
        meta_file = self.path / META
        if not meta_file.is_file():
            hint = (" (its shards are there: the ingest has not finished; re-run the same command to complete it)"
                    if shard_dirs(self.path) else "")
            raise StoreError(f"{self.path} is not a finished store: no {META}{hint}")
        self.meta = json.loads(meta_file.read_text())
        self.shards = shard_dirs(self.path)
        index = [np.load(d / "index.npy") for d in self.shards]
        sizes = [len(i) for i in index]
        self.listing_index = np.concatenate(index) if index else np.zeros(0, np.int64)
        shard_of = np.repeat(np.arange(len(sizes)), sizes)
        offset = np.concatenate([np.arange(n) for n in sizes]) if sizes else np.zeros(0, np.int64)
        order = np.argsort(self.listing_index, kind="stable")
        # rows are addressed by store position p: order[p] is the concatenated row of position p
        self._order, self._shard_of, self._offset = order, shard_of, offset
        self.listing_index = self.listing_index[order]
        if len(self.listing_index) != self.meta["counts"]["stored"]:
            raise StoreError(f"{self.path}: meta.json says {self.meta['counts']['stored']} items but the shards "
                             f"hold {len(self.listing_index)}; re-run the ingest command to repair it")
        self.labels = self.array("label")[:].astype(np.int64)
        self.class_names: list[str] = self.meta["class_names"]
        self._by_class = None
        self._keys = None

    def __len__(self) -> int:
        return len(self.listing_index)

    @property
    def array_names(self) -> list[str]:
        return list(self.meta["arrays"])

    def array(self, name: str) -> ShardedArray:
        if name not in ("index", "label") and name not in self.meta["arrays"]:
            raise StoreError(f"{self.path} has no array {name!r}; it has {', '.join(self.meta['arrays'])}")
        parts = [np.load(d / f"{name}.npy", mmap_mode="r") for d in self.shards]
        return ShardedArray(parts, self._order, self._shard_of, self._offset)

    def keys(self, positions=None) -> np.ndarray:
        """Source keys (relative paths etc.) of store positions, for showing originals."""
        if self._keys is None:
            self._keys = np.load(self.path / LISTING, allow_pickle=False)["keys"]
        keys = self._keys
        idx = self.listing_index if positions is None else self.listing_index[np.asarray(positions)]
        return keys[idx]

    def class_indices(self, c: int) -> np.ndarray:
        """Store positions of class c (memory-mapped class-balanced sampling draws from these)."""
        if self._by_class is None:
            self._by_class = class_index(self.labels, len(self.class_names))
        return self._by_class[c]

    def sample_class_balanced(self, classes, per_class: int, rng: np.random.Generator) -> np.ndarray:
        """Positions [len(classes), per_class]: `per_class` items of each given class, uniformly with
        replacement (a class may hold fewer items than asked for), drawn from the caller's rng."""
        out = np.empty((len(classes), per_class), np.int64)
        for row, c in enumerate(classes):
            pool = self.class_indices(int(c))
            if len(pool) == 0:
                raise StoreError(f"class {c} ({self.class_names[int(c)]!r}) has no items in {self.path}")
            out[row] = pool[rng.integers(0, len(pool), per_class)]
        return out

    def dataset(self, names=None, flip_copies: str = "both"):
        """A Ray Dataset with one block per shard: rows {<array>: ..., label}. With flipped copies
        stored, `both` streams the plain and the flipped version of every item (2N rows, the
        flip augmentation without randomness), `plain` only the plain ones."""
        import ray.data

        names = list(names or [n for n in self.array_names if not n.endswith("_flip")])
        with_flip = flip_copies == "both" and all(f"{n}_flip" in self.meta["arrays"] for n in names)
        load = _ShardLoader(names, with_flip)
        return ray.data.from_items([{"shard": str(d)} for d in self.shards],
                                   override_num_blocks=max(1, len(self.shards))).map_batches(
            load, batch_size=1, batch_format="numpy")


class _ShardLoader:
    def __init__(self, names, with_flip):
        self.names, self.with_flip = names, with_flip

    def __call__(self, batch):
        d = Path(batch["shard"][0])
        label = np.load(d / "label.npy")
        out = {n: np.load(d / f"{n}.npy") for n in self.names}
        if self.with_flip:
            out = {n: np.concatenate([out[n], np.load(d / f"{n}_flip.npy")]) for n in self.names}
            label = np.concatenate([label, label])
        out["label"] = label.astype(np.int64)
        return out


def write_meta(store_dir: Path, meta: dict) -> None:
    write_text(Path(store_dir) / META, json.dumps(meta, indent=2, default=str))


def write_skipped(store_dir: Path, records: list[dict]) -> None:
    write_text(Path(store_dir) / SKIPPED, "".join(json.dumps(r) + "\n" for r in records))
