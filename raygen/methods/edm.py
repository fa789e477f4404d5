"""EDM: "Elucidating the Design Space of Diffusion-Based Generative Models" (Karras et al.,
arXiv 2206.00364), as a raygen Method.

The denoiser D(x; sigma) estimates the clean image from x = y + n, n ~ N(0, sigma^2 I). It wraps the
raw network F with the preconditioning of Table 1 (Eq. 7):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

and is trained with E_{sigma, y, n} lambda(sigma) ||D(y + n; sigma) - y||^2 (Eq. 2, 8). Three
parameterizations of Table 1 are here: VP (Song et al. 2021), VE (the same), and EDM's own.
Sampling integrates the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma on the time steps
of Eq. 5 with Heun's 2nd-order method (Algorithm 2, optionally with "churn", i.e. stochasticity).

Precision: the preconditioner computes in float32 (the network may run under autocast); the sampler
keeps its state x in float64 (as NVlabs/edm does). Every random draw comes from the caller's generator
through raygen.core.rng. docs/methods/edm.md has the tables and what differs from NVlabs/edm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from raygen.config import ConfigError
from raygen.core.contracts import Method
from raygen.core.rng import rand, randn
from raygen.methods.augment import augment_batch

NO_UPPER_LIMIT = 1e9  # S_max default: churn at every sigma (a yaml-friendly stand-in for infinity)


# ============================================================ preconditioning (Table 1)
class Precond:
    """c_skip, c_out, c_in, c_noise as functions of sigma (tensors), the training distribution of
    sigma and the loss weight lambda(sigma); `__call__` is D(x; sigma) in float32."""

    sigma_min: float  # the range of sigma the network is trained on
    sigma_max: float
    sample_sigma_min: float  # the sampler's default range (EDM's choices for each parameterization)
    sample_sigma_max: float

    def c_skip(self, sigma): raise NotImplementedError
    def c_out(self, sigma): raise NotImplementedError
    def c_in(self, sigma): raise NotImplementedError
    def c_noise(self, sigma): raise NotImplementedError

    def sample_sigma(self, generator, n: int, device) -> torch.Tensor:
        """Training noise levels sigma [n] (the 'Noise distribution' row of Table 1)."""
        raise NotImplementedError

    def loss_weight(self, sigma): raise NotImplementedError

    def round_sigma(self, sigma):
        """The noise level the network can represent; continuous for all three, so the identity (the
        hook exists for discrete-time networks such as iDDPM in NVlabs/edm)."""
        return sigma

    def __call__(self, net, x, sigma, labels=None, augment_labels=None) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), in float32. `sigma` is a scalar or [B]."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        s = sigma.view(-1, 1, 1, 1)
        f = net(self.c_in(s) * x, self.c_noise(sigma), labels=labels, augment_labels=augment_labels)
        return self.c_skip(s) * x + self.c_out(s) * f.to(torch.float32)


class VPPrecond(Precond):
    """Variance preserving (Song et al., arXiv 2011.13456), Table 1 "VP": sigma(t) = sqrt(e^{beta_d t^2/2
    + beta_min t} - 1), t ~ U(epsilon_t, 1), c_noise = (M - 1) sigma^-1(sigma), lambda = 1/sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 epsilon_s: float = 1e-3):
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min, self.sigma_max = float(self.sigma(epsilon_t)), float(self.sigma(1.0))
        # EDM samples a VP network from t = 1 down to t = epsilon_s (Table 1, "Sampling")
        self.sample_sigma_min, self.sample_sigma_max = float(self.sigma(epsilon_s)), self.sigma_max

    def sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """t(sigma): the positive root of beta_d t^2/2 + beta_min t = ln(1 + sigma^2)."""
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def c_skip(self, sigma): return torch.ones_like(sigma)
    def c_out(self, sigma): return -sigma
    def c_in(self, sigma): return 1 / (sigma**2 + 1).sqrt()
    def c_noise(self, sigma): return (self.M - 1) * self.sigma_inv(sigma)

    def sample_sigma(self, generator, n, device):
        t = 1 + rand(generator, (n,), device) * (self.epsilon_t - 1)  # U(epsilon_t, 1]
        return self.sigma(t).to(device, torch.float32)

    def loss_weight(self, sigma): return 1 / sigma**2


