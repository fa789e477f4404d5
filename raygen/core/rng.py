"""Random draws that belong to samples, not to batches.

A `SeedStack` holds one `torch.Generator` per sample (seeded by that sample's seed), so image k of a
generation is the same whichever batch, worker or resume it is drawn in (EDM's per-seed protocol).
`randn`/`rand` accept either a plain `torch.Generator` (one stream for the whole batch, as training
uses) or a `SeedStack` (row i from generator i); samplers call them and never the global RNG.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch


class SeedStack:
    """One generator per sample: row i of every draw comes from `torch.Generator().manual_seed(seeds[i])`."""

    def __init__(self, seeds: Sequence[int], device: Union[str, torch.device] = "cpu"):
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, fn, shape, dtype) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"a SeedStack of {len(self.generators)} seeds draws batches of that size, got shape "
                             f"{tuple(shape)}")
        return torch.stack([fn(tuple(shape[1:]), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])


Generator = Union[torch.Generator, SeedStack, None]


def _device(generator: Generator, fallback) -> torch.device:
    return generator.device if generator is not None else torch.device(fallback)


def randn(generator: Generator, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Standard normal draws of `shape` from `generator`, moved to `device`."""
    if isinstance(generator, SeedStack):
        return generator._stack(torch.randn, shape, dtype).to(device)
    return torch.randn(tuple(shape), generator=generator, device=_device(generator, device), dtype=dtype).to(device)


def rand(generator: Generator, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) draws of `shape` from `generator`, moved to `device`."""
    if isinstance(generator, SeedStack):
        return generator._stack(torch.rand, shape, dtype).to(device)
    return torch.rand(tuple(shape), generator=generator, device=_device(generator, device), dtype=dtype).to(device)
