"""Drifting recipe (Deng et al., arXiv 2602.04770): a one-step class-conditional generator trained
by regressing frozen latent-MAE features of its samples onto drifted targets.

Stages of `jobs/drifting.py`, each resumable:
  1. the feature MAE (raygen.recipes.latent_mae), unless `stage.mae_ckpt` names a trained one;
  2. the generator (raygen.nets.drift_dit) with the drifting loss (raygen.methods.drifting), batches
     of `nc` classes x (G generated, P positives, U unconditional negatives) per step;
  3. one-step generation, scored by the one evaluator at every omega of `eval.sweep.omega`.
Pixel space for the embedded digits; `stage.latents=<store>` trains in SD-VAE latent space. The math is
in docs/methods/drifting.md; the method object lives in raygen.methods.drifting and the class-balanced
samplers in raygen.data.samplers, so this module holds only the recipe.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from raygen.config import ConfigError
from raygen.core.contracts import NetSpec
from raygen.data import images as image_data
from raygen.data.samplers import ClassIndexedData, class_balanced_batches, prefetch
from raygen.eval.evaluate import EvalConfig, check_settings
from raygen.methods.drifting import DriftConfig, Drifting, FeatureConfig, check_feasible
from raygen.nets.drift_dit import parse_arch
from raygen.recipes import Recipe, register
from raygen.recipes.common import ImageTask, RunSection, evaluate_trained, run_evaluation
from raygen.recipes.latent_mae import MAEModelConfig
from raygen.train.config import LOOP_METRICS, DebugConfig, LogConfig, OptimConfig, TrainConfig
from raygen.train.state import DataPosition

NAME = "drifting"


@dataclass
class StageConfig:
    space: Literal["pixel", "latent"] = "pixel"  # latent: the preset needs stage.latents
    latents: Optional[str] = None  # a latent store (jobs/encode_latents.py): train in its latent space
    mae_ckpt: Optional[str] = None  # a trained MAE (mae.pt or its run dir); unset: stage 1 trains one


@dataclass
class MAEStageConfig:
    """Stage 1, used when stage.mae_ckpt is unset: the MAE's network and its own training schedule."""

    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-3, weight_decay=0.01, betas=(0.9, 0.95),
                                                                   warmup_steps=4000))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=30000, batch_size=8192, ema_decay=0.9995))


@dataclass
class GeneratorConfig:
    arch: str = "DriftDiT-B/2"  # DriftDiT-{T,S,B,L}/{2,4,16}
    hidden_size: Optional[int] = None  # overrides of the named size
    depth: Optional[int] = None
    num_heads: Optional[int] = None


@dataclass
class BatchConfig:
    """Per optimizer step (arXiv 2602.04770 Sec. 4): nc classes x (G generated, P positives, U uncond negatives)."""

    nc: int = 64  # classes per step, counted over all workers
    gen: int = 64  # G
    pos: int = 64  # P, drawn from the class (or its queue)
    uncond: int = 16  # U, drawn from the whole data set (or the global queue)
    # uniform: nc distinct classes, positives and negatives drawn from the whole (memory-mapped) data;
    # queue: the release's memory bank (paper A.8): `push_per_step` random items pushed per step into
    # per-class queues (`class_queue`) and a global one (`global_queue`), classes = labels of the pushed batch
    sampler: Literal["uniform", "queue"] = "uniform"
    push_per_step: int = 64
    class_queue: int = 128
    global_queue: int = 1000
    distinct_classes: bool = True  # uniform: the nc classes of a step are distinct (when nc <= number of classes)
    omega_min: float = 1.0  # omega ~ p(omega) proportional to omega^-power on [omega_min, omega_max]
    omega_max: float = 4.0
    omega_power: float = 3.0
    no_cfg_frac: float = 0.0  # fraction of classes trained at omega = 1 (SOTA-L: 0.5)
    flips: Literal["random", "plain"] = "random"  # latent stores with flipped copies: pick one at random

    def validate(self):
        for k in ("nc", "gen", "pos", "uncond"):
            if getattr(self, k) < 1:
                raise ConfigError(f"batch.{k} must be >= 1, got {getattr(self, k)}")
        if self.gen < 2:
            raise ConfigError("batch.gen must be >= 2: generated samples repel each other")
        if not 1.0 <= self.omega_min <= self.omega_max:
            raise ConfigError(f"need 1 <= batch.omega_min <= batch.omega_max, got {self.omega_min}, {self.omega_max}")
        if not 0.0 <= self.no_cfg_frac <= 1.0:
            raise ConfigError(f"batch.no_cfg_frac must be in [0, 1], got {self.no_cfg_frac}")
        if self.sampler == "queue" and self.push_per_step < self.nc:
            raise ConfigError(f"batch.sampler=queue takes the step's classes from the pushed batch: batch.push_per_step="
                              f"{self.push_per_step} must be >= batch.nc={self.nc}")
        if min(self.push_per_step, self.class_queue, self.global_queue) < 1:
            raise ConfigError("batch.push_per_step, batch.class_queue and batch.global_queue must be >= 1")


