"""EDM (Karras et al., arXiv 2206.00364): the sampler against a float64 transcription of Algorithm 2,
the ODE on Gaussian data against its closed form, the preconditioners against Table 1 written out
here, the training sigma distributions and loss weights, label dropout and classifier-free guidance."""
import math

import numpy as np
import pytest
import torch

from raygen.config import ConfigError
from raygen.core.rng import SeedStack
from raygen.methods.edm import (EDM, EDMConfig, EDMPrecond, VEPrecond, VPPrecond, edm_sampler,
                                edm_sigma_steps, nfe)

SQRT2 = math.sqrt(2.0)


# ---------------------------------------------------------------- Table 1, written out independently
def table1(precond: str, sigma: np.ndarray, sigma_d=0.5, beta_d=19.9, beta_min=0.1, M=1000):
    """(c_skip, c_out, c_in, c_noise, lambda) of EDM Table 1 in float64."""
    s = np.asarray(sigma, dtype=np.float64)
    one = np.ones_like(s)
    if precond == "vp":
        # sigma^-1: solve beta_d/2 t^2 + beta_min t - ln(1 + sigma^2) = 0 for t > 0 (numpy's roots)
        t = np.array([max(np.roots([beta_d / 2, beta_min, -math.log1p(v * v)]).real) for v in s.ravel()])
        return one, -s, 1 / np.sqrt(s**2 + 1), (M - 1) * t.reshape(s.shape), 1 / s**2
    if precond == "ve":
        return one, s, one, np.log(s / 2), 1 / s**2
    return (sigma_d**2 / (s**2 + sigma_d**2), s * sigma_d / np.sqrt(s**2 + sigma_d**2),
            1 / np.sqrt(sigma_d**2 + s**2), np.log(s) / 4, (s**2 + sigma_d**2) / (s * sigma_d) ** 2)


def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    return np.sqrt(np.exp(0.5 * beta_d * np.asarray(t) ** 2 + beta_min * np.asarray(t)) - 1)


PRECONDS = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond}


@pytest.mark.parametrize("name", ["edm", "vp", "ve"])
def test_preconditioning_matches_table1(name):
    sigma = np.geomspace(0.002, 150.0, 41)
    p = PRECONDS[name]()
    st = torch.from_numpy(sigma)
    got = [f(st).double().numpy() * np.ones_like(sigma) for f in (p.c_skip, p.c_out, p.c_in, p.c_noise, p.loss_weight)]
    for g, want, what in zip(got, table1(name, sigma), ("c_skip", "c_out", "c_in", "c_noise", "lambda")):
        np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-12, err_msg=f"{name} {what}")


def test_edm_loss_weight_balances_the_output_scale():
    """EDM chooses lambda = 1 / c_out^2 (Eq. 8, Appendix B.6): the effective weight is 1 at every sigma."""
    p = EDMPrecond()
    sigma = torch.from_numpy(np.geomspace(1e-3, 1e3, 25))
    torch.testing.assert_close(p.loss_weight(sigma) * p.c_out(sigma) ** 2, torch.ones_like(sigma), rtol=1e-12, atol=0)


def test_vp_sigma_range_follows_epsilon():
    p = VPPrecond()
    assert p.sigma_min == pytest.approx(vp_sigma(1e-5), rel=1e-9)
    assert p.sigma_max == pytest.approx(vp_sigma(1.0), rel=1e-9)
    assert p.sample_sigma_min == pytest.approx(vp_sigma(1e-3), rel=1e-9)  # EDM's epsilon_s for sampling


