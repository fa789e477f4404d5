"""The contracts between the layers (docs/architecture.md): what a trainer runs (a `Task`), what a
generative method offers (a `Method`), and how a network is rebuilt without its training config
(a `NetSpec`). A recipe supplies a Task subclass; the trainer and the evaluator only call what is
declared here, so a missing piece fails when the class is defined or registered, not on a worker.
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Optional


@dataclass(frozen=True)
class NetSpec:
    """A network as `builder(**kwargs)`: `builder` is "package.module:function" (or a class), so a
    checkpoint or an exported EMA file can rebuild the network without the recipe's config."""

    builder: str
    kwargs: dict = field(default_factory=dict)

    def build(self):
        module, _, name = self.builder.partition(":")
        if not name:
            raise ValueError(f"net builder {self.builder!r} must read 'package.module:function'")
        return getattr(importlib.import_module(module), name)(**self.kwargs)

    def to_dict(self) -> dict:
        return {"builder": self.builder, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict) -> "NetSpec":
        return cls(d["builder"], dict(d.get("kwargs", {})))


class Method(abc.ABC):
    """A generative method: the training objective and, when it generates, its sampler.

    `loss(net, batch, generator)` returns a loss with the batch as its leading dimension (per sample,
    or per element); the trainer reduces it (`train.loss_reduction`). `sample(net, noise, cond,
    generator, **settings)` maps noise (and conditioning such as class labels) to samples; the
    keyword settings it accepts and the evaluator may set or sweep are named in `sampler_settings`.
    All randomness comes from the caller's `generator`, so a resumed run or an evaluation repeats.
    """

    sampler_settings: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def loss(self, net, batch: dict, generator) -> Any: ...

    def sample(self, net, noise, cond: dict, generator, **settings):
        raise NotImplementedError(f"{type(self).__name__} is a training objective without a sampler")

    def default_settings(self) -> dict:
        """The sampler settings used when the evaluation leaves them unset."""
        return {}

    def log_metrics(self) -> dict:
        """Method diagnostics of the last step, logged with the loop's metrics (e.g. drift norms)."""
        return {}


class Task(abc.ABC):
    """What the trainer runs: the network (as a NetSpec), the method, the data and previews.

    Data comes either from Ray Datasets (`datasets()`, sharded by Ray Train, position = epoch and
    batch) or from the task's own stream (`batches()`, e.g. class-balanced draws whose position is a
    step counter). `batches()` returning None means: read the `train` dataset.
    """

    recipe: ClassVar[str] = ""  # the registry name of the recipe this task belongs to
    backend: ClassVar[str] = "torch"  # which trainer backend runs it (raygen.train.driver.BACKENDS)
    cfg: Any
    num_classes: int
    sample_shape: tuple
    preview_upscale: int = 1

    @abc.abstractmethod
    def net_spec(self) -> NetSpec: ...

    @abc.abstractmethod
    def build_method(self) -> Method: ...

    @abc.abstractmethod
    def preview(self, net, generator):
        """Images in [-1, 1] for the training-time sample grid (one column per class)."""

    def build_net(self):
        return self.net_spec().build()

    def datasets(self) -> dict:
        """Ray Datasets by name (`train`), for tasks that stream from Ray Data."""
        return {}

    def batches(self, position, rank: int, world: int, device) -> Optional[Iterator]:
        """An endless (position after the batch, batch) stream, or None to read the `train` dataset."""
        return None

    # ---- what the evaluator needs of a generating task --------------------------------------------
    def conditions(self, n: int) -> dict:
        """Conditioning of n evaluation samples: class-balanced labels where there are classes."""
        import torch

        return {"label": torch.arange(n) % self.num_classes} if self.num_classes else {}

    def to_pixels(self, x):
        """Samples -> images in [-1, 1] (latent tasks decode here)."""
        return x

    def generate(self, method: Method, net, cond: dict, generator, **settings):
        """Samples for `cond` as images in [-1, 1]; noise and every other draw come from `generator`
        (a torch.Generator, or a raygen.core.rng.SeedStack for draws that depend only on each seed)."""
        import torch

        from raygen.core.rng import randn

        n = len(next(iter(cond.values())))
        device = next(net.parameters()).device
        noise = randn(generator, (n, *self.sample_shape), device)  # a SeedStack gives per-seed noise
        with torch.no_grad():
            x = method.sample(net, noise, {k: v.to(device) for k, v in cond.items()}, generator, **settings)
        return self.to_pixels(x)