@dataclass
class DriftTrainConfig(TrainConfig):
    batch_size: int = 0  # resolved as batch.nc x batch.gen (generated samples per step); not set by hand


@dataclass
class DriftingConfig:
    run: RunSection = field(default_factory=RunSection)
    stage: StageConfig = field(default_factory=StageConfig)
    data: image_data.ImageDataConfig = field(default_factory=image_data.ImageDataConfig)
    mae: MAEStageConfig = field(default_factory=MAEStageConfig)
    model: GeneratorConfig = field(default_factory=GeneratorConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.01, betas=(0.9, 0.95),
                                                                   warmup_steps=5000, grad_clip=2.0))
    train: DriftTrainConfig = field(default_factory=lambda: DriftTrainConfig(steps=30000))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(sweep={"omega": [1.0, 1.5, 2.0, 3.0]},
                                                                headline="best", preview={"omega": 1.5}))
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


    def validate(self):
        """Checks of the config's own values; values derived from the data are checked in `resolve`."""
        if self.stage.space == "latent" and not self.stage.latents and self.data.source != "latents":
            raise ConfigError("this preset trains in latent space: set stage.latents=<store directory> (make one "
                              "with `python jobs/encode_latents.py source.path=...`)")
        if self.data.source == "image_folder" and not self.stage.latents:
            raise ConfigError("data.source=image_folder: the drifting recipe reads class-indexed random batches; "
                              "encode the folder into a store first (jobs/encode_latents.py) and pass stage.latents")
        try:
            parse_arch(self.model.arch)
        except ValueError as e:
            raise ConfigError(f"model.arch: {e}") from None
        t = self.train
        for n in t.world_sizes():
            if self.batch.nc % (n * t.grad_accum):
                raise ConfigError(
                    f"batch.nc={self.batch.nc} classes per step is not divisible by {n} workers x train.grad_accum "
                    f"= {n * t.grad_accum} (train.num_workers={t.num_workers}); every worker takes whole classes, "
                    "so pick a multiple")
        check_feasible(self.drift, self.batch.omega_min if self.batch.no_cfg_frac == 0 else 1.0)
        check_settings(self.eval, Drifting.sampler_settings, NAME)


