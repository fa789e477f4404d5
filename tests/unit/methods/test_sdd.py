"""Beta diffusion / SDD (raygen/methods/sdd.py, beta_math.py) against independent float64 references:
scipy's special functions and distributions, closed-form KLs written here, numerical integration, and
Monte Carlo from numpy's own Gamma sampler."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats
from torch import nn

from raygen.config import ConfigError
from raygen.core.rng import SeedStack
from raygen.methods.beta_math import (
    dirichlet_log_normalizer,
    holder_pseudo_divergence,
    kl_beta,
    kl_gamma,
    log_beta_logit,
    log_gamma,
    logit_moments,
    logit_smoothing_divisor,
    sampler_alphas,
)
from raygen.methods.sdd import BetaDiffusion, SDDConfig, beta_sampler

F64 = torch.float64


class TinyNet(nn.Module):
    """A small conv net with the SongUNet call signature: net(x, noise_labels, labels, augment_labels)."""

    def __init__(self, channels=3, num_classes=10, width=8):
        super().__init__()
        self.num_classes = num_classes
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        self.noise = nn.Linear(1, width)
        self.label = nn.Embedding(num_classes + 1, width)
        self.augment = nn.Linear(9, width)

    def forward(self, x, noise_labels, labels=None, augment_labels=None):
        h = self.inp(x) + self.noise(noise_labels.view(-1, 1)).view(x.shape[0], -1, 1, 1)
        if labels is not None:
            h = h + self.label(labels).view(x.shape[0], -1, 1, 1)
        if augment_labels is not None:
            h = h + self.augment(augment_labels).view(x.shape[0], -1, 1, 1)
        return self.out(torch.tanh(h))


def batch_of(n, h, w, seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, channels, h, w, generator=g) * 2 - 1,
            "label": torch.randint(0, 10, (n,), generator=g)}


# ============================================================ log-space Gamma draws
def log_gamma_cdf(y, a):
    """P(log G <= y), G ~ Gamma(a, 1), float64: the regularised incomplete gamma at e^y, with its
    leading term e^(a y) / Gamma(a + 1) where e^y underflows (the next term is O(e^y) smaller)."""
    y = np.asarray(y, dtype=np.float64)
    tiny = y < -700
    out = np.empty_like(y)
    out[~tiny] = special.gammainc(a, np.exp(y[~tiny]))
    out[tiny] = np.exp(a * y[tiny] - special.gammaln(a + 1))
    return out


@pytest.mark.parametrize("a", [1e-4, 1.2e-3, 0.018, 0.3, 1.0, 2.5, 40.0, 1e3, 1e4])
def test_log_gamma_matches_the_log_gamma_distribution(a):
    n = 50_000
    x = log_gamma(torch.full((n,), a, dtype=F64), torch.Generator().manual_seed(1)).numpy()
    assert x.dtype == np.float64 and np.isfinite(x).all()
    mean, var = special.digamma(a), special.polygamma(1, a)
    m4 = np.mean((x - x.mean()) ** 4)
    assert abs(x.mean() - mean) < 5 * math.sqrt(var / n), (x.mean(), mean)
    assert abs(x.var() / var - 1) < 6 * math.sqrt(max(m4 / var ** 2 - 1, 0) / n), (x.var(), var)
    # the whole law, including the far lower tail float32 samplers pin at log(1.18e-38) = -87.34
    assert stats.kstest(x, lambda y: log_gamma_cdf(y, a)).pvalue > 1e-3
    pinned = np.mean(np.abs(x + 87.34) < 0.01)
    assert pinned < 0.01


def test_log_gamma_of_tiny_shapes_goes_far_below_float32_underflow():
    x = log_gamma(torch.full((20_000,), 1e-4, dtype=F64), torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    assert np.median(x.numpy()) < -1000  # median of log G(1e-4) is about -log(2)/1e-4 = -6931


def test_log_beta_logit_matches_scipy_beta():
    a, b = torch.full((50_000,), 3.0, dtype=F64), torch.full((50_000,), 0.7, dtype=F64)
    p = torch.sigmoid(log_beta_logit(a, b, torch.Generator().manual_seed(2))).numpy()
    assert stats.kstest(p, stats.beta(3.0, 0.7).cdf).pvalue > 1e-3


def test_log_gamma_per_seed_rows_do_not_depend_on_the_batch():
    shapes = torch.tensor([1e-3, 0.5, 1.0, 7.0, 1e4], dtype=F64).repeat(6, 40, 1)  # [6, 40, 5]
    whole = log_gamma(shapes, SeedStack(range(6)))
    parts = torch.cat([log_gamma(shapes[:2], SeedStack([0, 1])), log_gamma(shapes[2:], SeedStack([2, 3, 4, 5]))])
    assert torch.equal(whole, parts)
    alone = log_gamma(shapes[3:4], SeedStack([3]))
    assert torch.equal(whole[3:4], alone)


def test_log_gamma_extra_rejection_rounds_keep_rows_and_law(monkeypatch):
    """One proposal per round leaves ~5% of shape-1 elements open, so the extra per-row rounds run."""
    import raygen.methods.beta_math as bm

    monkeypatch.setattr(bm, "PROPOSALS", 1)
    shapes = torch.full((6, 2000), 0.5, dtype=F64)  # boosted to shape 1.5 (acceptance 0.973)
    whole = log_gamma(shapes, SeedStack(range(6)))
    parts = torch.cat([log_gamma(shapes[:2], SeedStack([0, 1])), log_gamma(shapes[2:], SeedStack([2, 3, 4, 5]))])
    assert torch.equal(whole, parts)
    x = torch.cat([whole.flatten(), log_gamma(torch.full((20_000,), 0.5, dtype=F64), torch.Generator().manual_seed(0))])
    assert stats.kstest(x.numpy(), lambda y: log_gamma_cdf(y, 0.5)).pvalue > 1e-3


# ============================================================ schedule and step grid
def test_step_grid_is_geometric_in_alpha_up_to_350_steps():
    for n in (1, 10, 200, 350):
        alpha = sampler_alphas(n, 10.0, -13.0, 1.0, 1e-5).numpy()
        assert alpha.shape == (n + 1,)
        np.testing.assert_allclose(alpha[0], special.expit(-13.0), rtol=1e-12)
        assert alpha[-1] == 1.0
        np.testing.assert_allclose(alpha[1:] / alpha[:-1], special.expit(-13.0) ** (-1.0 / n), rtol=1e-10)


def test_step_grid_is_logit_linear_above_350_steps():
    n, start, end = 400, 10.0, -13.0
    alpha = sampler_alphas(n, start, end, 1.0, 1e-5).numpy()
    assert alpha.shape == (n + 1,)
    u = np.append(1 - np.arange(n) / (n - 1) * (1 - 1e-5), 0.0)
    np.testing.assert_allclose(special.logit(alpha), start + (end - start) * u, rtol=1e-9, atol=1e-9)
    assert np.all(np.diff(alpha) > 0)


def test_training_times_follow_the_schedule():
    m = BetaDiffusion(SDDConfig(), 0)
    lam, alpha_t, alpha_s, delta = m.training_times(10_000, torch.Generator().manual_seed(0), "cpu")
    assert lam.dtype == F64
    assert lam.min() >= -13.0 and lam.max() <= 10.0
    u = (lam.numpy() - 10.0) / (-23.0)
    assert u.min() >= 1e-5 - 1e-12 and stats.kstest(u, stats.uniform(1e-5, 1 - 1e-5).cdf).pvalue > 1e-3
    np.testing.assert_allclose(special.logit(alpha_s.numpy()), 10.0 - 23.0 * 0.95 * u, rtol=1e-8, atol=1e-8)
    assert (delta > 0).all()
    np.testing.assert_array_equal(delta.numpy(), alpha_s.numpy() - alpha_t.numpy())


# ============================================================ input normalisation
def mc_logit_moments(alpha, eta, shift, scale, n=400_000, seed=0):
    """Mean and std of logit x_t by Monte Carlo in float64 with numpy: x0 ~ U[shift, shift + scale],
    logit x_t = log G1 - log G2; shapes < 1 use log G(a) = log G(a + 1) + log(U)/a (exact)."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(shift, shift + scale, n)

    def log_g(k):
        small = k < 1
        g = np.log(rng.standard_gamma(np.where(small, k + 1, k)))
        return g + np.where(small, np.log(rng.uniform(size=n)) / k, 0.0)

    lt = log_g(eta * alpha * x0) - log_g(eta - eta * alpha * x0)
    return lt.mean(), lt.std(), lt.std() / math.sqrt(n)


