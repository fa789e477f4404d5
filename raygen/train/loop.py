"""The one generic training loop, run by every torch recipe under Ray Train's `TorchTrainer`.

It knows nothing about any generative method: a *task* gives it a network (`build_net`) and a
method (`build_method`) whose `loss(net, batch, generator)` returns a per-sample loss and whose
`preview(net, generator)` returns images for a sample grid. The loop does the rest: DDP, data
shards, AdamW, LR schedule, clipping, fp32 EMA, AMP, accumulation, compile, logging, sample grids,
checkpoints with full state, resume, and non-finite-loss handling.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from raygen.config import ConfigError, to_dict
from raygen.core.files import save_torch
from raygen.core.progress import Progress
from raygen.train.state import (
    EMA,
    STATE_FILE,
    Counters,
    DataPosition,
    lr_factor,
    rng_state,
    set_rng_state,
)


class NonFiniteLossError(RuntimeError):
    pass


# what every `ray.train.report` of the loop carries (methods may add theirs through `log_metrics()`)
LOOP_METRICS = ("step", "loss", "lr", "grad_norm", "steps_per_s", "samples_per_s", "nonfinite_total", "epoch",
                "ema_decay")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128  # global, summed over workers and accumulation micro-steps; 0 = the recipe sets it
    grad_accum: int = 1
    num_workers: int = 1
    use_gpu: Optional[bool] = None  # None: use GPUs when the cluster has them
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0  # with use_gpu; fractions let runs (e.g. sweep trials) share a GPU
    torch_threads: int = 0  # 0: the node's cores divided by the workers on it
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto = bf16 on GPU, off on CPU
    compile: bool = False
    ema_decay: float = 0.999
    ema_warmup: bool = True
    seed: int = 0
    shuffle_buffer: int = 20000
    log_every: int = 50
    ckpt_every: int = 500
    sample_every: int = 500
    keep_checkpoints: int = 2
    max_failures: int = 1  # worker-group restarts from the last checkpoint (FailureConfig)
    max_nonfinite_in_a_row: int = 20

    def validate(self):
        for k in ("steps", "grad_accum", "num_workers", "cpus_per_worker", "log_every", "ckpt_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        if self.batch_size < 0:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.batch_size % (self.num_workers * self.grad_accum):
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by train.num_workers x train.grad_accum "
                f"= {self.num_workers * self.grad_accum}; pick a multiple"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("train.ema_decay must be in [0, 1)")


@dataclass
class LogConfig:
    tensorboard: bool = True
    wandb: bool = True  # offline unless WANDB_API_KEY / WANDB_MODE say otherwise
    wandb_project: str = "raygen"
    wandb_group: Optional[str] = None
    # W&B's system-metrics sampler (CPU/GPU use): useful on GPU boxes, a measurable tax on a 2-core CPU
    wandb_system_stats: bool = True
    progress: bool = True


@dataclass
class DebugConfig:
    fail_at_step: Optional[int] = None  # raise once in every worker at this step (tests fault tolerance)
    nan_at_steps: list[int] = field(default_factory=list)  # make the loss NaN at these steps


# ------------------------------------------------------------------------------------------------
def _batches(shard, pos: DataPosition, local_bs: int, cfg: TrainConfig, device):
    """Endless stream of (position after this batch, batch). Every epoch is reshuffled with a seed
    derived from (seed, epoch), so the stream is reproducible and can be resumed mid-epoch."""
    epoch, skip = pos.epoch, pos.batch
    while True:
        it = shard.iter_torch_batches(
            batch_size=local_bs,
            drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed * 100003 + epoch,
            device=device,
            prefetch_batches=2,
        )
        n = 0
        for i, batch in enumerate(it):
            n += 1
            if i < skip:
                continue
            yield DataPosition(epoch, i + 1), batch
        if n == 0:
            raise RuntimeError(
                f"the training shard yields no batch of {local_bs}: the dataset is smaller than one batch per "
                "worker; lower train.batch_size or use more data"
            )
        epoch, skip = epoch + 1, 0


def _threads(cfg: TrainConfig) -> int:
    if cfg.torch_threads:
        return cfg.torch_threads
    import ray.train

    local_workers = ray.train.get_context().get_local_world_size()
    return max(1, (os.cpu_count() or 1) // local_workers)


def _unwrap(net):
    net = getattr(net, "module", net)  # DDP
    return getattr(net, "_orig_mod", net)  # torch.compile


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    task, run_dir = config["task"], Path(config["run_dir"])
    cfg = task.cfg
    tc: TrainConfig = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(_threads(tc))
    torch.manual_seed(tc.seed + rank)

    net = task.build_net().to(device)
    method = task.build_method()
    ema = EMA(net, tc.ema_decay, tc.ema_warmup)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    generator = torch.Generator(device=device).manual_seed(tc.seed * 1000 + rank)
    counters = Counters()

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
            net.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            counters = Counters(**{**state["counters"], "data": DataPosition(**state["counters"]["data"])})
            rng_file = Path(d) / f"rng_rank{rank}.pt"
            if rng_file.exists():
                set_rng_state(torch.load(rng_file, weights_only=False), generator)
            else:  # world size changed: a fresh but deterministic stream for this rank
                generator.manual_seed(tc.seed * 1000 + rank + 7919 * counters.step)

    logger = None
    if rank == 0:
        from raygen.train.logging import MetricsLogger, truncate_metrics

        truncate_metrics(run_dir, counters.step)
        logger = MetricsLogger(run_dir, to_dict(cfg), tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                               wandb_project=cfg.log.wandb_project, run_name=run_dir.name,
                               group=cfg.log.wandb_group, system_stats=cfg.log.wandb_system_stats)
        (run_dir / "samples").mkdir(exist_ok=True)

    use_amp = device.type == "cuda" and tc.amp in ("auto", "bf16")
    model = net
    if tc.compile:
        model = torch.compile(model)
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)

    if hasattr(task, "batch_stream"):  # recipes that draw their own batches (drifting: class-balanced)
        stream = task.batch_stream(counters.data, rank, world, device)
    else:
        local_bs = tc.batch_size // (world * tc.grad_accum)
        stream = _batches(ray.train.get_dataset_shard("train"), counters.data, local_bs, tc, device)
    progress = Progress(tc.steps, counters.step, f"train {run_dir.name}") if rank == 0 and cfg.log.progress else None

    # window sums stay on the device: reading them every step would sync a GPU every step
    window_loss, window_n = torch.zeros((), device=device), torch.zeros((), device=device)
    window_start, window_t = counters.step, time.perf_counter()
    while counters.step < tc.steps:
        step = counters.step
        if cfg.debug.fail_at_step == step:
            marker = run_dir / f".debug_failed_at_{step}"
            if not marker.exists():  # fail once per run, then let the restarted group go on
                marker.touch()
                raise RuntimeError(f"debug.fail_at_step={step}: injected worker failure")
        for g in opt.param_groups:
            g["lr"] = cfg.optim.lr * lr_factor(step, cfg.optim.warmup_steps, tc.steps, cfg.optim.schedule,
                                               cfg.optim.min_lr_ratio)
        loss_sum = torch.zeros((), device=device)
        for micro in range(tc.grad_accum):
            counters.data, batch = next(stream)
            sync = micro == tc.grad_accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss = method.loss(model, batch, generator).mean()
                if step in cfg.debug.nan_at_steps:
                    loss = loss * float("nan")
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        # DDP all-reduces gradients, so every rank sees the same norm and takes the same decision
        if torch.isfinite(grad_norm):
            opt.step()
            counters.nonfinite_in_a_row = 0
        else:
            counters.nonfinite_total += 1
            counters.nonfinite_in_a_row += 1
            if counters.nonfinite_in_a_row >= tc.max_nonfinite_in_a_row:
                raise NonFiniteLossError(
                    f"stopping at step {step}: {counters.nonfinite_in_a_row} non-finite losses/gradients in a row "
                    f"(train.max_nonfinite_in_a_row); lower optim.lr, enable optim.grad_clip, or check the data"
                )
        opt.zero_grad(set_to_none=True)
        ema.update(net, step)
        counters.step += 1
        counters.samples_seen += tc.batch_size
        finite = torch.isfinite(loss_sum)
        window_loss += torch.where(finite, loss_sum / tc.grad_accum, 0.0)
        window_n += finite
        if progress is not None:
            progress.update(counters.step, loss_sum / tc.grad_accum)  # read only when printed

        step = counters.step
        last = step == tc.steps
        do_log = step % tc.log_every == 0 or last
        do_ckpt = step % tc.ckpt_every == 0 or last
        if rank == 0 and (step % tc.sample_every == 0 or last):
            _write_preview(task, ema, net, run_dir, step, logger)
        if do_log or do_ckpt:
            elapsed, n_steps, n_finite = time.perf_counter() - window_t, step - window_start, int(window_n)
            metrics = {
                "step": step,
                "loss": float(window_loss) / n_finite if n_finite else float("nan"),
                "lr": opt.param_groups[0]["lr"],
                "grad_norm": float(grad_norm),
                "steps_per_s": n_steps / max(elapsed, 1e-9),
                "samples_per_s": n_steps * tc.batch_size / max(elapsed, 1e-9),
                "nonfinite_total": counters.nonfinite_total,
                "epoch": counters.data.epoch,
                "ema_decay": ema.current_decay(step - 1),
                # a method may add its own diagnostics of the last step (drifting: drift norms per temperature)
                **(method.log_metrics() if hasattr(method, "log_metrics") else {}),
            }
            if rank == 0 and do_log:
                logger.log(metrics)
            window_loss.zero_()
            window_n.zero_()
            window_start, window_t = step, time.perf_counter()
            if do_ckpt:
                _report_with_checkpoint(metrics, net, ema, opt, counters, generator, rank)
            else:
                ray.train.report(metrics)
    if progress is not None:
        progress.update(counters.step, float("nan"), force=True)
    if logger is not None:
        logger.close()


def _write_preview(task, ema, net, run_dir, step, logger):
    """A sample grid from the EMA weights, with its own fixed-seed generator so the same noise is
    used at every step (progress is visible) and the training random stream is untouched."""
    from raygen.core.grid import save_grid

    device = next(net.parameters()).device
    ema_net = task.build_net().to(device)
    ema_net.load_state_dict(ema.state_dict())
    images = task.preview(ema_net.eval(), torch.Generator(device=device).manual_seed(12345))
    path = save_grid(images, run_dir / "samples" / f"step_{step:07d}.png", nrow=task.num_classes,
                     upscale=task.preview_upscale)
    if logger is not None:
        logger.log_image("samples", path, step)


def _report_with_checkpoint(metrics, net, ema, opt, counters, generator, rank):
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            save_torch(
                {"model": _unwrap(net).state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                 "counters": asdict(counters)},
                Path(d) / STATE_FILE,
            )
        save_torch(rng_state(generator), Path(d) / f"rng_rank{rank}.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# ------------------------------------------------------------------------------------------------
def fit(task, run_dir: Path, datasets: dict):
    """Run `train_loop_per_worker` under TorchTrainer. Checkpoints go to <run_dir>/checkpoints; calling
    this again with the same run_dir resumes from the newest one (Ray Train V2: same storage_path + name)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raygen.tune import trial as tune_trial

    tc: TrainConfig = task.cfg.train
    use_gpu = tc.use_gpu if tc.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    if not use_gpu:
        cpus = ray.cluster_resources().get("CPU", 0)
        if tc.num_workers * tc.cpus_per_worker > cpus:
            raise ConfigError(
                f"train.num_workers={tc.num_workers} x train.cpus_per_worker={tc.cpus_per_worker} needs more CPUs "
                f"than the cluster has ({cpus:g}); lower them"
            )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task, "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": tc.gpus_per_worker} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name="checkpoints",
            storage_path=str(run_dir),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            # inside a sweep trial, the trial's own run forwards its reports to Tune (ASHA, Tune's loggers)
            callbacks=tune_trial.report_callbacks(run_dir),
        ),
        datasets=datasets,
    )
    return trainer.fit()


def final_state(result) -> dict:
    """The state dict saved in the newest checkpoint of a finished `fit`."""
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; check train.ckpt_every")
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)


def latest_state(run_dir) -> dict:
    """The state dict of the newest checkpoint of the run in `run_dir` (for evaluating a finished run)."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob(f"checkpoint_*/{STATE_FILE}"))
    if not ckpts:
        raise ConfigError(f"no checkpoint with {STATE_FILE} under {Path(run_dir) / 'checkpoints'}; give the directory "
                          "of a run that saved one")
    return torch.load(ckpts[-1], map_location="cpu", weights_only=False)


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