def resolve(cfg: DriftingConfig) -> DriftingConfig:
    """Derived values: the data (a latent store when stage.latents is set, its resolution), the batch size
    (generated samples per step, nc x G); then the checks that need them."""
    if cfg.stage.mae_ckpt:
        from raygen.recipes.latent_mae import exported

        if not exported(Path(cfg.stage.mae_ckpt).expanduser()) and not Path(cfg.stage.mae_ckpt).expanduser().is_file():
            raise ConfigError(f"stage.mae_ckpt={cfg.stage.mae_ckpt!r}: no trained MAE there (no net_ema.pt); train "
                              "one with `python jobs/latent_mae.py` or leave stage.mae_ckpt unset")
    data = cfg.data
    if cfg.stage.latents:
        data = image_data.ImageDataConfig(source="latents", path=cfg.stage.latents, latent_flips=data.latent_flips)
    data = image_data.resolve_data(data)
    patch = parse_arch(cfg.model.arch)["patch_size"]
    if data.resolution % patch:
        raise ConfigError(f"data.resolution={data.resolution} is not divisible by the patch size {patch} "
                          f"of model.arch={cfg.model.arch}")
    num_classes = len(image_data.class_names(data))
    b = cfg.batch
    if b.sampler == "uniform" and b.distinct_classes and b.nc > num_classes:
        raise ConfigError(f"batch.nc={b.nc} distinct classes per step, but the data has {num_classes}; "
                          f"lower batch.nc or set batch.distinct_classes=false")
    train = dataclasses.replace(cfg.train, batch_size=b.nc * b.gen)
    return dataclasses.replace(cfg, data=data, train=train)


