"""Learned variance (Improved DDPM, arXiv 2102.09672), respacing and the DiffiT guidance options of the DDPM
method, against float64 transcriptions of the formulas written here (and scipy / torch.distributions)."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from raygen.config import ConfigError
from raygen.core.rng import SeedStack, randn
from raygen.methods.ddpm import (
    DDPM,
    DDPMConfig,
    cfg_scale_at,
    discretized_gaussian_log_likelihood,
    gaussian_kl,
    learned_log_variance,
    respace,
    space_timesteps,
)

T = 1000


def schedule64(schedule="linear"):
    m = DDPM(DDPMConfig(schedule=schedule), 10)
    return m.betas64, np.cumprod(1.0 - m.betas64)


# ---- the VLB terms --------------------------------------------------------------------------------
def kl_closed_form(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) = log(s2/s1) + (v1 + (m1-m2)^2) / (2 v2) - 1/2 (variances v)."""
    return 0.5 * np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5


def bin_log_prob(x, mean, sd):
    """log P(X in bin of x) for X ~ N(mean, sd^2): bins of width 2/255 around the 256 levels of [-1, 1],
    the outermost ones extended to -inf / +inf."""
    z_hi, z_lo = (x + 1 / 255 - mean) / sd, (x - 1 / 255 - mean) / sd
    # the interior as a difference of CDFs, taken as survival functions above the mean (1 - cdf there
    # would cancel)
    interior = np.where(z_lo > 0, norm.sf(z_lo) - norm.sf(z_hi), norm.cdf(z_hi) - norm.cdf(z_lo))
    p = np.where(x <= -1 + 1e-9, norm.cdf(z_hi), np.where(x >= 1 - 1e-9, norm.sf(z_lo), interior))
    with np.errstate(divide="ignore"):
        return np.log(p)


def test_gaussian_kl_is_the_closed_form_and_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(500, generator=g, dtype=torch.float64), torch.randn(500, generator=g, dtype=torch.float64)
    lv1, lv2 = 2 * torch.randn(500, generator=g, dtype=torch.float64), 2 * torch.randn(500, generator=g,
                                                                                        dtype=torch.float64)
    ours = gaussian_kl(m1, lv1, m2, lv2).numpy()
    ref = kl_closed_form(m1.numpy(), np.exp(lv1.numpy()), m2.numpy(), np.exp(lv2.numpy()))
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)
    peer = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                             torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    np.testing.assert_allclose(ours, peer.numpy(), rtol=1e-10, atol=1e-12)
    assert (ours >= 0).all()


def test_discretized_log_likelihood_matches_scipy_cdf_differences():
    g = torch.Generator().manual_seed(1)
    levels = torch.randint(0, 256, (4000,), generator=g)
    levels[:50], levels[50:100] = 0, 255  # the edge bins
    x = levels.double() / 127.5 - 1
    mean = x + 0.02 * torch.randn(4000, generator=g, dtype=torch.float64)
    log_scale = math.log(0.01) + 0.5 * torch.randn(4000, generator=g, dtype=torch.float64)
    ours = discretized_gaussian_log_likelihood(x, mean, log_scale).numpy()
    ref = bin_log_prob(x.numpy(), mean.numpy(), np.exp(log_scale.numpy()))
    keep = ref > math.log(1e-10)  # below 1e-12 both are floored differently
    assert keep.mean() > 0.9
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=1e-8, atol=1e-10)
    # the edge bins reach to infinity: a mean far outside [-1, 1] still has all its mass in them
    far = torch.tensor([-3.0, 3.0], dtype=torch.float64)
    edge = discretized_gaussian_log_likelihood(torch.tensor([-1.0, 1.0], dtype=torch.float64), far,
                                               torch.full((2,), math.log(0.1), dtype=torch.float64))
    torch.testing.assert_close(edge, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_discretized_likelihood_is_a_distribution_over_the_256_levels():
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, sd in [(0.3, 0.05), (-0.98, 0.2), (1.0, 0.004), (0.0, 3.0)]:
        lp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), torch.full_like(grid, math.log(sd)))
        assert abs(float(lp.exp().sum()) - 1.0) < 1e-9, (mean, sd)