@pytest.mark.parametrize("alpha", [2.26e-6, 1e-4, 3e-3, 0.1, 0.5, 0.9, 0.99995])
def test_logit_moments_match_monte_carlo(alpha):
    eta, shift, scale = 1e4, 0.6, 0.39
    mean, std = logit_moments(torch.tensor([alpha], dtype=F64), eta, shift, scale)
    mc_mean, mc_std, se = mc_logit_moments(alpha, eta, shift, scale)
    assert abs(mean.item() - mc_mean) < 5 * se, (mean.item(), mc_mean)
    assert abs(std.item() / mc_std - 1) < 0.01, (std.item(), mc_std)


def test_public_input_std_drops_only_the_covariance():
    """'public' is V1 + V2 + Var psi(a x0) + Var psi(eta - a x0); a float64 quadrature of the same."""
    eta, shift, scale = 1e4, 0.6, 0.39
    alphas = np.array([1e-5, 0.02, 0.5, 0.99])
    _, std = logit_moments(torch.tensor(alphas, dtype=F64), eta, shift, scale, covariance=False)
    _, std_exact = logit_moments(torch.tensor(alphas, dtype=F64), eta, shift, scale)
    x = np.linspace(shift, shift + scale, 20001)
    for i, al in enumerate(alphas):
        a = eta * al
        ev = np.mean(special.polygamma(1, a * x) + special.polygamma(1, eta - a * x))
        ref = math.sqrt(ev + np.var(special.digamma(a * x)) + np.var(special.digamma(eta - a * x)))
        assert abs(std[i].item() / ref - 1) < 5e-3  # the 101-point trapezoid: ~0.2% at alpha -> 1
    assert (std <= std_exact + 1e-12).all()


