"""DiT recipe: class-conditional DiT (raygen.nets.dit) + DDPM/DDIM (raygen.methods.ddpm) on an image
dataset, trained by the generic loop and evaluated with FID, class accuracy and a DDIM step sweep."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from raygen.config import ConfigError
from raygen.data import images as image_data
from raygen.eval.evaluate import EvalConfig
from raygen.methods.ddpm import DDPM, DDPMConfig
from raygen.nets.dit import DIT_SIZES, dit
from raygen.recipes.common import ImageTask, RunSection, run_evaluation
from raygen.train.loop import DebugConfig, LogConfig, OptimConfig, TrainConfig

NAME = "dit"


@dataclass
class ModelConfig:
    arch: str = "DiT-T/4"  # DiT-{T,S,B,L,XL}/{2,4,8}
    hidden_size: Optional[int] = None  # overrides of the named size
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0

    def validate(self):
        size, _, patch = self.arch.removeprefix("DiT-").partition("/")
        if size not in DIT_SIZES or patch not in ("2", "4", "8"):
            raise ConfigError(f"model.arch={self.arch!r} is not a DiT size; use DiT-<T|S|B|L|XL>/<2|4|8>")


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
        patch = int(self.model.arch.rsplit("/", 1)[1])
        if self.data.resolution % patch:
            raise ConfigError(
                f"data.resolution={self.data.resolution} is not divisible by the patch size {patch} of "
                f"model.arch={self.model.arch}"
            )


class DiTTask(ImageTask):
    """What the generic loop and the evaluator need: the network, the method, previews."""

    recipe = NAME

    def build_net(self) -> torch.nn.Module:
        m = self.cfg.model
        overrides = {k: v for k in ("hidden_size", "depth", "num_heads") if (v := getattr(m, k)) is not None}
        return dit(m.arch, input_size=self.cfg.data.resolution, in_channels=self.image_shape[0],
                   num_classes=self.num_classes, mlp_ratio=m.mlp_ratio, **overrides)

    def build_method(self) -> DDPM:
        return DDPM(self.cfg.method, self.num_classes)

    def generate(self, method: DDPM, net, labels: torch.Tensor, generator: torch.Generator, **sampler) -> torch.Tensor:
        """Images in [-1, 1] for `labels`; noise comes from `generator` (reproducible)."""
        device = next(net.parameters()).device
        noise = torch.randn((len(labels), *self.image_shape), generator=generator, device=generator.device)
        x = method.sample(net, noise.to(device), labels.to(device), generator=generator, **sampler)
        return self.to_pixels(x)

    def preview(self, net, generator: torch.Generator, per_class: int = 8) -> torch.Tensor:
        """A class-per-column grid: `per_class` rows of every class."""
        labels = torch.arange(self.num_classes).repeat(per_class)
        return self.generate(self.build_method(), net, labels, generator)

    def datasets(self) -> dict:
        return {"train": image_data.build_dataset(self.cfg.data, "train")}


def run(cfg: DiTConfig, run_dir) -> dict:
    """Train under Ray Train, then evaluate the EMA weights in a Ray task. Returns eval metrics."""

    from raygen.eval.evaluate import evaluate
    from raygen.train.loop import fit, plot_metrics, final_state

    task = DiTTask(cfg)
    result = fit(task, run_dir, task.datasets())
    plot_metrics(run_dir)
    if not cfg.eval.enabled:
        return {}
    ema = final_state(result)["ema"]
    return run_evaluation(evaluate, task, ema, run_dir)


def evaluate_run(cfg: DiTConfig, run_dir, trained_run) -> dict:
    """Evaluation only: the EMA weights of `trained_run`'s newest checkpoint, sampled and scored with
    this config's sampler settings (eval.steps, eval.cfg_scale, method.*), written to <run_dir>/eval."""

    from raygen.eval.evaluate import evaluate
    from raygen.train.loop import latest_state

    task = DiTTask(cfg)
    ema = latest_state(trained_run)["ema"]
    return run_evaluation(evaluate, task, ema, run_dir)


def reported_metrics(cfg: DiTConfig, eval_only: bool = False, during_training: bool = False) -> list[str]:
    """What a run reports to a sweep: the loop's metrics while training, the evaluation's at the end."""
    from raygen.eval.evaluate import scored_metrics
    from raygen.train.loop import LOOP_METRICS

    train = [] if eval_only else list(LOOP_METRICS)
    if during_training or not cfg.eval.enabled:
        return train
    scored = scored_metrics(cfg.eval, image_data.pixel_source(cfg.data))
    evaluated = ["steps", "cfg_scale", "num_samples", "sample_seconds", *scored]
    if scored and cfg.eval.untrained_baseline:
        evaluated += ["fid_untrained", "fid_untrained_over_fid"]
    if cfg.method.sampler == "ddim":
        evaluated += [f"{m}@steps={n}" for n in cfg.eval.sweep_steps for m in scored]
    return train + evaluated


def main(argv=None):
    """The `jobs/dit.py` entry point; returns the run directory."""
    from raygen.cli import guarded, init_ray, report, setup_job

    cfg, run_dir, _ = setup_job(NAME, DiTConfig, argv)
    init_ray()
    report(run_dir, guarded(run, cfg, run_dir))
    return run_dir
