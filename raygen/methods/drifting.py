"""Drifting loss (Deng, Li, Li, Du, He, "Generative Modeling via Drifting", arXiv 2602.04770).

Each generated feature x_i gets a drift V_i that pulls it toward the positives of its class and pushes it
away from the generated samples and the unconditional reals; phi(x) is regressed onto sg(phi(x) + V)
(paper Eq. 26). Formulas follow the official release (lambertae/drifting) where it and the paper differ;
docs/methods/drifting.md writes them out, and its section names are cited here as "docs: <section>";
paper equations as "Eq. 20".

One drift *problem* b is one (class, location) pair of one feature key: generated x [G, C], positives
y+ [P, C], unconditional negatives y- [U, C] with CFG weight w_b. `drift` solves B problems at once
(batched matmuls, no Python loop over classes); the scale s and the drift norms theta_R are statistics of
the whole key batch (docs: The drift), so chunking over problems runs in two passes and does not change the
result.

Targets are ordered T = [x (G); y- (U); y+ (P)] with weights [1; w; 1]: the first G + U columns are the
negatives, the last P the positives.

Choices where the sources leave room (documented here, tested in tests/test_drifting_loss.py):
- l2_sq metric: d = ||x - T||^2, so s is a mean *squared* distance; sigma = max(sqrt(s / C), 1e-3) keeps
  E[||x^ - T^||^2] ~ C, the l2 analogue of Eq. 21 (sigma only scales the loss; V/theta does not depend on it).
- CFG weight: `cfg_weighting` applies to every coupling except sinkhorn + weighted_cols, whose column
  marginal already carries w (docs: Couplings); `logit` is not accepted there.
- Features are centred on the mean of the generated samples of each problem before the distances and
  target sums. V is translation invariant (the W+ and W- rows have equal sums, docs: The drift), so this only
  removes fp32 cancellation for features with a large common offset (e.g. the std keys).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from raygen.config import ConfigError
from raygen.core.contracts import Method

# Bytes of fp32 scratch one chunk of problems may use with chunk_size=0 (docs: Memory; the [B, G, G+U+P]
# matrices of the largest key are GBs when batched over all classes). On CPU smaller chunks stay in cache:
# 16-64 problems of G=64, C=256 run 1.6x faster than 256 (measured on 1 thread, bench/drift_loss.py shapes).
AUTO_CHUNK_BYTES = 256 * 2**20
AUTO_CHUNK_BYTES_CPU = 32 * 2**20
KEEP_DISTANCE_BYTES = 256 * 2**20  # distances of all chunks are kept between the two passes up to this size
_LIVE_MATRICES = 8  # [b, G, T] fp32 tensors alive at once in pass 2 (distances, logits, coupling, temps)

_CHOICES = {
    "metric": ("l2", "l2_sq"),
    "coupling": ("partial_two_sided", "row", "sinkhorn"),
    "partial_form": ("log", "kernel"),
    "drift_form": ("alg2_joint", "split"),
    "sinkhorn_marginal": ("none", "weighted_cols"),
    "cfg_weighting": ("after_norm", "logit"),
}


@dataclass
class DriftConfig:
    """The `drift.<key>` config section. Defaults are the official baseline (docs: The drift)."""

    temperatures: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.2])  # R (paper rho)
    metric: Literal["l2", "l2_sq"] = "l2"  # l2 is the baseline; l2_sq an ablation (docs: The drift, step 1)
    # partial_two_sided: sqrt(softmax_t * softmax_i) (official); row: softmax_t; sinkhorn: docs: Couplings
    coupling: Literal["partial_two_sided", "row", "sinkhorn"] = "partial_two_sided"
    partial_form: Literal["log", "kernel"] = "log"  # LSE in log space, or exp and sums (same result)
    drift_form: Literal["alg2_joint", "split"] = "alg2_joint"  # Alg. 2 joint W+/W-, or P_pos Y+ - P_neg Y-
    sinkhorn_iters: int = 20
    sinkhorn_marginal: Literal["none", "weighted_cols"] = "weighted_cols"
    # after_norm: A *= w after normalisation (official); logit: + log w on the uncond logits (docs: CFG)
    cfg_weighting: Literal["after_norm", "logit"] = "after_norm"
    self_mask: float = 100.0  # added to the normalised self-distance d~_ii (docs: The drift, step 3)
    # partial_two_sided: A = sqrt(max(a_row a_col, floor)) (docs: Couplings). Every pair keeps A >= sqrt(floor), so
    # samples far from all positives are pulled toward the positives' mean (see the 2-D toy in the tests)
    affinity_floor: float = 1e-6
    chunk_size: int = 0  # problems per chunk; 0 = as many as fit AUTO_CHUNK_BYTES

    def validate(self, omega_min: float | None = None):
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"drift.{key} must be one of {', '.join(choices)}, got {getattr(self, key)!r}")
        if not self.temperatures:
            raise ConfigError("drift.temperatures must list at least one temperature, e.g. [0.02,0.05,0.2]")
        if not all(math.isfinite(r) and r > 0 for r in self.temperatures):
            raise ConfigError(f"drift.temperatures must all be finite and > 0, got {self.temperatures}")
        if self.sinkhorn_iters < 1:
            raise ConfigError(f"drift.sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")
        if not (math.isfinite(self.self_mask) and self.self_mask >= 0):
            raise ConfigError(f"drift.self_mask must be finite and >= 0, got {self.self_mask}")
        if not 0.0 <= self.affinity_floor < 1.0:
            raise ConfigError(f"drift.affinity_floor must be in [0, 1), got {self.affinity_floor}")
        if self.chunk_size < 0:
            raise ConfigError(f"drift.chunk_size must be >= 0 (0 = automatic), got {self.chunk_size}")
        if self.coupling == "sinkhorn" and self.partial_form == "kernel":
            raise ConfigError("drift.coupling=sinkhorn runs in log space only (docs: Couplings); set drift.partial_form=log")
        if self.coupling == "sinkhorn" and self.sinkhorn_marginal == "weighted_cols" and self.cfg_weighting == "logit":
            raise ConfigError("drift.cfg_weighting=logit would apply w twice: sinkhorn_marginal=weighted_cols already "
                              "puts w in the column marginal; set drift.cfg_weighting=after_norm or "
                              "drift.sinkhorn_marginal=none")
        if omega_min is not None:
            check_feasible(self, omega_min)


def check_feasible(cfg: DriftConfig, omega_min: float) -> None:
    """Raise ConfigError if some omega >= omega_min makes the coupling infeasible (docs: Couplings)."""
    if cfg.coupling == "sinkhorn" and cfg.sinkhorn_marginal == "none" and omega_min <= 1.0:
        raise ConfigError(
            f"drift.coupling=sinkhorn with drift.sinkhorn_marginal=none has infeasible marginals at omega <= 1 "
            f"(omega_min={omega_min:g}): there w = 0, so the uncond columns carry no mass, but the uniform column "
            f"marginal demands 1/T of it on each; set drift.sinkhorn_marginal=weighted_cols or omega_min > 1")


# ---- CFG (docs: CFG) -----------------------------------------------------------------------------

def cfg_weight(omega, G: int, U: int):
    """w = (omega - 1)(G - 1)/U: the uncond mass fraction U w / ((G-1) + U w) is (omega - 1)/omega."""
    if U == 0:
        return omega * 0.0
    return (omega - 1.0) * (G - 1) / U


def sample_omega(n: int, generator: torch.Generator, lo: float = 1.0, hi: float = 4.0, power: float = 3.0,
                 no_cfg_frac: float = 0.0) -> torch.Tensor:
    """omega ~ p(omega) ∝ omega^-power on [lo, hi] by inverse CDF (docs: CFG); a fraction no_cfg_frac is
    set to 1. float32 [n] on the generator's device."""
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    a = 1.0 - power
    if hi == lo:
        omega = torch.full_like(u, lo)
    elif a == 0.0:  # p ∝ 1/omega: log-uniform
        omega = lo * (hi / lo) ** u
    else:  # omega = (lo^a + u (hi^a - lo^a))^(1/a)
        omega = (lo**a + u * (hi**a - lo**a)) ** (1.0 / a)
    if no_cfg_frac > 0:
        off = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64) < no_cfg_frac
        omega = torch.where(off, torch.ones_like(omega), omega)
    return omega.float()


