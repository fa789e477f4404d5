"""Read speed for training: raygen's NPY store vs Parquet (raw-bytes tensor column), on the same synthetic
dataset built in both formats in a temp dir, in one process.

* NPY: written by `raygen.data.store.write_shard` (+ the minimal meta.json `Store` needs), read with
  `Store(...).array("latent")[positions]` (memory-mapped `ShardedArray`) and `Store.dataset()`.
* Parquet: one file per shard, the latent as a raw-bytes `fixed_size_binary(row bytes)` column viewed
  as float16 [*shape] without a copy (a real store would keep shape/dtype in the schema metadata) +
  int64 label, row groups of --row-group rows, uncompressed (float16 latents hardly compress). Bytes,
  because the self-describing `arrow.fixed_shape_tensor` column (a FixedSizeList: Parquet stores it
  as a repeated field with per-value levels) decodes far slower: `decode_one_file_s` times both on one
  shard. Random access is measured two ways: `tables` = every file read once with
  `pq.read_table(memory_map=True)`, combined into one chunk and kept open, batches gathered with
  `take` (the whole dataset decoded into the process's memory); `row groups` = `ParquetFile`s kept
  open, each batch reads the row groups that hold its rows, then `take` (a reader that does not hold
  everything in RAM).

Measured: random-access batches (class-balanced 64 classes x 64 items = 4096 rows, and uniform 256
rows; same positions for every reader; median rows/s of --repeats after a warm-up), the first batch
after opening with the files evicted from the page cache (posix_fadvise DONTNEED), full Ray Data
passes with iter_batches(256) (median of --passes after a warm-up pass), and the size on disk.
Readers take turns within each repeat, as the machine may be shared.

    python bench/store_read.py [--num 32768] [--shard-size 4096] [--shape 4,32,32] [--row-group 1024]
    # -> bench/results/store_read.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raygen.core.files import write_text  # noqa: E402
from raygen.data.store import Store, write_meta, write_shard  # noqa: E402


def build(root: Path, n: int, shard: int, shape: tuple, classes: int, row_group: int, seed: int):
    rng = np.random.default_rng(seed)
    npy, par = root / "npy", root / "parquet"
    par.mkdir(parents=True)
    for start in range(0, n, shard):
        idx = np.arange(start, min(start + shard, n), dtype=np.int64)
        label = rng.integers(0, classes, len(idx)).astype(np.int64)
        latent = rng.standard_normal((len(idx), *shape), dtype=np.float32).astype(np.float16)
        write_shard(npy, {"index": idx, "label": label, "latent": latent}, [])
        width = latent[0].nbytes
        column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(idx), [None, pa.py_buffer(latent)])
        write_parquet(par / f"part-{start:09d}.parquet", {"latent": column, "label": label}, row_group)
        if start == 0:  # the same shard as a fixed_shape_tensor column, for decode_one_file_s
            flat = pa.FixedSizeListArray.from_arrays(pa.array(latent.reshape(-1)), latent[0].size)
            tensor = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float16(), list(shape)), flat)
            write_parquet(root / "tensor.parquet", {"latent": tensor, "label": label}, row_group)
    write_meta(npy, {"format": "raygen-store/1 (NPY shards)", "class_names": [str(c) for c in range(classes)],
                     "arrays": {"latent": {"shape": list(shape), "dtype": "float16"}}, "counts": {"stored": n}})
    return npy, par


def write_parquet(path: Path, columns: dict, row_group: int) -> None:
    pq.write_table(pa.table(columns), path, row_group_size=row_group, compression="none")
    with open(path, "rb") as f:  # clean pages, so that evict() can drop them
        os.fsync(f.fileno())


def files(d: Path) -> list[Path]:
    return [p for p in sorted(d.rglob("*")) if p.is_file()]


def evict(*dirs: Path) -> None:
    for p in [p for d in dirs for p in files(d)]:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


SHAPE = (4, 32, 32)  # set by main


def latent(col) -> np.ndarray:
    """A fixed_size_binary column as float16 [n, *SHAPE], without a copy for a single chunk."""
    a = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    w = a.type.byte_width
    return np.frombuffer(a.buffers()[1], np.uint8, len(a) * w, a.offset * w).view(np.float16).reshape(len(a), *SHAPE)


def open_tables(par: Path, shard: int):
    # one chunk per file: `take` on a many-chunk column would concatenate the chunks on every call
    tables = [pq.read_table(p, columns=["latent"], memory_map=True).combine_chunks() for p in files(par)]

    def get(pos):
        out, s_of = None, pos // shard
        for s in np.unique(s_of):
            sel = np.nonzero(s_of == s)[0]
            rows = latent(tables[s].column("latent").take(pos[sel] - s * shard))
            out = np.empty((len(pos), *rows.shape[1:]), rows.dtype) if out is None else out
            out[sel] = rows
        return out
    return get


def open_row_groups(par: Path, shard: int, row_group: int):
    pfs = [pq.ParquetFile(p, memory_map=True) for p in files(par)]

    def get(pos):
        out, s_of = None, pos // shard
        for s in np.unique(s_of):
            sel = np.nonzero(s_of == s)[0]
            local = pos[sel] - s * shard
            rg = local // row_group
            need = np.unique(rg)  # row groups are full except the last, so they concatenate in order:
            at = np.searchsorted(need, rg) * row_group + local % row_group
            rows = latent(pfs[s].read_row_groups(need.tolist(), columns=["latent"]).column("latent").take(at))
            out = np.empty((len(pos), *rows.shape[1:]), rows.dtype) if out is None else out
            out[sel] = rows
        return out
    return get


def open_npy(npy: Path):
    arr = Store(npy).array("latent")
    return lambda pos: arr[pos]


def rates(readers: dict, batches, repeats: int, min_s: float = 0.3) -> dict:
    """Median rows/s of each reader over `repeats` runs of >= min_s, after a warm-up; the readers
    take turns within every repeat, so a busy neighbour slows them alike."""
    for get in readers.values():
        for b in batches[:2]:
            get(b)
    out, i = {name: [] for name in readers}, 0
    for _ in range(repeats):
        for name, get in readers.items():
            n, t0 = 0, time.perf_counter()
            while (dt := time.perf_counter() - t0) < min_s or n == 0:
                n += len(get(batches[i % len(batches)]))
                i += 1
            out[name].append(n / dt)
    return {name: statistics.median(r) for name, r in out.items()}


def one_pass(ds, n: int, fmt: str) -> float:
    """rows/s of one full pass. Parquet batches come as Arrow tables and are viewed as ndarrays
    (Ray's numpy format would turn the bytes column into an array of Python bytes objects)."""
    rows, t0 = 0, time.perf_counter()
    for b in ds.iter_batches(batch_size=256, batch_format=fmt):
        rows += len(b["latent"] if fmt == "default" else latent(b.column("latent")))
    assert rows == n, rows
    return rows / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=32768)
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--shape", default="4,32,32")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--row-group", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--passes", type=int, default=2, help="timed Ray Data passes per format")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "store_read.json"))
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    global SHAPE
    shape = SHAPE = tuple(int(s) for s in args.shape.split(","))

    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="store_read-") as tmp:
        t0 = time.perf_counter()
        npy, par = build(Path(tmp), args.num, args.shard_size, shape, args.classes, args.row_group, args.seed)
        build_s = time.perf_counter() - t0
        opens = {"npy": lambda: open_npy(npy), "parquet_tables": lambda: open_tables(par, args.shard_size),
                 "parquet_row_groups": lambda: open_row_groups(par, args.shard_size, args.row_group)}

        # the same positions for every reader: class-balanced (64 classes x 64 items, with replacement)
        store, rng = Store(npy), np.random.default_rng(args.seed + 1)
        present = np.unique(store.labels)
        balanced = [np.concatenate([rng.choice(store.class_indices(c), 64) for c in
                                    rng.choice(present, min(64, len(present)), replace=False)]) for _ in range(16)]
        uniform = [rng.integers(0, len(store), 256) for _ in range(64)]

        decode = {}
        for name, path in (("bytes", files(par)[0]), ("fixed_shape_tensor", Path(tmp) / "tensor.parquet")):
            pq.read_table(path, memory_map=True)
            t0 = time.perf_counter()
            pq.read_table(path, memory_map=True)
            decode[name] = time.perf_counter() - t0

        cold = {}
        for name, make in opens.items():
            evict(npy, par)
            t0 = time.perf_counter()
            make()(balanced[0])
            cold[name] = time.perf_counter() - t0

        readers = {name: make() for name, make in opens.items()}
        ref = readers["npy"](balanced[0])
        assert all(np.array_equal(r(balanced[0]), ref) for r in readers.values())
        random = {"class_balanced_4096": rates(readers, balanced, args.repeats),
                  "uniform_256": rates(readers, uniform, args.repeats)}
        del readers

        # a warm-up pass each, then --passes timed passes taking turns; median rows/s
        sets = {"npy": (Store(npy).dataset(["latent"]), "default"),
                "parquet": (ray.data.read_parquet(str(par)), "pyarrow")}
        passes = {k: [] for k in sets}
        for i in range(args.passes + 1):
            for k, (ds, fmt) in sets.items():
                r = one_pass(ds, args.num, fmt)
                if i:
                    passes[k].append(r)
        streaming = {k: statistics.median(r) for k, r in passes.items()}
        disk = {"npy": sum(p.stat().st_size for p in files(npy)),
                "parquet": sum(p.stat().st_size for p in files(par))}
    ray.shutdown()

    ratios = {f"random_{pat}_vs_{k}": round(v["npy"] / v[k], 2) for pat, v in random.items()
              for k in ("parquet_tables", "parquet_row_groups")}
    ratios.update(streaming=round(streaming["npy"] / streaming["parquet"], 2),
                  disk=round(disk["npy"] / disk["parquet"], 3))

    print(f"{'rows/s':<34}{'npy':>12}{'pq tables':>12}{'pq rowgrp':>12}")
    for pat, v in random.items():
        print(f"random {pat:<27}" + "".join(f"{v[k]:>12,.0f}" for k in opens))
    print(f"{'cold open + 1st balanced batch s':<34}" + "".join(f"{cold[k]:>12.3f}" for k in opens))
    print(f"{'Ray Data stream (iter_batches 256)':<34}{streaming['npy']:>12,.0f}{streaming['parquet']:>12,.0f}")
    print(f"{'parquet: decode 1 file s':<34}" + ", ".join(f"{k} {v:.3f}" for k, v in decode.items()))
    print(f"{'disk MiB':<34}{disk['npy'] / 2**20:>12.1f}{disk['parquet'] / 2**20:>12.1f}")
    print("npy/parquet:", ", ".join(f"{k} {v}" for k, v in ratios.items()))

    cb, r = random["class_balanced_4096"], ratios
    conclusion = (f"Class-balanced random batches: NPY memmap {cb['npy']:,.0f} rows/s = "
                  f"{r['random_class_balanced_4096_vs_parquet_row_groups']}x Parquet read by row group, "
                  f"{r['random_class_balanced_4096_vs_parquet_tables']}x Parquet decoded whole into RAM; "
                  f"Ray Data streaming {r['streaming']}x Parquet; disk {r['disk']}x.")
    print(conclusion)
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "loadavg_start_end": [load0, os.getloadavg()],
                    "numpy": np.__version__, "pyarrow": pa.__version__, "ray": ray.__version__},
        "config": {**vars(args), "shape": list(shape), "dtype": "float16",
                   "parquet_column": "fixed_size_binary (raw float16 bytes)", "parquet_compression": "none"},
        "build_s": round(build_s, 2),
        "random_rows_per_s": {p: {k: round(x) for k, x in v.items()} for p, v in random.items()},
        "cold_open_first_batch_s": {k: round(v, 4) for k, v in cold.items()},
        "streaming_rows_per_s": {k: round(v) for k, v in streaming.items()},
        "decode_one_file_s": {k: round(v, 4) for k, v in decode.items()},
        "disk_bytes": disk,
        "ratios_npy_over_parquet": ratios,
        "conclusion": conclusion,
    }
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
