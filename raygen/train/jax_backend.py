"""The JAX backend: one training loop for every JAX recipe, per worker, under Ray Train's `JaxTrainer`
(docs/architecture.md, docs/checkpoints.md).

Like the torch loop it knows nothing of any generative method. The task gives it a Flax module
(`build_net`), `init_params(net, key)`, a method whose `loss(bound_net, batch, key)` returns a loss with
the batch as leading dimension, `preview(bound_net, key)` and its own data stream (`batches`, a pure
function of the data position, so a resumed or re-sharded run reads the same global batches).

What the loop adds:
- optax AdamW/Adam with linear warm-up + constant/cosine decay and global-norm clipping, an fp32 EMA
  with the same decay policies as the torch loop, skip-or-sanitise of non-finite steps;
- true data parallelism: every worker is one JAX process of one global mesh. On TPUs and GPUs Ray's
  `JaxConfig` starts JAX's distributed runtime; on CPU workers it does not, so the loop does it
  itself (rank 0's address shared through Ray Train's collective) and pins each worker's cores
  before JAX starts (JAX ignores thread-count flags on CPU; affinity set afterwards has no effect);
- the global batch is assembled from each process's slice (`make_array_from_process_local_data`) and
  `jit` averages gradients over the mesh, so N workers take exactly the step one worker takes on the
  same global batch;
- checkpoints: the full state (params, EMA, optimizer, step, PRNG key) as an orbax checkpoint in
  `state/`, plus the platform's `record.json` (step, counters with the data position, NetSpec);
- the same metrics.jsonl / TensorBoard / W&B / progress lines / sample grids as the torch loop.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from raygen.config import ConfigError
from raygen.core.progress import Progress
from raygen.train.checkpoint import read_record, write_record
from raygen.train.config import OptimConfig, TrainConfig
from raygen.train.state import Counters, ema_decay
from raygen.train.logging import keep_rank0_files, open_run_logger

STATE_DIR = "state"  # the orbax checkpoint inside a checkpoint directory
EXPORT_JAX = "net_ema.msgpack"


class NonFiniteLossError(RuntimeError):
    pass


# ---- process set-up (before JAX starts) ----------------------------------------------------------------

def pin_cpus(local_rank: int, local_world: int) -> list[int]:
    """Give this worker its share of the node's cores. Must run before JAX initialises its CPU backend:
    JAX sizes its thread pools once, from the affinity it sees then."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // max(1, local_world))
    mine = cores[local_rank * per:(local_rank + 1) * per] or cores
    os.sched_setaffinity(0, mine)
    return mine


def init_distributed(rank: int, world: int) -> None:
    """JAX's distributed runtime across CPU workers: rank 0 picks the coordinator address, every rank
    joins. (Ray's JaxConfig does this only for TPUs and GPUs.)"""
    import socket

    import jax
    import ray
    from ray.train.collective import broadcast_from_rank_zero

    address = None
    if rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        address = f"{ray.util.get_node_ip_address()}:{port}"
    address = broadcast_from_rank_zero(address)
    jax.distributed.initialize(address, num_processes=world, process_id=rank)


# ---- optimizer and schedules ---------------------------------------------------------------------------

def lr_schedule(optim: OptimConfig, total_steps: int):
    """optim.lr x the torch loop's `lr_factor` (raygen.train.state), written with jnp so optax can trace it."""
    import jax.numpy as jnp

    warmup = optim.warmup_steps

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        warm = (step + 1) / max(warmup, 1)
        if optim.schedule == "constant":
            after = 1.0
        else:
            progress = jnp.clip((step - warmup) / max(1, total_steps - warmup), 0.0, 1.0)
            after = optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        factor = jnp.where(step < warmup, warm, after) if warmup > 0 else after
        return optim.lr * factor

    return schedule


