"""The checkpoint format (docs/checkpoints.md).

A checkpoint directory holds a small backend-neutral record, `record.json` (format, backend, step,
counters, data position, the network's NetSpec, the recipe), plus the backend's payload: for torch,
`state.pt` (model, EMA, optimizer; written by rank 0) and `rng_rank<r>.pt` (every rank's RNG
states, so a resumed run continues the exact random stream). Files are written atomically into a
temporary directory; Ray Train then copies it under `<run_dir>/checkpoints/` and registers it only
once the copy is complete. Which checkpoint is the latest is Ray Train's own record
(`checkpoint_manager_snapshot.json`), not the newest name on disk.

At the end of a run the EMA weights are also exported alone as `<run_dir>/net_ema.pt`: the NetSpec and
the state dict, enough to rebuild the network without the training config (`load_exported`).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from raygen.config import ConfigError
from raygen.core.contracts import NetSpec
from raygen.core.files import save_torch, write_json

FORMAT = 1
RECORD_FILE = "record.json"
STATE_FILE = "state.pt"
EXPORT_FILE = "net_ema.pt"


def write_record(ckpt_dir: Path, *, backend: str, counters: dict, net: NetSpec, recipe: str) -> None:
    write_json(Path(ckpt_dir) / RECORD_FILE, {"format": FORMAT, "backend": backend, "step": counters["step"],
                                              "counters": counters, "net": net.to_dict(), "recipe": recipe})


def read_record(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / RECORD_FILE).read_text())


def latest_checkpoint(run_dir) -> Path | None:
    """The directory of the latest checkpoint Ray Train registered for the run in `run_dir` (None if none)."""
    from ray.train import Result

    from raygen.core import storage

    remote = storage.remote_of(run_dir)
    where = storage.join(remote, "checkpoints") if remote else Path(run_dir) / "checkpoints"
    if not remote and not where.is_dir():
        return None
    try:
        with warnings.catch_warnings():  # Ray's own use of a deprecated pydantic call; nothing for the user
            warnings.filterwarnings("ignore", message=r".*parse_obj.*", category=DeprecationWarning)
            result = Result.from_path(str(where))
    except RuntimeError:  # no checkpoint manager snapshot: Ray Train never registered one
        return None
    if result.checkpoint is None:
        return None
    if not remote or not storage.is_uri(remote):  # local, or a filesystem every node mounts
        return Path(result.checkpoint.path)
    # in object storage: a local copy, made once per checkpoint (atomically: a cut download is not used)
    import shutil

    cache = Path(run_dir) / storage.CHECKPOINT_CACHE
    local = cache / Path(result.checkpoint.path).name
    if not local.is_dir():
        tmp = cache / f".{local.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        result.checkpoint.to_directory(str(tmp))
        os.replace(tmp, local)
        for old in cache.iterdir():  # only the latest is kept
            if old != local and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
    return local


def latest_state(run_dir) -> dict:
    """The torch payload (model, EMA, optimizer) of the latest registered checkpoint of `run_dir`."""
    import torch

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or not (ckpt / STATE_FILE).is_file():
        raise ConfigError(f"no registered checkpoint under {Path(run_dir) / 'checkpoints'}; give the directory of "
                          "a run that saved one")
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)


def export_ema(run_dir, net: NetSpec, ema_state: dict, *, step: int, recipe: str) -> Path:
    """<run_dir>/net_ema.pt: the EMA weights and how to build the network, nothing of the training config."""
    path = Path(run_dir) / EXPORT_FILE
    save_torch({"format": FORMAT, "net": net.to_dict(), "ema": ema_state, "step": step, "recipe": recipe}, path)
    return path


def load_exported(path, device="cpu"):
    """(network in eval mode with the EMA weights, the export record) from a `net_ema.pt` or its run dir."""
    import torch

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / EXPORT_FILE
    if not p.is_file():
        raise FileNotFoundError(p)
    record = torch.load(p, map_location="cpu", weights_only=False)
    net = NetSpec.from_dict(record["net"]).build()
    net.load_state_dict(record["ema"])
    return net.eval().to(device), record