# ============================================================ divergences
def kl_gamma_ref(a, b):
    return (a - b) * special.digamma(a) - special.gammaln(a) + special.gammaln(b)


def kl_beta_ref(a1, b1, a2, b2):
    """KL(Beta(a1, b1) || Beta(a2, b2)), the textbook closed form (not the Gamma decomposition)."""
    return (special.betaln(a2, b2) - special.betaln(a1, b1) + (a1 - a2) * special.digamma(a1)
            + (b1 - b2) * special.digamma(b1) + (a2 - a1 + b2 - b1) * special.digamma(a1 + b1))


def test_kl_gamma_reference_is_the_integral():
    for a, b in [(2.5, 4.0), (0.7, 0.3), (30.0, 33.0)]:
        p, q = stats.gamma(a), stats.gamma(b)
        val, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), 0, np.inf, limit=200)
        assert abs(val - kl_gamma_ref(a, b)) < 1e-7


def test_kl_gamma_and_kl_beta_match_float64_references():
    rng = np.random.default_rng(0)
    a1, b1, a2, b2 = (10 ** rng.uniform(-3, 4, 500) for _ in range(4))
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    np.testing.assert_allclose(kl_gamma(t(a1), t(a2)).numpy(), kl_gamma_ref(a1, a2), rtol=1e-9, atol=1e-9)
    ref = kl_beta_ref(a1, b1, a2, b2)
    np.testing.assert_allclose(kl_beta(t(a1), t(b1), t(a2), t(b2)).numpy(), ref, rtol=1e-7, atol=1e-7)
    assert (ref >= -1e-9).all()


def test_kl_terms_at_the_loss_scale_keep_their_digits():
    """Shapes ~ eta = 1e4 and a small prediction error: the KL is ~1e-4 and float64 keeps it."""
    eta, alpha, x0, x0h = 1e4, 0.9, 0.8, 0.8005
    args = [eta * alpha * x0h, eta - eta * alpha * x0h, eta * alpha * x0, eta - eta * alpha * x0]
    got = kl_beta(*(torch.tensor(v, dtype=F64) for v in args)).item()
    ref = kl_beta_ref(*args)
    assert 1e-5 < ref < 1e-2
    assert abs(got / ref - 1) < 1e-6