def test_precond_call_is_eq7_in_float32():
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), sigma a scalar or per sample."""
    seen = {}

    def net(x_in, noise_labels, labels=None, augment_labels=None):
        seen.update(x_in=x_in, noise_labels=noise_labels)
        return torch.sin(x_in) + noise_labels.view(-1, 1, 1, 1)

    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sigma = np.array([0.01, 1.0, 30.0])
    for name, cls in PRECONDS.items():
        c_skip, c_out, c_in, c_noise, _ = (torch.from_numpy(v).view(-1, 1, 1, 1) for v in table1(name, sigma))
        d = cls()(net, x, torch.from_numpy(sigma))
        assert d.dtype == torch.float32 and seen["x_in"].dtype == torch.float32
        assert seen["noise_labels"].shape == (3,)
        want = c_skip * x + c_out * (torch.sin(c_in * x) + c_noise)
        torch.testing.assert_close(d.double(), want, rtol=2e-5, atol=2e-5 * float(c_out.abs().max()))
    d_scalar = EDMPrecond()(net, x, 2.0)  # a scalar sigma is broadcast to the batch
    assert seen["noise_labels"].shape == (3,)
    torch.testing.assert_close(d_scalar, EDMPrecond()(net, x, torch.full((3,), 2.0)))


# ---------------------------------------------------------------- Algorithm 2, transcribed from the paper
def algorithm2(D, x_T, N, sigma_min, sigma_max, rho, S_churn, S_tmin, S_tmax, S_noise, draw):
    """EDM Algorithm 2 (arXiv 2206.00364), line by line, float64 numpy. `draw()` returns N(0, I)."""
    t = [(sigma_max ** (1 / rho) + i / (N - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
         for i in range(N)] + [0.0]  # Eq. 5, t_N = 0
    x = np.array(x_T, dtype=np.float64)  # line 1: x_0 ~ N(0, t_0^2 I) (drawn by the caller)
    for i in range(N):  # line 2
        gamma = min(S_churn / N, SQRT2 - 1) if S_tmin <= t[i] <= S_tmax else 0.0  # line 3
        eps = S_noise * draw()  # line 4: eps_i ~ N(0, S_noise^2 I)
        t_hat = t[i] + gamma * t[i]  # line 5
        x_hat = x + math.sqrt(t_hat**2 - t[i] ** 2) * eps  # line 6
        d = (x_hat - D(x_hat, t_hat)) / t_hat  # line 7
        x_next = x_hat + (t[i + 1] - t_hat) * d  # line 8
        if t[i + 1] != 0:  # line 9
            d_prime = (x_next - D(x_next, t[i + 1])) / t[i + 1]  # line 10
            x_next = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d_prime)  # line 11
        x = x_next
    return x


def mixture_denoiser(x, sigma):
    """The ideal denoiser of the 1-d data 0.3 N(-1, 0.2^2) + 0.7 N(1.5, 0.1^2), per element (nonlinear)."""
    w, mu, s = (0.3, 0.7), (-1.0, 1.5), (0.2, 0.1)
    xs = torch.as_tensor(x, dtype=torch.float64)
    var = [sk**2 + sigma**2 for sk in s]
    logp = torch.stack([math.log(wk) - 0.5 * (xs - mk) ** 2 / v - 0.5 * math.log(v) for wk, mk, v in zip(w, mu, var)])
    post = torch.softmax(logp, dim=0)
    means = torch.stack([(sk**2 * xs + sigma**2 * mk) / v for sk, mk, v in zip(s, mu, var)])
    out = (post * means).sum(0)
    return out if isinstance(x, torch.Tensor) else out.numpy()


@pytest.mark.parametrize("churn", [dict(S_churn=0.0, S_min=0.0, S_max=math.inf, S_noise=1.0),
                                   dict(S_churn=5.0, S_min=0.05, S_max=20.0, S_noise=1.007),
                                   dict(S_churn=40.0, S_min=0.0, S_max=math.inf, S_noise=1.0)])
def test_heun_sampler_equals_algorithm2(churn):
    shape = (4, 1, 3, 3)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80.0
    g = torch.Generator().manual_seed(123)
    got = edm_sampler(mixture_denoiser, x_T, steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, generator=g, **churn)
    ref_g = torch.Generator().manual_seed(123)  # the same stream, drawn float64 like the sampler's state
    ref = algorithm2(mixture_denoiser, x_T.numpy(), 18, 0.002, 80.0, 7.0, churn["S_churn"], churn["S_min"],
                     churn["S_max"], churn["S_noise"],
                     lambda: torch.randn(shape, generator=ref_g, dtype=torch.float64).numpy())
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-10)
    # samples land on the data's two modes (a sanity check that the test is about a working sampler)
    assert np.all((np.abs(ref + 1.0) < 0.8) | (np.abs(ref - 1.5) < 0.5))


def test_churn_uses_per_seed_streams():
    """With a SeedStack each sample's churn noise comes from its own seed: sample k is the same alone or
    in a batch, and equals Algorithm 2 driven by torch.Generator().manual_seed(seed_k)."""
    seeds = [11, 5, 7]
    x_T = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    kw = dict(steps=10, S_churn=30.0, S_min=0.01, S_max=50.0)
    batch = edm_sampler(mixture_denoiser, x_T, generator=SeedStack(seeds), **kw)
    for k, seed in enumerate(seeds):
        alone = edm_sampler(mixture_denoiser, x_T[k:k + 1], generator=SeedStack([seed]), **kw)
        torch.testing.assert_close(alone[0], batch[k], rtol=0, atol=1e-12)
        g = torch.Generator().manual_seed(seed)
        ref = algorithm2(mixture_denoiser, x_T[k].numpy(), 10, 0.002, 80.0, 7.0, 30.0, 0.01, 50.0, 1.0,
                         lambda: torch.randn((2, 2, 2), generator=g, dtype=torch.float64).numpy())
        np.testing.assert_allclose(batch[k].numpy(), ref, rtol=1e-10, atol=1e-10)


def test_euler_solver_and_nfe():
    """Euler = Algorithm 2 without lines 9-11; NFE: Heun 2N - 1 (35 at N = 18), Euler N."""
    calls = []

    def counting(x, sigma):
        calls.append(sigma)
        return mixture_denoiser(x, sigma)

    x_T = torch.randn(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    out = edm_sampler(counting, x_T, steps=18, solver="euler")
    t = edm_sigma_steps(18).numpy()
    x = x_T.numpy()
    for i in range(18):
        x = x + (t[i + 1] - t[i]) * (x - mixture_denoiser(x, float(t[i]))) / t[i]
    np.testing.assert_allclose(out.numpy(), x, rtol=1e-10, atol=1e-10)
    assert len(calls) == 18 == nfe(18, "euler")
    calls.clear()
    edm_sampler(counting, x_T, steps=18, solver="heun")
    assert len(calls) == 35 == nfe(18, "heun")
    assert 0.0 not in calls  # the correction is skipped on the step to sigma_N = 0


def test_sigma_steps_eq5():
    s = edm_sigma_steps(18, 0.002, 80.0, 7.0).numpy()
    assert s.shape == (19,) and s[-1] == 0.0
    assert s[0] == pytest.approx(80.0, rel=1e-12) and s[17] == pytest.approx(0.002, rel=1e-12)
    # Eq. 5: sigma_i^(1/rho) is linear in i
    np.testing.assert_allclose(np.diff(s[:18] ** (1 / 7)), np.full(17, (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17), rtol=1e-9)


# ---------------------------------------------------------------- the ODE on Gaussian data
def gaussian_denoiser(mu, s):
    """Data N(mu, s^2): D(x; sigma) = E[y | y + n = x] = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)."""
    return lambda x, sigma: (s**2 * x + sigma**2 * mu) / (s**2 + sigma**2)


@pytest.mark.parametrize("mu,s", [(2.0, 0.5), (-1.0, 0.2)])
def test_heun_ode_maps_the_gaussian_prior_to_the_data(mu, s):
    """With this D the ODE dx/dsigma = (x - D)/sigma and its Heun discretization are affine in x, so the
    sampler is x_T -> a x_T + b and pushes N(m, v) to N(a m + b, a^2 v) exactly. The exact ODE maps
    N(mu, s^2 + sigma_max^2) (the data convolved with the noise at sigma_max) to N(mu, s^2), so the prior
    is that one: starting from N(0, sigma_max^2) would shift the mean by about mu s / sigma_max.

    Mean: mu is a fixed point of every step, so it is matched to rounding (< 1e-3 by far, while the
    N(0, sigma_max^2) start is off by more than 1e-3). Variance: Heun at N = 18 carries a real
    discretization error (11% of s^2 at s = 0.5, 15% at s = 0.2), so we check that it is 2nd order in the step
    and below 1e-3 once N is large; Euler's is 1st order."""
    sigma_max = 80.0
    D = gaussian_denoiser(mu, s)

    def affine(steps, solver="heun"):
        out = edm_sampler(D, torch.tensor([0.0, 1.0], dtype=torch.float64), steps=steps, sigma_max=sigma_max,
                          solver=solver)
        return float(out[1] - out[0]), float(out[0])

    a, b = affine(18)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 90 + 3
    torch.testing.assert_close(edm_sampler(D, x, steps=18, sigma_max=sigma_max), a * x + b, rtol=1e-12, atol=1e-12)

    prior_var = s**2 + sigma_max**2
    assert abs(a * mu + b - mu) < 1e-3
    assert abs(a * 0.0 + b - mu) > 1e-3  # the naive N(0, sigma_max^2) start: the check above is a real one
    # exact-ODE map for comparison: a_exact = s / sqrt(s^2 + sigma_max^2)
    assert a == pytest.approx(s / math.sqrt(prior_var), rel=0.15)

    def var_err(steps, solver="heun"):
        a, _ = affine(steps, solver)
        return abs(a * a * prior_var - s**2)

    heun = [var_err(n) for n in (18, 36, 72, 144, 288)]
    assert heun[0] < 0.2 * s**2  # 11% of s^2 at s = 0.5, 15% at s = 0.2
    for coarse, fine in zip(heun, heun[1:]):
        assert 3.0 < coarse / fine < 5.0  # halving the step quarters the error: 2nd order
    assert heun[-1] < 1e-3
    euler = [var_err(n, "euler") for n in (72, 144, 288)]
    for coarse, fine in zip(euler, euler[1:]):
        assert 1.6 < coarse / fine < 2.4  # 1st order
    assert euler[-1] > heun[-1]

    # Monte Carlo through the same sampler: 200k draws from the matching prior agree with the affine law
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = edm_sampler(D, mu + math.sqrt(prior_var) * z, steps=18, sigma_max=sigma_max)
    assert abs(float(y.mean()) - mu) < 4 * a * math.sqrt(prior_var / 200_000)
    assert float(y.var()) == pytest.approx(a * a * prior_var, rel=0.02)


