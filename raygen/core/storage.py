"""Run directories kept on object storage or a shared filesystem (`run.storage`, docs/cluster.md).

With `run.storage=s3://bucket/prefix` (or `gs://...`, or a path every node mounts), the run directory
`<runs-root>/<recipe>/<run>` has a twin at `<storage>/<recipe>/<run>`: Ray Train writes the checkpoints
there itself (its `storage_path`, through pyarrow filesystems), and raygen copies the rest of the run
directory (config, metrics.jsonl, sample grids, plots, eval results, the exported weights) next to them.
The local directory is a working copy on whichever node writes it: rank 0 pushes its metrics and grids
after every checkpoint, the driver pushes the rest as each stage ends. A run started again with its
`run.name` on a fresh cluster (empty runs root) pulls the twin back and resumes from its checkpoints.

The binding lives in two environment variables set by the job before Ray starts, so Ray workers (the
training ranks, sweep trials, evaluation tasks) inherit it through the job's runtime environment:
`RAYGEN_STORAGE` (the storage root as the user gave it) and `RAYGEN_RUNS_ROOT` (the driver's runs root,
which the local paths are relative to). A query string on the URI (e.g. `?endpoint_override=host:port&
scheme=http` for an S3-compatible server) is kept on every path derived from it.
"""
from __future__ import annotations

import os
from pathlib import Path

from raygen.config import ConfigError

ENV_STORAGE = "RAYGEN_STORAGE"
ENV_RUNS_ROOT = "RAYGEN_RUNS_ROOT"
SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "file://")
MANAGED = ("checkpoints",)  # written to storage by Ray Train itself
CHECKPOINT_CACHE = ".checkpoint_cache"  # local copies of checkpoints read back from storage


def is_uri(s: str) -> bool:
    return "://" in s


def check(storage: str | None) -> None:
    """A storage root must be a URI of a filesystem pyarrow knows or an absolute path."""
    if not storage:
        return
    if is_uri(storage):
        if not storage.startswith(SCHEMES):
            raise ConfigError(f"run.storage={storage!r}: use s3://bucket/prefix, gs://bucket/prefix or a path every "
                              "node mounts")
    elif not os.path.isabs(os.path.expanduser(storage)):
        raise ConfigError(f"run.storage={storage!r} is a relative path; give an absolute path every node mounts "
                          "(e.g. /nfs/raygen) or an s3:// / gs:// URI")


def bind(storage: str | None, runs_root) -> None:
    """Make `storage` the twin of `runs_root` for this process and the Ray workers it starts."""
    if storage:
        check(storage)
        if not is_uri(storage):
            storage = str(Path(storage).expanduser().resolve())
        os.environ[ENV_STORAGE] = storage
        os.environ[ENV_RUNS_ROOT] = str(Path(runs_root).expanduser().resolve())
    else:
        os.environ.pop(ENV_STORAGE, None)
        os.environ.pop(ENV_RUNS_ROOT, None)


def join(uri: str, *parts: str) -> str:
    """`uri`/parts, keeping a query string (`?endpoint_override=...`) at the end."""
    base, q, query = uri.partition("?")
    path = "/".join([base.rstrip("/"), *[p.strip("/") for p in parts if p]])
    return f"{path}{q}{query}"


def display(uri: str) -> str:
    """`uri` as printed: no query string, no credentials (`s3://KEY:SECRET@bucket/...`)."""
    base = uri.partition("?")[0]
    scheme, sep, rest = base.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def remote_of(local_dir) -> str | None:
    """The storage twin of `local_dir` (a run directory under the bound runs root), or None when no
    storage is bound or the directory is not under the runs root."""
    storage, root = os.environ.get(ENV_STORAGE), os.environ.get(ENV_RUNS_ROOT)
    if not storage or not root:
        return None
    try:
        rel = Path(local_dir).resolve().relative_to(Path(root))
    except ValueError:
        return None
    return join(storage, rel.as_posix())