def vlb_reference(x0, x_t, t, eps_hat, v, b, ab):
    """L_t in bits/dim per sample, float64, from the formulas (DDPM Eq. 5-7 and 13, Improved DDPM Eq. 15)."""
    out = []
    for i, ti in enumerate(t):
        abt, beta = ab[ti], b[ti]
        abp = ab[ti - 1] if ti > 0 else 1.0
        post_var = lambda s: b[s] * (1 - ab[s - 1]) / (1 - ab[s])  # noqa: E731  (s >= 1)
        var_q = post_var(ti) if ti > 0 else post_var(1)  # beta_tilde_0 = 0 is clipped to beta_tilde_1
        frac = (v[i] + 1) / 2
        var_p = np.exp(frac * np.log(beta) + (1 - frac) * np.log(var_q))
        x0_hat = (x_t[i] - np.sqrt(1 - abt) * eps_hat[i]) / np.sqrt(abt)
        c0, ct = np.sqrt(abp) * beta / (1 - abt), np.sqrt(1 - beta) * (1 - abp) / (1 - abt)
        mean_q, mean_p = c0 * x0[i] + ct * x_t[i], c0 * x0_hat + ct * x_t[i]
        if ti > 0:
            nats = kl_closed_form(mean_q, var_q, mean_p, var_p).mean()
        else:
            nats = -bin_log_prob(x0[i], mean_p, np.sqrt(var_p)).mean()
        out.append(nats / np.log(2))
    return np.array(out)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_vlb_terms_equal_a_float64_transcription(schedule):
    m = DDPM(DDPMConfig(schedule=schedule, learn_sigma=True), 10)
    b, ab = schedule64(schedule)
    g = torch.Generator().manual_seed(2)
    n, shape = 12, (12, 3, 4, 4)
    t = torch.tensor([0, 0, 0, 1, 2, 5, 50, 300, 600, 900, 998, 999])
    x0 = torch.randint(0, 256, shape, generator=g).float() / 127.5 - 1
    x0[0, 0, 0] = -1.0
    x0[1, 0, 0] = 1.0
    eps = torch.randn(shape, generator=g)
    sa = torch.from_numpy(np.sqrt(ab[t.numpy()])).float().view(n, 1, 1, 1)
    x_t = sa * x0 + (1 - sa**2).sqrt() * eps
    eps_hat = eps + 0.3 * torch.randn(shape, generator=g)  # near the truth, so t = 0 has probable bins
    v = torch.rand(shape, generator=g) * 2.4 - 1.2  # v' slightly outside [0, 1] too (it is not clamped)
    ours = m.vlb_terms(x0, x_t, t, torch.cat([eps_hat, v], 1)).numpy()
    ref = vlb_reference(x0.double().numpy(), x_t.double().numpy(), t.numpy(), eps_hat.double().numpy(),
                        v.double().numpy(), b, ab)
    assert ours.shape == (n,)
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=1e-5)
    assert (ref[:3] > 0).all() and (ref[3:] >= 0).all()


def test_learned_variance_interpolates_between_beta_tilde_and_beta():
    b, ab = schedule64()
    m = DDPM(DDPMConfig(learn_sigma=True), 10)
    for t in [1, 10, 500, 999]:
        beta, beta_tilde = b[t], b[t] * (1 - ab[t - 1]) / (1 - ab[t])
        lb, lbt = math.log(beta), math.log(beta_tilde)
        v = torch.tensor([-1.0, 1.0, 0.0, 0.5], dtype=torch.float64)
        got = learned_log_variance(v, lb, lbt).numpy()
        frac = 0.75  # v = 0.5
        np.testing.assert_allclose(got, [lbt, lb, 0.5 * (lb + lbt), frac * lb + (1 - frac) * lbt], rtol=1e-12)
        # the method's tables: log beta and the clipped log beta_tilde
        assert math.isclose(float(m.log_beta[t]), lb, rel_tol=1e-6)
        assert math.isclose(float(m.log_post_var[t]), lbt, rel_tol=1e-6)
    # at t = 0 beta_tilde_0 = 0; the reference code uses beta_tilde_1
    assert math.isclose(float(m.log_post_var[0]), math.log(b[1] * (1 - ab[0]) / (1 - ab[1])), rel_tol=1e-6)