# ---------------------------------------------------------------- the Method: sampling through the preconditioner
class OracleNet(torch.nn.Module):
    """F that makes D(x; sigma) the ideal Gaussian denoiser through a given preconditioner: it undoes
    c_in and c_noise with the test's own Table 1 (not the method's), then F = (D - c_skip x) / c_out."""

    def __init__(self, precond: str, mu: float, s: float):
        super().__init__()
        self.precond, self.mu, self.s = precond, mu, s
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def sigma_of(self, c_noise: np.ndarray) -> np.ndarray:
        if self.precond == "edm":
            return np.exp(4 * c_noise)
        if self.precond == "ve":
            return 2 * np.exp(c_noise)
        return vp_sigma(c_noise / 999)

    def forward(self, x_in, noise_labels, labels=None, augment_labels=None):
        sigma = self.sigma_of(noise_labels.double().numpy()).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _, _ = table1(self.precond, sigma)
        x = x_in.double().numpy() / c_in
        d = (self.s**2 * x + sigma**2 * self.mu) / (self.s**2 + sigma**2)
        return torch.from_numpy((d - c_skip * x) / c_out).float()


@pytest.mark.parametrize("precond", ["edm", "vp", "ve"])
def test_method_sample_is_the_sampler_on_the_preconditioned_net(precond):
    """EDM.sample(net, noise) = edm_sampler(D, sigma_max * noise) with the preconditioner's default range;
    the network runs in float32, so agreement is to float32 accuracy."""
    mu, s = 0.3, 0.5
    method = EDM(EDMConfig(precond=precond), num_classes=0)
    settings = method.default_settings()
    noise = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    got = method.sample(OracleNet(precond, mu, s), noise, {}, None)
    assert got.dtype == torch.float32
    want = edm_sampler(gaussian_denoiser(mu, s), noise.double() * settings["sigma_max"], steps=18,
                       sigma_min=settings["sigma_min"], sigma_max=settings["sigma_max"])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert method.nfe() == 35 and method.nfe(solver="euler", steps=10) == 10


