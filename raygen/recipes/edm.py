"""EDM recipe (Karras et al., arXiv 2206.00364): an EDM-family U-Net (raygen.nets.unet) with EDM's
preconditioning, loss and Heun sampler (raygen.methods.edm), trained by the torch backend with EDM's loop
policies (Adam, LR ramp-up and EMA half-life in images, per-sample summed loss, nan_to_num gradients) and
scored by the one evaluator. Presets: `default`/`smoke` (embedded digits), `cifar10_ddpmpp`,
`imagenet64_adm` (the paper's configurations). docs/methods/edm.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from raygen.eval.evaluate import check_settings
from raygen.methods.edm import EDM, EDMConfig
from raygen.recipes.common import image_recipe
from raygen.recipes.diffusion import UNetRecipeConfig, UNetTask, prepare_pixel_store, resolve_common

NAME = "edm"


@dataclass
class EDMRecipeConfig(UNetRecipeConfig):
    method: EDMConfig = field(default_factory=EDMConfig)

    def validate(self):
        check_settings(self.eval, EDM.sampler_settings, NAME)


class EDMTask(UNetTask):
    recipe = NAME
    method_cls = EDM


RECIPE = image_recipe(NAME, EDMRecipeConfig, EDMTask, resolve=resolve_common, prepare=prepare_pixel_store,
                      description="EDM: U-Net with EDM preconditioning, loss and Heun sampler")
