"""The config sections every trained recipe shares: optimizer, training loop, logging, debugging.

Loop policies that differ between method families are choices here, not code paths in a recipe:
the optimizer (AdamW, or Adam without decay as EDM), the EMA (a per-step decay, or a half-life in
images with a ramp-up as EDM, arXiv 2206.00364 App. F), the loss reduction (mean over every element,
or EDM's per-sample sum averaged over the batch) and what a non-finite gradient does (skip the step,
or replace NaN/Inf by finite numbers as EDM and SDD do).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from raygen.config import ConfigError

# what every report of the training loop carries (a method adds its own through `Method.log_metrics`)
LOOP_METRICS = ("step", "loss", "lr", "grad_norm", "steps_per_s", "samples_per_s", "nonfinite_total", "epoch",
                "ema_decay")


@dataclass
class OptimConfig:
    kind: Literal["adamw", "adam"] = "adamw"  # adam: no weight decay at all (EDM)
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    warmup_kimg: Optional[float] = None  # the warm-up in thousands of images (EDM's ramp-up); sets warmup_steps
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def validate(self):
        if self.kind == "adam" and self.weight_decay:
            raise ConfigError(f"optim.kind=adam takes no weight decay (got optim.weight_decay={self.weight_decay}); "
                              "use optim.kind=adamw or set optim.weight_decay=0")
        if self.warmup_kimg is not None and self.warmup_kimg < 0:
            raise ConfigError("optim.warmup_kimg must be >= 0 (or null to use optim.warmup_steps)")
        if self.lr <= 0 or self.eps <= 0:
            raise ConfigError("optim.lr and optim.eps must be > 0")


@dataclass
class TrainConfig:
    steps: int = 1000
    duration_kimg: Optional[float] = None  # the run's length in thousands of images (EDM); sets steps
    batch_size: int = 128  # global, summed over workers and accumulation micro-steps; 0 = the recipe sets it
    grad_accum: int = 1
    # a count, or [min, max]: elastic (Ray Train V2) - the run starts with as many workers as the cluster
    # can place, at least min, continues on fewer after a node is lost and grows back up to max
    num_workers: Union[int, list[int]] = 1
    use_gpu: Optional[bool] = None  # None: use GPUs when the cluster has them
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0  # with use_gpu; fractions let runs (e.g. sweep trials) share a GPU
    # TPU slices (JAX recipes): Ray reserves each worker's TPU chips from the topology and type
    use_tpu: bool = False
    topology: Optional[str] = None  # e.g. "2x4"
    accelerator_type: Optional[str] = None  # e.g. "TPU-V6E", "TPU-V5LITEPOD" (v5e), "TPU-V4"
    torch_threads: int = 0  # 0: the node's cores divided by the workers on it
    # CPUs Ray Data may use to feed training (decode, shuffle) beyond the workers' own; null: what is free.
    # On a cluster shared with ingest jobs, a limit keeps the two from starving each other.
    data_cpus: Optional[float] = None
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto = bf16 on GPU, off on CPU
    compile: bool = False
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) early on
    # EMA as a half-life in thousands of training images (EDM); replaces ema_decay when set
    ema_halflife_kimg: Optional[float] = None
    ema_rampup_ratio: Optional[float] = 0.05  # half-life at most this fraction of the images seen so far
    loss_reduction: Literal["mean", "sum"] = "mean"  # sum: per-sample sum over elements, mean over the batch (EDM)
    nonfinite_grads: Literal["skip", "nan_to_num"] = "skip"
    seed: int = 0
    shuffle_buffer: int = 20000
    log_every: int = 50
    ckpt_every: int = 500
    sample_every: int = 500
    keep_checkpoints: int = 2
    max_failures: int = 1  # worker-group restarts from the last checkpoint (FailureConfig)
    max_nonfinite_in_a_row: int = 20

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    def world_sizes(self) -> range:
        """Every worker count the run may train with."""
        return range(self.min_workers, self.max_workers + 1)

    def validate(self):
        if isinstance(self.num_workers, list):
            if len(self.num_workers) != 2 or self.num_workers[0] > self.num_workers[1]:
                raise ConfigError(f"train.num_workers={self.num_workers}: give a count or [min, max] with min <= max "
                                  "(e.g. train.num_workers=[1,4])")
            if self.elastic and self.max_failures == 0:
                raise ConfigError("elastic train.num_workers=[min, max] restarts the worker group when a node comes or "
                                  "goes: set train.max_failures >= 1 (or -1 for no limit)")
            if self.elastic and self.use_tpu:
                raise ConfigError("train.use_tpu=true takes a fixed train.num_workers (whole slices), not [min, max]")
        for k in ("steps", "grad_accum", "min_workers", "cpus_per_worker", "log_every", "ckpt_every"):
            if getattr(self, k) < 1:
                name = "num_workers" if k == "min_workers" else k
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.data_cpus is not None and self.data_cpus <= 0:
            raise ConfigError(f"train.data_cpus must be > 0 (or null: every free CPU), got {self.data_cpus}")
        if self.batch_size < 0:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        for n in self.world_sizes():
            if self.batch_size % (n * self.grad_accum):
                raise ConfigError(
                    f"train.batch_size={self.batch_size} is not divisible by {n} workers x train.grad_accum "
                    f"= {n * self.grad_accum}"
                    + (f" (elastic train.num_workers={self.num_workers} may train with any count in between)"
                       if self.elastic else "") + "; pick a multiple"
                )
        if self.use_tpu and self.max_workers > 1 and not (self.topology and self.accelerator_type):
            raise ConfigError("train.use_tpu=true with several workers needs train.topology (e.g. 2x4) and "
                              "train.accelerator_type (e.g. TPU-V6E), as the slice was created")
        if self.use_tpu and self.topology and self.accelerator_type:
            check_tpu_slice(self.accelerator_type, self.topology, self.max_workers)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("train.ema_decay must be in [0, 1)")
        if self.duration_kimg is not None and self.duration_kimg <= 0:
            raise ConfigError("train.duration_kimg must be > 0 (or null to use train.steps)")
        if self.ema_halflife_kimg is not None and self.ema_halflife_kimg <= 0:
            raise ConfigError("train.ema_halflife_kimg must be > 0 (or null to use train.ema_decay)")


def check_tpu_slice(accelerator_type: str, topology: str, num_workers: int) -> None:
    """The slice names Ray knows, and one worker per host of whole slices (Ray's own TPU helpers)."""
    from ray.util import tpu

    try:
        tpu.get_tpu_version_from_type(accelerator_type)
        hosts, _ = tpu.get_tpu_worker_resources(topology=topology, accelerator_type=accelerator_type)
    except ValueError as e:
        raise ConfigError(f"train.accelerator_type={accelerator_type} / train.topology={topology}: {e} (v5e is "
                          "TPU-V5LITEPOD)") from None
    if hosts and num_workers % hosts:
        raise ConfigError(f"train.num_workers={num_workers}: a {accelerator_type} {topology} slice has {hosts} "
                          f"host{'s' * (hosts > 1)}, one worker each; use a multiple of {hosts}")


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


def resolve_image_units(train: TrainConfig, optim: OptimConfig) -> tuple[TrainConfig, OptimConfig]:
    """EDM states durations in images (arXiv 2206.00364, App. F: 200 Mimg, LR ramp-up over 10 Mimg); with
    `train.duration_kimg` / `optim.warmup_kimg` set, the step counts follow from the global batch."""
    import dataclasses
    import math

    if train.duration_kimg is not None:
        train = dataclasses.replace(train, steps=max(1, math.ceil(train.duration_kimg * 1000 / train.batch_size)))
    if optim.warmup_kimg is not None:
        optim = dataclasses.replace(optim, warmup_steps=math.ceil(optim.warmup_kimg * 1000 / train.batch_size))
    return train, optim
