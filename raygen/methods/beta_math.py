"""The math of Beta diffusion (Zhou et al., arXiv 2309.07867) without the network: log-space Gamma and
Beta draws, the time schedule, the analytic moments that normalise the network input, the Gamma/Beta
KL divergences of the KLUB/ELBO losses, and the Hölder pseudo-divergence (HPD) of Smoothed Dirichlet
Diffusion. `raygen/methods/sdd.py` joins them into a Method; docs/methods/sdd.md has the derivations.

Precision: every Gamma shape, every per-sample schedule scalar and every lgamma/digamma term is float64.
The shapes reach eta * alpha ~ 1e4, where lgamma ~ 8e4, so differences of lgammas lose about four
digits; float32 would leave KL values of ~1e-3 (a well-trained prediction) buried in rounding.

Randomness: every draw goes through raygen.core.rng with the caller's generator (a torch.Generator, or a
SeedStack whose row i comes from seed i only), never the global RNG.
"""
from __future__ import annotations

import torch

from raygen.core.rng import SeedStack, rand, randn

F64 = torch.float64
EPS = torch.finfo(torch.float32).eps  # guards the std denominator of the network input

# ============================================================ log-space Gamma and Beta draws
# Proposals per element drawn in the first round of Marsaglia-Tsang. Its acceptance rate is >= 0.951
# for every shape >= 1 (the worst case is shape 1), so after 4 proposals at most 0.049^4 = 6e-6 of
# the elements are still open and take one more (small) round.
PROPOSALS = 4


def _marsaglia_tsang(shape: torch.Tensor, normals: torch.Tensor, uniforms: torch.Tensor):
    """log G for G ~ Gamma(shape, 1), shape >= 1, by Marsaglia & Tsang (ACM TOMS 26(3), 2000), in
    float64 and in log space: G = d v with d = shape - 1/3, v = (1 + x / sqrt(9 d))^3, x ~ N(0, 1),
    accepted when log U < x^2/2 + d - d v + d log v. `normals`/`uniforms` hold K proposals on dim 0
    ([K, *shape.shape]); returns (log G of the first accepted proposal, whether one was accepted)."""
    d = shape - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)
    w = 1.0 + c * normals  # v = w^3 must be > 0
    positive = w > 0
    log_v = 3.0 * torch.log(torch.where(positive, w, torch.ones_like(w)))
    v = torch.exp(log_v)
    # d (1 - v + log v) loses digits for large d as v -> 1; -expm1 keeps it: 1 - v = -expm1(log v)
    accept = positive & (torch.log1p(-uniforms) < 0.5 * normals ** 2 + d * (-torch.expm1(log_v) + log_v))
    first = torch.argmax(accept.to(torch.uint8), dim=0, keepdim=True)  # first accepted proposal
    log_g = torch.log(d) + torch.gather(log_v, 0, first).squeeze(0)
    return log_g, accept.any(dim=0)


def _log_gamma_one_stream(shape: torch.Tensor, generator) -> torch.Tensor:
    """log Gamma(shape) draws (shape >= 1, any layout) from one torch.Generator, rejection rounds until
    every element is accepted; the number of rounds depends only on this stream's own draws."""
    flat = shape.reshape(-1)
    out = torch.empty_like(flat)
    todo = torch.arange(flat.numel(), device=flat.device)
    while todo.numel():
        a = flat[todo]
        k_shape = (PROPOSALS, a.numel())
        normals = randn(generator, k_shape, a.device, F64)
        uniforms = rand(generator, k_shape, a.device, F64)
        log_g, ok = _marsaglia_tsang(a, normals, uniforms)
        out[todo[ok]] = log_g[ok]
        todo = todo[~ok]
    return out.view(shape.shape)