def test_default_sigma_ranges_per_preconditioner():
    assert EDM(EDMConfig(), 0).default_settings()["sigma_min"] == 0.002
    assert EDM(EDMConfig(), 0).default_settings()["sigma_max"] == 80.0
    vp = EDM(EDMConfig(precond="vp"), 0).default_settings()
    assert vp["sigma_min"] == pytest.approx(vp_sigma(1e-3)) and vp["sigma_max"] == pytest.approx(vp_sigma(1.0))
    ve = EDM(EDMConfig(precond="ve"), 0).default_settings()
    assert (ve["sigma_min"], ve["sigma_max"]) == (0.02, 100.0)
    assert EDM(EDMConfig(precond="ve", sigma_max=50.0), 0).default_settings()["sigma_max"] == 50.0


class LabelNet(torch.nn.Module):
    """A small conv net with the raygen UNet signature whose output depends on the class label."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.embed = torch.nn.Embedding(self.num_classes + 1, 2)
        self.calls = []

    def forward(self, x, noise_labels, labels=None, augment_labels=None):
        self.calls.append(x.shape[0])
        h = torch.tanh(self.conv(x)) + 0.1 * noise_labels.view(-1, 1, 1, 1)
        if labels is not None:
            h = h + self.embed(labels).view(-1, 2, 1, 1)
        return h


@pytest.mark.parametrize("w", [0.0, 1.0, 1.7, 4.0])
def test_cfg_is_the_guidance_formula_from_one_doubled_batch(w):
    net = LabelNet()
    method = EDM(EDMConfig(), num_classes=4)
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 1])
    with torch.no_grad():
        d_cond = method.precond(net, x, 1.3, labels=labels)
        d_uncond = method.precond(net, x, 1.3, labels=torch.full_like(labels, 4))
        net.calls.clear()
        got = method.denoiser(net, labels, w)(x, 1.3)
    torch.testing.assert_close(got, d_uncond + w * (d_cond - d_uncond), rtol=1e-5, atol=1e-5)
    assert net.calls == ([3] if w in (0.0, 1.0) else [6])  # one network call per evaluation

    net.calls.clear()
    method.sample(net, torch.randn(3, 2, 5, 5), {"label": labels}, None, cfg_scale=w, steps=6)
    assert len(net.calls) == method.nfe(steps=6) == 11


def test_sample_per_seed_with_churn_and_cfg():
    net, method = LabelNet(), EDM(EDMConfig(S_churn=20.0, cfg_scale=2.0), num_classes=4)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([1, 2, 3])
    seeds = [100, 101, 102]
    batch = method.sample(net, noise, {"label": labels}, SeedStack(seeds), steps=8)
    alone = method.sample(net, noise[1:2], {"label": labels[1:2]}, SeedStack(seeds[1:2]), steps=8)
    torch.testing.assert_close(alone[0], batch[1], rtol=1e-5, atol=1e-5)
    other = method.sample(net, noise, {"label": labels}, SeedStack([7, 8, 9]), steps=8)
    assert not torch.allclose(other, batch)  # the churn noise comes from the generator


# ---------------------------------------------------------------- training loss
class RecordingNet(torch.nn.Module):
    """Elementwise F; remembers what the preconditioner handed it."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.7))
        self.seen = {}

    def forward(self, x_in, noise_labels, labels=None, augment_labels=None):
        self.seen = dict(x_in=x_in.detach().double(), noise_labels=noise_labels.detach().double(), labels=labels,
                         augment_labels=augment_labels)
        return self.scale * torch.tanh(x_in)