class VEPrecond(Precond):
    """Variance exploding (Song et al., arXiv 2011.13456), Table 1 "VE": ln sigma ~ U(ln sigma_min,
    ln sigma_max), c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma/2), lambda = 1/sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100):
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sample_sigma_min, self.sample_sigma_max = self.sigma_min, self.sigma_max

    def c_skip(self, sigma): return torch.ones_like(sigma)
    def c_out(self, sigma): return sigma
    def c_in(self, sigma): return torch.ones_like(sigma)
    def c_noise(self, sigma): return (0.5 * sigma).log()

    def sample_sigma(self, generator, n, device):
        u = rand(generator, (n,), device)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def loss_weight(self, sigma): return 1 / sigma**2


class EDMPrecond(Precond):
    """EDM's own (Table 1 "Ours", Eq. 7 with the choices of Appendix B.6): unit-variance network input
    and training target, ln sigma ~ N(P_mean, P_std^2), lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2
    so that lambda c_out^2 = 1 (the effective loss weight is uniform over sigma)."""

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.0, sigma_max: float = math.inf,
                 P_mean: float = -1.2, P_std: float = 1.2):
        self.sigma_data, self.P_mean, self.P_std = sigma_data, P_mean, P_std
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sample_sigma_min, self.sample_sigma_max = 0.002, 80.0  # Sec. 3 / Table 1, "Sampling"

    def c_skip(self, sigma): return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
    def c_out(self, sigma): return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
    def c_in(self, sigma): return 1 / (self.sigma_data**2 + sigma**2).sqrt()
    def c_noise(self, sigma): return sigma.log() / 4

    def sample_sigma(self, generator, n, device):
        return (randn(generator, (n,), device) * self.P_std + self.P_mean).exp()

    def loss_weight(self, sigma): return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


# ============================================================ sampler (Eq. 5, Algorithm 2)
def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    round_sigma: Optional[Callable] = None) -> torch.Tensor:
    """Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for
    i < N, then sigma_N = 0; float64 [N + 1]. N = 1 is the single step sigma_max -> 0."""
    i = torch.arange(num_steps, dtype=torch.float64)
    frac = i / (num_steps - 1) if num_steps > 1 else i
    sigmas = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if round_sigma is not None:
        sigmas = round_sigma(sigmas)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def nfe(steps: int, solver: str = "heun") -> int:
    """Network evaluations of edm_sampler: Heun 2N - 1 (no correction on the last step), Euler N."""
    return 2 * steps - 1 if solver == "heun" else steps


def churn_gamma(sigma: float, steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    """Algorithm 2, line 4: gamma_i = min(S_churn / N, sqrt(2) - 1) if S_min <= sigma_i <= S_max else 0."""
    return min(S_churn / steps, math.sqrt(2) - 1) if S_min <= sigma <= S_max else 0.0


@torch.no_grad()
def edm_sampler(denoise: Callable, x_T: torch.Tensor, steps: int = 18, sigma_min: float = 0.002,
                sigma_max: float = 80.0, rho: float = 7.0, solver: str = "heun", S_churn: float = 0.0,
                S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0, generator=None,
                round_sigma: Optional[Callable] = None) -> torch.Tensor:
    """EDM Algorithm 2 over `denoise(x, sigma) -> D(x; sigma)` (sigma a Python float), from x_T ~
    N(0, sigma_max^2 I) (the caller scales). Returns x_N in float64.

    Each step: optionally raise the noise from sigma_i to sigma_hat = (1 + gamma_i) sigma_i by adding
    fresh noise (churn), take an Euler step to sigma_{i+1}, and unless sigma_{i+1} = 0 correct it with
    the trapezoidal rule (Heun). solver='euler' skips every correction. Churn noise is drawn on every
    step when S_churn > 0 (as Algorithm 2 does; steps outside [S_min, S_max] multiply it by zero) and
    never when S_churn = 0, from `generator` via raygen.core.rng (a SeedStack gives per-seed samples)."""
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    rs = round_sigma or (lambda s: s)
    sigmas = edm_sigma_steps(steps, sigma_min, sigma_max, rho, round_sigma).tolist()
    x_next = x_T.to(torch.float64)
    for i, (sigma_cur, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x_cur = x_next
        # churn: move up to sigma_hat by adding noise of variance sigma_hat^2 - sigma_i^2
        if S_churn > 0:
            gamma = churn_gamma(sigma_cur, steps, S_churn, S_min, S_max)
            sigma_hat = float(rs(torch.tensor(sigma_cur + gamma * sigma_cur, dtype=torch.float64)))
            eps = randn(generator, x_cur.shape, x_cur.device, torch.float64) * S_noise
            x_hat = x_cur + math.sqrt(sigma_hat**2 - sigma_cur**2) * eps
        else:
            sigma_hat, x_hat = sigma_cur, x_cur
        # Euler step from sigma_hat to sigma_{i+1}
        d_cur = (x_hat - denoise(x_hat, sigma_hat).to(torch.float64)) / sigma_hat
        x_next = x_hat + (sigma_next - sigma_hat) * d_cur
        # 2nd-order correction, skipped when sigma_{i+1} = 0 (the last step)
        if solver == "heun" and i < steps - 1:
            d_prime = (x_next - denoise(x_next, sigma_next).to(torch.float64)) / sigma_next
            x_next = x_hat + (sigma_next - sigma_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# ============================================================ config and Method
PRECONDS = ("edm", "vp", "ve")
SOLVERS = ("heun", "euler")


@dataclass
class EDMConfig:
    """The `method` section of an EDM recipe."""

    precond: Literal["edm", "vp", "ve"] = "edm"
    sigma_data: float = 0.5  # std of the training data (EDM precond only)
    P_mean: float = -1.2  # ln sigma ~ N(P_mean, P_std^2) in training (EDM precond only)
    P_std: float = 1.2
    label_dropout: float = 0.1  # probability of the null class in training, for CFG
    # EDM's augmentation probability (raygen/methods/augment.py); > 0 needs a net with augment_dim 9
    augment_p: float = 0.0
    # ---- sampler (previews and evaluation) ----
    solver: Literal["heun", "euler"] = "heun"
    steps: int = 18  # N; Heun uses 2N - 1 network evaluations
    # None = the preconditioner's range: edm 0.002..80, vp sigma(t=1e-3)..sigma(t=1) (0.0105..152),
    # ve 0.02..100 (EDM's sampling ranges for each parameterization)
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    rho: float = 7.0
    S_churn: float = 0.0  # 0 = deterministic ODE sampler
    S_min: float = 0.0
    S_max: float = NO_UPPER_LIMIT  # 1e9 = no upper limit
    S_noise: float = 1.0
    cfg_scale: float = 1.0  # 1 = plain conditional, 0 = unconditional

    def validate(self):
        def bad(key, why):
            raise ConfigError(f"method.{key} {why}")

        if self.precond not in PRECONDS:
            bad("precond", f"must be one of {', '.join(PRECONDS)}, got {self.precond!r}")
        if self.solver not in SOLVERS:
            bad("solver", f"must be 'heun' or 'euler', got {self.solver!r}")
        if not self.sigma_data > 0:
            bad("sigma_data", f"must be > 0 (the data's standard deviation, 0.5 for images in [-1, 1]), got {self.sigma_data}")
        if not self.P_std > 0:
            bad("P_std", f"must be > 0 (EDM uses 1.2), got {self.P_std}")
        if not 0.0 <= self.label_dropout < 1.0:
            bad("label_dropout", f"must be in [0, 1) (0.1 for classifier-free guidance), got {self.label_dropout}")
        if not 0.0 <= self.augment_p <= 1.0:
            bad("augment_p", f"must be in [0, 1] (0 = off; EDM used 0.12 on CIFAR-10), got {self.augment_p}")
        if self.steps < 1:
            bad("steps", f"must be >= 1 (EDM uses 18), got {self.steps}")
        if self.sigma_min is not None and not self.sigma_min > 0:
            bad("sigma_min", f"must be > 0 (EDM uses 0.002) or null for the preconditioner's default, got {self.sigma_min}")
        smin, smax = self.sigma_range()
        if not smax > smin:
            bad("sigma_max", f"must exceed method.sigma_min={smin}, got {smax}")
        if not self.rho > 0:
            bad("rho", f"must be > 0 (EDM uses 7), got {self.rho}")
        if self.S_churn < 0 or self.S_noise < 0:
            bad("S_churn" if self.S_churn < 0 else "S_noise",
                "must be >= 0 (S_churn 0 = deterministic sampler; S_noise 1 = unit churn noise)")
        if self.S_max < self.S_min:
            bad("S_max", f"must be >= method.S_min={self.S_min} (use 1e9 for no upper limit), got {self.S_max}")
        if self.cfg_scale < 0:
            bad("cfg_scale", f"must be >= 0 (1 = no guidance, 0 = unconditional), got {self.cfg_scale}")

    def build_precond(self) -> Precond:
        if self.precond == "vp":
            return VPPrecond()
        if self.precond == "ve":
            return VEPrecond()
        return EDMPrecond(sigma_data=self.sigma_data, P_mean=self.P_mean, P_std=self.P_std)

    def sigma_range(self) -> tuple[float, float]:
        """The sampler's (sigma_min, sigma_max): the config's, else the preconditioner's defaults."""
        p = self.build_precond()
        return (p.sample_sigma_min if self.sigma_min is None else float(self.sigma_min),
                p.sample_sigma_max if self.sigma_max is None else float(self.sigma_max))


