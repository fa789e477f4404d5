"""What every image recipe's task shares: the run section, the data's classes and sample shape,
and showing samples (latents decoded through the store's VAE, grayscale when the source was)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from raygen.data import images as image_data


@dataclass
class RunSection:
    name: Optional[str] = None  # a named run resumes when started again with the same name


class ImageTask:
    """Base of the tasks the generic loop trains: `cfg.data` decides classes, shape and previews."""

    def __init__(self, cfg):
        self.cfg = cfg
        data = cfg.data
        self.class_names = image_data.class_names(data)
        self.num_classes = len(self.class_names)
        self.image_shape = (image_data.channels(data), data.resolution, data.resolution)
        # latent runs decode samples through the store's VAE; FID/accuracy then use the pixel source
        self.pixel_data = image_data.pixel_source(data)
        self.store_meta = image_data.store_meta(data) if data.source == "latents" else None
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


def run_evaluation(evaluate_fn, task, ema_state: dict, run_dir) -> dict:
    """`evaluate_fn(task, ema_state, run_dir, cpus)` as a Ray task on the GPU (or `eval.cpus` CPUs, 0 =
    every free CPU) after training released its workers. It is scheduled outside any placement group:
    inside a sweep trial it would otherwise be captured by the trial's (which holds no CPU)."""
    import ray

    cfg = task.cfg
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    cpus = cfg.eval.cpus or max(1, int(ray.available_resources().get("CPU", 1)))
    remote = ray.remote(num_cpus=cpus, num_gpus=1 if use_gpu else 0)(evaluate_fn)
    return ray.get(remote.options(scheduling_strategy="DEFAULT").remote(task, ema_state, str(run_dir), cpus))
