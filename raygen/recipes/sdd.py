"""Beta diffusion / SDD recipe (Zhou et al., arXiv 2309.07867, and its Smoothed-Dirichlet fork): an
EDM-family U-Net (raygen.nets.unet) predicting x0 from logits of multiplicative Beta noise, trained with
KLUB / ELBO / HKD and sampled by the reverse Beta chain (raygen.methods.sdd), with EDM's loop policies.
Presets: `default`/`smoke` (embedded digits), `cifar10_klub`, `cifar10_hkd` (the official options),
`volumes` (2-D slices of CT/MR volumes). docs/methods/sdd.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from raygen.eval.evaluate import check_settings
from raygen.methods.sdd import BetaDiffusion, SDDConfig
from raygen.recipes.common import image_recipe
from raygen.recipes.diffusion import UNetRecipeConfig, UNetTask, prepare_pixel_store, resolve_common

NAME = "sdd"


@dataclass
class SDDRecipeConfig(UNetRecipeConfig):
    method: SDDConfig = field(default_factory=SDDConfig)

    def validate(self):
        check_settings(self.eval, BetaDiffusion.sampler_settings, NAME)


class SDDTask(UNetTask):
    recipe = NAME
    method_cls = BetaDiffusion


RECIPE = image_recipe(NAME, SDDRecipeConfig, SDDTask, resolve=resolve_common, prepare=prepare_pixel_store,
                      description="Beta diffusion / SDD: U-Net with KLUB/ELBO/HKD losses and the Beta sampler")
