"""Training state and the loop's policies: EMA, learning-rate schedule, optimizer, loss reduction,
non-finite gradients, RNG capture, and the counters a checkpoint records (docs/checkpoints.md)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from raygen.train.config import OptimConfig, TrainConfig


def ema_decay(cfg: TrainConfig, num_updates: int) -> float:
    """The EMA decay of update `num_updates` (0-based).

    Per step: min(decay, (1 + n) / (10 + n)) with the warm-up, so early averages are not dominated by
    the random init. As a half-life (EDM, arXiv 2206.00364 App. F): beta = 0.5^(B / h), h the
    half-life in images, ramped up as h = min(h, ratio * images seen) so the average forgets the
    initialisation quickly."""
    if cfg.ema_halflife_kimg is not None:
        halflife = cfg.ema_halflife_kimg * 1000
        if cfg.ema_rampup_ratio is not None:
            halflife = min(halflife, (num_updates + 1) * cfg.batch_size * cfg.ema_rampup_ratio)
        return 0.5 ** (cfg.batch_size / max(halflife, 1e-8))
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1 + num_updates) / (10 + num_updates))
    return cfg.ema_decay


class EMA:
    """fp32 exponential moving average of a network's parameters and buffers."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        self.cfg = cfg
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    def current_decay(self, num_updates: int) -> float:
        return ema_decay(self.cfg, num_updates)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, num_updates: int) -> None:
        d = self.current_decay(num_updates)
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1.0 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            self.shadow[k].copy_(v)


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Linear warm-up, then constant or cosine decay to `min_ratio` of the peak."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, arXiv 1711.05101) or Adam without decay (EDM's choice)."""
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.kind == "adam":
        return torch.optim.Adam(params, **kw)
    return torch.optim.AdamW(params, weight_decay=cfg.weight_decay, **kw)


def reduce_loss(loss: torch.Tensor, how: str) -> torch.Tensor:
    """mean: over every element. sum: summed over each sample's elements, averaged over the batch
    (EDM's `loss.sum() / batch`), which scales the gradient with the number of pixels."""
    if how == "sum" and loss.dim() > 0:
        return loss.sum() / loss.shape[0]
    return loss.mean()


def sanitize_grads(params) -> None:
    """Replace NaN/Inf gradient entries by finite numbers (EDM and SDD do this before every step)."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)


def rng_state(generator: torch.Generator) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "generator_device": str(generator.device),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class DataPosition:
    """Where the data stream is: `epoch` and batches already consumed within it."""

    epoch: int = 0
    batch: int = 0


@dataclass
class Counters:
    step: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    data: DataPosition = field(default_factory=DataPosition)
    world: int = 0  # the worker count that wrote it (0: not recorded); an elastic run may resume on another

    def position_for(self, world: int) -> DataPosition:
        """The data position in a dataset shard of a run now on `world` workers. A shard is 1/world of
        the epoch, so after a resize the batches consumed per worker scale by old/new world: the run
        continues from the same fraction of the epoch (the exact order within it changes with the split)."""
        if not self.world or self.world == world:
            return self.data
        return DataPosition(self.data.epoch, self.data.batch * self.world // world)

    @classmethod
    def from_dict(cls, d: dict) -> "Counters":
        d = {k: v for k, v in d.items() if k in ("step", "nonfinite_total", "nonfinite_in_a_row", "data", "world")}
        return cls(**{**d, "data": DataPosition(**d.get("data", {}))})