def log_gamma(shape_param: torch.Tensor, generator=None) -> torch.Tensor:
    """log G, G ~ Gamma(shape_param, 1), float64, exact for every shape > 0 and never -inf.

    Shapes below 1 use log G(a) = log G(a + 1) + log(U) / a, U ~ U(0, 1] (Marsaglia & Tsang's boost,
    taken in log space), so even a = 1e-4 (where log G ~ -1e4) is drawn exactly; PyTorch's samplers
    return G itself and clamp it at the smallest normal float, i.e. log G >= -87.3 in float32.

    With a SeedStack the first dim is the batch: row i uses only generator i, in a fixed order (the
    boost uniforms, one round of PROPOSALS proposals for the whole batch, then extra rounds for row i
    alone if row i has open elements), so a sample is the same in any batch."""
    a = shape_param.to(F64)
    boosted = a < 1.0
    shape = torch.where(boosted, a + 1.0, a)
    u_boost = rand(generator, a.shape, a.device, F64)
    boost = torch.where(boosted, torch.log1p(-u_boost) / a, torch.zeros_like(a))  # log(1 - U) with U in [0, 1)
    if isinstance(generator, SeedStack):
        k_shape = (a.shape[0], PROPOSALS, *a.shape[1:])
        normals = randn(generator, k_shape, a.device, F64).transpose(0, 1)
        uniforms = rand(generator, k_shape, a.device, F64).transpose(0, 1)
        log_g, ok = _marsaglia_tsang(shape, normals, uniforms)
        open_rows = (~ok).reshape(a.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        for i in open_rows:  # rare (~6e-6 per element): finish row i from its own generator
            todo = ~ok[i]
            log_g[i][todo] = _log_gamma_one_stream(shape[i][todo], generator.generators[i])
    else:
        log_g = _log_gamma_one_stream(shape, generator)
    return log_g + boost


def log_beta_logit(a: torch.Tensor, b: torch.Tensor, generator=None) -> torch.Tensor:
    """logit X for X ~ Beta(a, b), as log G_a - log G_b (G ~ Gamma(., 1)); float64, never +-inf."""
    return log_gamma(a, generator) - log_gamma(b, generator)


# ============================================================ schedule (arXiv 2309.07867, Sec. 4)
def logit_alpha(u: torch.Tensor, start: float, end: float, power: float) -> torch.Tensor:
    """logit alpha(u) = start + (end - start) u^power for u in [0, 1]: alpha runs from sigmoid(start)
    (almost clean) at u = 0 down to sigmoid(end) (almost pure noise) at u = 1."""
    return start + (end - start) * u.to(F64) ** power


def sampler_alphas(steps: int, start: float, end: float, power: float, eps: float) -> torch.Tensor:
    """alpha_0 < ... < alpha_N (float64, N = steps) of the reverse chain. N <= 350: geometric in alpha
    from alpha_min = sigmoid(end) to alpha_N = 1 (alpha_k = alpha_min^(1 - k/N)). N > 350: the training
    schedule at u_k = 1 - k/(N-1) (1 - eps), k = 0..N-1, then u = 0 (alpha_N = sigmoid(start))."""
    if steps <= 350:
        k = torch.arange(steps + 1, dtype=F64)
        log_alpha_min = torch.nn.functional.logsigmoid(torch.tensor(float(end), dtype=F64))
        return torch.exp(log_alpha_min * (1.0 - k / steps))
    k = torch.arange(steps, dtype=F64)
    u = torch.cat([1.0 - k / (steps - 1) * (1.0 - eps), torch.zeros(1, dtype=F64)])
    return torch.sigmoid(logit_alpha(u, start, end, power))


def logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


# ============================================================ input normalisation
GRID_POINTS = 101  # the trapezoid grid over x0 for the variance of digamma terms (as the public code)


def _trapezoid_mean(f: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim of values on an even grid, trapezoid rule (ends weighted 1/2)."""
    return (f[..., 1:-1].sum(-1) + 0.5 * (f[..., 0] + f[..., -1])) / (f.shape[-1] - 1)


def logit_moments(alpha: torch.Tensor, eta: float, shift: float, scale: float, covariance: bool = True):
    """Mean and std of logit x_t over x0 ~ U[shift, shift + scale] and x_t | x0 ~ Beta(eta alpha x0,
    eta (1 - alpha x0)), per entry of `alpha` (float64 in and out).

    logit x_t = log G1 - log G2 with E[log G] = digamma, Var[log G] = trigamma, so with a = eta alpha
    and S = scale the integrals over x0 are closed form:
        E  = E[psi(a x0)] - E[psi(eta - a x0)]
           = [lnG(a xmax) - lnG(a xmin)] / (a S) - [lnG(eta - a xmin) - lnG(eta - a xmax)] / (a S)
        Var = E[psi1(a x0)] + E[psi1(eta - a x0)] + Var_x0[psi(a x0) - psi(eta - a x0)]
    with the trigamma means [psi(a xmax) - psi(a xmin)]/(a S) and [psi(eta - a xmin) - psi(eta - a xmax)]/(a S).
    The last variance is a trapezoid integral on a 101-point grid. covariance=False drops the
    covariance of the two digamma terms as the public Beta-diffusion code does (its std is then up to
    ~27% low at alpha ~ 0.5; docs/methods/sdd.md)."""
    a = eta * alpha.to(F64)
    xmin, xmax = shift, shift + scale
    aS = a * scale
    e1 = (torch.lgamma(a * xmax) - torch.lgamma(a * xmin)) / aS
    e2 = (torch.lgamma(eta - a * xmin) - torch.lgamma(eta - a * xmax)) / aS
    v1 = (torch.digamma(a * xmax) - torch.digamma(a * xmin)) / aS
    v2 = (torch.digamma(eta - a * xmin) - torch.digamma(eta - a * xmax)) / aS
    grid = torch.linspace(xmin, xmax, GRID_POINTS, dtype=F64, device=a.device)
    ax = a.unsqueeze(-1) * grid
    psi1, psi2 = torch.digamma(ax), torch.digamma(eta - ax)
    if covariance:
        spread = (_trapezoid_mean((psi1 - psi2) ** 2) - (e1 - e2) ** 2).clamp(min=0)
    else:
        spread = ((_trapezoid_mean(psi1 ** 2) - e1 ** 2).clamp(min=0)
                  + (_trapezoid_mean(psi2 ** 2) - e2 ** 2).clamp(min=0))
    return e1 - e2, torch.sqrt(v1 + v2 + spread)


# ============================================================ divergences
def kl_gamma(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(Gamma(a, 1) || Gamma(b, 1)) = (a - b) psi(a) - lnG(a) + lnG(b)."""
    return (a - b) * torch.digamma(a) - torch.lgamma(a) + torch.lgamma(b)


def kl_beta(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """KL(Beta(a1, b1) || Beta(a2, b2)) through the Gamma representation Beta = G_a / (G_a + G_b):
    KL_G(a1||a2) + KL_G(b1||b2) - KL_G(a1+b1||a2+b2). Each term is clamped at 0 and so is the sum (as the
    public code: the terms are >= 0 in exact arithmetic, so the clamps only remove rounding)."""
    return (kl_gamma(a1, a2).clamp(min=0) + kl_gamma(b1, b2).clamp(min=0)
            - kl_gamma(a1 + b1, a2 + b2).clamp(min=0)).clamp(min=0)


def dirichlet_log_normalizer(theta: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """F(theta) = sum_c lnG(theta_c + 1/2) - lnG(sum_c (theta_c + 1/2)) over the channel dim (kept)."""
    t = theta + 0.5
    return torch.lgamma(t).sum(dim, keepdim=True) - torch.lgamma(t.sum(dim, keepdim=True))


HOLDER_EXPONENT = 1.8  # a; its conjugate is b = a / (a - 1) = 2.25


def holder_pseudo_divergence(alpha_p: torch.Tensor, alpha_q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """SDD's symmetrised Hölder pseudo-divergence between Dirichlets over the channel axis, one value per
    pixel (the channel dim kept as size 1): HPD = [hd(a, b) + hd(b, a)] / 2 with
    hd(a, b) = F(a alpha_p)/a + F(b alpha_q)/b - F(alpha_p + alpha_q) and 1/a + 1/b = 1.
    F is convex, so hd >= 0 by Jensen (a alpha_p and b alpha_q weighted 1/a, 1/b average to
    alpha_p + alpha_q). It is not 0 at alpha_p = alpha_q: it vanishes only when a alpha_p = b alpha_q."""
    a = HOLDER_EXPONENT
    b = a / (a - 1.0)
    joint = dirichlet_log_normalizer(alpha_p + alpha_q, dim)

    def hd(x, y):
        return dirichlet_log_normalizer(x * alpha_p, dim) / x + dirichlet_log_normalizer(y * alpha_q, dim) / y - joint

    return 0.5 * (hd(a, b) + hd(b, a))


def logit_smoothing_divisor(logits: torch.Tensor, strength: float = 2e-6) -> torch.Tensor:
    """SDD's smoothing divisor, per sample: mean over pixels of exp(strength sum_c (l_{c+1} - l_c)^2),
    shape [B, 1, 1, 1]. (SDD averages over the whole batch, so a sample's input depended on its batch
    mates and on the device shard; per sample it does not.)"""
    pen = strength * (logits[:, 1:] - logits[:, :-1]).pow(2).sum(1, keepdim=True)
    return torch.exp(pen).mean(dim=(1, 2, 3), keepdim=True)


# (w_hpd, w_conditional, w_marginal) per loss; Beta-Diffusion has no HKD, so both tables share SDD's
WEIGHTS = {
    "beta": {"klub": (0.0, 0.99, 0.01), "elbo": (0.0, 0.99, 0.01), "hkd": (0.7, 0.97, 0.03)},
    "sdd": {"klub": (0.0, 0.96, 0.04), "elbo": (0.0, 0.99, 0.01), "hkd": (0.7, 0.97, 0.03)},
}