def test_ancestral_step_with_v_at_the_ends_is_the_fixed_variances():
    m = DDPM(DDPMConfig(learn_sigma=True), 10)
    g = torch.Generator().manual_seed(3)
    x, e, z = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    ones = torch.ones_like(x)
    for t in [1, 400, 999]:
        small = m.ddpm_step(x, e, t, z, fixed_variance="beta_tilde")
        large = m.ddpm_step(x, e, t, z, fixed_variance="beta")
        torch.testing.assert_close(m.ddpm_step(x, e, t, z, v=-ones), small, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.ddpm_step(x, e, t, z, v=ones), large, rtol=1e-5, atol=1e-6)
        if t == 1:  # beta_tilde_1 is about half of beta_1 (they meet as t -> T)
            assert not torch.allclose(small, large)


# ---- the hybrid loss ------------------------------------------------------------------------------
def test_vlb_gradient_reaches_only_the_variance_channels():
    m = DDPM(DDPMConfig(learn_sigma=True), 10)
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 10, 100, 500, 999])
    sa = m.sqrt_ab[t].view(-1, 1, 1, 1)
    x_t = sa * x0 + m.sqrt_1mab[t].view(-1, 1, 1, 1) * eps
    out = torch.cat([eps + 0.2 * torch.randn(x0.shape, generator=g), 0.3 * torch.randn(x0.shape, generator=g)], 1)
    out.requires_grad_(True)
    terms = m.hybrid_terms(out, x0, x_t, t, eps)
    (gv,) = torch.autograd.grad(terms["vlb"].sum(), out, retain_graph=True)
    assert torch.equal(gv[:, :3], torch.zeros_like(gv[:, :3]))
    assert (gv[:, 3:].abs().flatten(1).sum(1) > 0).all()  # every sample's variance learns, t = 0 included
    (gm,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.equal(gm[:, 3:], torch.zeros_like(gm[:, 3:])) and gm[:, :3].abs().sum() > 0


class TwoHeadNet(torch.nn.Module):
    """eps and v from separate parameters, so the gradient of each loss term can be attributed."""

    def __init__(self, c=3, learn_sigma=True):
        super().__init__()
        self.eps_w = torch.nn.Parameter(torch.tensor(0.5))
        self.v_w = torch.nn.Parameter(torch.tensor(0.1))
        self.learn_sigma = learn_sigma

    def forward(self, x, t, y):
        eps = torch.tanh(self.eps_w * x + 1e-3 * t.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1))
        if not self.learn_sigma:
            return eps
        return torch.cat([eps, torch.tanh(self.v_w * x - 5e-4 * t.view(-1, 1, 1, 1))], 1)