def build_optimizer(optim: OptimConfig, total_steps: int):
    """Global-norm clipping, then AdamW (decoupled decay, arXiv 1711.05101) or Adam (EDM's choice)."""
    import optax

    lr = lr_schedule(optim, total_steps)
    b1, b2 = optim.betas
    if optim.kind == "adam":
        opt = optax.adam(lr, b1=b1, b2=b2, eps=optim.eps)
    else:
        opt = optax.adamw(lr, b1=b1, b2=b2, eps=optim.eps, weight_decay=optim.weight_decay)
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), opt) if optim.grad_clip > 0 else opt


# ---- the jitted step -----------------------------------------------------------------------------------

def make_train_step(net, method, opt, tc: TrainConfig):
    """One optimizer step on the global batch. The EMA decay is an input (it depends on the step on the
    host, as in the torch loop); `poison` multiplies the loss (1.0, or NaN to test non-finite handling)."""
    import jax
    import jax.numpy as jnp
    import optax

    def loss_fn(params, batch, key, poison):
        loss = method.loss(net.bind({"params": params}), batch, key)
        if tc.loss_reduction == "sum" and loss.ndim > 0:
            loss = loss.reshape(loss.shape[0], -1).sum(1).mean()
        else:
            loss = loss.mean()
        return loss * poison

    def step(state, batch, decay, poison):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, key, poison)
        if tc.nonfinite_grads == "nan_to_num":
            grads = jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
        ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), state["ema"], params)
        new = {**state, "params": params, "opt_state": opt_state, "ema": ema, "step": state["step"] + 1}
        return new, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return jax.jit(step, donate_argnums=0)


# ---- state on the host and on the mesh -----------------------------------------------------------------

def host(tree):
    """A numpy copy of a (replicated) state: each process holds the whole of a replicated array."""
    import jax

    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
                        tree)


def replicate(tree, sharding):
    import jax

    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
                        tree)


def _checkpointer():
    """An orbax checkpointer local to this process: the state is a host copy that rank 0 writes alone and
    every rank reads from its own copy of the checkpoint (nodes need not share a file system), so no
    cross-process barrier may be involved (one would wait forever for the ranks that do not save)."""
    import jax
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def save_state(path: Path, state_host: dict) -> None:
    with _checkpointer() as ckptr:
        ckptr.save(Path(path).absolute(), state_host)


def restore_state(path: Path, like: dict) -> dict:
    """The orbax state at `path`, shaped as `like` (a host state of the same network and optimizer)."""
    with _checkpointer() as ckptr:
        return ckptr.restore(Path(path).absolute(), like)


def initial_state(task, net, opt, seed: int) -> dict:
    """The same initial state on every process (params drawn from `seed`), as host numpy arrays."""
    import jax

    key = jax.random.key(seed)
    params = task.init_params(net, jax.random.fold_in(key, 1))
    state = {"params": params, "ema": jax.tree.map(lambda p: p.astype(np.float32), params),
             "opt_state": opt.init(params), "step": np.int32(0),
             "key": np.asarray(jax.random.key_data(jax.random.fold_in(key, 2)))}
    return host(state)


# ---- the loop ------------------------------------------------------------------------------------------

