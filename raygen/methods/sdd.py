"""Beta diffusion (Zhou, Chen, Wang & Zheng, arXiv 2309.07867) and its Smoothed Dirichlet Diffusion fork
(SDD: channels of a pixel as Dirichlet categories, a Hölder pseudo-divergence loss term), as a raygen Method.

Data x in [-1, 1] become x0 = Shift + Scale (x + 1)/2 in [0.60, 0.99]. The forward process is
multiplicative with Beta marginals, x_t ~ Beta(eta alpha_t x0, eta (1 - alpha_t x0)) (Eq. 3 of the
paper); the reverse step given x0 is x_s = x_t + (1 - x_t) p, p ~ Beta(eta (alpha_s - alpha_t) x0,
eta (1 - alpha_s x0)) (Eq. 5). Everything random is drawn as logits from log-space Gammas.
The network sees the normalised logit of x_t and predicts logit x0 (a skip connection around it);
training minimises KL upper bounds between the Beta reverse conditionals and marginals made with x0
and with the prediction (KLUB, Eq. 11-13), the argument-swapped ELBO form, or SDD's HKD (HPD + KLUB).

Pure math lives in raygen/methods/beta_math.py; docs/methods/sdd.md has the tables and what differs
from the public Beta-Diffusion and SDD code (and why).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from raygen.config import ConfigError
from raygen.core.contracts import Method
from raygen.core.rng import rand
from raygen.methods.beta_math import (
    EPS,
    WEIGHTS,
    holder_pseudo_divergence,
    kl_beta,
    log_beta_logit,
    logit_alpha,
    logit_moments,
    logit_smoothing_divisor,
    sampler_alphas,
)

F64 = torch.float64
LOSSES = ("klub", "elbo", "hkd")
PREVIOUS_TIME = 0.95  # u_s = 0.95 u: the less noisy time of the training pair (s, t)
NOISE_LABEL_SCALE = -1.0 / 8.0  # c_noise = -logit(alpha_t) / 8, where EDM would pass ln(sigma) / 4


@dataclass
class SDDConfig:
    """The `method` section of a Beta-diffusion / SDD recipe (defaults: the public checkpoints')."""

    eta: float = 1e4  # concentration of the Beta marginals
    shift: float = 0.6  # x0 = shift + scale (x + 1)/2
    scale: float = 0.39
    sigmoid_start: float = 10.0  # logit alpha = start + (end - start) u^power
    sigmoid_end: float = -13.0
    sigmoid_power: float = 1.0
    eps: float = 1e-5  # u = 1 - U (1 - eps) in training
    loss: Literal["klub", "elbo", "hkd"] = "klub"
    weights: Literal["beta", "sdd"] = "beta"  # whose loss weights (docs/methods/sdd.md, table)
    smoothing: bool = False  # SDD's logit smoothing (per-sample divisor)
    # 'exact' includes the covariance of the digamma terms in the input std; 'public' drops it as the
    # public code does (std up to ~27% low at alpha ~ 0.5)
    input_norm: Literal["exact", "public"] = "exact"
    label_dropout: float = 0.1  # probability of the null class in training, for CFG
    augment_p: float = 0.0  # EDM augmentation probability (> 0 needs a net with augment_dim 9)
    # ---- sampler (previews and evaluation) ----
    steps: int = 200  # NFE = steps
    # 'constant': x_init = shift + scale/2 everywhere (SDD); 'data_mean': the per-pixel training mean
    # (Beta-Diffusion), which the task hands over as `method.data_mean` ([C, H, W] in [-1, 1])
    x_init: Literal["constant", "data_mean"] = "constant"
    cfg_scale: float = 1.0  # 1 = conditional only, 0 = unconditional

    def validate(self):
        def bad(key, why):
            raise ConfigError(f"method.{key} {why}")

        if not self.eta > 0:
            bad("eta", f"must be > 0 (the public code uses 1e4), got {self.eta}")
        if not self.shift > 0:
            bad("shift", f"must be > 0 so x0 stays inside (0, 1) (the public code uses 0.6), got {self.shift}")
        if not self.scale > 0:
            bad("scale", f"must be > 0 (the public code uses 0.39), got {self.scale}")
        if not self.shift + self.scale < 1:
            bad("scale", f"must keep method.shift + method.scale < 1 (x0 must stay below 1), got "
                         f"{self.shift} + {self.scale}; e.g. shift 0.6, scale 0.39")
        if not self.sigmoid_start > self.sigmoid_end:
            bad("sigmoid_start", f"must exceed method.sigmoid_end={self.sigmoid_end} (alpha falls from "
                                 f"sigmoid(start) to sigmoid(end); the public code uses 10 and -13), "
                                 f"got {self.sigmoid_start}")
        if not self.sigmoid_power > 0:
            bad("sigmoid_power", f"must be > 0 (the public code uses 1), got {self.sigmoid_power}")
        if not 0 < self.eps < 1:
            bad("eps", f"must be in (0, 1) (the public code uses 1e-5), got {self.eps}")
        if self.loss not in LOSSES:
            bad("loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.weights not in WEIGHTS:
            bad("weights", f"must be 'beta' or 'sdd', got {self.weights!r}")
        if self.input_norm not in ("exact", "public"):
            bad("input_norm", f"must be 'exact' or 'public', got {self.input_norm!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            bad("label_dropout", f"must be in [0, 1) (0.1 for classifier-free guidance), got {self.label_dropout}")
        if not 0.0 <= self.augment_p <= 1.0:
            bad("augment_p", f"must be in [0, 1] (0 = off; the public checkpoints used 0.12), got {self.augment_p}")
        if self.steps < 1:
            bad("steps", f"must be >= 1 (the public code samples with 200), got {self.steps}")
        if self.x_init not in ("constant", "data_mean"):
            bad("x_init", f"must be 'constant' or 'data_mean', got {self.x_init!r}")
        if self.cfg_scale < 0:
            bad("cfg_scale", f"must be >= 0 (1 = no guidance, 0 = unconditional), got {self.cfg_scale}")

    # ---- the pieces of the process, read like the paper -----------------------------------------
    def to_x0(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> [shift, shift + scale] (float64)."""
        x0 = self.shift + self.scale * (images.to(F64) + 1.0) / 2.0
        return x0.clamp(self.shift, self.shift + self.scale)

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """[shift, shift + scale] -> [-1, 1]."""
        return (x0 - self.shift) / self.scale * 2.0 - 1.0

    def x0_hat(self, logit_x0: torch.Tensor) -> torch.Tensor:
        """The prediction x0_hat = shift + scale sigmoid(D) (float64, inside [shift, shift + scale])."""
        x0 = self.shift + self.scale * torch.sigmoid(logit_x0.to(F64))
        return x0.clamp(self.shift, self.shift + self.scale)

    def normalise(self, logits: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Network input (logit x_t - E) / (std + EPS) in float32; alpha is per sample [B] (float64)."""
        mean, std = logit_moments(alpha, self.eta, self.shift, self.scale, covariance=self.input_norm == "exact")
        view = (-1,) + (1,) * (logits.dim() - 1)
        return ((logits - mean.view(view)) / (std.view(view) + EPS)).to(torch.float32)


def precondition(net, x_in: torch.Tensor, logit_alpha_t: torch.Tensor, labels=None, augment_labels=None):
    """D = x_in + F(x_in; c_noise = -logit(alpha_t) / 8), the predicted logit of x0 (float32).
    c_skip = c_out = c_in = 1: the input is already normalised, and D is a logit, not an image."""
    c_noise = (NOISE_LABEL_SCALE * logit_alpha_t).to(torch.float32)
    f = net(x_in.to(torch.float32), c_noise, labels, augment_labels=augment_labels)
    return x_in.to(torch.float32) + f.to(torch.float32)


# ============================================================ sampler
@torch.no_grad()
def beta_sampler(denoise: Callable, shape, steps: int = 200, *, cfg: Optional[SDDConfig] = None,
                 x_init: Optional[torch.Tensor] = None, generator=None, device="cpu") -> torch.Tensor:
    """The reverse Beta chain (arXiv 2309.07867, Algorithm 2), N = `steps` network evaluations.

    denoise(x_in, logit_alpha) -> D (logit x0_hat) with x_in the normalised float32 logits [B, ...]
    and logit_alpha a float64 scalar tensor. x_init is the mean image the chain starts from, in [-1, 1]
    (broadcast to `shape`); None is the constant shift + scale/2. Logits stay in float64.
    Returns the last x0_hat as images in [-1, 1] (float32)."""
    cfg = cfg or SDDConfig()
    alphas = sampler_alphas(steps, cfg.sigmoid_start, cfg.sigmoid_end, cfg.sigmoid_power, cfg.eps).to(device)
    n = shape[0]
    if x_init is None:
        x_start = torch.full(tuple(shape), cfg.shift + cfg.scale / 2.0, dtype=F64, device=device)
    else:
        x_start = cfg.to_x0(x_init.to(device)).expand(tuple(shape)).contiguous()
    # x_T ~ Beta(eta alpha_min x_init, eta (1 - alpha_min x_init)), as a logit
    a0 = cfg.eta * alphas[0] * x_start
    logits = log_beta_logit(a0, cfg.eta - a0, generator)
    if cfg.smoothing:
        logits = logits / logit_smoothing_divisor(logits)
    x0_hat = x_start
    for alpha_cur, alpha_next in zip(alphas[:-1], alphas[1:]):
        logit_cur = torch.log(alpha_cur) - torch.log1p(-alpha_cur)
        x_in = cfg.normalise(logits, alpha_cur.expand(n))
        x0_hat = cfg.x0_hat(denoise(x_in, logit_cur))
        # p ~ Beta(eta (alpha_next - alpha_cur) x0_hat, eta (1 - alpha_next x0_hat)); x <- x + (1 - x) p
        logit_p = log_beta_logit(cfg.eta * (alpha_next - alpha_cur) * x0_hat,
                                 cfg.eta * (1.0 - alpha_next * x0_hat), generator)
        logits = torch.logsumexp(torch.stack([logits, logit_p, logits + logit_p]), dim=0)
    return cfg.to_images(x0_hat).to(torch.float32)


# ============================================================ the Method
class BetaDiffusion(Method):
    """Beta diffusion / SDD: `loss` (KLUB, ELBO or HKD per element [B, C, H, W]) and `sample` (the
    reverse Beta chain with classifier-free guidance on the predicted x0 logit)."""

    sampler_settings = ("steps", "cfg_scale")

    def __init__(self, cfg: SDDConfig, num_classes: int):
        cfg.validate()
        self.cfg = cfg
        self.num_classes = num_classes
        self.null_class = num_classes  # the label the network reads as "no class"
        self.w_hpd, self.w_cond, self.w_marg = WEIGHTS[cfg.weights][cfg.loss]
        self.data_mean: Optional[torch.Tensor] = None  # [C, H, W] in [-1, 1], for x_init='data_mean'
        self._last: dict = {}

    # ---- training -------------------------------------------------------------------------------
    def drop_labels(self, labels: torch.Tensor, generator) -> torch.Tensor:
        """Replace each label by the null class with probability label_dropout (CFG training)."""
        drop = rand(generator, (labels.shape[0],), labels.device) < self.cfg.label_dropout
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def training_times(self, n: int, generator, device):
        """(logit alpha_t, alpha_t, alpha_s, delta = alpha_s - alpha_t), float64 [n]: u = 1 - U (1 - eps),
        u_s = 0.95 u, so alpha_s > alpha_t."""
        c = self.cfg
        u = 1.0 - rand(generator, (n,), device, F64) * (1.0 - c.eps)
        lam_t = logit_alpha(u, c.sigmoid_start, c.sigmoid_end, c.sigmoid_power)
        lam_s = logit_alpha(PREVIOUS_TIME * u, c.sigmoid_start, c.sigmoid_end, c.sigmoid_power)
        alpha_t, alpha_s = torch.sigmoid(lam_t), torch.sigmoid(lam_s)
        return lam_t, alpha_t, alpha_s, alpha_s - alpha_t

    def loss_terms(self, x0: torch.Tensor, x0_hat: torch.Tensor, alpha_t, alpha_s, delta) -> dict:
        """The per-element divergences between the Beta laws made with the truth x0 (p) and with the
        prediction x0_hat (q), float64. alpha_t, alpha_s, delta broadcast against x0.
        conditional: q(x_s | x_t, x0) = x_t + (1 - x_t) Beta(eta delta x0, eta (1 - alpha_s x0));
        marginal: q(x_t | x0) = Beta(eta alpha_t x0, eta (1 - alpha_t x0)).
        KLUB = KL(q-from-x0_hat || p-from-x0) (arXiv 2309.07867, Eq. 12-13); the ELBO form swaps the
        arguments. HPD (SDD) compares the conditional first shapes over the channel axis, per pixel."""
        eta = self.cfg.eta
        cond_p = (eta * delta * x0, eta - eta * alpha_s * x0)
        cond_q = (eta * delta * x0_hat, eta - eta * alpha_s * x0_hat)
        marg_p = (eta * alpha_t * x0, eta - eta * alpha_t * x0)
        marg_q = (eta * alpha_t * x0_hat, eta - eta * alpha_t * x0_hat)
        if self.cfg.loss == "elbo":
            cond, marg = kl_beta(*cond_p, *cond_q), kl_beta(*marg_p, *marg_q)
        else:
            cond, marg = kl_beta(*cond_q, *cond_p), kl_beta(*marg_q, *marg_p)
        terms = {"conditional": cond, "marginal": marg}
        if self.w_hpd:
            terms["hpd"] = holder_pseudo_divergence(cond_p[0], cond_q[0]).clamp(min=0)
        return terms

    def loss(self, net, batch: dict, generator=None) -> torch.Tensor:
        """The KLUB / ELBO / HKD loss per element [B, C, H, W] (float32); the trainer reduces it (the
        presets sum per sample, EDM's convention). SDD's per-pixel HPD is broadcast over the channels,
        as in its code."""
        c = self.cfg
        images = batch["image"].to(torch.float32)
        n, dev = images.shape[0], images.device
        labels = batch.get("label") if self.num_classes else None
        if labels is not None:
            labels = self.drop_labels(labels.to(dev), generator)
        augment_labels = None
        if c.augment_p > 0:
            from raygen.methods.augment import augment_batch  # only runs that augment need it

            images, augment_labels = augment_batch(images, c.augment_p, generator)
        lam_t, alpha_t, alpha_s, delta = self.training_times(n, generator, dev)
        x0 = c.to_x0(images)
        view = (n,) + (1,) * (x0.dim() - 1)
        a_t, a_s, d = alpha_t.view(view), alpha_s.view(view), delta.view(view)
        # x_t ~ Beta(eta alpha_t x0, eta (1 - alpha_t x0)), drawn as its logit
        logits = log_beta_logit(c.eta * a_t * x0, c.eta - c.eta * a_t * x0, generator)
        if c.smoothing:
            logits = logits / logit_smoothing_divisor(logits)
        x_in = c.normalise(logits, alpha_t)
        x0_hat = c.x0_hat(precondition(net, x_in, lam_t, labels, augment_labels))
        terms = self.loss_terms(x0, x0_hat, a_t, a_s, d)
        loss = self.w_cond * terms["conditional"] + self.w_marg * terms["marginal"]
        if "hpd" in terms:
            loss = loss + self.w_hpd * terms["hpd"]
        self._last = {k: v.detach().mean() for k, v in terms.items()}
        return loss.expand_as(x0).to(torch.float32)

    def log_metrics(self) -> dict:
        """Mean KL terms of the last loss call (read from the device only here)."""
        return {f"kl_{k}": float(v) for k, v in self._last.items()}

    # ---- sampling -------------------------------------------------------------------------------
    def default_settings(self) -> dict:
        return {"steps": self.cfg.steps, "cfg_scale": self.cfg.cfg_scale}

    def _settings(self, settings: dict) -> dict:
        unknown = set(settings) - set(self.sampler_settings)
        if unknown:
            raise TypeError(f"BetaDiffusion.sample got unknown settings {sorted(unknown)}; known: "
                            f"{self.sampler_settings}")
        out = self.default_settings()
        out.update({k: v for k, v in settings.items() if v is not None})
        out["steps"], out["cfg_scale"] = int(out["steps"]), float(out["cfg_scale"])
        return out

    def nfe(self, **settings) -> int:
        """Network evaluations per sample: one per step (a CFG pass is one doubled batch)."""
        return self._settings(settings)["steps"]

    def denoiser(self, net, labels: Optional[torch.Tensor], cfg_scale: float) -> Callable:
        """denoise(x_in, logit_alpha) -> logit x0_hat with classifier-free guidance D_u + w (D_c - D_u)
        on the x0 logit, both halves from one doubled batch; w = 1 is one conditional pass, w = 0 one
        null-class pass, labels=None (an unconditional net) one pass without labels."""

        def denoise(x_in, logit_a):
            lam = logit_a.expand(x_in.shape[0])
            if labels is None or cfg_scale == 1.0:
                return precondition(net, x_in, lam, labels)
            null = torch.full_like(labels, self.null_class)
            if cfg_scale == 0.0:
                return precondition(net, x_in, lam, null)
            d = precondition(net, torch.cat([x_in, x_in]), torch.cat([lam, lam]), torch.cat([labels, null]))
            d_cond, d_uncond = d.chunk(2)
            return d_uncond + cfg_scale * (d_cond - d_uncond)

        return denoise

    @torch.no_grad()
    def sample(self, net, noise: torch.Tensor, cond: dict, generator=None, **settings) -> torch.Tensor:
        """Images in [-1, 1] (float32). `noise` gives only the shape and device: the Beta chain draws
        its own log-gammas from `generator` (a SeedStack makes every image depend on its seed only)."""
        s = self._settings(settings)
        labels = cond.get("label") if (cond and self.num_classes) else None
        if labels is None and self.num_classes:
            labels = torch.full((noise.shape[0],), self.null_class, dtype=torch.long, device=noise.device)
        elif labels is not None:
            labels = labels.to(noise.device)
        x_init = None
        if self.cfg.x_init == "data_mean":
            if self.data_mean is None:
                raise ConfigError("method.x_init=data_mean needs the task to set method.data_mean (the per-pixel "
                                  "training mean in [-1, 1]); set method.x_init=constant otherwise")
            x_init = self.data_mean
        return beta_sampler(self.denoiser(net, labels, s["cfg_scale"]), tuple(noise.shape), s["steps"],
                            cfg=self.cfg, x_init=x_init, generator=generator, device=noise.device)
