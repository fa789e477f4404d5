"""Latent-MAE recipe: the frozen feature network of the drifting method (raygen.nets.mae), trained
with the generic loop on an image source or a latent store by masked-patch reconstruction (paper
A.3). `jobs/latent_mae.py` trains one on its own; `jobs/drifting.py` trains one as its first stage.

The run directory gets `mae.pt` at the end: the EMA weights plus the network's constructor
arguments, which is what `stage.mae_ckpt` of the drifting job points at (that file or its run dir).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from raygen.config import ConfigError
from raygen.data import images as image_data
from raygen.recipes.common import ImageTask, RunSection
from raygen.train.loop import DebugConfig, LogConfig, OptimConfig, TrainConfig

NAME = "latent_mae"
MAE_FILE = "mae.pt"


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

    def validate(self):
        # the encoder halves the map three times and the masking works on whole patches
        if self.data.resolution % 8 or self.data.resolution % self.model.patch:
            raise ConfigError(f"data.resolution={self.data.resolution} must be divisible by 8 (three stride-2 "
                              f"stages) and by model.patch={self.model.patch}")


def build_mae(model_args: dict):
    from raygen.nets.mae import LatentMAE

    return LatentMAE(**model_args)


class MAEObjective:
    """Masked-patch MSE (the net's forward is its per-sample loss, so DDP sees a forward call)."""

    def loss(self, net, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return net(batch["image"], generator)


class MAETask(ImageTask):
    recipe = NAME

    def __init__(self, cfg: LatentMAEConfig):
        super().__init__(cfg)
        self._preview_batch = None

    def model_args(self) -> dict:
        m = self.cfg.model
        return {"in_channels": self.image_shape[0], "width": m.width, "layers": list(m.layers),
                "input_size": self.cfg.data.resolution, "patch": m.patch, "mask_ratio": m.mask_ratio}

    def build_net(self) -> torch.nn.Module:
        return build_mae(self.model_args())

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

    def datasets(self) -> dict:
        return {"train": image_data.build_dataset(self.cfg.data, "train")}


def first_per_class(data_cfg, num_classes: int):
    """One model-ready training example per class, [num_classes, C, H, W] float32."""
    import numpy as np

    if data_cfg.source == "latents":
        from raygen.data.store import Store

        store = Store(data_cfg.path)
        pos = [store.class_indices(c)[0] for c in range(num_classes)]
        return store.array("latent")[np.asarray(pos)].astype(np.float32)
    images, labels = image_data.arrays(data_cfg, "train")
    idx = [int(np.flatnonzero(labels == c)[0]) for c in range(num_classes)]
    return image_data.to_model_input({"image": images[idx], "label": labels[idx]})["image"]


def export(task: MAETask, ema_state: dict, run_dir: Path) -> Path:
    """<run_dir>/mae.pt: what the drifting job loads (EMA weights + constructor arguments)."""
    from raygen.core.files import save_torch

    path = Path(run_dir) / MAE_FILE
    save_torch({"model_args": task.model_args(), "ema": ema_state,
                       "data": asdict(task.cfg.data), "steps": task.cfg.train.steps}, path)
    return path


def load_mae(path: str | Path, device="cpu"):
    """A frozen MAE (eval mode, no grads) from a `mae.pt` or the run directory holding one."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / MAE_FILE
    if not p.is_file():
        raise ConfigError(f"stage.mae_ckpt={str(path)!r}: no {MAE_FILE} there; train one with "
                          f"`python jobs/latent_mae.py` (it writes <run_dir>/{MAE_FILE}) or leave stage.mae_ckpt unset")
    state = torch.load(p, map_location="cpu", weights_only=False)
    net = build_mae(state["model_args"])
    net.load_state_dict(state["ema"])
    net.requires_grad_(False)
    return net.eval().to(device), state


def run(cfg: LatentMAEConfig, run_dir) -> dict:
    from raygen.train.loop import final_state, fit, plot_metrics

    task = MAETask(cfg)
    result = fit(task, Path(run_dir), task.datasets())
    plot_metrics(run_dir)
    path = export(task, final_state(result)["ema"], run_dir)
    last = result.metrics or {}
    return {"mae": str(path), "final_loss": last.get("loss")}


def reported_metrics(cfg: LatentMAEConfig, eval_only: bool = False, during_training: bool = False) -> list[str]:
    """What a run reports to a sweep: the loop's metrics (its loss is the masked reconstruction MSE)."""
    from raygen.train.loop import LOOP_METRICS

    return [*LOOP_METRICS, *(() if during_training else ("final_loss",))]


def main(argv=None):
    """The `jobs/latent_mae.py` entry point; returns the run directory."""
    from raygen.cli import guarded, init_ray, report, setup_job

    cfg, run_dir, _ = setup_job(NAME, LatentMAEConfig, argv)
    init_ray()
    report(run_dir, guarded(run, cfg, run_dir))
    return run_dir
