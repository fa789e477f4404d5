"""Latent-MAE recipe: the frozen feature network of the drifting method (raygen.nets.mae), trained
with the generic loop on an image source or a latent store by masked-patch reconstruction (paper
A.3). `jobs/latent_mae.py` trains one on its own; `jobs/drifting.py` trains one as its first stage.

Like every run, the run directory gets `net_ema.pt` at the end (docs/checkpoints.md): the EMA weights
plus the network's NetSpec, which is what `stage.mae_ckpt` of the drifting job points at (that file or
its run dir).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raygen.config import ConfigError
from raygen.core.contracts import Method, NetSpec
from raygen.data import images as image_data
from raygen.recipes import Recipe, register
from raygen.recipes.common import ImageTask, RunSection
from raygen.train.checkpoint import EXPORT_FILE
from raygen.train.config import LOOP_METRICS, DebugConfig, LogConfig, OptimConfig, TrainConfig

NAME = "latent_mae"
LEGACY_FILE = "mae.pt"  # what runs made before net_ema.pt wrote


@dataclass
class MAEModelConfig:
    width: int = 256  # W: stage widths W, 2W, 4W, 8W (ablation 256, SOTA 640)
    layers: list[int] = field(default_factory=lambda: [3, 4, 6, 3])  # BasicBlocks per stage (ResNet-34)
    patch: int = 2  # masked patch size
    mask_ratio: float = 0.5

    def validate(self):
        if self.width < 1 or len(self.layers) != 4 or min(self.layers) < 1:
            raise ConfigError("mae model: width must be >= 1 and layers a list of 4 block counts >= 1")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio must be in (0, 1), got {self.mask_ratio}")


@dataclass
class LatentMAEConfig:
    run: RunSection = field(default_factory=RunSection)
    data: image_data.ImageDataConfig = field(default_factory=image_data.ImageDataConfig)
    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)



def resolve(cfg: LatentMAEConfig) -> LatentMAEConfig:
    data = image_data.resolve_data(cfg.data)
    # the encoder halves the map three times and the masking works on whole patches
    if data.resolution % 8 or data.resolution % cfg.model.patch:
        raise ConfigError(f"data.resolution={data.resolution} must be divisible by 8 (three stride-2 "
                          f"stages) and by model.patch={cfg.model.patch}")
    return dataclasses.replace(cfg, data=data)



class MAEObjective(Method):
    """Masked-patch MSE (the net's forward is its per-sample loss, so DDP sees a forward call)."""

    def loss(self, net, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return net(batch["image"], generator)


class MAETask(ImageTask):
    recipe = NAME

    def __init__(self, cfg: LatentMAEConfig):
        super().__init__(cfg)
        self._preview_batch = None

    def net_spec(self) -> NetSpec:
        m = self.cfg.model
        return NetSpec("raygen.nets.mae:LatentMAE", {
            "in_channels": self.sample_shape[0], "width": m.width, "layers": list(m.layers),
            "input_size": self.cfg.data.resolution, "patch": m.patch, "mask_ratio": m.mask_ratio})

    def build_method(self) -> MAEObjective:
        return MAEObjective()

    def preview(self, net, generator: torch.Generator) -> torch.Tensor:
        """Rows of (original, masked input, reconstruction) for one example of each class."""
        x = self._examples().to(generator.device)
        masked, recon = net.reconstruct(x, generator)
        return self.to_pixels(torch.cat([x, masked, recon]))

    def _examples(self) -> torch.Tensor:
        if self._preview_batch is None:
            self._preview_batch = torch.from_numpy(first_per_class(self.cfg.data, self.num_classes))
        return self._preview_batch


def first_per_class(data_cfg, num_classes: int):
    """One model-ready training example per class, [num_classes, C, H, W] float32."""
    import numpy as np

    if image_data.is_latent_store(data_cfg):
        from raygen.data.store import Store

        store = Store(data_cfg.path)
        pos = [store.class_indices(c)[0] for c in range(num_classes)]
        return store.array("latent")[np.asarray(pos)].astype(np.float32)
    images, labels = image_data.arrays(data_cfg, "train")
    idx = [int(np.flatnonzero(labels == c)[0]) for c in range(num_classes)]
    return image_data.to_model_input({"image": images[idx], "label": labels[idx]})["image"]


def exported(run_dir) -> bool:
    return (Path(run_dir) / EXPORT_FILE).is_file() or (Path(run_dir) / LEGACY_FILE).is_file()


def load_mae(path) -> dict:
    """The export record ({"net": NetSpec dict, "ema": state dict, ...}) of a trained MAE, from its
    `net_ema.pt`, a `mae.pt` of an older run, or the run directory holding either."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = next((p / f for f in (EXPORT_FILE, LEGACY_FILE) if (p / f).is_file()), p / EXPORT_FILE)
    if not p.is_file():
        raise ConfigError(f"stage.mae_ckpt={str(path)!r}: no {EXPORT_FILE} there; train one with "
                          f"`python jobs/latent_mae.py` (it writes <run_dir>/{EXPORT_FILE}) or leave stage.mae_ckpt unset")
    record = torch.load(p, map_location="cpu", weights_only=False)
    if "model_args" in record:  # the older mae.pt layout
        record = {"net": NetSpec("raygen.nets.mae:LatentMAE", record["model_args"]).to_dict(), "ema": record["ema"]}
    if NetSpec.from_dict(record["net"]).builder != "raygen.nets.mae:LatentMAE":
        raise ConfigError(f"stage.mae_ckpt={str(path)!r} holds a {record['net']['builder']} network, not a "
                          "latent-MAE; point it at a jobs/latent_mae.py run")
    return record


def run(cfg: LatentMAEConfig, run_dir, callbacks=()) -> dict:
    from raygen.train.driver import train
    from raygen.train.logging import read_metrics

    train(MAETask(cfg), Path(run_dir), callbacks)
    records = read_metrics(run_dir)
    return {"mae": str(Path(run_dir) / EXPORT_FILE), "final_loss": records[-1].get("loss") if records else None}


def reported_metrics(cfg: LatentMAEConfig, eval_only: bool = False, during_training: bool = False) -> list[str]:
    """The loop's metrics (its loss is the masked reconstruction MSE), and the final loss at the end."""
    return [*LOOP_METRICS, *(() if during_training else ("final_loss",))]


RECIPE = register(Recipe(name=NAME, config=LatentMAEConfig, task=MAETask, run=run,
                         reported_metrics=reported_metrics, resolve=resolve,
                         description="the latent-MAE feature network of the drifting method (masked-patch MSE)"))