@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_loss_is_weighted_l_simple_plus_lambda_times_T_times_L_t(weighting):
    batch = {"image": torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1,
             "label": torch.arange(8) % 10}
    hybrid = DDPM(DDPMConfig(learn_sigma=True, loss_weighting=weighting), 10)
    plain = DDPM(DDPMConfig(loss_weighting=weighting), 10)
    net = TwoHeadNet()
    loss = hybrid.loss(net, batch, torch.Generator().manual_seed(9))
    assert loss.shape == (8,)
    # the same draws: the L_simple part is the plain method's loss on the eps head
    simple = plain.loss(TwoHeadNet(learn_sigma=False), batch, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    t = torch.randint(0, T, (8,), generator=g)
    eps = torch.randn(batch["image"].shape, generator=g)
    x_t = hybrid.sqrt_ab[t].view(-1, 1, 1, 1) * batch["image"] + hybrid.sqrt_1mab[t].view(-1, 1, 1, 1) * eps
    drop = torch.rand(8, generator=g) < 0.1
    y = torch.where(drop, torch.full_like(batch["label"], 10), batch["label"])
    vlb = hybrid.vlb_terms(batch["image"], x_t, t, net(x_t, t, y).detach())
    torch.testing.assert_close(loss, simple + 1e-3 * T * vlb, rtol=1e-5, atol=1e-6)
    assert set(hybrid.log_metrics()) == {"loss_mse", "loss_vlb"} and plain.log_metrics() == {}
    # the VLB part trains the variance head only: the eps head's gradient is L_simple's
    loss.mean().backward()
    g_eps_hybrid = net.eps_w.grad.clone()
    assert net.v_w.grad.abs() > 0
    lone = TwoHeadNet(learn_sigma=False)
    plain.loss(lone, batch, torch.Generator().manual_seed(9)).mean().backward()
    torch.testing.assert_close(g_eps_hybrid, lone.eps_w.grad, rtol=1e-5, atol=1e-8)


def test_learn_sigma_refuses_a_network_without_variance_channels():
    m = DDPM(DDPMConfig(learn_sigma=True), 10)
    batch = {"image": torch.zeros(2, 3, 4, 4), "label": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match="2 x 3 output channels"):
        m.loss(TwoHeadNet(learn_sigma=False), batch, torch.Generator().manual_seed(0))


# ---- respacing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spec,n", [("250", 250), (250, 250), ("50", 50), ("ddim50", 50), ("10,15,20", 45)])
def test_respaced_betas_reproduce_alpha_bar_at_the_kept_steps(schedule, spec, n):
    b, ab = schedule64(schedule)
    new_b, kept = respace(b, spec)
    assert len(kept) == len(new_b) == n and kept == sorted(set(kept)) and kept[0] == 0
    # the cosine schedule's last kept step has alpha_bar_k / alpha_bar_{k-1} ~ 1e-3, so 1 - beta_k carries a
    # relative rounding of ~1e-13 per such step
    np.testing.assert_allclose(np.cumprod(1.0 - new_b), ab[kept], rtol=1e-12 if schedule == "linear" else 1e-11,
                               atol=0)


def test_space_timesteps_strides():
    kept = space_timesteps(T, "250")
    assert kept[-1] == T - 1 and kept[:4] == [0, 4, 8, 12]  # stride 999/249 = 4.012, rounded
    assert space_timesteps(T, "ddim50") == list(range(0, T, 20))
    assert space_timesteps(T, 1000) == list(range(T))
    # sections: 300 steps as thirds of 10, 15 and 20 evenly strided steps, each spanning its third
    sec = space_timesteps(300, "10,15,20")
    assert len(sec) == 45 and (sec[0], sec[9], sec[10], sec[24], sec[25], sec[44]) == (0, 99, 100, 199, 200, 299)
    assert sec[:3] == [0, 11, 22] and sec[10:13] == [100, 107, 114]  # strides 99/9 and 99/14, rounded
    for bad in ["0", "1001", "ddim600", "abc", "1"]:
        with pytest.raises(ValueError):
            space_timesteps(T, bad)


def test_respacing_to_T_is_the_identity():
    for schedule in ("linear", "cosine"):
        b, _ = schedule64(schedule)
        new_b, kept = respace(b, T)
        assert kept == list(range(T)) and np.array_equal(new_b, b)
    m = DDPM(DDPMConfig(), 10)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = {"label": torch.tensor([1, 2])}
    a = m.sample(net_c, noise, cond, torch.Generator().manual_seed(1), sampler="ddpm")
    b_ = m.sample(net_c, noise, cond, torch.Generator().manual_seed(1), sampler="ddpm", respace="1000")
    assert inside(a) and torch.equal(a, b_)


def test_ddim_on_ddimN_respacing_is_leading_spacing():
    m = DDPM(DDPMConfig(), 10)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = {"label": torch.tensor([1, 2])}
    a = m.sample(net_c, noise, cond, None, sampler="ddim", respace="ddim50")
    b = m.sample(net_c, noise, cond, None, sampler="ddim", steps=50, spacing="leading")
    assert inside(a) and torch.equal(a, b)
    assert not torch.equal(a, m.sample(net_c, noise, cond, None, sampler="ddim", steps=50, spacing="trailing"))


# ---- guidance -------------------------------------------------------------------------------------
def test_power_cosine_ramp_runs_from_1_at_T_to_cfg_at_0():
    for cfg, power in [(4.4, 4.0), (1.5, 2.0), (0.5, 4.0)]:
        assert cfg_scale_at(T, T, cfg, "power_cosine", power) == 1.0
        assert math.isclose(cfg_scale_at(0, T, cfg, "power_cosine", power), cfg, rel_tol=1e-12)
        s = np.array([cfg_scale_at(t, T, cfg, "power_cosine", power) for t in range(T + 1)])
        steps = np.diff(s) * np.sign(1 - cfg)  # moves from cfg towards 1 as t grows
        assert (steps >= 0).all() and (steps[: T // 2] > 0).all()
        # the formula, at a few points
        for t in (100, 500, 900):
            ref = 1 + (cfg - 1) * 0.5 * (1 - math.cos(math.pi * (1 - t / T) ** power))
            assert math.isclose(s[t], ref, rel_tol=1e-12)
    assert cfg_scale_at(123, T, 4.4, "constant") == 4.4


class CountingNet(torch.nn.Module):
    """2C output channels that depend on the label, with a log of every call's batch size."""

    def __init__(self, out_channels):
        super().__init__()
        self.out_channels, self.calls = out_channels, []

    def forward(self, x, t, y):
        self.calls.append(x.shape[0])
        reps = self.out_channels // x.shape[1]
        base = torch.cat([x] * reps, 1)
        k = torch.arange(self.out_channels, dtype=x.dtype).view(1, -1, 1, 1)
        return torch.tanh(0.5 * base + 0.1 * (k + 1) * y.view(-1, 1, 1, 1).to(x.dtype) + 1e-3 * t.view(-1, 1, 1, 1))


def test_three_channel_guidance_leaves_the_other_channels_conditional():
    m = DDPM(DDPMConfig(learn_sigma=True), num_classes=10)
    net = CountingNet(8)
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    labels, t, s = torch.tensor([1, 4, 7]), 321, 2.5
    out = m.guided_output(net, x, t, labels, s, cfg_channels=3)
    assert net.calls == [6]  # cond and uncond in one doubled batch
    tt = torch.full((3,), t)
    c, u = net(x, tt, labels), net(x, tt, torch.full_like(labels, 10))
    torch.testing.assert_close(out[:, :3], u[:, :3] + s * (c[:, :3] - u[:, :3]))
    assert torch.equal(out[:, 3:], c[:, 3:])  # the 4th eps channel and every variance channel
    # default: every eps channel guided, the variance channels conditional
    full = m.guided_output(net, x, t, labels, s)
    torch.testing.assert_close(full[:, :4], u[:, :4] + s * (c[:, :4] - u[:, :4]))
    assert torch.equal(full[:, 4:], c[:, 4:])
    with pytest.raises(ValueError, match="cfg_channels=5"):
        m.guided_output(net, x, t, labels, s, cfg_channels=5)


# ---- sampling against a float64 loop --------------------------------------------------------------
_AB = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))  # the default linear schedule's alpha_bar


def net_c(x, t, y):
    """C channels: the optimal eps for data ~ N(0, 0.5^2), sqrt(1-ab) x / (0.25 ab + 1 - ab), plus a
    label-dependent term, so samples stay inside [-1, 1] and guidance visibly moves them."""
    a = torch.from_numpy(_AB)[t].to(x.dtype).view(-1, 1, 1, 1)
    yy = y.view(-1, 1, 1, 1).to(x.dtype)
    return (1 - a).sqrt() * x / (0.25 * a + 1 - a) + 0.1 * torch.tanh(0.5 * x + 0.2 * (yy - 5))


def net_2c(x, t, y):
    """2C channels: net_c's eps and a variance output v that depends on x, t and the label."""
    tt, yy = t.view(-1, 1, 1, 1).to(x.dtype), y.view(-1, 1, 1, 1).to(x.dtype)
    return torch.cat([net_c(x, t, y), torch.tanh(0.5 * x - 1e-3 * tt + 0.1 * yy)], 1)


def inside(x):
    """Most of a sample is not clamped (a clamped sample would hide differences)."""
    return float((x.abs() < 0.999).float().mean()) > 0.75


def manual_ddpm(net, seeds, shape, labels, kept, variance, cfg, power, k_guided, null=10):
    """Ancestral sampling in float64 written from the formulas, drawing x_T then one z per step > 0."""
    _, ab_full = schedule64()
    stack = SeedStack(seeds)
    x = randn(stack, shape).double()
    C = shape[1]
    ab = ab_full[kept]
    for k in range(len(kept) - 1, -1, -1):
        t = kept[k]
        tt = torch.full((len(seeds),), t)
        s = 1 + (cfg - 1) * 0.5 * (1 - math.cos(math.pi * (1 - t / T) ** power))
        o_c, o_u = net(x, tt, labels), net(x, tt, torch.full_like(labels, null))
        out = o_c.clone()
        out[:, :k_guided] = o_u[:, :k_guided] + s * (o_c[:, :k_guided] - o_u[:, :k_guided])
        eps = out[:, :C]
        abp = ab[k - 1] if k > 0 else 1.0
        beta = 1 - ab[k] / abp
        x0 = (x - math.sqrt(1 - ab[k]) * eps) / math.sqrt(ab[k])
        mean = math.sqrt(abp) * beta / (1 - ab[k]) * x0 + math.sqrt(1 - beta) * (1 - abp) / (1 - ab[k]) * x
        if k == 0:
            x = mean
            break
        beta_tilde = beta * (1 - abp) / (1 - ab[k])
        if variance == "learned":
            frac = (out[:, C:] + 1) / 2
            var = torch.exp(frac * math.log(beta) + (1 - frac) * math.log(beta_tilde))
        else:
            var = torch.full_like(x, beta if variance == "beta" else beta_tilde)
        x = mean + var.sqrt() * randn(stack, shape).double()
    return x.clamp(-1, 1)


@pytest.mark.parametrize("variance", ["learned", "beta", "beta_tilde"])
def test_respaced_ddpm_sampling_equals_a_float64_loop_per_seed(variance):
    learned = variance == "learned"
    cfg = DDPMConfig(learn_sigma=learned, fixed_variance="beta" if variance == "beta" else "beta_tilde",
                     sampler="ddpm", respace="25", cfg_scale=3.0, cfg_schedule="power_cosine", cfg_channels=3)
    m = DDPM(cfg, 10)
    net = net_2c if learned else net_c
    seeds, shape, labels = [3, 7, 11], (3, 4, 4, 4), torch.tensor([2, 5, 9])
    stack = SeedStack(seeds)
    noise = randn(stack, shape)  # as Task.generate draws it
    ours = m.sample(net, noise, {"label": labels}, stack)
    kept = [round(j * 999 / 24) for j in range(25)]
    ref = manual_ddpm(net, seeds, shape, labels, kept, variance, 3.0, 4.0, 3)
    assert inside(ours)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=2e-4)
    # the ramp and the channel choice matter: constant guidance of every channel gives other samples
    plain = m.sample(net, randn(SeedStack(seeds), shape), {"label": labels}, SeedStack(seeds), cfg_schedule="constant",
                     cfg_channels=4)
    assert (plain - ours).abs().max() > 0.05
    # per seed: a sample does not depend on the batch it is drawn in
    one = SeedStack([7])
    alone = m.sample(net, randn(one, (1, 4, 4, 4)), {"label": labels[1:2]}, one)
    torch.testing.assert_close(alone, ours[1:2], rtol=1e-6, atol=1e-6)


