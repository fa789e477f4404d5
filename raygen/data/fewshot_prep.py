"""`jobs/prepare_fewshot.py`: the class split and the episode tables of few-shot generation (FSDiT: the
supports of a class -> new images of that class, with train and test classes disjoint).

    listing (driver) -> split_classes -> episode_table per split -> Ray Data -> <dir>/episodes/<split>/*.parquet
                                                                             -> <dir>/split.json

The tables hold listing positions only, no pixels: a store made from the same source (same listing,
see `listing_sha256`) is indexed by the same positions. The output is a pure function of the listing
and the config, so running the job again gives identical tables; it is written to a temporary name
first, so a reader sees the old tables or the new ones, never a mix.

Read back with `load_split(dir)` and `load_episodes(dir, split)` (pyarrow, no Ray).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from raygen.config import ConfigError, to_dict
from raygen.data.episodes import SPLITS, episode_table, split_classes
from raygen.data.sources import EMBEDDED_KINDS, Listing, SourceConfig, list_source

__all__ = ["FORMAT", "FewshotPrepConfig", "build_fewshot", "listing_sha256", "load_episodes", "load_split", "main", "parse_split",
           "prepare_fewshot", "write_fewshot"]

FORMAT = "raygen-fewshot/1 (parquet episode tables)"
RECIPE = "prepare_fewshot"
COLUMNS = ("episode", "target", "supports", "label", "set", "rotation")


def parse_split(text: str) -> tuple[int, int, int]:
    """`60/16/20` (or `60,16,20`) -> (60, 16, 20): the train/val/test class counts."""
    parts = str(text).replace(",", "/").split("/")
    try:
        counts = tuple(int(p) for p in parts)
    except ValueError:
        counts = ()
    if len(counts) != 3 or any(c < 0 for c in counts):
        raise ConfigError(f"split={text!r} must be three class counts train/val/test >= 0, e.g. split=60/16/20")
    return counts


@dataclass
class FewshotPrepConfig:
    source: SourceConfig = field(default_factory=lambda: SourceConfig(kind="fewshot"))
    split: str = "60/16/20"  # classes for train/val/test (disjoint); classes beyond the sum are left out
    seed: int = 42  # the class split and the episode draws
    sets: int = 100  # draws of shots+1 images per class; each gives shots+1 episodes (every image once the target)
    shots: int = 5  # support images per episode
    out: Optional[str] = None  # default: <runs-root>/fewshot/<source>-<split>-<sets>x<shots>-seed<seed>-<hash>

    def validate(self):
        parse_split(self.split)
        if self.sets < 1 or self.shots < 1:
            raise ConfigError(f"sets and shots must be >= 1, got sets={self.sets}, shots={self.shots}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")


def listing_sha256(listing: Listing) -> str:
    """Digest of the listing's keys and labels, computed as a store's ingest.json `listing_sha256`: equal
    digests mean the episode positions index that store."""
    text = "\n".join(f"{k}\t{lab}" for k, lab in zip(listing.keys, listing.labels))
    return hashlib.sha256(text.encode()).hexdigest()


def config_hash(cfg: FewshotPrepConfig) -> str:
    d = to_dict(cfg)
    d.pop("out")
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_dir(cfg: FewshotPrepConfig, runs_root: str) -> Path:
    """Named by what the tables depend on, so the same command writes (and rewrites) the same directory."""
    src = cfg.source
    name = src.kind if src.kind in EMBEDDED_KINDS else Path(str(src.path).rstrip("/")).stem
    parts = [name, src.split, "-".join(str(c) for c in parse_split(cfg.split)), f"{cfg.sets}x{cfg.shots}",
             f"seed{cfg.seed}", config_hash(cfg)]
    return Path(runs_root).expanduser().resolve() / "fewshot" / "-".join(p for p in parts if p)


def _where(cfg: FewshotPrepConfig, listing: Listing) -> str:
    src = cfg.source
    return f"source.path={src.path!r}" if src.path else f"source.kind={listing.kind}"


def plan_tables(cfg: FewshotPrepConfig, listing: Listing) -> tuple[dict, dict]:
    """(class ids per split, episode table per split), after checking that the listing can give them; a
    problem is a ConfigError naming the class (its folder), the key to change and the fix."""
    counts = parse_split(cfg.split)
    labelled = listing.labels[listing.labels >= 0]
    where = _where(cfg, listing)
    if not listing.class_names or len(labelled) == 0:
        raise ConfigError(f"{where} lists {len(listing.keys)} images without class labels; few-shot episodes need "
                          "classes: point source.path at a class-folder tree <path>/<class>/<images>")
    present = np.bincount(labelled, minlength=len(listing.class_names))
    if sum(counts) > len(listing.class_names):
        raise ConfigError(f"split={cfg.split} needs {sum(counts)} classes but {where} has "
                          f"{len(listing.class_names)}; lower the counts (they may sum to at most "
                          f"{len(listing.class_names)}) or use a source with more classes")
    try:
        classes = split_classes(listing.class_names, counts, cfg.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    need = cfg.shots + 1
    for name in SPLITS:
        short = [c for c in classes[name] if present[c] < need]
        if short:
            c = short[0]
            more = f" (and {len(short) - 1} more {name} classes)" if len(short) > 1 else ""
            raise ConfigError(
                f"class {listing.class_names[c]!r} of {where} has {present[c]} images{more}, but shots={cfg.shots} "
                f"needs {need} per class (a target and {cfg.shots} supports); add images to it, remove its folder, "
                f"or lower shots")
    tables = {name: episode_table(listing.labels, classes[name], cfg.sets, cfg.shots, cfg.seed) for name in SPLITS}
    return classes, tables


def _arrow_table(table: dict):
    import pyarrow as pa

    n, shots = table["supports"].shape
    supports = pa.FixedSizeListArray.from_arrays(pa.array(table["supports"].reshape(-1), pa.int64()), shots)
    return pa.table({"episode": pa.array(np.arange(n, dtype=np.int64)), "target": table["target"],
                     "supports": supports, "label": table["label"], "set": table["set"],
                     "rotation": table["rotation"]})


def write_fewshot(out_dir: Path, tables: dict, split_meta: dict) -> None:
    """Write the episode tables through Ray Data (`episodes/<split>/*.parquet`) and `split.json`. The tables
    go to a temporary folder that then replaces `episodes/` whole."""
    import ray.data

    from raygen.core.files import write_json

    out_dir = Path(out_dir)
    quiet = logging.getLogger("ray.data.dataset")  # its "Data sink Parquet finished" lines say nothing new
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    tmp = out_dir / f".episodes.{os.getpid()}.tmp"
    old = out_dir / f".episodes.{os.getpid()}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, table in tables.items():
            arrow = _arrow_table(table)
            if arrow.num_rows:
                ray.data.from_arrow(arrow).write_parquet(str(tmp / name))
            (tmp / name).mkdir(parents=True, exist_ok=True)  # an empty split is an empty folder
        final = out_dir / "episodes"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        quiet.setLevel(level)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    write_json(out_dir / "split.json", split_meta)


def build_fewshot(cfg: FewshotPrepConfig) -> tuple[dict, dict, Listing]:
    """(split.json, episode tables, listing): everything but the writing, on the driver, no Ray."""
    listing = list_source(cfg.source)
    classes, tables = plan_tables(cfg, listing)
    counts = np.bincount(listing.labels[listing.labels >= 0], minlength=len(listing.class_names))
    meta = {
        "format": FORMAT,
        "seed": cfg.seed,
        "split": list(parse_split(cfg.split)),
        "sets": cfg.sets,
        "shots": cfg.shots,
        "listing": {"kind": listing.kind, "num_items": len(listing.keys), "listing_sha256": listing_sha256(listing),
                    "num_classes": len(listing.class_names), "problems": len(listing.problems)},
        "source": {**to_dict(cfg.source), "resolved_kind": listing.kind, "info": listing.info},
        "splits": {name: {"class_ids": [int(c) for c in classes[name]],
                          "class_names": [listing.class_names[c] for c in classes[name]],
                          "images": int(counts[classes[name]].sum()) if classes[name] else 0,
                          "episodes": int(len(tables[name]["target"]))} for name in SPLITS},
    }
    return meta, tables, listing


def prepare_fewshot(cfg: FewshotPrepConfig, out_dir: Path, built: tuple | None = None) -> dict:
    """List the source, split its classes, build and write the episode tables and config.yaml (plus the
    listing's problems in skipped.jsonl); returns split.json. `built`: what `build_fewshot` returned."""
    from raygen.config import dump_yaml

    meta, tables, listing = built or build_fewshot(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_fewshot(out_dir, tables, meta)
    dump_yaml(cfg, out_dir / "config.yaml")
    if listing.problems:
        from raygen.data.store import write_skipped

        write_skipped(out_dir, listing.problems)
    return meta


# ---------------------------------------------------------------- reading back


def load_split(fewshot_dir) -> dict:
    """split.json of a prepared few-shot directory (class ids and names per split, seed, listing digest)."""
    path = Path(fewshot_dir) / "split.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; make it with python jobs/prepare_fewshot.py")
    return json.loads(path.read_text())


def load_episodes(fewshot_dir, split: str) -> dict:
    """The episode table of `split` as numpy arrays, in table order (by the `episode` column, whatever
    the file names): int64 `episode`, `target`, `supports` [E, shots], `label`; int32 `set`, `rotation`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    shots = int(load_split(fewshot_dir)["shots"])
    folder = Path(fewshot_dir) / "episodes" / split
    files = sorted(p for p in folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found; make it with python jobs/prepare_fewshot.py")
        return {"episode": np.zeros(0, np.int64), "target": np.zeros(0, np.int64),
                "supports": np.zeros((0, shots), np.int64), "label": np.zeros(0, np.int64),
                "set": np.zeros(0, np.int32), "rotation": np.zeros(0, np.int32)}
    table = pa.concat_tables([pq.read_table(f, columns=list(COLUMNS)) for f in files])
    table = table.sort_by("episode")
    out = {}
    for name in COLUMNS:
        col = table.column(name).combine_chunks()
        if name == "supports":
            out[name] = col.flatten().to_numpy().astype(np.int64).reshape(-1, shots)
        else:
            out[name] = col.to_numpy().astype(np.int32 if name in ("set", "rotation") else np.int64)
    return out


# ---------------------------------------------------------------- the job


def _with_kind_for_path(overrides: list[str]) -> list[str]:
    """The default preset generates the embedded set (source.kind=fewshot); `source.path=...` on the
    command line means a real source, so it also selects source.kind=auto unless the kind is given."""
    from raygen.config import parse_override

    keys = {".".join(parse_override(o)[0]) for o in overrides}
    if "source.path" in keys and "source.kind" not in keys:
        return ["source.kind=auto", *overrides]
    return list(overrides)


def main(argv=None) -> Path:
    """`python jobs/prepare_fewshot.py [key=value ...]`: prints the class and episode counts per split and
    ends with `fewshot_dir: <path>`."""
    from raygen.config import load_config
    from raygen.core.job import fail, init_ray, interrupts, lock_run, parse_args, preset_dir, prepare_run_dir

    args = parse_args(RECIPE, FewshotPrepConfig, argv)
    try:
        cfg, _ = load_config(FewshotPrepConfig, preset=args.preset, preset_dir=preset_dir(RECIPE),
                             config_file=args.config, overrides=_with_kind_for_path(args.overrides))
        out_dir = Path(cfg.out).expanduser().resolve() if cfg.out else default_dir(cfg, args.runs_root)
        built = build_fewshot(cfg)  # a source that cannot give the split fails here, before Ray starts
        lock_run(out_dir.parent, f"fewshot-{out_dir.name}", f"a prepare_fewshot into {out_dir}")
        prepare_run_dir(out_dir)
        with interrupts(lambda: f"interrupted: prepare_fewshot into {out_dir}; its tables are replaced whole, so "
                                f"the folder holds the previous ones or none; run the same command again"):
            init_ray()
            meta = prepare_fewshot(cfg, out_dir, built)
    except ConfigError as e:
        fail(str(e))
    lst = meta["listing"]
    print(f"listing: {lst['num_items']} images of {lst['num_classes']} classes ({lst['kind']})"
          + (f"; {lst['problems']} listing problems skipped (see skipped.jsonl)" if lst["problems"] else ""))
    for name in SPLITS:
        s = meta["splits"][name]
        print(f"{name}: {len(s['class_ids'])} classes, {s['episodes']} episodes ({s['images']} images)")
    print(f"fewshot_dir: {out_dir}", flush=True)
    return out_dir