class EDM(Method):
    """EDM training objective (Eq. 2 with Table 1's lambda and sigma distribution) and sampler
    (Algorithm 2) with classifier-free guidance (Ho & Salimans, arXiv 2207.12598)."""

    sampler_settings = ("solver", "steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max",
                        "S_noise", "cfg_scale")

    def __init__(self, cfg: EDMConfig, num_classes: int):
        cfg.validate()
        self.cfg = cfg
        self.num_classes = num_classes
        self.null_class = num_classes  # the label the network reads as "no class"
        self.precond = cfg.build_precond()

    # ---- training -------------------------------------------------------------------------------
    def drop_labels(self, labels: torch.Tensor, generator) -> torch.Tensor:
        """Replace each label by the null class with probability label_dropout (CFG training)."""
        drop = rand(generator, (labels.shape[0],), labels.device) < self.cfg.label_dropout
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def loss(self, net, batch: dict, generator=None) -> torch.Tensor:
        """lambda(sigma) (D(y + n; sigma) - y)^2 per element [B, C, H, W] (EDM's loss; the trainer
        reduces, EDM presets sum). y is the (optionally augmented) image, n ~ N(0, sigma^2 I)."""
        images = batch["image"].to(torch.float32)
        n, dev = images.shape[0], images.device
        sigma = self.precond.sample_sigma(generator, n, dev).to(torch.float32)
        labels = batch.get("label") if self.num_classes else None
        if labels is not None:
            labels = self.drop_labels(labels.to(dev), generator)
        y, augment_labels = images, None
        if self.cfg.augment_p > 0:
            y, augment_labels = augment_batch(images, self.cfg.augment_p, generator)
        noise = randn(generator, y.shape, dev) * sigma.view(-1, 1, 1, 1)
        denoised = self.precond(net, y + noise, sigma, labels=labels, augment_labels=augment_labels)
        return self.precond.loss_weight(sigma).view(-1, 1, 1, 1) * (denoised - y) ** 2

    # ---- sampling -------------------------------------------------------------------------------
    def default_settings(self) -> dict:
        c = self.cfg
        smin, smax = c.sigma_range()
        return {"solver": c.solver, "steps": c.steps, "sigma_min": smin, "sigma_max": smax, "rho": c.rho,
                "S_churn": c.S_churn, "S_min": c.S_min, "S_max": c.S_max, "S_noise": c.S_noise,
                "cfg_scale": c.cfg_scale}

    def _settings(self, settings: dict) -> dict:
        unknown = set(settings) - set(self.sampler_settings)
        if unknown:
            raise TypeError(f"EDM.sample got unknown settings {sorted(unknown)}; known: {self.sampler_settings}")
        out = self.default_settings()
        out.update({k: v for k, v in settings.items() if v is not None})
        out["steps"] = int(out["steps"])
        return out

    def denoiser(self, net, labels: Optional[torch.Tensor], cfg_scale: float) -> Callable:
        """denoise(x, sigma) with classifier-free guidance D_u + w (D_c - D_u), both halves from one
        doubled batch. w = 1 is one conditional pass, w = 0 one unconditional (null-class) pass;
        labels=None (an unconditional net) is one pass without labels."""
        precond = self.precond

        def denoise(x, sigma):
            if labels is None or cfg_scale == 1.0:
                return precond(net, x, sigma, labels=labels)
            null = torch.full_like(labels, self.null_class)
            if cfg_scale == 0.0:
                return precond(net, x, sigma, labels=null)
            d = precond(net, torch.cat([x, x]), sigma, labels=torch.cat([labels, null]))
            d_cond, d_uncond = d.chunk(2)
            return d_uncond + cfg_scale * (d_cond - d_uncond)

        return denoise

    @torch.no_grad()
    def sample(self, net, noise: torch.Tensor, cond: dict, generator=None, **settings) -> torch.Tensor:
        """x_0 (float32, not clamped: EDM maps to images afterwards) from `noise` ~ N(0, I), which is
        scaled to x_T = sigma_max * noise. Labels come from cond["label"]; without them a class-
        conditional net is sampled unconditionally (null class)."""
        s = self._settings(settings)
        labels = cond.get("label") if (cond and self.num_classes) else None
        if labels is None and self.num_classes:
            labels = torch.full((noise.shape[0],), self.null_class, dtype=torch.long, device=noise.device)
        elif labels is not None:
            labels = labels.to(noise.device)
        x = edm_sampler(self.denoiser(net, labels, s["cfg_scale"]), noise.to(torch.float64) * s["sigma_max"],
                        steps=s["steps"], sigma_min=s["sigma_min"], sigma_max=s["sigma_max"], rho=s["rho"],
                        solver=s["solver"], S_churn=s["S_churn"], S_min=s["S_min"], S_max=s["S_max"],
                        S_noise=s["S_noise"], generator=generator, round_sigma=self.precond.round_sigma)
        return x.to(torch.float32)

    def nfe(self, **settings) -> int:
        """Network evaluations per sample for these settings (a CFG pass counts once: one doubled batch)."""
        s = self._settings(settings)
        return nfe(s["steps"], s["solver"])
