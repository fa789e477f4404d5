"""DiT recipe: class-conditional DiT (raygen.nets.dit) + DDPM/DDIM (raygen.methods.ddpm) on an image
dataset, trained by the torch backend and scored by the one evaluator (docs/methods/ddpm.md)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from raygen.config import ConfigError
from raygen.core.contracts import NetSpec
from raygen.data import images as image_data
from raygen.eval.evaluate import EvalConfig, check_settings
from raygen.methods.ddpm import DDPM, DDPMConfig
from raygen.nets.dit import parse_arch
from raygen.recipes.common import ImageTask, RunSection, image_recipe
from raygen.train.config import DebugConfig, LogConfig, OptimConfig, TrainConfig

NAME = "dit"


@dataclass
class ModelConfig:
    arch: str = "DiT-T/4"  # DiT-{T,S,B,L,XL}/{2,4,8}
    hidden_size: Optional[int] = None  # overrides of the named size
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0

    def validate(self):
        try:
            parse_arch(self.arch)
        except ValueError as e:
            raise ConfigError(f"model.arch: {e}") from None

    @property
    def patch(self) -> int:
        return parse_arch(self.arch)["patch_size"]


@dataclass
class DiTConfig:
    run: RunSection = field(default_factory=RunSection)
    data: image_data.ImageDataConfig = field(default_factory=image_data.ImageDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: DDPMConfig = field(default_factory=DDPMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self):
        check_settings(self.eval, DDPM.sampler_settings, NAME)


class DiTTask(ImageTask):
    recipe = NAME
    method_cls = DDPM

    def net_spec(self) -> NetSpec:
        m = self.cfg.model
        overrides = {k: v for k in ("hidden_size", "depth", "num_heads") if (v := getattr(m, k)) is not None}
        return NetSpec("raygen.nets.dit:dit", {"name": m.arch, "input_size": self.cfg.data.resolution,
                                               "in_channels": self.sample_shape[0], "num_classes": self.num_classes,
                                               "mlp_ratio": m.mlp_ratio, **overrides, **learn_sigma(self.cfg.method)})


def learn_sigma(method: DDPMConfig) -> dict:
    """The network kwarg for a learned variance (only when on: NetSpecs of earlier runs stay as they were)."""
    return {"learn_sigma": True} if method.learn_sigma else {}


def resolve(cfg: DiTConfig) -> DiTConfig:
    """Derived values: the store's resolution for latent data; then the checks that need it."""
    data = image_data.resolve_data(cfg.data)
    if data.resolution % cfg.model.patch:
        raise ConfigError(f"data.resolution={data.resolution} is not divisible by the patch size {cfg.model.patch} "
                          f"of model.arch={cfg.model.arch}")
    return dataclasses.replace(cfg, data=data)


RECIPE = image_recipe(NAME, DiTConfig, DiTTask, resolve=resolve,
                      description="class-conditional DiT with DDPM training and DDIM/DDPM sampling")
