"""DDPM/DDIM math against diffusers' schedulers (a peer implementation) on the same eps predictions."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from raygen.config import ConfigError
from raygen.methods.ddpm import DDPM, DDPMConfig, ddim_timesteps

SCHEDULES = [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]


def fake_eps(x, t):
    # a deterministic, t-dependent stand-in for a network's epsilon prediction
    return torch.tanh(x * 0.7 + 0.001 * t)


@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_alpha_bar_matches_diffusers(ours, theirs):
    m = DDPM(DDPMConfig(schedule=ours), 10)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(m.alpha_bar64, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ours,theirs", SCHEDULES)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers(ours, theirs, spacing, eta):
    steps = 20
    m = DDPM(DDPMConfig(schedule=ours, spacing=spacing, eta=eta), 10)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule=theirs, clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing=spacing, steps_offset=0)
    sched.set_timesteps(steps)
    ts = ddim_timesteps(1000, steps, spacing)
    assert ts == sched.timesteps.tolist()
    x_ours = x_ref = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        z = torch.randn(x_ours.shape, generator=torch.Generator().manual_seed(100 + i))
        x_ours = m.ddim_step(x_ours, fake_eps(x_ours, t), t, t_prev, eta=eta, noise=z)
        x_ref = sched.step(fake_eps(x_ref, t), t, x_ref, eta=eta,
                           generator=torch.Generator().manual_seed(100 + i)).prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_ddpm_posterior_matches_diffusers(ours, theirs):
    m = DDPM(DDPMConfig(schedule=ours), 10)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, clip_sample=False,
                          variance_type="fixed_small")
    sched.set_timesteps(1000)
    # diffusers keeps its schedule in float32, whose rounding is amplified by 1/sqrt(alpha_bar_T) ~ 160 at
    # t = T-1; run it in float64 so the comparison measures the posterior math, not float32 noise
    for name in ("betas", "alphas", "alphas_cumprod"):
        setattr(sched, name, getattr(sched, name).double())
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in [999, 500, 37, 1, 0]:
        # the same draw diffusers makes for its float64 step
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64).float()
        ours_out = m.ddpm_step(x, fake_eps(x, t), t, noise=z)
        ref = sched.step(fake_eps(x, t).double(), t, x.double(), generator=torch.Generator().manual_seed(t))
        ref = ref.prev_sample.float()
        torch.testing.assert_close(ours_out, ref, rtol=1e-5, atol=1e-5)


def test_schedule_that_never_reaches_noise_is_rejected_with_the_fix():
    # a T=100 linear schedule with the T=1000 betas ends at alpha_bar_T = 0.364 (docs/methods/ddpm.md)
    with pytest.raises(ConfigError, match=r"num_timesteps=100.*0\.364.*short_schedule=rescale"):
        DDPMConfig(num_timesteps=100).validate()
    m = DDPM(DDPMConfig(num_timesteps=100, short_schedule="rescale"), 10)
    assert m.alpha_bar64[-1] < 1e-3
    assert DDPM(DDPMConfig(num_timesteps=100, schedule="cosine"), 10).alpha_bar64[-1] < 1e-3


def test_cfg_combines_conditional_and_unconditional_predictions():
    m = DDPM(DDPMConfig(), num_classes=3)

    def net(x, t, y):  # eps depends on the label so the guidance formula is visible
        return x * 0 + y.view(-1, 1, 1, 1).float()

    x = torch.zeros(2, 1, 2, 2)
    e = m.eps(net, x, 10, torch.tensor([0, 1]), cfg_scale=3.0)
    null = 3.0  # the null class index
    expected = null + 3.0 * (torch.tensor([0.0, 1.0]) - null)
    torch.testing.assert_close(e[:, 0, 0, 0], expected)
