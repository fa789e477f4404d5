"""The one driver: `fit` builds the Ray Train run (trainer, scaling, storage, failure policy,
callbacks) for any task and hands the steps to the task's backend (docs/architecture.md).

A backend offers `scaling(train_config, gpu)` (its own ScalingConfig, or None for the common one),
`trainer(task, run_dir, scaling_config, run_config, dataset_config)` (a Ray Train trainer over its per-worker loop) and `export(task, run_dir, checkpoint_dir)` (writes `net_ema.pt`, returns the EMA
state). The backends are raygen.train.torch_backend and raygen.train.jax_backend.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from raygen.config import ConfigError
from raygen.train.config import TrainConfig

BACKENDS = {"torch": "raygen.train.torch_backend:TorchBackend", "jax": "raygen.train.jax_backend:JaxBackend"}


def backend(name: str):
    if name not in BACKENDS:
        raise ConfigError(f"unknown training backend {name!r}; available: {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def use_gpu(tc: TrainConfig) -> bool:
    import ray

    return tc.use_gpu if tc.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0


def check_resources(tc: TrainConfig) -> None:
    """The worker group must fit on the cluster (checked before anything is written)."""
    import ray

    if tc.use_tpu:
        tpus = ray.cluster_resources().get("TPU", 0)
        if not tpus:
            raise ConfigError("train.use_tpu=true but the cluster has no TPU; start one with `ray up "
                              "cluster/tpu.yaml` or set train.use_tpu=false")
    elif not use_gpu(tc):
        cpus = ray.cluster_resources().get("CPU", 0)
        if tc.min_workers * tc.cpus_per_worker > cpus:
            raise ConfigError(
                f"train.num_workers={tc.num_workers} x train.cpus_per_worker={tc.cpus_per_worker} needs more CPUs "
                f"than the cluster has ({cpus:g}); lower them"
            )


def fit(task, run_dir: Path, callbacks=()):
    """Train `task` under Ray Train. Checkpoints go to <run_dir>/checkpoints; calling this again with
    the same run_dir resumes from the latest registered one (Ray Train V2: same storage_path + name).
    Checkpoint directories Ray Train never registered (a write cut by a crash or a full disk) are
    removed first, and again when the run fails. `callbacks` are Ray Train callbacks (a sweep trial
    passes the one that reports to Tune)."""
    import ray.train

    tc: TrainConfig = task.cfg.train
    check_resources(tc)
    gpu = use_gpu(tc) and not tc.use_tpu
    runner = backend(task.backend)
    scaling = runner.scaling(tc, gpu) or ray.train.ScalingConfig(
        num_workers=(tc.min_workers, tc.max_workers) if tc.elastic else tc.min_workers, use_gpu=gpu,
        resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": tc.gpus_per_worker} if gpu else {})},
    )
    from raygen.core import storage

    run_config = ray.train.RunConfig(
        name="checkpoints",
        # with run.storage, Ray Train writes the checkpoints there itself (pyarrow): every node reaches them
        storage_path=storage.remote_of(run_dir) or str(run_dir),
        failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
        callbacks=list(callbacks),
    )
    remove_unregistered_checkpoints(run_dir)
    trainer = runner.trainer(task, Path(run_dir), scaling, run_config, ingest_config(tc))
    try:
        result = interruptible(trainer.fit)
    except Exception:
        remove_unregistered_checkpoints(run_dir)
        raise
    if result.error is not None:
        remove_unregistered_checkpoints(run_dir)
    return result


def ingest_config(tc: TrainConfig):
    """Ray Data's share of the cluster while it feeds the workers. Ray Train reserves the workers'
    resources first and Data plans within what is left; `train.data_cpus` caps Data further, so an
    ingest job on the same cluster keeps its CPUs (and the trainer's data never waits on them). Order
    is preserved: the data stream is a function of the seed, hence an exact resume."""
    import ray.train
    from ray.data import ExecutionOptions, ExecutionResources

    limits = ExecutionResources(cpu=tc.data_cpus) if tc.data_cpus is not None else ExecutionResources.for_limits()
    return ray.train.DataConfig(execution_options=ExecutionOptions(resource_limits=limits, preserve_order=True))


def interruptible(fn):
    """`fn()` in a helper thread while the main thread waits, so Ctrl-C and SIGTERM reach the job's own
    handler (raygen.core.job.interrupts) instead of Ray Train's, which aborts the run and exits the
    process without a word. Off the main thread (a Tune trial) it simply calls `fn()`."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return fn()
    out: dict = {}

    def target():
        try:
            out["result"] = fn()
        except BaseException as e:  # re-raised in the main thread
            out["error"] = e

    worker = threading.Thread(target=target, name="raygen-fit", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if "error" in out:
        raise out["error"]
    return out["result"]


def remove_unregistered_checkpoints(run_dir) -> list[Path]:
    """Delete `checkpoints/checkpoint_*` directories that Ray Train's record does not list: they were
    never registered (cut by a crash or a full disk) and a resumed run would never use them."""
    import json
    import shutil

    storage = Path(run_dir) / "checkpoints"
    if not storage.is_dir():
        return []
    snapshot = storage / "checkpoint_manager_snapshot.json"
    registered = set()
    if snapshot.is_file():
        try:
            state = json.loads(snapshot.read_text())
        except ValueError:  # written atomically by Ray; unreadable means we cannot tell: keep everything
            return []
        registered = {r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])}
        latest = state.get("latest_checkpoint_result") or {}
        registered.add(latest.get("checkpoint_dir_name"))
    removed = []
    for d in sorted(storage.glob("checkpoint_*")):
        if d.is_dir() and d.name not in registered:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if removed:
        print(f"removed {len(removed)} checkpoint director{'y' if len(removed) == 1 else 'ies'} Ray Train never "
              f"registered (a cut write): {', '.join(d.name for d in removed)}", flush=True)
    return removed


def train(task, run_dir: Path, callbacks=(), plot_keys=()) -> dict:
    """`fit`, then export the EMA weights (`net_ema.pt`) and plot the curves; returns the EMA state."""
    result = fit(task, run_dir, callbacks)
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; check train.ckpt_every")
    from raygen.core import storage
    from raygen.train.logging import RANK0_FILES

    storage.pull(run_dir, only=RANK0_FILES, overwrite=True)  # rank 0 may have run on another node
    plot_metrics(run_dir, keys=("loss", "lr", "grad_norm", "steps_per_s", *plot_keys))
    with result.checkpoint.as_directory() as ckpt:
        ema = backend(task.backend).export(task, Path(run_dir), Path(ckpt))
    storage.push(run_dir)  # a stage (the drifting MAE) is kept before the next one starts
    return ema



def plot_metrics(run_dir: Path, keys=("loss", "lr", "grad_norm", "steps_per_s")) -> Path | None:
    """plots/training.png: the logged curves against the step."""
    from raygen.train.logging import read_metrics

    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in records)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot(*zip(*pts))
        ax.set_title(k)
        ax.set_xlabel("step")
        if k == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "plots" / "training.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