@pytest.mark.parametrize("loss", ["klub", "elbo", "hkd"])
def test_kl_terms_are_nonnegative_and_vanish_at_the_truth(loss):
    m = BetaDiffusion(SDDConfig(loss=loss, weights="sdd"), 0)
    g = torch.Generator().manual_seed(0)
    x0 = 0.6 + 0.39 * torch.rand(8, 3, 4, 4, generator=g, dtype=F64)
    x0h = 0.6 + 0.39 * torch.rand(8, 3, 4, 4, generator=g, dtype=F64)
    _, a_t, a_s, d = (v.view(-1, 1, 1, 1) for v in m.training_times(8, g, "cpu"))
    wrong = m.loss_terms(x0, x0h, a_t, a_s, d)
    same = m.loss_terms(x0, x0.clone(), a_t, a_s, d)
    for k in ("conditional", "marginal"):
        assert (wrong[k] >= 0).all() and (wrong[k] > 0).any()
        assert torch.equal(same[k], torch.zeros_like(same[k]))
        # the unclamped textbook KL between the same Beta laws
        eta = 1e4
        if k == "conditional":
            p = (eta * d * x0, eta - eta * a_s * x0)
            q = (eta * d * x0h, eta - eta * a_s * x0h)
        else:
            p = (eta * a_t * x0, eta - eta * a_t * x0)
            q = (eta * a_t * x0h, eta - eta * a_t * x0h)
        first, second = (p, q) if loss == "elbo" else (q, p)
        ref = kl_beta_ref(*(v.expand_as(x0).numpy() for v in (*first, *second)))
        np.testing.assert_allclose(wrong[k].numpy(), ref, rtol=1e-6, atol=1e-8)


# ============================================================ HPD
def hpd_ref(alpha_p, alpha_q):
    """Per-pixel symmetrised Hölder pseudo-divergence over axis 1 (channels), float64 numpy."""
    def F(theta):
        t = theta + 0.5
        return special.gammaln(t).sum(1, keepdims=True) - special.gammaln(t.sum(1, keepdims=True))

    def hd(a, b):
        return F(a * alpha_p) / a + F(b * alpha_q) / b - F(alpha_p + alpha_q)

    return 0.5 * (hd(1.8, 2.25) + hd(2.25, 1.8))


@pytest.mark.parametrize("hw", [(4, 16), (8, 32), (5, 24)])
def test_hpd_is_over_channels_and_matches_reference(hw):
    g = torch.Generator().manual_seed(0)
    ap = 10 ** (4 * torch.rand(2, 3, *hw, generator=g, dtype=F64) - 2)
    aq = ap * (0.5 + torch.rand(2, 3, *hw, generator=g, dtype=F64))
    h = holder_pseudo_divergence(ap, aq)
    assert h.shape == (2, 1, *hw)
    np.testing.assert_allclose(h.numpy(), hpd_ref(ap.numpy(), aq.numpy()), rtol=1e-9, atol=1e-9)
    assert (h >= -1e-9).all()  # F is convex, so each hd >= 0 (Jensen)
    perm = torch.randperm(hw[1], generator=g)
    torch.testing.assert_close(holder_pseudo_divergence(ap[..., perm], aq[..., perm]), h[..., perm], rtol=0, atol=0)
    # a channel permutation leaves it unchanged (a sum over the Dirichlet's categories)
    torch.testing.assert_close(holder_pseudo_divergence(ap[:, [2, 0, 1]], aq[:, [2, 0, 1]]), h, rtol=1e-12, atol=1e-9)


