"""Beta diffusion / SDD recipe (Zhou et al., arXiv 2309.07867, and its Smoothed-Dirichlet fork): an
EDM-family U-Net (raygen.nets.unet) predicting x0 from logits of multiplicative Beta noise, trained with
KLUB / ELBO / HKD and sampled by the reverse Beta chain (raygen.methods.sdd), with EDM's loop policies.
Presets: `default`/`smoke` (embedded digits), `cifar10_klub`, `cifar10_hkd` (the official options),
`volumes` (2-D slices of CT/MR volumes). docs/methods/sdd.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from raygen.data.images import ImageDataConfig
from raygen.data.ingest import PixelStoreConfig
from raygen.eval.evaluate import EvalConfig, check_settings
from raygen.methods.sdd import BetaDiffusion, SDDConfig
from raygen.recipes import Recipe, register
from raygen.recipes.common import RunSection, reported_image_metrics
from raygen.recipes.diffusion import RawSourceConfig, UNetConfig, UNetTask, evaluate_unet, resolve_common, \
    run_unet
from raygen.train.config import DebugConfig, LogConfig, OptimConfig, TrainConfig

NAME = "sdd"


@dataclass
class SDDRecipeConfig:
    run: RunSection = field(default_factory=RunSection)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    source: RawSourceConfig = field(default_factory=RawSourceConfig)  # how data.source=files is read
    store: PixelStoreConfig = field(default_factory=PixelStoreConfig)  # where data.source=files is encoded
    model: UNetConfig = field(default_factory=UNetConfig)
    method: SDDConfig = field(default_factory=SDDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self):
        check_settings(self.eval, BetaDiffusion.sampler_settings, NAME)


class SDDTask(UNetTask):
    recipe = NAME

    def build_method(self) -> BetaDiffusion:
        return BetaDiffusion(self.cfg.method, self.num_classes)


def run(cfg: SDDRecipeConfig, run_dir, callbacks=()) -> dict:
    return run_unet(SDDTask, cfg, run_dir, callbacks)


def evaluate(cfg: SDDRecipeConfig, run_dir, trained_run) -> dict:
    return evaluate_unet(SDDTask, cfg, run_dir, trained_run)


def reported_metrics(cfg: SDDRecipeConfig, eval_only: bool = False, during_training: bool = False) -> list[str]:
    return reported_image_metrics(BetaDiffusion, cfg, eval_only, during_training)


RECIPE = register(Recipe(name=NAME, config=SDDRecipeConfig, task=SDDTask, run=run, reported_metrics=reported_metrics,
                         evaluate=evaluate, resolve=resolve_common,
                         description="Beta diffusion / SDD: U-Net with KLUB/ELBO/HKD losses and the Beta sampler"))