class DriftingTask(ImageTask):
    """The generator, the drifting method with its frozen feature network, class-balanced batches."""

    recipe = NAME

    def __init__(self, cfg: DriftingConfig, mae_export: Optional[dict] = None):
        super().__init__(cfg)
        self.mae_export = mae_export  # {"net": NetSpec dict, "ema": state dict} of the feature MAE

    def net_spec(self) -> NetSpec:
        m = self.cfg.model
        overrides = {k: v for k in ("hidden_size", "depth", "num_heads") if (v := getattr(m, k)) is not None}
        return NetSpec("raygen.nets.drift_dit:drift_dit", {"name": m.arch, "input_size": self.cfg.data.resolution,
                                                            "in_channels": self.sample_shape[0],
                                                            "num_classes": self.num_classes, **overrides})

    def mae_net(self, device="cpu"):
        spec = NetSpec.from_dict(self.mae_export["net"])
        with torch.device(device):
            return spec.build()

    def build_method(self) -> Drifting:
        """The method with its feature network and cached real images built on first use: sampling
        (previews, evaluation) never builds them."""
        c = self.cfg
        mae = self.frozen_mae if self.mae_export is not None else None
        real = self.real_images if self.cache_real() else None
        return Drifting(c.drift, c.features, c.batch, mae, self.sample_shape, real)

    def frozen_mae(self):
        net = self.mae_net()
        net.load_state_dict(self.mae_export["ema"])
        return net

    def real_images(self):
        return ClassIndexedData(self.cfg.data).images

    def cache_real(self) -> bool:
        """Whether the real samples' features are computed once and gathered by index (FeatureConfig)."""
        f = self.cfg.features
        if not f.cache_real or self.cfg.data.source in image_data.STORE_SOURCES or self.mae_export is None:
            return False
        keys = self.mae_net("meta").feature_keys(f.maps, tuple(f.patch_sizes), f.input_keys)
        per_item = sum(L * C for L, C in keys.values()) * 4
        n = len(image_data.arrays(self.cfg.data, "train")[1])
        return per_item * n <= f.cache_max_mb * 2**20

    def datasets(self) -> dict:
        return {}  # the batches are drawn by index (`batches`), not streamed from a Ray Dataset

    def batches(self, position: DataPosition, rank: int, world: int, device):
        """Class-balanced batches (raygen.data.samplers): a pure function of the step, so a resumed run
        continues the stream exactly."""
        b, tc = self.cfg.batch, self.cfg.train
        stream = class_balanced_batches(ClassIndexedData(self.cfg.data, b.flips), b, start=position.batch,
                                        per_micro=b.nc // tc.grad_accum, rank=rank, world=world, seed=tc.seed,
                                        by_index=self.cache_real())
        for i, batch in prefetch(stream):
            yield DataPosition(0, i), {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
def mae_stage(cfg: DriftingConfig, run_dir: Path) -> Path:
    """Stage 1: the MAE named by stage.mae_ckpt, or one trained into <run_dir>/mae (kept on resume)."""
    from raygen.recipes import latent_mae

    if cfg.stage.mae_ckpt:
        return Path(cfg.stage.mae_ckpt)
    mae_dir = Path(run_dir) / "mae"
    if latent_mae.exported(mae_dir):
        print(f"stage 1: using the MAE already trained in {mae_dir}", flush=True)
        return mae_dir
    mae_cfg = latent_mae.LatentMAEConfig(data=cfg.data, model=cfg.mae.model, optim=cfg.mae.optim,
                                         train=cfg.mae.train, log=cfg.log)
    mae_dir.mkdir(parents=True, exist_ok=True)
    from raygen.config import write_config

    write_config(mae_cfg, mae_dir / "config.yaml")
    print(f"stage 1: training the feature MAE into {mae_dir}", flush=True)
    latent_mae.run(mae_cfg, mae_dir)
    return mae_dir


def check_mae(mae_export: dict, cfg: DriftingConfig) -> None:
    """The MAE must have been trained on samples shaped like the generator's output."""
    args = mae_export["net"]["kwargs"]
    want = (image_data.channels(cfg.data), cfg.data.resolution)
    if (args["in_channels"], args["input_size"]) != want:
        raise ConfigError(f"stage.mae_ckpt: the MAE takes {args['in_channels']}x{args['input_size']}² inputs but the "
                          f"generator makes {want[0]}x{want[1]}² samples; train the MAE on the same data")


def run(cfg: DriftingConfig, run_dir, callbacks=()) -> dict:
    from raygen.recipes.latent_mae import load_mae
    from raygen.train.driver import train

    run_dir = Path(run_dir)
    mae_export = load_mae(mae_stage(cfg, run_dir))
    check_mae(mae_export, cfg)
    print("stage 2: training the one-step generator", flush=True)
    task = DriftingTask(cfg, mae_export)
    ema = train(task, run_dir, callbacks, plot_keys=tuple(f"drift_theta_{R:g}" for R in cfg.drift.temperatures))
    if not cfg.eval.enabled:
        return {}
    print(f"stage 3: one-step generation and evaluation at {cfg.eval.sweep or cfg.eval.settings or 'omega 1'}",
          flush=True)
    return run_evaluation(task, ema, run_dir)


def evaluate(cfg: DriftingConfig, run_dir, trained_run) -> dict:
    """The EMA generator of `trained_run`, sampled and scored with this config's eval settings."""
    return evaluate_trained(DriftingTask(cfg), run_dir, trained_run)


def shared_stage(cfg: DriftingConfig, shared_dir: Path, swept_keys: list[str]) -> dict:
    """A sweep that varies no MAE key trains its MAE once: every trial then measures the same feature space."""
    if cfg.stage.mae_ckpt or any(k.startswith("mae.") for k in swept_keys):
        return {}
    return {"stage.mae_ckpt": str(mae_stage(cfg, Path(shared_dir)))}


def reported_metrics(cfg: DriftingConfig, eval_only: bool = False, during_training: bool = False) -> list[str]:
    """The loop's metrics and the drift diagnostics while training, the evaluation's at the end."""
    from raygen.eval.evaluate import reported_metrics as eval_metrics

    train = [] if eval_only else [*LOOP_METRICS, *(f"drift_theta_{R:g}" for R in cfg.drift.temperatures),
                                  "omega_mean"]
    if during_training or not cfg.eval.enabled:
        return train
    return train + eval_metrics(cfg.eval, image_data.pixel_source(cfg.data), Drifting.sampler_settings)


RECIPE = register(Recipe(name=NAME, config=DriftingConfig, task=DriftingTask, run=run,
                         reported_metrics=reported_metrics, evaluate=evaluate, resolve=resolve,
                         shared_stage=shared_stage,
                         description="one-step generator trained with the drifting loss in a frozen MAE's features"))
