"""Flow matching (rectified flow) as a `Method` for the JAX backend: the objective and the guided Euler
sampler of raygen.jaxgen.flow, behind the contract every trainer and evaluator calls
(docs/methods/fsdit.md). Conventions: t = 0 noise, t = 1 data, v-target x1 - eps, logit-normal t
(arXiv 2403.03206), one shared CFG drop mask (arXiv 2207.12598)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from raygen.config import ConfigError
from raygen.core.contracts import Method


@dataclass
class FlowMatchingConfig:
    t_sampler: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    t_clip: float = 0.99  # training inputs keep at least 1 - t_clip of their noise
    cfg_drop: float = 0.1  # fraction of training samples whose supports are replaced by the null
    steps: int = 50  # Euler steps (sampler default)
    cfg_scale: float = 3.0  # guidance weight (sampler default): 1 = conditional, 0 = unconditional

    def validate(self):
        if not 0.0 < self.t_clip <= 1.0 or not 0.0 <= self.cfg_drop <= 1.0:
            raise ConfigError("method.t_clip must be in (0, 1] and method.cfg_drop in [0, 1]")
        if self.steps < 1:
            raise ConfigError(f"method.steps must be >= 1, got {self.steps}")

    def flow(self, **settings):
        from raygen.jaxgen.flow import FlowConfig

        return FlowConfig(t_sampler=self.t_sampler, logit_mean=self.logit_mean, logit_std=self.logit_std,
                          t_clip=self.t_clip, cfg_drop=self.cfg_drop, steps=settings.get("steps", self.steps),
                          cfg_scale=settings.get("cfg_scale", self.cfg_scale))


class FlowMatching(Method):
    """`loss(net, batch, key)`: per-sample flow-matching loss [B] of a bound Flax module.
    `sample(net, noise, cond, key, steps, cfg_scale)`: Euler with classifier-free guidance; `cond` holds
    the supports' `pooled` [B,K,D] and (optionally) `tokens` [B,K,T,D]."""

    sampler_settings: ClassVar[tuple[str, ...]] = ("steps", "cfg_scale")

    def __init__(self, cfg: FlowMatchingConfig):
        self.cfg = cfg

    def loss(self, net, batch: dict, key):
        from raygen.jaxgen.flow import flow_loss

        module, variables = net.unbind()
        _, aux = flow_loss(module, variables["params"], batch, key, self.cfg.flow())
        return aux["loss"]

    def sample(self, net, noise, cond: dict, key=None, **settings):
        from raygen.jaxgen.flow import euler_sample_jit

        s = {**self.default_settings(), **settings}
        module, variables = net.unbind()
        return euler_sample_jit(module, variables["params"], noise, cond["pooled"], cond.get("tokens"),
                                steps=int(s["steps"]), cfg_scale=float(s["cfg_scale"]))

    def default_settings(self) -> dict:
        return {"steps": self.cfg.steps, "cfg_scale": self.cfg.cfg_scale}
