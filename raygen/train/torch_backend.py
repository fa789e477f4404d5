"""The torch backend: the one training loop every torch recipe runs, per worker, under Ray Train's
`TorchTrainer`.

It knows nothing about any generative method: the task gives it a network (`build_net`), a method
whose `loss(net, batch, generator)` returns a loss with the batch as leading dimension, previews,
and its data (Ray Dataset shards, or the task's own stream). The loop does the rest: DDP, AMP,
accumulation, the optimizer, LR schedule, clipping, fp32 EMA, compile, logging, sample grids,
checkpoints with full state (docs/checkpoints.md), resume and non-finite handling, each policy
chosen by the `train`/`optim` config (raygen.train.config).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from raygen.core.files import save_torch
from raygen.core.progress import Progress
from raygen.train.checkpoint import STATE_FILE, export_ema, read_record, write_record
from raygen.train.config import TrainConfig
from raygen.train.state import (
    EMA,
    Counters,
    DataPosition,
    build_optimizer,
    lr_factor,
    reduce_loss,
    rng_state,
    sanitize_grads,
    set_rng_state,
)
from raygen.train.logging import keep_rank0_files, open_run_logger


class NonFiniteLossError(RuntimeError):
    pass


def dataset_batches(shard, pos: DataPosition, local_bs: int, cfg: TrainConfig, device):
    """Endless stream of (position after this batch, batch) from a Ray Dataset shard. Every epoch is
    reshuffled with a seed derived from (seed, epoch), so the stream is reproducible and resumes
    mid-epoch."""
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
    ema = EMA(net, tc)
    opt = build_optimizer(net.parameters(), cfg.optim)
    generator = torch.Generator(device=device).manual_seed(tc.seed * 1000 + rank)
    counters = Counters()

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
            net.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            counters = Counters.from_dict(read_record(d)["counters"])
            rng_file = Path(d) / f"rng_rank{rank}.pt"
            if rng_file.exists():
                set_rng_state(torch.load(rng_file, weights_only=False), generator)
            else:  # world size changed: a fresh but deterministic stream for this rank
                generator.manual_seed(tc.seed * 1000 + rank + 7919 * counters.step)

    logger = open_run_logger(run_dir, cfg, counters.step) if rank == 0 else None

    use_amp = device.type == "cuda" and tc.amp in ("auto", "bf16")
    model = net
    if tc.compile:
        model = torch.compile(model)
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)

    if rank == 0 and counters.world and counters.world != world:
        print(f"resuming at step {counters.step} on {world} worker{'s' * (world > 1)} (the checkpoint was written by "
              f"{counters.world}); the global batch stays {tc.batch_size}", flush=True)
    stream = task.batches(counters.data, rank, world, device)
    if stream is None:
        local_bs = tc.batch_size // (world * tc.grad_accum)
        counters.data = counters.position_for(world)
        stream = dataset_batches(ray.train.get_dataset_shard("train"), counters.data, local_bs, tc, device)
    counters.world = world
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
                    loss = reduce_loss(method.loss(model, batch, generator), tc.loss_reduction)
                if step in cfg.debug.nan_at_steps:
                    loss = loss * float("nan")
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach()
        if tc.nonfinite_grads == "nan_to_num":
            sanitize_grads(net.parameters())
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
            _write_preview(task, ema, run_dir, step, device, logger)
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
                **method.log_metrics(),
            }
            if rank == 0 and do_log:
                logger.log(metrics)
            window_loss.zero_()
            window_n.zero_()
            window_start, window_t = step, time.perf_counter()
            if do_ckpt:
                _report_with_checkpoint(task, metrics, net, ema, opt, counters, generator, rank)
                if rank == 0:
                    keep_rank0_files(run_dir, logger)
            else:
                ray.train.report(metrics)
    if progress is not None:
        progress.update(counters.step, float("nan"), force=True)
    if logger is not None:
        logger.close()


def _write_preview(task, ema, run_dir, step, device, logger):
    """A sample grid from the EMA weights, with its own fixed-seed generator so the same noise is
    used at every step (progress is visible) and the training random stream is untouched."""
    from raygen.core.grid import save_grid

    ema_net = task.build_net().to(device)
    ema_net.load_state_dict(ema.state_dict())
    images = task.preview(ema_net.eval(), torch.Generator(device=device).manual_seed(12345))
    path = save_grid(images, run_dir / "samples" / f"step_{step:07d}.png", nrow=task.num_classes or None,
                     upscale=task.preview_upscale)
    if logger is not None:
        logger.log_image("samples", path, step)


def _report_with_checkpoint(task, metrics, net, ema, opt, counters, generator, rank):
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            save_torch({"model": _unwrap(net).state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict()},
                       Path(d) / STATE_FILE)
            write_record(d, backend="torch", counters=asdict(counters), net=task.net_spec(),
                         recipe=task.recipe)
        save_torch(rng_state(generator), Path(d) / f"rng_rank{rank}.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class TorchBackend:
    """How the driver runs a torch task: `TorchTrainer` over `train_loop_per_worker`; the payload is
    `state.pt`, the export `net_ema.pt`."""

    name = "torch"

    def scaling(self, tc: TrainConfig, gpu: bool):
        return None  # the driver's CPU/GPU ScalingConfig

    def trainer(self, task, run_dir: Path, scaling_config, run_config, dataset_config=None):
        from ray.train.torch import TorchTrainer

        return TorchTrainer(train_loop_per_worker, train_loop_config={"task": task, "run_dir": str(run_dir)},
                            scaling_config=scaling_config, run_config=run_config, datasets=task.datasets(),
                          dataset_config=dataset_config)

    def export(self, task, run_dir: Path, checkpoint_dir: Path) -> dict:
        """Write <run_dir>/net_ema.pt from a checkpoint; return the EMA state dict."""
        state = torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=False)
        export_ema(run_dir, task.net_spec(), state["ema"], step=read_record(checkpoint_dir)["step"], recipe=task.recipe)
        return state["ema"]