def filesystem(uri: str):
    """(pyarrow filesystem, path on it) of a storage URI or path."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri if is_uri(uri) else str(Path(uri).resolve()))
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with the backend's text
        raise ConfigError(f"run.storage: cannot open {uri!r}: {e}") from None


def _files(fs, path: str) -> dict[str, object]:
    """{relative path: FileInfo} of every file under `path` on `fs` ({} when it does not exist)."""
    import pyarrow.fs

    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        return {}
    out = {}
    for f in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True)):
        if f.type == pyarrow.fs.FileType.File:
            out[f.path[len(path.rstrip("/")) + 1:]] = f
    return out


def _wanted(rel: str, only, skip) -> bool:
    """Whether `rel` is copied: its top-level entry in `only` (all when None), none of its directories
    in `skip` (Ray Train's own `checkpoints/` at any depth: a stage or a sweep trial has one too), no
    temporary file of an atomic write, no cached download of a checkpoint."""
    parts = rel.split("/")
    if any(p in skip for p in parts[:-1]) or parts[0] == CHECKPOINT_CACHE:
        return False
    if any(p.startswith(".") and p.endswith(".tmp") for p in parts):
        return False
    return only is None or parts[0] in only


def push(local_dir, only=None, skip=MANAGED) -> int:
    """Copy the files of `local_dir` that the twin lacks or holds at another size or an older time (the
    top-level entries in `only`, if given; never Ray Train's `checkpoints/`). Returns the files copied."""
    remote = remote_of(local_dir)
    if remote is None:
        return 0
    import pyarrow.fs

    fs, root = filesystem(remote)
    local_dir = Path(local_dir)
    have = _files(fs, root)
    copied = 0
    for p in sorted(local_dir.rglob("*")):
        rel = p.relative_to(local_dir).as_posix()
        if not p.is_file() or p.is_symlink() or not _wanted(rel, only, skip):
            continue
        st = p.stat()
        theirs = have.get(rel)
        if theirs is not None and theirs.size == st.st_size and theirs.mtime is not None \
                and theirs.mtime.timestamp() >= st.st_mtime:
            continue
        fs.create_dir(f"{root}/{rel}".rsplit("/", 1)[0], recursive=True)
        pyarrow.fs.copy_files(str(p), f"{root}/{rel}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
        copied += 1
    return copied


def pull(local_dir, only=None, skip=MANAGED, overwrite=False) -> int:
    """Copy the twin's files into `local_dir`: those missing locally (or, with `overwrite`, every one of
    a different size). Each file arrives atomically (a temporary name, then a rename)."""
    remote = remote_of(local_dir)
    if remote is None:
        return 0
    fs, root = filesystem(remote)
    return _download(fs, root, Path(local_dir), only, skip, overwrite)


def _download(fs, root: str, local_dir: Path, only=None, skip=MANAGED, overwrite=False) -> int:
    from raygen.core.files import atomic_write

    copied = 0
    for rel, info in sorted(_files(fs, root).items()):
        if not _wanted(rel, only, skip):
            continue
        dest = local_dir / rel
        if dest.exists() and not (overwrite and dest.stat().st_size != info.size):
            continue
        with fs.open_input_stream(f"{root}/{rel}") as src, atomic_write(dest) as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
        copied += 1
    return copied


def fetch_named_run(storage: str, runs_root, recipe: str, name: str) -> Path | None:
    """A named run kept in `storage` but absent from `runs_root` (a fresh cluster): its newest directory
    `<storage>/<recipe>/<stamp>-<name>` pulled into `<runs_root>/<recipe>/` (checkpoints stay in storage;
    Ray Train reads them there). Returns the local directory, or None when storage has no such run."""
    import pyarrow.fs

    fs, root = filesystem(join(storage, recipe))
    if fs.get_file_info(root).type == pyarrow.fs.FileType.NotFound:
        return None
    dirs = sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(root))
                  if i.type == pyarrow.fs.FileType.Directory and i.base_name.endswith(f"-{name}")
                  and i.base_name[:15].replace("-", "").isdigit())
    if not dirs:
        return None
    local = Path(runs_root).expanduser().resolve() / recipe / dirs[-1]
    if local.is_dir():
        return local
    local.mkdir(parents=True, exist_ok=True)
    n = _download(fs, f"{root}/{dirs[-1]}", local)
    print(f"fetched run {dirs[-1]} from {display(join(storage, recipe, dirs[-1]))} ({n} files; "
          "its checkpoints stay there)", flush=True)
    return local