def test_full_chain_ddpm_sampling_is_unchanged():
    """respace unset: all T steps with beta_tilde, the float64 loop with every timestep kept."""
    m = DDPM(DDPMConfig(sampler="ddpm", cfg_scale=2.0), 10)
    seeds, shape, labels = [0, 1], (2, 1, 3, 3), torch.tensor([3, 8])
    stack = SeedStack(seeds)
    ours = m.sample(net_c, randn(stack, shape), {"label": labels}, stack)
    ref = manual_ddpm_constant(net_c, seeds, shape, labels, 2.0)
    assert inside(ours)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=2e-4)


def manual_ddpm_constant(net, seeds, shape, labels, cfg, null=10):
    b, ab = schedule64()
    stack = SeedStack(seeds)
    x = randn(stack, shape).double()
    for t in range(T - 1, -1, -1):
        tt = torch.full((len(seeds),), t)
        o_c, o_u = net(x, tt, labels), net(x, tt, torch.full_like(labels, null))
        eps = o_u + cfg * (o_c - o_u)
        abp = ab[t - 1] if t > 0 else 1.0
        x0 = (x - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
        mean = math.sqrt(abp) * b[t] / (1 - ab[t]) * x0 + math.sqrt(1 - b[t]) * (1 - abp) / (1 - ab[t]) * x
        if t == 0:
            return mean.clamp(-1, 1)
        x = mean + math.sqrt(b[t] * (1 - abp) / (1 - ab[t])) * randn(stack, shape).double()


# ---- settings -------------------------------------------------------------------------------------
def test_settings_nfe_and_validation():
    import inspect

    m = DDPM(DDPMConfig(), 10)
    assert m.default_settings() == {"steps": 50, "cfg_scale": 1.0}  # what a default run records, as before
    params = inspect.signature(DDPM.sample).parameters
    assert all(s in params for s in DDPM.sampler_settings)
    assert m.nfe() == 50 and m.nfe(steps=20) == 20
    assert m.nfe(sampler="ddpm") == T and m.nfe(sampler="ddpm", respace="250") == 250
    assert m.nfe(respace="ddim50") == 50 and m.nfe(sampler="ddpm", respace=100) == 100
    diffit = DDPM(DDPMConfig(learn_sigma=True, sampler="ddpm", respace="250", cfg_scale=4.4,
                             cfg_schedule="power_cosine", cfg_channels=3), 1000)
    d = diffit.default_settings()
    assert d == {"steps": 50, "cfg_scale": 4.4, "respace": "250", "cfg_schedule": "power_cosine", "cfg_power": 4.0,
                 "cfg_channels": 3}
    assert set(d) <= set(DDPM.sampler_settings) and diffit.nfe(**d) == 250
    with pytest.raises(TypeError, match="unknown sampler settings"):
        m.nfe(respacing="250")
    for bad, match in [(dict(respace="ddim600"), "method.respace"), (dict(cfg_channels=0), "cfg_channels"),
                       (dict(cfg_power=0.0), "cfg_power"), (dict(vlb_weight=-1.0), "vlb_weight")]:
        with pytest.raises(ConfigError, match=match):
            DDPMConfig(**bad).validate()
    DDPMConfig(respace="250", learn_sigma=True, cfg_schedule="power_cosine", cfg_channels=3).validate()