def train_loop_per_worker(config: dict) -> None:
    import ray.train

    task, run_dir = config["task"], Path(config["run_dir"])
    cfg = task.cfg
    tc: TrainConfig = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    accelerated = config["accelerated"]
    if not accelerated:
        os.environ["JAX_PLATFORMS"] = "cpu"
        pin_cpus(ctx.get_local_rank(), ctx.get_local_world_size())
    import logging

    import jax

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every save at INFO
    if world > 1 and not accelerated:
        init_distributed(rank, world)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    net = task.build_net()
    method = task.build_method()
    opt = build_optimizer(cfg.optim, tc.steps)
    state_host = initial_state(task, net, opt, tc.seed)
    counters = Counters()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state_host = restore_state(Path(d) / STATE_DIR, state_host)
            counters = Counters.from_dict(read_record(d)["counters"])
    state = replicate(state_host, replicated)
    train_step = make_train_step(net, method, opt, tc)

    logger = open_run_logger(run_dir, cfg, counters.step) if rank == 0 else None
    stream = task.batches(counters.data, rank, world, None)
    progress = Progress(tc.steps, counters.step, f"train {run_dir.name}") if rank == 0 and cfg.log.progress else None

    window = []  # device scalars of the steps since the last report; read only when reporting
    pending = None  # (step, finite flag) of the last step, not yet counted
    window_start, window_t = counters.step, time.perf_counter()
    last_norm = None
    while counters.step < tc.steps:
        step = counters.step
        if cfg.debug.fail_at_step == step:
            marker = run_dir / f".debug_failed_at_{step}"
            if not marker.exists():  # fail once per run, then let the restarted group go on
                marker.touch()
                raise RuntimeError(f"debug.fail_at_step={step}: injected worker failure")
        counters.data, local = next(stream)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
        poison = np.float32("nan") if step in cfg.debug.nan_at_steps else np.float32(1.0)
        state, out = train_step(state, batch, np.float32(ema_decay(tc, step)), poison)
        window.append(out)
        counters.step += 1
        # the previous step's flag: it has finished (or nearly) while this one runs, so the host reads it
        # without stalling the device; the counters lag one step, and are flushed before any checkpoint
        if pending is not None:
            _count_nonfinite(counters, pending, tc)
        pending = (step, out["finite"]) if tc.nonfinite_grads == "skip" or cfg.debug.nan_at_steps else None
        step = counters.step
        last = step == tc.steps
        if progress is not None and (time.perf_counter() - progress.last >= progress.interval):
            progress.update(step, float(host(out["loss"])))
        if rank == 0 and (step % tc.sample_every == 0 or last):
            _write_preview(task, net, host(state["ema"]), run_dir, step, logger)
        if step % tc.log_every == 0 or step % tc.ckpt_every == 0 or last:
            _count_nonfinite(counters, pending, tc)  # a report reads the whole window anyway
            pending = None
            vals = host(window)
            losses = [float(v["loss"]) for v in vals if bool(v["finite"])]
            last_norm = float(vals[-1]["grad_norm"])
            elapsed, n_steps = time.perf_counter() - window_t, step - window_start
            metrics = {
                "step": step,
                "loss": float(np.mean(losses)) if losses else float("nan"),
                "lr": float(lr_schedule(cfg.optim, tc.steps)(step - 1)),
                "grad_norm": last_norm,
                "steps_per_s": n_steps / max(elapsed, 1e-9),
                "samples_per_s": n_steps * tc.batch_size / max(elapsed, 1e-9),
                "nonfinite_total": counters.nonfinite_total,
                "epoch": counters.data.epoch,
                "ema_decay": ema_decay(tc, step - 1),
                **method.log_metrics(),
            }
            if rank == 0 and (step % tc.log_every == 0 or last):
                logger.log(metrics)
            window, window_start, window_t = [], step, time.perf_counter()
            if step % tc.ckpt_every == 0 or last:
                _report_with_checkpoint(task, metrics, host(state), counters, rank)
                if rank == 0:
                    keep_rank0_files(run_dir, logger)
            else:
                ray.train.report(metrics)
    if progress is not None:
        progress.update(counters.step, float("nan"), force=True)
    if logger is not None:
        logger.close()


def _count_nonfinite(counters: Counters, pending, tc: TrainConfig) -> None:
    """Count a step's non-finite loss/gradient (its update was skipped or sanitised) and stop after
    `train.max_nonfinite_in_a_row` in a row."""
    if pending is None:
        return
    step, finite = pending
    if bool(host(finite)):
        counters.nonfinite_in_a_row = 0
        return
    counters.nonfinite_total += 1
    counters.nonfinite_in_a_row += 1
    if counters.nonfinite_in_a_row >= tc.max_nonfinite_in_a_row:
        raise NonFiniteLossError(
            f"stopping at step {step}: {counters.nonfinite_in_a_row} non-finite losses/gradients in a row "
            "(train.max_nonfinite_in_a_row); lower optim.lr, enable optim.grad_clip, or check the data")