def test_hpd_at_the_truth_is_positive_not_zero():
    """What the math gives: hd(a, b) vanishes where a alpha_p = b alpha_q, not at alpha_p = alpha_q,
    so the HPD of a perfect prediction is F(1.8 al)/1.8 + F(2.25 al)/2.25 - F(2 al) > 0 (3 channels);
    with one channel F = 0 and the HPD is 0."""
    al = torch.tensor([0.3, 2.0, 50.0], dtype=F64).view(1, 3, 1, 1)
    h = holder_pseudo_divergence(al, al)
    assert h.item() > 0
    np.testing.assert_allclose(h.numpy(), hpd_ref(al.numpy(), al.numpy()), rtol=1e-10)
    assert holder_pseudo_divergence(al[:, :1], al[:, :1] * 3).abs().item() == 0.0
    a, b = 1.8, 2.25
    hd = (dirichlet_log_normalizer(a * al) / a + dirichlet_log_normalizer(b * (a / b) * al) / b
          - dirichlet_log_normalizer(al + (a / b) * al))
    assert abs(hd.item()) < 1e-10


def test_smoothing_divisor_is_per_sample():
    g = torch.Generator().manual_seed(0)
    logits = 30 * torch.randn(4, 3, 8, 8, generator=g, dtype=F64)
    d = logit_smoothing_divisor(logits)
    assert d.shape == (4, 1, 1, 1)
    ref = np.exp(2e-6 * (np.diff(logits.numpy(), axis=1) ** 2).sum(1)).mean(axis=(1, 2))
    np.testing.assert_allclose(d.flatten().numpy(), ref, rtol=1e-12)
    torch.testing.assert_close(logit_smoothing_divisor(logits[2:3]), d[2:3], rtol=0, atol=0)


# ============================================================ the loss on a network
@pytest.mark.parametrize("loss", ["klub", "elbo", "hkd"])
@pytest.mark.parametrize("hw", [(16, 16), (32, 32), (64, 64), (16, 32)])
def test_loss_runs_with_gradients(loss, hw):
    net = TinyNet()
    m = BetaDiffusion(SDDConfig(loss=loss, weights="sdd" if loss == "hkd" else "beta", smoothing=loss == "hkd"), 10)
    out = m.loss(net, batch_of(3, *hw), torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, *hw) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out >= 0).all()
    out.sum().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum() for gr in grads) > 0
    metrics = m.log_metrics()
    assert set(metrics) >= {"kl_conditional", "kl_marginal"} and all(math.isfinite(v) for v in metrics.values())
    assert ("kl_hpd" in metrics) == (loss == "hkd")


