"""DDPM training objective (Ho et al. 2020, arXiv 2006.11239) with DDPM ancestral and DDIM samplers
(Song et al. 2021, arXiv 2010.02502) and classifier-free guidance (Ho & Salimans, arXiv 2207.12598).

Optional, as DiT (arXiv 2212.09748) and latent DiffiT (arXiv 2312.02139) use them: a learned variance
trained with the hybrid loss L_simple + lambda L_vlb (Improved DDPM, Nichol & Dhariwal, arXiv
2102.09672, Sec. 3.1), sampling on a respaced subset of the timesteps (Improved DDPM Sec. 4), a
power-cosine ramp of the guidance scale and guidance on the first k channels only (DiffiT's
"three-channel" guidance). docs/methods/ddpm.md has the formulas.

Notation follows the papers: beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s,
timesteps are 0-indexed (t = 0 .. T-1) as in the DiT/ADM/diffusers code bases.
Schedules are computed in float64 and cast once (float32 cumulative products drift; docs/methods/ddpm.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import numpy as np
import torch

from raygen.config import ConfigError
from raygen.core import rng
from raygen.core.contracts import Method

# A schedule "reaches noise" when alpha_bar_T <= this (docs/methods/ddpm.md: T=100 with the linear
# 1e-4..0.02 betas ends at alpha_bar_T = 0.364, so sampling starts far from anything trained on).
TERMINAL_ALPHA_BAR_MAX = 1e-3

# Probabilities below this are floored in the discretised likelihood (its log is about -27.6 nats).
_MIN_PROB = 1e-12


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
    # learned variance (Improved DDPM Sec. 3.1): the network outputs 2C channels (eps, v), the loss adds
    # vlb_weight * L_vlb (lambda = 0.001 in the paper) with the mean's gradient stopped
    learn_sigma: bool = False
    vlb_weight: float = 1e-3
    # the ancestral sampler's variance without learn_sigma: beta_tilde (posterior, "fixed small") or beta
    fixed_variance: Literal["beta", "beta_tilde"] = "beta_tilde"
    # sampler used for previews and evaluation
    sampler: Literal["ddim", "ddpm"] = "ddim"
    sample_steps: int = 50
    eta: float = 0.0
    spacing: Literal["leading", "trailing"] = "trailing"
    # visited timesteps as a respacing ("250": 250 evenly strided of T, "ddim50": stride T/50, "10,15,20":
    # per section); unset: ddpm takes all T steps and ddim `sample_steps` at `spacing`
    respace: Optional[str] = None
    cfg_scale: float = 1.0
    # guidance scale over the steps: 'constant', or 'power_cosine' (DiffiT): 1 at t = T, cfg_scale at t = 0
    cfg_schedule: Literal["constant", "power_cosine"] = "constant"
    cfg_power: float = 4.0
    cfg_channels: Optional[int] = None  # guide only the first k eps channels (DiffiT/DiT: 3); unset = all
    clip_denoised: bool = False  # clip x0-hat to [-1, 1] every step (the baseline clips only at the end)

    def validate(self):
        if self.num_timesteps < 2:
            raise ConfigError("method.num_timesteps must be >= 2")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError("method.label_dropout must be in [0, 1)")
        if self.sample_steps < 1 or self.sample_steps > self.num_timesteps:
            raise ConfigError(f"method.sample_steps must be in [1, method.num_timesteps={self.num_timesteps}]")
        if self.vlb_weight < 0:
            raise ConfigError("method.vlb_weight must be >= 0")
        if self.cfg_power <= 0:
            raise ConfigError("method.cfg_power must be > 0")
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise ConfigError("method.cfg_channels must be >= 1 (unset: guide every eps channel)")
        if self.respace is not None:
            try:
                space_timesteps(self.num_timesteps, self.respace)
            except ValueError as e:
                raise ConfigError(f"method.respace: {e}") from None
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


# ---- respacing (Improved DDPM Sec. 4) ------------------------------------------------------------
def space_timesteps(T: int, spec: Union[int, str]) -> list[int]:
    """The kept timesteps (ascending) of a respacing of T steps, in the notation of the ADM code base:

    - "N" (or the int N): N steps evenly strided over 0 .. T-1, both ends included (stride (T-1)/(N-1),
      rounded), so "250" of 1000 keeps 0, 4, 8, ..., 999;
    - "a,b,c": the T steps are cut into as many equal sections, section i keeps its own count evenly;
    - "ddimN": every k-th step from 0 with the integer stride k that gives exactly N steps.
    At least two steps must be kept (the learned variance at t = 0 borrows the next step's)."""
    text = str(spec).strip().replace(" ", "")
    if text.startswith("ddim"):
        n = _count(text[4:], text)
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == n:
                kept = list(range(0, T, stride))
                break
        else:
            raise ValueError(f"no integer stride gives {n} of {T} steps for respace={text!r}")
    else:
        counts = [_count(c, text) for c in text.split(",")]
        size, extra = divmod(T, len(counts))
        kept, start = [], 0
        for i, n in enumerate(counts):
            section = size + (1 if i < extra else 0)
            if n > section:
                raise ValueError(f"respace={text!r}: section {i} has {section} steps, fewer than the {n} asked")
            stride = (section - 1) / (n - 1) if n > 1 else 1.0
            kept += [start + round(j * stride) for j in range(n)]
            start += section
        kept = sorted(set(kept))
    if len(kept) < 2:
        raise ValueError(f"respace={text!r} keeps {len(kept)} step; at least 2 are needed")
    return kept


def _count(text: str, spec: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"respace={spec!r} is not 'N', 'ddimN' or comma-separated counts") from None
    if n < 1:
        raise ValueError(f"respace={spec!r}: step counts must be >= 1")
    return n


def respace(betas_: np.ndarray, spec: Union[int, str]) -> tuple[np.ndarray, list[int]]:
    """Betas of the process that visits only the kept timesteps of `spec` (space_timesteps): alpha_bar is
    unchanged at the kept steps, beta_k = 1 - alpha_bar_k / alpha_bar_{k-1} between consecutive kept
    steps (alpha_bar before the first = 1). Keeping all steps returns the betas unchanged."""
    T = len(betas_)
    kept = space_timesteps(T, spec)
    if kept == list(range(T)):
        return np.array(betas_, dtype=np.float64), kept
    ab = np.cumprod(1.0 - np.asarray(betas_, dtype=np.float64))[kept]
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    return 1.0 - ab / ab_prev, kept


@dataclass(frozen=True)
class Chain:
    """The Markov chain a sampler runs: the visited original timesteps and, per visited step k, alpha_bar
    (the original one), beta_k = 1 - alpha_bar_k / alpha_bar_{k-1} and the quantities of the posterior
    q(x_{k-1} | x_k, x0) (DDPM Eq. 6-7). The full chain has the schedule's own betas."""

    timesteps: list
    betas: np.ndarray
    alpha_bar: np.ndarray

    @property
    def alpha_bar_prev(self) -> np.ndarray:
        return np.concatenate([[1.0], self.alpha_bar[:-1]])

    @property
    def posterior_variance(self) -> np.ndarray:  # beta_tilde
        return self.betas * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)

    @property
    def log_posterior_variance_clipped(self) -> np.ndarray:
        """log beta_tilde, with beta_tilde_0 = 0 replaced by beta_tilde_1 (Improved DDPM's reference code)."""
        pv = self.posterior_variance
        return np.log(np.concatenate([pv[1:2], pv[1:]]))