# ---- pieces of one temperature (docs: The drift, step 4; Couplings) ----------------------------------------------

def pairwise_distance(x: torch.Tensor, t: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """[b, N, C] x [b, T, C] -> [b, N, T]: sqrt(max(||x - t||^2, 1e-8)) for l2, ||x - t||^2 for l2_sq."""
    sq = torch.baddbmm(x.square().sum(-1, keepdim=True) + t.square().sum(-1).unsqueeze(-2), x, t.transpose(1, 2),
                       alpha=-2.0)
    if metric == "l2":
        return sq.clamp_(min=1e-8).sqrt_()
    return sq.clamp_(min=0.0)


def _partial_two_sided(logits: torch.Tensor, valid: torch.Tensor | None, cfg: DriftConfig) -> torch.Tensor:
    """A = sqrt(max(softmax_t(l) * softmax_i(l), floor)) (docs: The drift; Alg. 2). `valid` [b, 1, T] marks the
    columns with finite logits (None: all); the others get A = 0 and never enter a normaliser (so no -inf - (-inf) appears)."""
    col_logits = logits if valid is None else torch.where(valid, logits, torch.zeros_like(logits))
    if cfg.partial_form == "log":  # exp(l - (LSE_t l + LSE_i l)/2)
        lse_row, lse_col = torch.logsumexp(logits, -1, keepdim=True), torch.logsumexp(col_logits, -2, keepdim=True)
        a = (logits - 0.5 * lse_row).sub_(0.5 * lse_col).exp_()
    else:  # the same with exp and sums, each softmax shifted by its own max
        k_row = torch.exp(logits - logits.amax(-1, keepdim=True))
        k_col = torch.exp(col_logits - col_logits.amax(-2, keepdim=True))
        a = (k_row / k_row.sum(-1, keepdim=True) * (k_col / k_col.sum(-2, keepdim=True))).sqrt_()
    a = a.clamp_(min=math.sqrt(cfg.affinity_floor))  # sqrt(max(p, f)) = max(sqrt(p), sqrt(f))
    return a if valid is None else a.masked_fill_(~valid, 0.0)


def sinkhorn(logits: torch.Tensor, log_c: torch.Tensor, iters: int) -> torch.Tensor:
    """Log-domain Sinkhorn (docs: Couplings): Pi = exp(l + log u + log v) with row sums 1/N (N = logits.shape[-2])
    and column sums exp(log_c) ([b, T] or broadcastable). The last update is the columns', so they are exact."""
    log_r = -math.log(logits.shape[-2])
    log_v = torch.zeros_like(logits[..., 0, :])
    for _ in range(iters):
        log_u = log_r - torch.logsumexp(logits + log_v.unsqueeze(-2), -1)
        log_v = log_c - torch.logsumexp(logits + log_u.unsqueeze(-1), -2)
    return torch.exp(logits + log_u.unsqueeze(-1) + log_v.unsqueeze(-2))


def coupling(logits: torch.Tensor, col_weight: torch.Tensor, cfg: DriftConfig) -> torch.Tensor:
    """Coupling A [b, N, T] of logits [b, N, T] with the column (target) weights [b, T] applied.

    partial_two_sided / row: A = normalise(l) * w (`after_norm`, official) or normalise(l + log w) with
    w = 0 columns masked (`logit`). sinkhorn: weighted_cols puts w in the column marginal
    c ∝ max(w, 1e-6); none uses a uniform c and weights like the other couplings (needs w > 0 for `logit`,
    see check_feasible)."""
    w = col_weight.unsqueeze(-2)  # [b, 1, T]
    if cfg.coupling == "sinkhorn" and cfg.sinkhorn_marginal == "weighted_cols":
        c = col_weight.clamp(min=1e-6)
        return sinkhorn(logits, (c / c.sum(-1, keepdim=True)).log(), cfg.sinkhorn_iters)
    valid = None
    if cfg.cfg_weighting == "logit":
        valid = w > 0
        logits = logits + torch.where(valid, w, torch.ones_like(w)).log().masked_fill(~valid, -math.inf)
    if cfg.coupling == "partial_two_sided":
        a = _partial_two_sided(logits, valid, cfg)
    elif cfg.coupling == "row":
        a = torch.softmax(logits, -1)
    else:
        a = sinkhorn(logits, torch.full_like(col_weight, -math.log(logits.shape[-1])), cfg.sinkhorn_iters)
    return a.mul_(w) if cfg.cfg_weighting == "after_norm" else a


def drift_field(logits: torch.Tensor, targets: torch.Tensor, col_weight: torch.Tensor, n_neg: int,
                cfg: DriftConfig) -> torch.Tensor:
    """Unnormalised drift V_R [b, N, C] at one temperature from logits [b, N, T], targets [b, T, C] and
    weights [b, T], with the columns ordered [negatives (n_neg) | positives].

    alg2_joint (Alg. 2, docs: The drift): one coupling A over all targets, W+ = A+ rowsum(A-),
    W- = A- rowsum(A+), V = W+ T+ - W- T-. split (docs: Couplings): row-normalised couplings of each block,
    V = P+ T+ - P- T-. Both W rows (and both P rows) have equal sums, so the official -(sum W) x term is 0."""
    if cfg.drift_form == "alg2_joint":
        coef = coupling(logits, col_weight, cfg)
        a_neg, a_pos = coef[..., :n_neg], coef[..., n_neg:]
        sum_neg, sum_pos = a_neg.sum(-1, keepdim=True), a_pos.sum(-1, keepdim=True)
        a_neg.mul_(-sum_pos)  # -W-
        a_pos.mul_(sum_neg)  # W+
    else:
        def rownorm(a):
            return a / a.sum(-1, keepdim=True).clamp(min=1e-30)

        p_neg = rownorm(coupling(logits[..., :n_neg], col_weight[:, :n_neg], cfg))
        p_pos = rownorm(coupling(logits[..., n_neg:], col_weight[:, n_neg:], cfg))
        coef = torch.cat([p_neg.neg_(), p_pos], -1)
    return torch.bmm(coef, targets)


# ---- the batched drift (docs: The drift) -------------------------------------------------------------------

def _chunk(cfg: DriftConfig, B: int, G: int, T: int, C: int, device: torch.device) -> int:
    if cfg.chunk_size > 0:
        return min(cfg.chunk_size, B)
    per_problem = 4 * (_LIVE_MATRICES * G * T + 3 * T * C + (len(cfg.temperatures) + 1) * G * C)
    budget = AUTO_CHUNK_BYTES_CPU if device.type == "cpu" else AUTO_CHUNK_BYTES
    return max(1, min(B, budget // per_problem))


@torch.no_grad()
def _drift(gen, pos, uncond, uncond_weight, cfg: DriftConfig):
    """(V [B, G, C], sigma, theta [R]) in fp32; see `drift`."""
    with torch.autocast(gen.device.type, enabled=False):
        gen, pos = gen.detach().float(), pos.detach().float()
        B, G, C = gen.shape
        P = pos.shape[1]
        if uncond is None:
            uncond = gen.new_zeros(B, 0, C)
        uncond = uncond.detach().float()
        U = uncond.shape[1]
        T = G + U + P
        w = torch.as_tensor(uncond_weight, dtype=torch.float32, device=gen.device).expand(B)
        if cfg.coupling == "sinkhorn" and cfg.sinkhorn_marginal == "none" and U > 0 and bool((w <= 0).any()):
            check_feasible(cfg, 1.0)  # raises: some problem has omega <= 1
        col_w = torch.cat([w.new_ones(B, G), w[:, None].expand(B, U), w.new_ones(B, P)], 1)  # omega_T
        bc = _chunk(cfg, B, G, T, C, gen.device)
        chunks = [slice(i, min(i + bc, B)) for i in range(0, B, bc)]

        def targets(sl):  # [b, T, C], centred on the generated mean (translation invariance, module doc)
            mu = gen[sl].mean(1, keepdim=True)
            return gen[sl] - mu, torch.cat([gen[sl], uncond[sl], pos[sl]], 1) - mu

        # pass 1: s = mean(d omega_T) / mean(omega_T) over the whole key batch (Eq. 20-21). The distances
        # are kept for pass 2 when all B of them fit KEEP_DISTANCE_BYTES, else recomputed per chunk.
        keep = len(chunks) == 1 or 4 * B * G * T <= KEEP_DISTANCE_BYTES
        total, cached = gen.new_zeros(()), []
        for sl in chunks:
            d = pairwise_distance(*targets(sl), cfg.metric)
            total += torch.einsum("bnt,bt->", d, col_w[sl])
            if keep:
                cached.append(d)
        s = total / (G * col_w.sum())
        sigma = (s / C).sqrt() if cfg.metric == "l2_sq" else s / math.sqrt(C)
        sigma = sigma.clamp(min=1e-3)
        s = s.clamp(min=1e-3)

        # pass 2: V_R per chunk for each temperature, then theta_R = RMS over the batch (Eq. 24-25)
        temps = list(cfg.temperatures)
        v_r = gen.new_empty(len(temps), B, G, C)
        sumsq = gen.new_zeros(len(temps), dtype=torch.float64)
        eye = torch.eye(G, dtype=torch.bool, device=gen.device)
        for k, sl in enumerate(chunks):
            x, tgt = targets(sl)
            d = cached[k].div_(s) if keep else pairwise_distance(x, tgt, cfg.metric).div_(s)  # d~
            if keep:
                cached[k] = None
            d[:, :, :G] += eye * cfg.self_mask  # self-mask: d~_ii += 100
            tgt = tgt / sigma  # T^
            for r, R in enumerate(temps):
                v = drift_field(d / (-R), tgt, col_w[sl], G + U, cfg)
                v_r[r, sl] = v
                sumsq[r] += v.square().sum(dtype=torch.float64)
        theta = (sumsq / v_r[0].numel()).clamp(min=1e-8).sqrt().float()
        return v_r.div_(theta.view(-1, 1, 1, 1)).sum(0), sigma, theta


def drift(gen: torch.Tensor, pos: torch.Tensor, uncond: torch.Tensor | None, uncond_weight, cfg: DriftConfig,
          *, return_scale: bool = False):
    """Drift V [B, G, C] of B independent problems (docs: The drift), in sigma-normalised units.

    gen [B, G, C], pos [B, P, C], uncond [B, U, C] (or None), uncond_weight: w per problem [B] (or a scalar).
    fp32, autocast off, no grad: V is a stop-grad target. The scale s and the per-temperature drift norm
    theta_R are taken over all B problems. With return_scale, returns (V, sigma): the loss regresses x/sigma
    onto x/sigma + V."""
    v, sigma, _ = _drift(gen, pos, uncond, uncond_weight, cfg)
    return (v, sigma) if return_scale else v


# ---- the loss over feature keys (Eq. 26) ------------------------------------------------------------

def _problems(f: torch.Tensor) -> torch.Tensor:
    """[nc, N, L, C] -> [nc * L, N, C], problem b = class * L + location."""
    nc, n, L, C = f.shape
    return f.detach().transpose(1, 2).reshape(nc * L, n, C)


def drifting_loss(gen_feats: dict[str, torch.Tensor], pos_feats: dict[str, torch.Tensor],
                  uncond_feats: dict[str, torch.Tensor] | None, omega: torch.Tensor, cfg: DriftConfig):
    """Sum over keys of mean((x/sigma - sg(x/sigma + V))^2) (Eq. 26; docs: The drift, step 5).

    gen_feats[k] [nc, G, L, C] (with grad), pos_feats[k] [nc, P, L, C], uncond_feats[k] [nc, U, L, C]
    (or [U, L, C] shared by all classes, or None), omega [nc]: the CFG strength per class, giving
    w = cfg_weight(omega, G, U) for every location of that class. Gradients reach only gen_feats.

    Returns (loss, stats). stats holds detached 0-dim tensors (no GPU sync; `stats_to_floats` converts
    them with one transfer): `<key>/sigma`, `<key>/loss`, `<key>/theta_<R>` (RMS of the unnormalised V_R
    in sigma units, the official `loss_R` is its square) and `loss`."""
    total, stats = None, {}
    for key, x in gen_feats.items():
        nc, G, L, C = x.shape
        y = pos_feats[key]
        u = None if uncond_feats is None else uncond_feats.get(key)
        if u is not None and u.dim() == 3:
            u = u.unsqueeze(0).expand(nc, *u.shape)
        U = 0 if u is None else u.shape[1]
        w = cfg_weight(omega.to(x.device, torch.float32), G, U).repeat_interleave(L)
        v, sigma, theta = _drift(_problems(x), _problems(y), None if u is None else _problems(u), w, cfg)
        v = v.view(nc, L, G, C).transpose(1, 2)  # back to [nc, G, L, C]
        with torch.autocast(x.device.type, enabled=False):
            xs = x.float() / sigma
            loss = (xs - (xs.detach() + v)).square().mean()
        total = loss if total is None else total + loss
        stats[f"{key}/sigma"], stats[f"{key}/loss"] = sigma.detach(), loss.detach()
        for R, t in zip(cfg.temperatures, theta):
            stats[f"{key}/theta_{R:g}"] = t
    if total is None:
        raise ValueError("drifting_loss needs at least one feature key")
    stats["loss"] = total.detach()
    return total, stats


def stats_to_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """The stats of `drifting_loss` as floats, with one device-to-host copy."""
    keys = list(stats)
    values = torch.stack([stats[k].float().reshape(()) for k in keys]).tolist() if keys else []
    return dict(zip(keys, values))


# ---- the method object: generator + frozen feature network --------------------------------------------


@dataclass
class FeatureConfig:
    """Which feature-network keys span the drift problems (docs/methods/drifting.md: 12 maps x 7 keys
    plus the 2 input keys)."""

    maps: Optional[list[str]] = None  # MAE maps (conv1, layer1..4, layer<k>_blk<j>); null = all
    patch_sizes: list[int] = field(default_factory=lambda: [2, 4])
    input_keys: bool = True  # x_norm and x_global: the raw sample itself (the "vanilla" drift)
    # real samples' features are stop-grad and the MAE is frozen: for an in-memory data set, compute them
    # once per worker and gather them by index (exact; skipped when they would exceed cache_max_mb)
    cache_real: bool = True
    cache_max_mb: int = 2048


class Drifting(Method):
    """The method (arXiv 2602.04770 Alg. 1): draw omega per class, generate G samples per class in one
    network evaluation each, take the frozen feature network's features of generated (with grad) and
    real (no grad) samples, and regress the generated ones onto their drifted targets (Eq. 26).

    `batch` is the recipe's batch section (gen, pos, uncond, omega_min/max/power, no_cfg_frac); `mae` the
    frozen feature network (None when only sampling); `real_images`, when given, are the in-memory
    training images whose features are computed once and gathered by index."""

    sampler_settings = ("omega",)

    def __init__(self, drift: DriftConfig, features: FeatureConfig, batch, mae, sample_shape: tuple,
                 real_images=None):
        """`mae`: the frozen feature network, or a zero-argument function that builds it (called on first
        use, so sampling and previews never build a large MAE they do not need), or None (sampling only).
        `real_images`: the in-memory training images whose features are cached, or a function giving them."""
        self.drift_cfg, self.feature_cfg, self.batch = drift, features, batch
        self._mae, self.sample_shape = mae, tuple(sample_shape)
        self._real_images, self._cache = real_images, None
        self.last_stats, self.last_omega = None, None

    def nfe(self, **settings) -> int:
        """One network evaluation per sample: the generator maps noise to an image in one step."""
        return 1

    def default_settings(self) -> dict:
        return {"omega": 1.0}

    def mae(self, device):
        if self._mae is None:
            raise RuntimeError("this Drifting method was built without its feature network (sampling only)")
        if not isinstance(self._mae, torch.nn.Module):
            self._mae = self._mae()
        # the feature network is frozen: no gradient may flow into (or be computed for) its weights
        if self._mae.training or next(self._mae.parameters()).requires_grad:
            self._mae.requires_grad_(False).eval()
        if next(self._mae.parameters()).device != torch.device(device):
            self._mae = self._mae.to(device)
        return self._mae

    def features(self, x: torch.Tensor) -> dict:
        f = self.feature_cfg
        return self.mae(x.device).features(x, layers=f.maps, patch_sizes=tuple(f.patch_sizes),
                                           include_input=f.input_keys)

    def real_features(self, batch: dict) -> dict:
        """Features of the positives and negatives, [nc*P + nc*U] rows: from the cache, or computed."""
        if "pos_idx" not in batch:
            with torch.no_grad():
                return self.features(torch.cat([batch["pos"].flatten(0, 1), batch["uncond"].flatten(0, 1)]))
        idx = torch.cat([batch["pos_idx"].flatten(), batch["uncond_idx"].flatten()])
        if self._cache is None:
            if callable(self._real_images):
                self._real_images = self._real_images()
            device = idx.device
            with torch.no_grad():
                parts = [self.features(torch.from_numpy(self._real_images[i:i + 256]).to(device))
                         for i in range(0, len(self._real_images), 256)]
            self._cache = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return {k: v[idx] for k, v in self._cache.items()}

    def log_metrics(self) -> dict:
        """Diagnostics of the last step: per temperature the mean over keys of theta_R (the RMS of the
        unnormalised drift, in sigma units: it shrinks as generated and real features match), and the
        mean omega drawn."""
        if self.last_stats is None:
            return {}
        stats = stats_to_floats(self.last_stats)
        out = {}
        for R in self.drift_cfg.temperatures:
            vals = [v for k, v in stats.items() if k.endswith(f"/theta_{R:g}")]
            out[f"drift_theta_{R:g}"] = sum(vals) / max(1, len(vals))
        out["omega_mean"] = float(self.last_omega)
        return out

    def draw_omega(self, n: int, generator: torch.Generator) -> torch.Tensor:
        b = self.batch
        return sample_omega(n, generator, lo=b.omega_min, hi=b.omega_max, power=b.omega_power,
                            no_cfg_frac=b.no_cfg_frac)

    def loss(self, net, batch: dict, generator: torch.Generator) -> torch.Tensor:
        from raygen.nets.drift_dit import draw_style

        b = self.batch
        labels = batch["label"]
        nc, g, p, u = len(labels), b.gen, b.pos, b.uncond
        omega = self.draw_omega(nc, generator).to(labels.device)
        self.last_omega = omega.mean().detach()  # read at log time only (no device sync per step)
        noise = torch.randn((nc * g, *self.sample_shape), generator=generator, device=generator.device)
        style = draw_style(nc * g, generator).to(labels.device)
        x = net(noise.to(labels.device), labels.repeat_interleave(g), omega.repeat_interleave(g), style)
        gen = {k: v.unflatten(0, (nc, g)) for k, v in self.features(x).items()}
        real = self.real_features(batch)
        pos_f = {k: v[:nc * p].unflatten(0, (nc, p)) for k, v in real.items()}
        unc_f = {k: v[nc * p:].unflatten(0, (nc, u)) for k, v in real.items()}
        loss, self.last_stats = drifting_loss(gen, pos_f, unc_f, omega, self.drift_cfg)
        return loss

    @torch.no_grad()
    def sample(self, net, noise: torch.Tensor, cond: dict, generator: torch.Generator, omega: float = 1.0):
        """One network evaluation per sample at CFG strength `omega`; the style indices come from `generator`."""
        from raygen.nets.drift_dit import draw_style

        n, device = len(noise), noise.device
        style = draw_style(n, generator)
        return net(noise, cond["label"].to(device), torch.full((n,), float(omega), device=device), style.to(device))
