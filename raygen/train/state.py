"""Training state: EMA, learning-rate schedule, RNG capture, and the checkpoint format.

A checkpoint directory holds `state.pt` (model, EMA, optimizer, LR-schedule step, global step, data
position, counters; written by rank 0) and `rng_rank<r>.pt` (every rank's RNG states), so a resumed
run continues the exact random stream (the DiT/Latte resume bugs lost the EMA: ray.md §1).
Files are written to a temporary name and renamed; Ray Train then copies the directory into
`<run_dir>/checkpoints/` and only registers it once the copy is complete.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


STATE_FILE = "state.pt"


class EMA:
    """fp32 exponential moving average of parameters, with the warm-up decay
    min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the random init."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    def current_decay(self, num_updates: int) -> float:
        return min(self.decay, (1 + num_updates) / (10 + num_updates)) if self.warmup else self.decay

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
    samples_seen: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    data: DataPosition = field(default_factory=DataPosition)