# ---- the variational bound's terms (Ho et al. Eq. 5, 13; Improved DDPM Sec. 3.1) -----------------
def gaussian_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (diagonal Gaussians)."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2).pow(2) * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) elementwise, in nats, for data x in [-1, 1] on the 256-level grid under N(mean, e^(2 log_scale))
    integrated over x's bin (Ho et al. Eq. 13): the bin is [x - 1/255, x + 1/255], widened to (-inf, x + 1/255]
    at x = -1 and [x - 1/255, inf) at x = 1. Probabilities are floored at 1e-12."""
    inv_s = torch.exp(-log_scale)
    upper = (x - mean + 1.0 / 255) * inv_s
    lower = (x - mean - 1.0 / 255) * inv_s
    log_below_upper = torch.special.log_ndtr(upper)  # x = -1: P(X <= -1 + 1/255)
    log_above_lower = torch.special.log_ndtr(-lower)  # x = 1: P(X >= 1 - 1/255)
    # P(lower < Z <= upper), taken from the side of 0 where both CDFs are far from 1 (no cancellation)
    mass = torch.where(lower > 0, _normal_cdf(-lower) - _normal_cdf(-upper), _normal_cdf(upper) - _normal_cdf(lower))
    floor = math.log(_MIN_PROB)
    return torch.where(x < -0.999, log_below_upper.clamp_min(floor),
                       torch.where(x > 0.999, log_above_lower.clamp_min(floor), torch.log(mass.clamp_min(_MIN_PROB))))


def _normal_cdf(z):
    """Standard normal CDF through erfc, accurate in the lower tail (torch.special.ndtr is not, on CPU:
    float32 ndtr(-6) is 0)."""
    return 0.5 * torch.erfc(-z * (1.0 / math.sqrt(2.0)))


def learned_log_variance(v, log_beta, log_beta_tilde):
    """Improved DDPM Eq. 15: log Sigma = v' log beta_t + (1 - v') log beta_tilde_t with v' = (v + 1) / 2."""
    frac = (v + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


def cfg_scale_at(t, T: int, cfg_scale: float, schedule: str = "constant", power: float = 4.0) -> float:
    """The guidance scale at original timestep t: constant, or DiffiT's power-cosine ramp
    s(t) = 1 + (cfg - 1) * (1 - cos(pi (1 - t/T)^power)) / 2, which is 1 at t = T and cfg at t = 0."""
    if schedule == "constant":
        return cfg_scale
    if schedule != "power_cosine":
        raise ValueError(f"cfg_schedule={schedule!r}: choose 'constant' or 'power_cosine'")
    ramp = 0.5 * (1.0 - math.cos(math.pi * (1.0 - t / T) ** power))
    return 1.0 + (cfg_scale - 1.0) * ramp


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


class DDPM(Method):
    """epsilon-prediction diffusion. `loss(net, batch)` for training; `sample(net, noise, cond)`."""

    sampler_settings = ("steps", "cfg_scale", "eta", "sampler", "spacing", "respace", "cfg_schedule", "cfg_power",
                        "cfg_channels", "fixed_variance")

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
        self.chain = Chain(list(range(self.T)), b, ab)
        # the posterior of the full chain, for the VLB terms (float64 -> float32 once)
        f32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)).float()  # noqa: E731
        ab_prev = self.chain.alpha_bar_prev
        self.post_coef_x0 = f32(np.sqrt(ab_prev) * b / (1.0 - ab))
        self.post_coef_xt = f32(np.sqrt(1.0 - b) * (1.0 - ab_prev) / (1.0 - ab))
        self.log_beta = f32(np.log(b))
        self.log_post_var = f32(self.chain.log_posterior_variance_clipped)
        self._vlb_tables: dict = {}  # device -> the tables vlb_terms reads, copied once
        self._last: dict = {}

    # ---- training -------------------------------------------------------------------------------
    def loss(self, net, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_simple (Ho et al. Eq. 14): w_t || eps - eps_theta(sqrt(ab_t) x0 + sqrt(1-ab_t) eps, t, y) ||^2,
        per sample (w_t = 1 unless loss_weighting=min_snr). Labels are replaced by the null class with
        probability label_dropout (CFG training). With learn_sigma the hybrid loss of Improved DDPM:
        plus vlb_weight * T * L_t (L_vlb = sum_t L_t, estimated at the drawn t) in bits per dimension."""
        x0, y = batch["image"], batch["label"]
        n, dev = x0.shape[0], x0.device
        gdev = generator.device if generator is not None else dev  # draw where the generator lives
        t = torch.randint(0, self.T, (n,), device=gdev, generator=generator).to(dev)
        eps = torch.randn(x0.shape, device=gdev, generator=generator).to(dev, x0.dtype)
        drop = torch.rand(n, device=gdev, generator=generator).to(dev) < self.cfg.label_dropout
        y = torch.where(drop, torch.full_like(y, self.null_class), y)
        sa = self.sqrt_ab.to(dev)[t].view(n, 1, 1, 1)
        s1 = self.sqrt_1mab.to(dev)[t].view(n, 1, 1, 1)
        x_t = sa * x0 + s1 * eps
        out = net(x_t, t, y)
        if not self.cfg.learn_sigma:
            mse = (out.float() - eps.float()).pow(2).flatten(1).mean(1)
            return self.loss_weight.to(dev)[t] * mse
        terms = self.hybrid_terms(out, x0, x_t, t, eps)
        self._last = {k: v.detach().mean() for k, v in terms.items()}
        return self.loss_weight.to(dev)[t] * terms["mse"] + (self.cfg.vlb_weight * self.T) * terms["vlb"]

    def split_output(self, out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, v) of a learned-variance network's 2C-channel output."""
        if out.shape[1] != 2 * channels:
            raise ValueError(f"method.learn_sigma=true needs a network with 2 x {channels} output channels (eps and "
                             f"the variance interpolation v), got {out.shape[1]}")
        return out[:, :channels], out[:, channels:]

    def hybrid_terms(self, out, x0, x_t, t, eps) -> dict:
        """Per-sample terms of the hybrid loss for a 2C-channel output: 'mse' (L_simple, unweighted) and
        'vlb' (L_t in bits per dimension, Improved DDPM Sec. 3.1), whose mean is taken from the detached eps
        so only the variance channels learn from it."""
        eps_hat, v = self.split_output(out.float(), x0.shape[1])
        mse = _per_sample_mean((eps_hat - eps.float()).pow(2))
        return {"mse": mse, "vlb": self.vlb_terms(x0, x_t, t, torch.cat([eps_hat.detach(), v], 1))}

    def vlb_terms(self, x0, x_t, t, out) -> torch.Tensor:
        """L_t per sample in bits per dimension for a 2C-channel output (eps, v) at timesteps t (full chain):
        KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and -log p(x0 | x_1) discretised for t = 0
        (Ho et al. Eq. 5 and 13). The gradient flows into whatever of `out` is not detached."""
        n, dev = x0.shape[0], x0.device
        x0, x_t = x0.float(), x_t.float()
        eps_hat, v = self.split_output(out.float(), x0.shape[1])
        if dev not in self._vlb_tables:
            self._vlb_tables[dev] = torch.stack([self.sqrt_ab, self.sqrt_1mab, self.post_coef_x0, self.post_coef_xt,
                                                 self.log_beta, self.log_post_var]).to(dev)
        sa, s1, c0, ct, log_beta, log_post_var = self._vlb_tables[dev][:, t].view(6, n, 1, 1, 1)
        x0_hat = (x_t - s1 * eps_hat) / sa
        mean_hat = c0 * x0_hat + ct * x_t
        log_var_hat = learned_log_variance(v, log_beta, log_post_var)
        mean_q = c0 * x0 + ct * x_t
        kl = _per_sample_mean(gaussian_kl(mean_q, log_post_var, mean_hat, log_var_hat))
        nll = -_per_sample_mean(discretized_gaussian_log_likelihood(x0, mean_hat, 0.5 * log_var_hat))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def log_metrics(self) -> dict:
        """With learn_sigma: the mean L_simple and L_t (bits/dim) of the last loss call."""
        return {f"loss_{k}": float(v) for k, v in self._last.items()}

    # ---- sampling -------------------------------------------------------------------------------
    def guided_output(self, net, x: torch.Tensor, t: int, labels: torch.Tensor, cfg_scale: float,
                      cfg_channels: Optional[int] = None) -> torch.Tensor:
        """The network's output with classifier-free guidance eps_u + s (eps_c - eps_u) on its first
        `cfg_channels` channels (default: all C eps channels), one batched call on [x; x]; the other channels
        (further eps channels, the variance channels v) are the conditional branch's."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if cfg_scale == 1.0:
            return net(x, tt, labels).float()
        null = torch.full_like(labels, self.null_class)
        out = net(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).float()
        o_c, o_u = out.chunk(2)
        k = x.shape[1] if cfg_channels is None else int(cfg_channels)
        if not 1 <= k <= x.shape[1]:
            raise ValueError(f"cfg_channels={k} must be in [1, {x.shape[1]}] (the eps channels)")
        if k == o_c.shape[1]:
            return o_u + cfg_scale * (o_c - o_u)
        return torch.cat([o_u[:, :k] + cfg_scale * (o_c[:, :k] - o_u[:, :k]), o_c[:, k:]], 1)

    def eps(self, net, x: torch.Tensor, t: int, labels: torch.Tensor, cfg_scale: float,
            cfg_channels: Optional[int] = None) -> torch.Tensor:
        """epsilon prediction with classifier-free guidance: eps_u + s (eps_c - eps_u), one batched call."""
        out = self.guided_output(net, x, t, labels, cfg_scale, cfg_channels)
        return out if out.shape[1] == x.shape[1] else out[:, :x.shape[1]]

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

    def ddpm_step(self, x, eps, t: int, noise=None, *, v=None, chain: Chain | None = None, k: int | None = None,
                  fixed_variance: str | None = None):
        """Ancestral step from the posterior q(x_{t-1} | x_t, x0) (Ho et al. Eq. 6-7), sigma^2 = beta-tilde
        (or beta with fixed_variance='beta'; or Improved DDPM's learned interpolation when the variance
        output `v` is given). On a respaced `chain`, step k (whose original timestep is t) goes to the
        previous kept step with that chain's betas."""
        chain = chain or self.chain
        k = t if k is None else k
        ab = chain.alpha_bar[k]
        ab_prev = chain.alpha_bar[k - 1] if k > 0 else 1.0
        beta = chain.betas[k]
        x0 = self.predict_x0(x, eps, t)
        mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
        if k == 0:
            return mean
        if v is not None:
            log_var = learned_log_variance(v, math.log(beta), float(chain.log_posterior_variance_clipped[k]))
            return mean + torch.exp(0.5 * log_var) * noise
        if (fixed_variance or self.cfg.fixed_variance) == "beta":
            return mean + math.sqrt(beta) * noise
        var = beta * (1 - ab_prev) / (1 - ab)
        return mean + math.sqrt(var) * noise

    def sampling_chain(self, respace_spec) -> Chain:
        """The chain over the kept timesteps of `respace_spec` (None: the full chain)."""
        if respace_spec is None:
            return self.chain
        b, kept = respace(self.betas64, respace_spec)
        if kept == list(range(self.T)):
            return self.chain
        return Chain(kept, b, self.alpha_bar64[kept])

    def _settings(self, settings: dict) -> dict:
        c = self.cfg
        s = {"steps": c.sample_steps, "cfg_scale": c.cfg_scale, "eta": c.eta, "sampler": c.sampler,
             "spacing": c.spacing, "respace": c.respace, "cfg_schedule": c.cfg_schedule, "cfg_power": c.cfg_power,
             "cfg_channels": c.cfg_channels, "fixed_variance": c.fixed_variance}
        unknown = set(settings) - set(s)
        if unknown:
            raise TypeError(f"DDPM got unknown sampler settings {sorted(unknown)}; known: {self.sampler_settings}")
        s.update({k: v for k, v in settings.items() if v is not None})
        s["steps"] = int(settings.get("steps") or c.sample_steps)  # as sample(): 0 / None -> the config's
        return s

    def nfe(self, **settings) -> int:
        """Network evaluations per sample: one per visited step (the guided pair runs as one doubled batch):
        the respaced count when `respace` is set, else T for ddpm and `steps` for ddim."""
        s = self._settings(settings)
        if s["respace"] is not None:
            return len(space_timesteps(self.T, s["respace"]))
        return self.T if s["sampler"] == "ddpm" else s["steps"]

    def default_settings(self) -> dict:
        """steps and cfg_scale, plus the respacing and guidance options where the config sets them away from
        their defaults (so a run records them without changing what a default run records)."""
        c = self.cfg
        out = {"steps": c.sample_steps, "cfg_scale": c.cfg_scale}
        if c.respace is not None:
            out["respace"] = c.respace
        if c.cfg_schedule != "constant":
            out.update(cfg_schedule=c.cfg_schedule, cfg_power=c.cfg_power)
        if c.cfg_channels is not None:
            out["cfg_channels"] = c.cfg_channels
        if c.fixed_variance != "beta_tilde" and not c.learn_sigma:
            out["fixed_variance"] = c.fixed_variance
        return out

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
        respace: Union[int, str, None] = None,
        cfg_schedule: str | None = None,
        cfg_power: float | None = None,
        cfg_channels: int | None = None,
        fixed_variance: str | None = None,
    ) -> torch.Tensor:
        """Generate images in [-1, 1] from `noise` (x_T) for `cond["label"]`. Unset options come from the
        method config. With `respace` both samplers visit the kept timesteps (ddim then ignores `steps` and
        `spacing`); with learn_sigma the ancestral sampler uses the network's variance."""
        c = self.cfg
        labels = cond["label"]
        sampler = sampler or c.sampler
        steps = int(steps or c.sample_steps)
        eta = c.eta if eta is None else eta
        spacing = spacing or c.spacing
        cfg_scale = c.cfg_scale if cfg_scale is None else cfg_scale
        respace = c.respace if respace is None else respace
        cfg_schedule = cfg_schedule or c.cfg_schedule
        cfg_power = c.cfg_power if cfg_power is None else cfg_power
        cfg_channels = c.cfg_channels if cfg_channels is None else cfg_channels
        fixed_variance = fixed_variance or c.fixed_variance
        C = noise.shape[1]

        def z():  # from the caller's generator (a SeedStack keeps every sample's draws its own)
            return rng.randn(generator, noise.shape, noise.device)

        def output(t: int) -> torch.Tensor:
            s = cfg_scale_at(t, self.T, cfg_scale, cfg_schedule, cfg_power) if cfg_scale != 1.0 else 1.0
            return self.guided_output(net, x, t, labels, s, cfg_channels)

        x = noise.float()
        if sampler == "ddpm":
            chain = self.sampling_chain(respace)
            for k in range(len(chain.timesteps) - 1, -1, -1):
                t = chain.timesteps[k]
                out = output(t)
                if c.learn_sigma:
                    e, v = self.split_output(out, C)
                else:
                    e, v = (out if out.shape[1] == C else out[:, :C]), None
                x = self.ddpm_step(x, e, t, z() if k > 0 else None, v=v, chain=chain, k=k,
                                   fixed_variance=fixed_variance)
        else:
            ts = ddim_timesteps(self.T, steps, spacing) if respace is None else space_timesteps(self.T, respace)[::-1]
            for i, t in enumerate(ts):
                t_prev = ts[i + 1] if i + 1 < len(ts) else -1
                out = output(t)
                e = out if out.shape[1] == C else out[:, :C]
                x = self.ddim_step(x, e, t, t_prev, eta, z() if eta > 0 else None)
        return x.clamp(-1, 1)
