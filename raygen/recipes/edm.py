"""EDM recipe (Karras et al., arXiv 2206.00364): an EDM-family U-Net (raygen.nets.unet) with EDM's
preconditioning, loss and Heun sampler (raygen.methods.edm), trained by the torch backend with EDM's loop
policies (Adam, LR ramp-up and EMA half-life in images, per-sample summed loss, nan_to_num gradients) and
scored by the one evaluator. Presets: `default`/`smoke` (embedded digits), `cifar10_ddpmpp`,
`imagenet64_adm` (the paper's configurations). docs/methods/edm.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from raygen.data.images import ImageDataConfig
from raygen.data.ingest import PixelStoreConfig
from raygen.eval.evaluate import EvalConfig, check_settings
from raygen.methods.edm import EDM, EDMConfig
from raygen.recipes import Recipe, register
from raygen.recipes.common import RunSection, reported_image_metrics
from raygen.recipes.diffusion import RawSourceConfig, UNetConfig, UNetTask, evaluate_unet, resolve_common, \
    run_unet
from raygen.train.config import DebugConfig, LogConfig, OptimConfig, TrainConfig

NAME = "edm"


@dataclass
class EDMRecipeConfig:
    run: RunSection = field(default_factory=RunSection)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    source: RawSourceConfig = field(default_factory=RawSourceConfig)  # how data.source=files is read
    store: PixelStoreConfig = field(default_factory=PixelStoreConfig)  # where data.source=files is encoded
    model: UNetConfig = field(default_factory=UNetConfig)
    method: EDMConfig = field(default_factory=EDMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self):
        check_settings(self.eval, EDM.sampler_settings, NAME)


class EDMTask(UNetTask):
    recipe = NAME

    def build_method(self) -> EDM:
        return EDM(self.cfg.method, self.num_classes)


def run(cfg: EDMRecipeConfig, run_dir, callbacks=()) -> dict:
    return run_unet(EDMTask, cfg, run_dir, callbacks)


def evaluate(cfg: EDMRecipeConfig, run_dir, trained_run) -> dict:
    return evaluate_unet(EDMTask, cfg, run_dir, trained_run)


def reported_metrics(cfg: EDMRecipeConfig, eval_only: bool = False, during_training: bool = False) -> list[str]:
    return reported_image_metrics(EDM, cfg, eval_only, during_training)


RECIPE = register(Recipe(name=NAME, config=EDMRecipeConfig, task=EDMTask, run=run, reported_metrics=reported_metrics,
                         evaluate=evaluate, resolve=resolve_common,
                         description="EDM: U-Net with EDM preconditioning, loss and Heun sampler"))