def _write_preview(task, net, ema_host, run_dir, step, logger):
    """A sample grid from the EMA weights with a fixed key (the same noise every time), computed on this
    process's own device so the other processes need not take part."""
    import jax
    import torch

    from raygen.core.grid import save_grid

    device = jax.local_devices()[0]
    params = jax.device_put(ema_host, device)
    with jax.default_device(device):
        images = task.preview(net.bind({"params": params}), jax.random.key(12345))
    path = save_grid(torch.from_numpy(np.asarray(images)), run_dir / "samples" / f"step_{step:07d}.png",
                     nrow=getattr(task, "preview_columns", None) or task.num_classes or None,
                     upscale=task.preview_upscale)
    if logger is not None:
        logger.log_image("samples", path, step)


def _report_with_checkpoint(task, metrics, state_host, counters, rank):
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            save_state(Path(d) / STATE_DIR, state_host)
            write_record(d, backend="jax", counters=asdict(counters), net=task.net_spec(), recipe=task.recipe)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


# ---- export --------------------------------------------------------------------------------------------

def export_ema_jax(run_dir, task, ema_host, step: int) -> Path:
    """<run_dir>/net_ema.msgpack: the NetSpec and the EMA params, nothing of the training config."""
    from flax import serialization

    from raygen.core.files import atomic_write

    record = {"format": 1, "net": task.net_spec().to_dict(), "ema": ema_host, "step": step, "recipe": task.recipe}
    path = Path(run_dir) / EXPORT_JAX
    with atomic_write(path) as f:
        f.write(serialization.msgpack_serialize(_plain(record)))
    return path


def _plain(tree):
    """Flax's msgpack takes dicts of arrays and scalars: turn the NetSpec's tuples into lists."""
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return list(tree)
    return tree


def load_exported_jax(path):
    """(Flax module, EMA params, the export record) from a `net_ema.msgpack` or its run directory."""
    from flax import serialization

    from raygen.core.contracts import NetSpec

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / EXPORT_JAX
    record = serialization.msgpack_restore(p.read_bytes())
    return NetSpec.from_dict(record["net"]).build(), record["ema"], record


class JaxBackend:
    """How the driver runs a JAX task: `JaxTrainer` over `train_loop_per_worker`; the payload is an
    orbax checkpoint in `state/`, the export `net_ema.msgpack`."""

    name = "jax"

    def scaling(self, tc: TrainConfig, gpu: bool):
        """TPU slices need topology and accelerator type (Ray fills in the TPU resources from them)."""
        import ray.train

        if tc.elastic:
            raise ConfigError(f"train.num_workers={tc.num_workers}: elastic training is for torch recipes; the JAX "
                              "backend's distributed runtime is started for a fixed world, so give a count")
        if tc.use_tpu:
            return ray.train.ScalingConfig(num_workers=tc.num_workers, use_tpu=True, topology=tc.topology,
                                           accelerator_type=tc.accelerator_type)
        return None

    def trainer(self, task, run_dir: Path, scaling_config, run_config, dataset_config=None):
        from ray.train.v2.jax import JaxConfig, JaxTrainer

        accelerated = bool(scaling_config.use_tpu or scaling_config.use_gpu)
        return JaxTrainer(train_loop_per_worker,
                          train_loop_config={"task": task, "run_dir": str(run_dir), "accelerated": accelerated},
                          jax_config=JaxConfig(use_tpu=scaling_config.use_tpu, use_gpu=bool(scaling_config.use_gpu)),
                          scaling_config=scaling_config, run_config=run_config, datasets=task.datasets(),
                          dataset_config=dataset_config)

    def export(self, task, run_dir: Path, checkpoint_dir: Path) -> dict:
        """Write <run_dir>/net_ema.msgpack from a checkpoint; return the EMA params (numpy)."""
        import jax

        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        net = task.build_net()
        like = initial_state(task, net, build_optimizer(task.cfg.optim, task.cfg.train.steps), task.cfg.train.seed)
        state = restore_state(Path(checkpoint_dir) / STATE_DIR, like)
        ema = jax.tree.map(np.asarray, state["ema"])
        export_ema_jax(run_dir, task, ema, step=read_record(checkpoint_dir)["step"])
        return ema