def test_edm_loss_is_weighted_denoising_error_with_lognormal_sigma():
    n = 200_000
    images = torch.rand(n, 1, 1, 1, generator=torch.Generator().manual_seed(0)) * 2 - 1
    net = RecordingNet()
    method = EDM(EDMConfig(), num_classes=0)
    loss = method.loss(net, {"image": images, "label": torch.zeros(n, dtype=torch.long)}, torch.Generator().manual_seed(1))
    assert loss.shape == images.shape and loss.dtype == torch.float32
    assert net.seen["labels"] is None and net.seen["augment_labels"] is None  # unconditional, no augmentation

    sigma = np.exp(4 * net.seen["noise_labels"].numpy())  # c_noise = ln(sigma)/4
    ln_sigma = np.log(sigma)
    assert abs(ln_sigma.mean() - (-1.2)) < 4 * 1.2 / math.sqrt(n)
    assert abs(ln_sigma.std() - 1.2) < 4 * 1.2 / math.sqrt(2 * n)

    c_skip, c_out, c_in, _, lam = (v.reshape(-1, 1, 1, 1) for v in table1("edm", sigma))
    x_noisy = net.seen["x_in"].numpy() / c_in
    y = images.double().numpy()
    eps = (x_noisy - y) / sigma.reshape(-1, 1, 1, 1)  # the noise was N(0, sigma^2)
    assert abs(eps.mean()) < 4 / math.sqrt(n) and abs(eps.std() - 1) < 4 / math.sqrt(2 * n)
    D = c_skip * x_noisy + c_out * 0.7 * np.tanh(net.seen["x_in"].numpy())
    np.testing.assert_allclose(loss.detach().double().numpy(), lam * (D - y) ** 2, rtol=1e-3, atol=1e-5)
    loss.sum().backward()
    assert net.scale.grad is not None and torch.isfinite(net.scale.grad)