@pytest.mark.parametrize("hw,loss", [((16, 16), "klub"), ((32, 32), "elbo"), ((64, 64), "hkd"), ((16, 32), "hkd")])
def test_loss_runs_with_song_unet(hw, loss):
    """The real network at small width (every loss x size runs on the small conv net above)."""
    unet = pytest.importorskip("raygen.nets.unet")
    torch.manual_seed(0)
    net = unet.SongUNet(hw, 3, 3, num_classes=10, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                        attn_resolutions=(), dropout=0.0)
    n = 1 if hw[0] * hw[1] > 1024 else 2
    m = BetaDiffusion(SDDConfig(loss=loss, weights="sdd"), 10)
    out = m.loss(net, batch_of(n, *hw), torch.Generator().manual_seed(0))
    assert out.shape == (n, 3, *hw) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert all(torch.isfinite(gr).all() for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0


def test_loss_reaches_zero_kl_for_an_oracle_prediction():
    """A 'network' that outputs logit((x0 - shift)/scale) - x_in gives x0_hat = x0: KLUB = 0."""
    b = batch_of(2, 8, 8)
    x0 = 0.6 + 0.39 * (b["image"].double() + 1) / 2
    target = torch.logit((x0 - 0.6) / 0.39, eps=1e-12)

    def oracle(x, noise_labels, labels=None, augment_labels=None):
        return (target - x.double()).float()

    m = BetaDiffusion(SDDConfig(), 0)
    out = m.loss(oracle, b, torch.Generator().manual_seed(0))
    assert out.abs().max() < 1e-3  # float32 rounding of the logit only


def test_label_dropout_uses_the_null_class():
    m = BetaDiffusion(SDDConfig(label_dropout=0.5), 10)
    labels = torch.zeros(2000, dtype=torch.long)
    out = m.drop_labels(labels, torch.Generator().manual_seed(0))
    frac = (out == 10).double().mean().item()
    assert set(out.unique().tolist()) == {0, 10} and abs(frac - 0.5) < 0.05


def test_loss_with_augmentation_passes_augment_labels():
    seen = {}
    net = TinyNet()

    def spy(x, noise_labels, labels=None, augment_labels=None):
        seen["aug"] = augment_labels
        return net(x, noise_labels, labels, augment_labels)

    m = BetaDiffusion(SDDConfig(augment_p=0.5), 10)
    out = m.loss(spy, batch_of(2, 8, 8), torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and seen["aug"].shape == (2, 9)


# ============================================================ sampler
def test_sampler_is_reproducible_per_seed_under_any_batching():
    torch.manual_seed(0)
    net = TinyNet()
    m = BetaDiffusion(SDDConfig(steps=4, cfg_scale=1.5), 10)
    labels = torch.arange(6) % 10
    noise = torch.zeros(6, 3, 8, 8)
    whole = m.sample(net, noise, {"label": labels}, SeedStack(range(6)))
    parts = torch.cat([m.sample(net, noise[:2], {"label": labels[:2]}, SeedStack([0, 1])),
                       m.sample(net, noise[2:], {"label": labels[2:]}, SeedStack([2, 3, 4, 5]))])
    assert whole.shape == (6, 3, 8, 8) and whole.dtype == torch.float32
    assert whole.min() >= -1 and whole.max() <= 1
    # the conv net may round differently at another batch size; a different draw would differ by O(1)
    torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-5)
    again = [m.sample(net, noise, {"label": labels}, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(again[0], again[1])
    assert not torch.allclose(again[0], whole)


def test_sampler_runs_the_reverse_beta_chain():
    """With a constant oracle x0_hat = c the chain ends at x_N ~ x0 = c (alpha_N = 1 for N <= 350), so the
    final x0_hat is c, and the drawn logits are finite throughout."""
    c = 0.75
    calls = []

    def denoise(x_in, logit_a):
        calls.append(float(logit_a))
        assert torch.isfinite(x_in).all() and x_in.dtype == torch.float32
        return torch.full_like(x_in, math.log((c - 0.6) / 0.39 / (1 - (c - 0.6) / 0.39)))

    cfg = SDDConfig()
    out = beta_sampler(denoise, (2, 3, 4, 4), steps=12, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 12 and calls == sorted(calls)  # NFE = steps, from noisy to clean
    torch.testing.assert_close(out, torch.full_like(out, (c - 0.6) / 0.39 * 2 - 1), rtol=0, atol=1e-6)
    m = BetaDiffusion(cfg, 0)
    assert m.nfe(steps=12) == 12 and m.nfe() == 200


def test_global_rng_untouched_by_loss_and_sampler():
    net = TinyNet()
    m = BetaDiffusion(SDDConfig(loss="hkd", weights="sdd", smoothing=True, steps=4, cfg_scale=2.0), 10)
    before = torch.get_rng_state()
    m.loss(net, batch_of(2, 8, 8), torch.Generator().manual_seed(0)).sum().backward()
    m.sample(net, torch.zeros(2, 3, 8, 8), {"label": torch.tensor([1, 2])}, SeedStack([0, 1]))
    m.sample(net, torch.zeros(2, 3, 8, 8), {"label": torch.tensor([1, 2])}, torch.Generator().manual_seed(3))
    assert torch.equal(before, torch.get_rng_state())


def test_data_mean_init_needs_the_mean():
    m = BetaDiffusion(SDDConfig(steps=2, x_init="data_mean"), 0)
    net = TinyNet()
    with pytest.raises(ConfigError, match="method.data_mean"):
        m.sample(net, torch.zeros(1, 3, 4, 4), {}, torch.Generator().manual_seed(0))
    m.data_mean = torch.zeros(3, 4, 4)
    assert m.sample(net, torch.zeros(1, 3, 4, 4), {}, torch.Generator().manual_seed(0)).shape == (1, 3, 4, 4)


@pytest.mark.parametrize("key,value", [("shift", 0.0), ("scale", 0.5), ("sigmoid_start", -20.0), ("eta", 0.0),
                                       ("label_dropout", 1.0), ("steps", 0), ("loss", "l2"), ("cfg_scale", -1.0)])
def test_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        SDDConfig(**{key: value}).validate()
