"""What every image recipe shares: the run section, the image task (classes, sample shape, previews,
latents decoded through the store's VAE), and the train -> export -> evaluate sequence."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from raygen.core import storage
from raygen.core.contracts import Task
from raygen.data import images as image_data
from raygen.recipes import Recipe, register


@dataclass
class RunSection:
    name: Optional[str] = None  # a named run resumes when started again with the same name
    # s3://bucket/prefix, gs://bucket/prefix or a path every node mounts: checkpoints (Ray Train's storage),
    # metrics, samples and eval results go there too, and a named run resumes from there on a fresh cluster
    storage: Optional[str] = None


class ImageTask(Task):
    """Base of the image tasks: `cfg.data` decides classes, sample shape and how samples are shown. A
    subclass names its method (`method_cls`, built from `cfg.method`) or overrides `build_method`."""

    method_cls: type  # a raygen.core.contracts.Method subclass

    def __init__(self, cfg):
        self.cfg = cfg
        data = cfg.data
        self.class_names = image_data.class_names(data)
        self.num_classes = len(self.class_names)
        self.sample_shape = (image_data.channels(data), data.resolution, data.resolution)
        # latent runs decode samples through the store's VAE; FID/accuracy then use the pixel source
        self.pixel_data = image_data.pixel_source(data)
        self.store_meta = image_data.store_meta(data) if image_data.is_latent_store(data) else None
        pixel_res = self.store_meta["preprocessing"]["resolution"] if self.store_meta else data.resolution
        self.preview_upscale = max(1, 64 // pixel_res)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> decoded images (grayscale when the store was made from grayscale digits)."""
        if self.store_meta is None:
            return x
        from raygen.data.encoders import decode_latents

        img = decode_latents(self.store_meta, x)
        if self.pixel_data is not None and image_data.channels(self.pixel_data) == 1:
            img = img.mean(1, keepdim=True)
        return img

    def build_method(self):
        return self.method_cls(self.cfg.method, self.num_classes)

    def preview(self, net, generator: torch.Generator, per_class: int = 8) -> torch.Tensor:
        """A class-per-column grid: `per_class` rows of every class, at the `eval.preview` settings."""
        labels = torch.arange(self.num_classes).repeat(per_class)
        return self.generate(self.build_method(), net, {"label": labels}, generator, **self.cfg.eval.preview)

    def datasets(self) -> dict:
        return {"train": image_data.build_dataset(self.cfg.data, "train")}


def run_evaluation(task, ema_state: dict, run_dir) -> dict:
    """The evaluator as a Ray task on a GPU (or `eval.cpus` CPUs, 0 = every free CPU) after training
    released its workers. It is scheduled outside any placement group: inside a sweep trial it would
    otherwise be captured by the trial's (which holds no CPU)."""
    import ray

    from raygen.train.driver import use_gpu

    cpus = task.cfg.eval.cpus or max(1, int(ray.available_resources().get("CPU", 1)))
    remote = ray.remote(num_cpus=cpus, num_gpus=1 if use_gpu(task.cfg.train) else 0)(evaluate_and_keep)
    metrics = ray.get(remote.options(scheduling_strategy="DEFAULT").remote(task, ema_state, str(run_dir), cpus))
    storage.pull(run_dir, only=("eval",), overwrite=True)  # written on the evaluating node
    return metrics


def evaluate_and_keep(task, ema_state, run_dir, cpus) -> dict:
    """The evaluator, then its results copied to `run.storage` from the node that wrote them."""
    from raygen.eval.evaluate import evaluate

    metrics = evaluate(task, ema_state, run_dir, cpus)
    storage.push(run_dir, only=("eval",))
    return metrics


def train_and_evaluate(task, run_dir, callbacks=(), plot_keys=()) -> dict:
    """Train under Ray Train, export the EMA weights, then evaluate them (when `eval.enabled`)."""
    from raygen.train.driver import train

    ema = train(task, Path(run_dir), callbacks, plot_keys)
    if not task.cfg.eval.enabled:
        return {}
    return run_evaluation(task, ema, run_dir)


def evaluate_trained(task, run_dir, trained_run) -> dict:
    """Evaluation only: the EMA weights exported by `trained_run` (or its latest registered checkpoint),
    sampled and scored with this task's config; results go to <run_dir>/eval."""
    from raygen.train.checkpoint import EXPORT_FILE, latest_state

    export = Path(trained_run) / EXPORT_FILE
    if export.is_file():
        ema = torch.load(export, map_location="cpu", weights_only=False)["ema"]
    else:
        ema = latest_state(trained_run)["ema"]
    return run_evaluation(task, ema, run_dir)


def reported_image_metrics(method_cls, cfg, eval_only: bool = False, during_training: bool = False) -> list[str]:
    """What an image recipe reports: the loop's metrics while training, then the evaluator's for this
    data and the method's sampler settings."""
    from raygen.eval.evaluate import reported_metrics as eval_metrics
    from raygen.train.config import LOOP_METRICS

    train = [] if eval_only else list(LOOP_METRICS)
    if during_training or not cfg.eval.enabled:
        return train
    return train + eval_metrics(cfg.eval, image_data.pixel_source(cfg.data), method_cls.sampler_settings)


def image_recipe(name: str, config: type, task: type, description: str, resolve=None, prepare=None) -> Recipe:
    """Register a network x method recipe that runs the shared sequence: `run` trains and evaluates
    `task(cfg)`, `evaluate` scores a trained run again, and the metrics reported are the evaluator's for
    `task.method_cls`'s sampler. `prepare(cfg, runs_root)`, when given, turns the config into the one the
    run reads before either (the U-Net recipes encode raw files into a pixel store there)."""
    method_cls = getattr(task, "method_cls", None)
    if method_cls is None:
        raise TypeError(f"recipe {name!r}: task {task.__name__} must name its method (method_cls)")

    def prepared(cfg, run_dir):
        return prepare(cfg, Path(run_dir).parent.parent) if prepare else cfg  # <runs-root>/<recipe>/<run>

    def run(cfg, run_dir, callbacks=()) -> dict:
        return train_and_evaluate(task(prepared(cfg, run_dir)), run_dir, callbacks)

    def evaluate(cfg, run_dir, trained_run) -> dict:
        return evaluate_trained(task(prepared(cfg, run_dir)), run_dir, trained_run)

    def reported_metrics(cfg, eval_only: bool = False, during_training: bool = False) -> list[str]:
        return reported_image_metrics(method_cls, cfg, eval_only, during_training)

    return register(Recipe(name=name, config=config, task=task, run=run, evaluate=evaluate, resolve=resolve,
                           reported_metrics=reported_metrics, description=description))
