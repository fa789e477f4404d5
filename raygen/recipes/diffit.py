"""DiffiT recipe (arXiv 2312.02139): the DiffiT networks (raygen.nets.diffit: image-space U-Net of DiffiT
ResBlocks, or latent DiffiT) with the DDPM method (raygen.methods.ddpm: L_simple, or L_simple + lambda
L_vlb with a learned variance; respaced ancestral or DDIM sampling; CFG with the power-cosine ramp).

The task is DiT's with another network: everything else (data, method, loop, evaluation) is shared, so
this module is the model section, the network spec and the registry record (docs/methods/diffit.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from raygen.config import ConfigError
from raygen.core.contracts import NetSpec
from raygen.data import images as image_data
from raygen.eval.evaluate import check_settings
from raygen.methods.ddpm import DDPM
from raygen.recipes.common import image_recipe
from raygen.recipes.dit import DiTConfig, DiTTask, learn_sigma

NAME = "diffit"


@dataclass
class DiffiTModelConfig:
    # image space: a U-Net preset (digits, cifar10, imagenet64); latent: DiffiT-{T,S,B,L,XL}/{2,4,8}
    arch: str = "digits"
    window_size: Optional[int] = None  # TMSA window (tokens a side); latent default: the whole grid (global)
    # overrides of the U-Net preset
    model_channels: Optional[int] = None
    channel_mult: Optional[list[int]] = None
    num_blocks: Optional[int] = None
    channels_per_head: Optional[int] = None
    # overrides of the latent size
    hidden_size: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    time_init: Literal["zero", "xavier"] = "zero"  # the time projection of TMSA (docs/methods/diffit.md)
    tmsa: bool = True  # false: the ablation, time token added to the spatial tokens, time-independent attention

    @property
    def latent(self) -> bool:
        return self.arch.startswith("DiffiT-")

    def validate(self):
        from raygen.nets import diffit

        try:
            diffit.parse_arch(self.arch) if self.latent else diffit.DIFFIT_UNETS[self.arch]
        except (KeyError, ValueError):
            raise ConfigError(f"model.arch={self.arch!r}: use a U-Net preset ({', '.join(diffit.DIFFIT_UNETS)}) "
                              "or a latent size DiffiT-{T,S,B,L,XL}/{2,4,8}") from None
        unet_keys = ("model_channels", "channel_mult", "num_blocks", "channels_per_head")
        given = [k for k in (("hidden_size", "depth", "num_heads") if not self.latent else unet_keys)
                 if getattr(self, k) is not None]
        if given:
            raise ConfigError(f"model.{given[0]} does not apply to model.arch={self.arch}; remove it")


@dataclass
class DiffiTConfig(DiTConfig):
    model: DiffiTModelConfig = field(default_factory=DiffiTModelConfig)

    def validate(self):
        check_settings(self.eval, DDPM.sampler_settings, NAME)


class DiffiTTask(DiTTask):
    recipe = NAME

    def net_spec(self) -> NetSpec:
        m, cfg = self.cfg.model, self.cfg
        keys = ("hidden_size", "depth", "num_heads") if m.latent else ("model_channels", "num_blocks",
                                                                           "channels_per_head")
        kwargs = {k: v for k in (*keys, "window_size") if (v := getattr(m, k)) is not None}
        kwargs.update(in_channels=self.sample_shape[0], num_classes=self.num_classes, mlp_ratio=m.mlp_ratio,
                      time_init=m.time_init, tmsa=m.tmsa, **learn_sigma(cfg.method))
        if m.latent:
            return NetSpec("raygen.nets.diffit:diffit", {"name": m.arch, "input_size": cfg.data.resolution, **kwargs})
        if m.channel_mult is not None:
            kwargs["channel_mult"] = list(m.channel_mult)
        return NetSpec("raygen.nets.diffit:diffit_unet", {"arch": m.arch, "img_resolution": cfg.data.resolution,
                                                          **kwargs})


def resolve(cfg: DiffiTConfig) -> DiffiTConfig:
    """The store's resolution for latent data; then the network is built on the meta device, so a size
    that does not split into windows or levels stops here, naming the keys."""
    import torch

    cfg = dataclasses.replace(cfg, data=image_data.resolve_data(cfg.data))
    try:
        with torch.device("meta"):
            DiffiTTask(cfg).net_spec().build()
    except ValueError as e:
        raise ConfigError(f"model.arch={cfg.model.arch} at data.resolution={cfg.data.resolution}: {e}; change "
                          "model.window_size, model.channel_mult or data.resolution") from None
    return cfg


RECIPE = image_recipe(NAME, DiffiTConfig, DiffiTTask, resolve=resolve,
                      description="DiffiT (time-dependent self-attention) with DDPM training, learned variance "
                                  "optional, respaced DDPM/DDIM sampling")
