"""Rank-0 metric sinks: `metrics.jsonl` (always), TensorBoard and Weights & Biases (optional).

W&B runs offline when no API key is configured, so a run never blocks on a login prompt or the
network; `wandb sync <run_dir>/wandb/offline-run-*` uploads it later.
"""
from __future__ import annotations

import json
import time
import os
from pathlib import Path

from raygen.core.files import write_text

METRICS_FILE = "metrics.jsonl"
# what rank 0 writes into the run directory while training (pushed to run.storage at every checkpoint)
RANK0_FILES = (METRICS_FILE, "samples", "tensorboard")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
    return out


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop records after `last_step` (written after the checkpoint we resume from), so every step
    appears once in metrics.jsonl after a restart."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


class MetricsLogger:
    def __init__(self, run_dir: Path, config: dict, *, tensorboard: bool, wandb: bool, wandb_project: str,
                 run_name: str, group: str | None = None, system_stats: bool = True):
        self.run_dir = Path(run_dir)
        self.file = open(self.run_dir / METRICS_FILE, "a", buffering=1)
        self.tb = None
        self.wandb_run = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb:
            import wandb as wb

            if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
                os.environ["WANDB_MODE"] = "offline"
            self.wandb_run = wb.init(
                project=wandb_project, name=run_name, group=group, config=config, dir=str(self.run_dir),
                # a sweep's trial names repeat across sweeps: the group (the sweep) keeps their ids apart
                id=(f"{group}-{run_name}" if group else run_name).replace("/", "-")[:128], resume="allow", settings=wb.Settings(console="off", silent=True, x_disable_stats=not system_stats),
            )

    def log(self, record: dict) -> None:
        # wall-clock time in the file only: it dates each record (resumes, reports), not a curve to plot
        self.file.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def flush(self) -> None:
        self.file.flush()
        if self.tb is not None:
            self.tb.flush()

    def log_image(self, tag: str, path: Path, step: int) -> None:
        if self.wandb_run is not None:
            import wandb as wb

            self.wandb_run.log({tag: wb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def open_run_logger(run_dir: Path, cfg, resumed_step: int) -> "MetricsLogger":
    """Rank 0's sinks for a (possibly resumed) run: records after `resumed_step` dropped, then
    metrics.jsonl / TensorBoard / W&B as `cfg.log` says, and the samples/ folder made."""
    from raygen.config import to_dict
    from raygen.core import storage

    Path(run_dir).mkdir(parents=True, exist_ok=True)  # rank 0 may run on a node that never had it
    if resumed_step:  # resumed where the last rank 0 never ran: its records come back from run.storage
        storage.pull(run_dir, only=(METRICS_FILE,))
    truncate_metrics(run_dir, resumed_step)
    log = cfg.log
    logger = MetricsLogger(run_dir, to_dict(cfg), tensorboard=log.tensorboard, wandb=log.wandb,
                           wandb_project=log.wandb_project, run_name=Path(run_dir).name, group=log.wandb_group,
                           system_stats=log.wandb_system_stats)
    (Path(run_dir) / "samples").mkdir(exist_ok=True)
    return logger



def keep_rank0_files(run_dir: Path, logger: "MetricsLogger | None") -> None:
    """After a checkpoint: what rank 0 wrote since (metrics.jsonl, sample grids, TensorBoard events) copied
    to `run.storage` (when bound), so a run resumed anywhere finds its records up to that checkpoint."""
    from raygen.core import storage

    if storage.remote_of(run_dir) is None:
        return
    if logger is not None:
        logger.flush()
    storage.push(run_dir, only=RANK0_FILES)