def test_vp_and_ve_training_sigma_distributions():
    n = 200_000
    g = torch.Generator().manual_seed(5)
    ve = VEPrecond().sample_sigma(g, n, "cpu").double().numpy()
    lo, hi = math.log(0.02), math.log(100)
    u = (np.log(ve) - lo) / (hi - lo)  # log-uniform: u ~ U(0, 1)
    assert u.min() >= 0 and u.max() <= 1 + 1e-6
    assert abs(u.mean() - 0.5) < 4 / math.sqrt(12 * n) and abs(u.var() - 1 / 12) < 0.002
    vp = VPPrecond().sample_sigma(g, n, "cpu").double().numpy()
    t = np.array(table1("vp", vp[:5000])[3]) / 999  # sigma^-1 by the test's own root finding: t ~ U(1e-5, 1)
    assert t.min() >= 1e-5 * (1 - 1e-4) and t.max() <= 1 + 1e-6
    assert abs(t.mean() - 0.5) < 4 / math.sqrt(12 * 5000)


@pytest.mark.parametrize("precond", ["vp", "ve"])
def test_vp_ve_loss_weight_is_inverse_variance(precond):
    images = torch.rand(64, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    net, method = RecordingNet(), EDM(EDMConfig(precond=precond), num_classes=0)
    loss = method.loss(net, {"image": images}, torch.Generator().manual_seed(2))
    c_noise = net.seen["noise_labels"].numpy()
    sigma = vp_sigma(c_noise / 999) if precond == "vp" else 2 * np.exp(c_noise)
    c_skip, c_out, c_in, _, lam = (v.reshape(-1, 1, 1, 1) for v in table1(precond, sigma))
    x_noisy = net.seen["x_in"].numpy() / c_in
    D = c_skip * x_noisy + c_out * 0.7 * np.tanh(net.seen["x_in"].numpy())
    np.testing.assert_allclose(loss.detach().double().numpy(), (D - images.double().numpy()) ** 2 / sigma.reshape(-1, 1, 1, 1) ** 2,
                               rtol=2e-3, atol=1e-5)


def test_label_dropout_rate_and_augment_labels():
    n, p = 40_000, 0.3
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    net = RecordingNet()
    method = EDM(EDMConfig(label_dropout=p), num_classes=10)
    method.loss(net, {"image": torch.zeros(n, 1, 1, 1), "label": labels}, torch.Generator().manual_seed(3))
    seen = net.seen["labels"]
    null = seen == 10
    assert abs(null.double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(seen[~null], labels[~null])  # kept labels are untouched

    net = RecordingNet()
    images = torch.randn(16, 3, 8, 8)
    EDM(EDMConfig(augment_p=1.0), num_classes=10).loss(net, {"image": images, "label": labels[:16]},
                                                        torch.Generator().manual_seed(3))
    aug = net.seen["augment_labels"]
    assert aug.shape == (16, 9) and (aug[:, [2, 3, 4, 5, 7, 8]] != 0).all()  # at p = 1 every geometric op fires


def test_loss_reproducible_with_the_generator():
    net = RecordingNet()
    method = EDM(EDMConfig(augment_p=0.5), num_classes=3)
    batch = {"image": torch.randn(8, 3, 8, 8), "label": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}
    a = method.loss(net, batch, torch.Generator().manual_seed(9))
    b = method.loss(net, batch, torch.Generator().manual_seed(9))
    c = method.loss(net, batch, torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("key,value", [("precond", "ddpm"), ("solver", "rk4"), ("sigma_data", 0.0), ("P_std", -1.0),
                                       ("label_dropout", 1.0), ("augment_p", 1.5), ("steps", 0), ("sigma_min", 0.0),
                                       ("sigma_max", 0.001), ("rho", 0.0), ("S_churn", -1.0), ("S_noise", -0.1),
                                       ("S_max", -1.0), ("cfg_scale", -1.0)])
def test_config_errors_name_the_key(key, value):
    cfg = EDMConfig(**{key: value})
    with pytest.raises(ConfigError, match=rf"method\.{key}\b"):
        cfg.validate()


def test_default_config_is_valid_and_settings_are_complete():
    cfg = EDMConfig()
    cfg.validate()
    method = EDM(cfg, num_classes=10)
    assert set(method.default_settings()) == set(method.sampler_settings)
    with pytest.raises(TypeError):
        method.sample(LabelNet(), torch.randn(1, 2, 4, 4), {}, None, eta=0.5)


# ---------------------------------------------------------------- the project's UNet
def test_with_song_unet():
    """EDM loss and sampler run on raygen's SongUNet with class labels and augmentation labels."""
    from raygen.nets.unet import SongUNet

    net = SongUNet(img_resolution=8, in_channels=3, out_channels=3, num_classes=4, augment_dim=9,
                   model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    method = EDM(EDMConfig(augment_p=0.5), num_classes=4)
    batch = {"image": torch.rand(4, 3, 8, 8) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}
    loss = method.loss(net, batch, torch.Generator().manual_seed(0))
    assert loss.shape == (4, 3, 8, 8) and torch.isfinite(loss).all()
    loss.sum().backward()
    x = method.sample(net, torch.randn(4, 3, 8, 8), {"label": batch["label"]}, SeedStack([0, 1, 2, 3]),
                      steps=3, cfg_scale=1.5, S_churn=1.0)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()
