"""DDPM training objective (Ho et al. 2020, arXiv 2006.11239) with DDPM ancestral and DDIM samplers
(Song et al. 2021, arXiv 2010.02502) and classifier-free guidance (Ho & Salimans, arXiv 2207.12598).

Notation follows the papers: beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s,
timesteps are 0-indexed (t = 0 .. T-1) as in the DiT/ADM/diffusers code bases.
Schedules are computed in float64 and cast once (float32 cumulative products drift; docs/methods/ddpm.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from raygen.config import ConfigError
from raygen.core import rng
from raygen.core.contracts import Method

# A schedule "reaches noise" when alpha_bar_T <= this (docs/methods/ddpm.md: T=100 with the linear
# 1e-4..0.02 betas ends at alpha_bar_T = 0.364, so sampling starts far from anything trained on).
TERMINAL_ALPHA_BAR_MAX = 1e-3


@dataclass
class DDPMConfig:
    schedule: Literal["linear", "cosine"] = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # Short linear schedules that do not reach noise: 'error' stops with the fix, 'rescale' scales
    # beta_end by 1000/T (docs/methods/ddpm.md, "Short schedules").
    short_schedule: Literal["error", "rescale"] = "error"
    label_dropout: float = 0.1  # probability of the null class in training, for CFG
    # per-timestep loss weight: 'uniform' is L_simple; 'min_snr' is Min-SNR-gamma (Hang et al.,
    # arXiv 2303.09556, Eq. 11 for eps-prediction: w_t = min(SNR_t, gamma) / SNR_t), faster to converge
    loss_weighting: Literal["uniform", "min_snr"] = "uniform"
    min_snr_gamma: float = 5.0
    # sampler used for previews and evaluation
    sampler: Literal["ddim", "ddpm"] = "ddim"
    sample_steps: int = 50
    eta: float = 0.0
    spacing: Literal["leading", "trailing"] = "trailing"
    cfg_scale: float = 1.0
    clip_denoised: bool = False  # clip x0-hat to [-1, 1] every step (the baseline clips only at the end)

    def validate(self):
        if self.num_timesteps < 2:
            raise ConfigError("method.num_timesteps must be >= 2")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError("method.label_dropout must be in [0, 1)")
        if self.sample_steps < 1 or self.sample_steps > self.num_timesteps:
            raise ConfigError(f"method.sample_steps must be in [1, method.num_timesteps={self.num_timesteps}]")
        betas(self)  # raises if the schedule does not reach noise


def linear_betas(T: int, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal, arXiv 2102.09672, Eq. 17)."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=np.float64)


def betas(cfg: DDPMConfig) -> np.ndarray:
    T = cfg.num_timesteps
    if cfg.schedule == "cosine":
        b = cosine_betas(T)
    else:
        b = linear_betas(T, cfg.beta_start, cfg.beta_end)
        terminal = float(np.prod(1 - b))
        if terminal > TERMINAL_ALPHA_BAR_MAX:
            if cfg.short_schedule == "rescale":
                b = linear_betas(T, cfg.beta_start * 1000 / T, cfg.beta_end * 1000 / T)
                terminal = float(np.prod(1 - b))
            if terminal > TERMINAL_ALPHA_BAR_MAX:
                raise ConfigError(
                    f"method: the linear schedule with num_timesteps={T}, beta_end={cfg.beta_end} ends at "
                    f"alpha_bar_T={terminal:.3g} > {TERMINAL_ALPHA_BAR_MAX:g}, so it never reaches noise; set "
                    f"method.short_schedule=rescale (beta_end -> {cfg.beta_end * 1000 / T:.3g}), "
                    "method.schedule=cosine, or a larger method.num_timesteps"
                )
    return b


def ddim_timesteps(T: int, steps: int, spacing: str) -> list[int]:
    """Descending timesteps for a `steps`-step sampler ('leading' = DDIM paper / diffusers default,
    'trailing' = starts at t = T-1, arXiv 2305.08891 Table 2)."""
    if spacing == "leading":
        ts = np.arange(0, steps) * (T // steps)
    else:
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64)[::-1] - 1
    return [int(t) for t in ts[::-1]]


class DDPM(Method):
    """epsilon-prediction diffusion. `loss(net, batch)` for training; `sample(net, noise, cond)`."""

    sampler_settings = ("steps", "cfg_scale", "eta", "sampler", "spacing")

    def __init__(self, cfg: DDPMConfig, num_classes: int):
        self.cfg = cfg
        self.num_classes = num_classes
        self.null_class = num_classes
        b = betas(cfg)
        ab = np.cumprod(1.0 - b)
        self.T = len(b)
        self.betas64 = b
        self.alpha_bar64 = ab
        self.alpha_bar = torch.from_numpy(ab).float()
        self.sqrt_ab = torch.from_numpy(np.sqrt(ab)).float()
        self.sqrt_1mab = torch.from_numpy(np.sqrt(1.0 - ab)).float()
        snr = ab / (1.0 - ab)
        w = np.minimum(snr, cfg.min_snr_gamma) / snr if cfg.loss_weighting == "min_snr" else np.ones_like(snr)
        self.loss_weight = torch.from_numpy(w).float()

    # ---- training -------------------------------------------------------------------------------
    def loss(self, net, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_simple (Ho et al. Eq. 14): w_t || eps - eps_theta(sqrt(ab_t) x0 + sqrt(1-ab_t) eps, t, y) ||^2,
        per sample (w_t = 1 unless loss_weighting=min_snr). Labels are replaced by the null class with
        probability label_dropout (CFG training)."""
        x0, y = batch["image"], batch["label"]
        n, dev = x0.shape[0], x0.device
        gdev = generator.device if generator is not None else dev  # draw where the generator lives
        t = torch.randint(0, self.T, (n,), device=gdev, generator=generator).to(dev)
        eps = torch.randn(x0.shape, device=gdev, generator=generator).to(dev, x0.dtype)
        drop = torch.rand(n, device=gdev, generator=generator).to(dev) < self.cfg.label_dropout
        y = torch.where(drop, torch.full_like(y, self.null_class), y)
        sa = self.sqrt_ab.to(dev)[t].view(n, 1, 1, 1)
        s1 = self.sqrt_1mab.to(dev)[t].view(n, 1, 1, 1)
        eps_hat = net(sa * x0 + s1 * eps, t, y)
        mse = (eps_hat.float() - eps.float()).pow(2).flatten(1).mean(1)
        return self.loss_weight.to(dev)[t] * mse

    # ---- sampling -------------------------------------------------------------------------------
    def eps(self, net, x: torch.Tensor, t: int, labels: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """epsilon prediction with classifier-free guidance: eps_u + s (eps_c - eps_u), one batched call."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if cfg_scale == 1.0:
            return net(x, tt, labels).float()
        null = torch.full_like(labels, self.null_class)
        e = net(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).float()
        e_c, e_u = e.chunk(2)
        return e_u + cfg_scale * (e_c - e_u)

    def predict_x0(self, x, eps, t):
        ab = self.alpha_bar64[t]
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        return x0.clamp(-1, 1) if self.cfg.clip_denoised else x0

    def ddim_step(self, x, eps, t: int, t_prev: int, eta: float = 0.0, noise=None):
        """Song et al. Eq. 12: x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1-ab_prev)/(1-ab_t)) sqrt(1 - ab_t/ab_prev). t_prev < 0 means ab_prev = 1."""
        ab = self.alpha_bar64[t]
        ab_prev = self.alpha_bar64[t_prev] if t_prev >= 0 else 1.0
        x0 = self.predict_x0(x, eps, t)
        if self.cfg.clip_denoised:  # keep eps consistent with the clipped x0
            eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
        out = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            out = out + sigma * noise
        return out

    def ddpm_step(self, x, eps, t: int, noise=None):
        """Ancestral step from the posterior q(x_{t-1} | x_t, x0) (Ho et al. Eq. 6-7), sigma^2 = beta-tilde."""
        ab = self.alpha_bar64[t]
        ab_prev = self.alpha_bar64[t - 1] if t > 0 else 1.0
        beta = self.betas64[t]
        x0 = self.predict_x0(x, eps, t)
        mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
        if t == 0:
            return mean
        var = beta * (1 - ab_prev) / (1 - ab)
        return mean + math.sqrt(var) * noise

    def nfe(self, **settings) -> int:
        """Network evaluations per sample: one per step (the guided pair runs as one doubled batch)."""
        return int(settings.get("steps", self.cfg.sample_steps))

    def default_settings(self) -> dict:
        c = self.cfg
        return {"steps": c.sample_steps, "cfg_scale": c.cfg_scale}

    @torch.no_grad()
    def sample(
        self,
        net,
        noise: torch.Tensor,
        cond: dict,
        generator: torch.Generator | None = None,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        spacing: str | None = None,
        cfg_scale: float | None = None,
    ) -> torch.Tensor:
        """Generate images in [-1, 1] from `noise` (x_T) for `cond["label"]`. Unset options come from the
        method config."""
        c = self.cfg
        labels = cond["label"]
        sampler = sampler or c.sampler
        steps = int(steps or c.sample_steps)
        eta = c.eta if eta is None else eta
        spacing = spacing or c.spacing
        cfg_scale = c.cfg_scale if cfg_scale is None else cfg_scale

        def z():  # from the caller's generator (a SeedStack keeps every sample's draws its own)
            return rng.randn(generator, noise.shape, noise.device)

        x = noise.float()
        if sampler == "ddpm":
            for t in range(self.T - 1, -1, -1):
                x = self.ddpm_step(x, self.eps(net, x, t, labels, cfg_scale), t, z() if t > 0 else None)
        else:
            ts = ddim_timesteps(self.T, steps, spacing)
            for i, t in enumerate(ts):
                t_prev = ts[i + 1] if i + 1 < len(ts) else -1
                e = self.eps(net, x, t, labels, cfg_scale)
                x = self.ddim_step(x, e, t, t_prev, eta, z() if eta > 0 else None)
        return x.clamp(-1, 1)
