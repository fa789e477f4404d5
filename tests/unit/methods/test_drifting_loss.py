"""The drifting loss (raygen.methods.drifting) against a float64 per-problem transcription of the spec
(docs/methods/drifting.md, The drift and Couplings), plus its behaviour: marginals, drift direction, antisymmetry,
chunking, gradients, a 2-D toy, config errors and the w = 0 / constant-feature corner cases."""
import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from raygen.config import ConfigError, from_dict
from raygen.methods import drifting as D
from raygen.methods.drifting import (DriftConfig, cfg_weight, check_feasible, coupling, drift, drift_field,
                                     drifting_loss, sample_omega)

@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: with a shared, loaded machine two intra-op threads only contend (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- float64 reference: one problem at a time, straight from the formulas -------------------------------


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def _ref_sinkhorn(logits, c, iters):
    """Plain (not log-domain) Sinkhorn in float64: u = r / (K v), v = c / (K^T u), from v = 1."""
    K = np.exp(logits)
    r = np.full(K.shape[0], 1.0 / K.shape[0])
    v = np.ones(K.shape[1])
    for _ in range(iters):
        u = r / (K @ v)
        v = c / (K.T @ u)
    return u[:, None] * K * v[None, :]


def ref_coupling(l, wt, cfg):
    """l [N, T], wt [T] -> A [N, T] with the weights applied."""
    N, T = l.shape
    if cfg.coupling == "sinkhorn" and cfg.sinkhorn_marginal == "weighted_cols":
        c = np.maximum(wt, 1e-6)
        return _ref_sinkhorn(l, c / c.sum(), cfg.sinkhorn_iters)
    valid = np.ones(T, bool)
    if cfg.cfg_weighting == "logit":  # + log w on the columns, w = 0 columns dropped
        valid = wt > 0
        l = l.copy()
        l[:, valid] += np.log(wt[valid])
    A = np.zeros((N, T))
    if cfg.coupling == "sinkhorn":
        A[:, valid] = _ref_sinkhorn(l[:, valid], np.full(valid.sum(), 1.0 / T), cfg.sinkhorn_iters)
    else:
        row = np.stack([_softmax(l[i, valid]) for i in range(N)])  # softmax over targets
        if cfg.coupling == "row":
            A[:, valid] = row
        else:
            col = np.stack([_softmax(l[:, t]) for t in np.flatnonzero(valid)], 1)  # softmax over generated
            A[:, valid] = np.sqrt(np.maximum(row * col, cfg.affinity_floor))
    if cfg.cfg_weighting == "after_norm":
        A = A * wt[None, :]
    return A


def ref_drift(gen, pos, unc, w, cfg):
    """(V [B, G, C], sigma) in float64, looping over problems."""
    gen, pos, unc, w = (np.asarray(a, np.float64) for a in (gen, pos, unc, w))
    B, G, C = gen.shape
    U, P = unc.shape[1], pos.shape[1]
    tg = np.concatenate([gen, unc, pos], 1)
    om = np.concatenate([np.ones((B, G)), np.repeat(w[:, None], U, 1), np.ones((B, P))], 1)
    d = np.zeros((B, G, G + U + P))
    for b, i, t in itertools.product(range(B), range(G), range(G + U + P)):
        sq = ((gen[b, i] - tg[b, t]) ** 2).sum()
        d[b, i, t] = math.sqrt(max(sq, 1e-8)) if cfg.metric == "l2" else sq
    s = (d * om[:, None, :]).mean() / om.mean()  # over the whole batch
    sigma = max(math.sqrt(s / C) if cfg.metric == "l2_sq" else s / math.sqrt(C), 1e-3)
    dn = d / max(s, 1e-3)
    for b in range(B):
        dn[b, :, :G] += cfg.self_mask * np.eye(G)
    V = np.zeros((B, G, C))
    for R in cfg.temperatures:
        VR = np.zeros((B, G, C))
        for b in range(B):
            l, th = -dn[b] / R, tg[b] / sigma
            if cfg.drift_form == "alg2_joint":
                A = ref_coupling(l, om[b], cfg)
                An, Ap = A[:, : G + U], A[:, G + U:]
                Wp = Ap * An.sum(1, keepdims=True)
                Wn = An * Ap.sum(1, keepdims=True)
                VR[b] = Wp @ th[G + U:] - Wn @ th[: G + U]
            else:
                An = ref_coupling(l[:, : G + U], om[b, : G + U], cfg)
                Ap = ref_coupling(l[:, G + U:], om[b, G + U:], cfg)
                VR[b] = (Ap / Ap.sum(1, keepdims=True)) @ th[G + U:] - (An / An.sum(1, keepdims=True)) @ th[: G + U]
        V += VR / math.sqrt(max((VR**2).mean(), 1e-8))  # theta_R over the whole batch
    return V, sigma


# ---- inputs -------------------------------------------------------------------------------------------

NC, L, G, P, U, C = 3, 4, 8, 6, 4, 5


def problems(omega, seed=0, nc=NC, locs=L, g=G, p=P, u=U, c=C):
    """B = nc * locs problems; classes have different omega (w repeated over the locations)."""
    gen_ = torch.Generator().manual_seed(seed)
    B = nc * locs
    gen = torch.randn(B, g, c, generator=gen_)
    pos = 0.3 + torch.randn(B, p, c, generator=gen_)
    unc = -0.2 + 1.2 * torch.randn(B, u, c, generator=gen_)
    w = cfg_weight(torch.tensor(omega, dtype=torch.float32), g, u).repeat_interleave(locs)
    return gen, pos, unc, w


def all_configs():
    out = []
    for metric, form in itertools.product(("l2", "l2_sq"), ("alg2_joint", "split")):
        for pf, cw in itertools.product(("log", "kernel"), ("after_norm", "logit")):
            out.append(dict(metric=metric, drift_form=form, coupling="partial_two_sided", partial_form=pf,
                            cfg_weighting=cw))
        for cw in ("after_norm", "logit"):
            out.append(dict(metric=metric, drift_form=form, coupling="row", cfg_weighting=cw))
            out.append(dict(metric=metric, drift_form=form, coupling="sinkhorn", sinkhorn_marginal="none",
                            cfg_weighting=cw))
        out.append(dict(metric=metric, drift_form=form, coupling="sinkhorn", sinkhorn_marginal="weighted_cols"))
    return out


CONFIGS = all_configs()


def cid(kw):
    return "-".join(str(v) for v in kw.values())


# ---- equals the reference ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw", CONFIGS, ids=cid)
def test_batched_drift_matches_float64_reference(kw):
    cfg = from_dict(DriftConfig, kw)
    # one class at omega = 1 (w = 0) except where that is infeasible (sinkhorn + uniform marginal)
    omega = [1.3, 1.7, 3.2] if kw.get("sinkhorn_marginal") == "none" else [1.0, 1.7, 3.2]
    gen, pos, unc, w = problems(omega)
    V, sigma = drift(gen, pos, unc, w, cfg, return_scale=True)
    Vref, sref = ref_drift(gen, pos, unc, w, cfg)
    assert V.dtype == torch.float32 and V.shape == gen.shape
    assert float(sigma) == pytest.approx(sref, rel=1e-5)
    Vref = torch.from_numpy(Vref).float()
    torch.testing.assert_close(V, Vref, rtol=1e-4, atol=1e-4 * float(Vref.abs().max()))


def test_partial_forms_agree():
    """log-space and exp/sum partial_two_sided couplings give the same A, also with w = 0 logit columns."""
    gen, pos, unc, w = problems([1.0, 1.5, 3.0])
    tgt = torch.cat([gen, unc, pos], 1)
    d = D.pairwise_distance(gen, tgt)
    col_w = torch.cat([torch.ones(12, G), w[:, None].expand(12, U), torch.ones(12, P)], 1)
    for cw, R in itertools.product(("after_norm", "logit"), (0.02, 0.2)):
        logits = -d / d.mean() / R
        a_log = coupling(logits, col_w, DriftConfig(cfg_weighting=cw, partial_form="log"))
        a_ker = coupling(logits, col_w, DriftConfig(cfg_weighting=cw, partial_form="kernel"))
        torch.testing.assert_close(a_log, a_ker, rtol=1e-5, atol=1e-6)
        assert (a_log > 0).any(2).all()


def test_sinkhorn_meets_marginals():
    gen, pos, unc, w = problems([1.2, 2.0, 3.5])
    tgt = torch.cat([gen, unc, pos], 1)
    d = D.pairwise_distance(gen, tgt)
    d = d / d.mean()
    d[:, :, :G] += 100 * torch.eye(G)  # self-mask, as in `drift`
    col_w = torch.cat([torch.ones(12, G), w[:, None].expand(12, U), torch.ones(12, P)], 1)
    T = G + U + P
    # Sinkhorn converges slowly at low temperature: the default 20 iterations suffice only at R = 0.2
    for R, iters in ((0.02, 1000), (0.05, 300), (0.2, 20)):
        logits = -d / R
        pi = coupling(logits, col_w, DriftConfig(coupling="sinkhorn", sinkhorn_marginal="weighted_cols",
                                                 sinkhorn_iters=iters))
        c = col_w / col_w.sum(1, keepdim=True)
        torch.testing.assert_close(pi.sum(2), torch.full((12, G), 1 / G), rtol=1e-4, atol=0)
        torch.testing.assert_close(pi.sum(1), c, rtol=1e-4, atol=0)
        pi = coupling(logits, col_w, DriftConfig(coupling="sinkhorn", sinkhorn_marginal="none", cfg_weighting="logit",
                                                 sinkhorn_iters=iters))
        torch.testing.assert_close(pi.sum(2), torch.full((12, G), 1 / G), rtol=1e-4, atol=0)
        torch.testing.assert_close(pi.sum(1), torch.full((12, T), 1 / T), rtol=1e-4, atol=0)
        # the uncond columns got their CFG weight: more mass per column where w is larger
        assert not torch.allclose(pi[:, :, G:G + U].sum(1), c[:, G:G + U])


# ---- behaviour ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [2, 16, 64])
def test_drift_vanishes_at_equilibrium_and_follows_a_shift(channels):
    B, g, p, u = 64, 64, 64, 16
    rng = torch.Generator().manual_seed(channels)
    gen = torch.randn(B, g, channels, generator=rng)
    pos = torch.randn(B, p, channels, generator=rng)
    unc = torch.randn(B, u, channels, generator=rng)
    w = cfg_weight(sample_omega(B, rng), g, u)
    cfg = DriftConfig()
    still = drift(gen, pos, unc, w, cfg).mean((0, 1))  # mean over all 4096 generated samples, [C]
    shifted = pos.clone()
    shifted[..., 0] += 1.0  # positives shifted by one std along channel 0
    moved = drift(gen, shifted, unc, w, cfg).mean((0, 1))
    assert moved[0] > 10 * still.abs().max(), (moved[0], still.abs().max())
    assert moved[0] > 10 * moved[1:].abs().max()  # along the shift, not across it


@pytest.mark.parametrize("kw", [c for c in CONFIGS if c["metric"] == "l2" and c.get("partial_form") != "kernel"],
                         ids=cid)
def test_swapping_positives_and_negatives_flips_the_drift(kw):
    """V = P+ T+ - P- T- (split) and W+ T+ - W- T- (alg2) are antisymmetric in the two blocks."""
    cfg = DriftConfig(**kw)
    gen, pos, unc, w = problems([1.3, 1.7, 3.2])
    tgt = torch.cat([gen, unc, pos], 1)
    col_w = torch.cat([torch.ones(12, G), w[:, None].expand(12, U), torch.ones(12, P)], 1)
    d = D.pairwise_distance(gen, tgt) / 3.0
    d[:, :, :G] += 100 * torch.eye(G)
    n = G + U
    v = drift_field(-d / 0.05, tgt, col_w, n, cfg)
    perm = torch.cat([torch.arange(n, n + P), torch.arange(n)])  # [positives | negatives]
    v_swapped = drift_field(-d[..., perm] / 0.05, tgt[:, perm], col_w[:, perm], P, cfg)
    assert v.abs().max() > 1e-3
    torch.testing.assert_close(v_swapped, -v, rtol=1e-4, atol=1e-5 * float(v.abs().max()))


@pytest.mark.parametrize("kw", [{}, dict(coupling="sinkhorn", drift_form="split", metric="l2_sq")], ids=cid)
def test_chunk_size_does_not_change_the_drift(kw, monkeypatch):
    gen, pos, unc, w = problems([1.0, 2.0, 3.0])
    one, sig = drift(gen, pos, unc, w, DriftConfig(**kw), return_scale=True)
    for chunk in (1, 5):
        v, s = drift(gen, pos, unc, w, DriftConfig(chunk_size=chunk, **kw), return_scale=True)
        torch.testing.assert_close(v, one, rtol=1e-4, atol=1e-5 * float(one.abs().max()))  # fp32 summation order
        torch.testing.assert_close(s, sig, rtol=1e-6, atol=0)
    for name in ("AUTO_CHUNK_BYTES", "AUTO_CHUNK_BYTES_CPU", "KEEP_DISTANCE_BYTES"):
        monkeypatch.setattr(D, name, 1)  # automatic chunking: one problem per chunk, distances recomputed
    assert D._chunk(DriftConfig(), 12, G, G + U + P, C, gen.device) == 1
    torch.testing.assert_close(drift(gen, pos, unc, w, DriftConfig(**kw)), one, rtol=1e-4,
                               atol=1e-5 * float(one.abs().max()))


def test_loss_gradient_reaches_only_generated_features():
    nc, g, p, u = 3, 6, 5, 4
    rng = torch.Generator().manual_seed(1)
    shapes = {"map": (4, 7), "mean": (1, 3)}  # key -> (L, C)
    gen = {k: torch.randn(nc, g, l, c, generator=rng, requires_grad=True) for k, (l, c) in shapes.items()}
    pos = {k: torch.randn(nc, p, l, c, generator=rng, requires_grad=True) for k, (l, c) in shapes.items()}
    unc = {k: torch.randn(nc, u, l, c, generator=rng, requires_grad=True) for k, (l, c) in shapes.items()}
    omega = torch.tensor([1.0, 2.0, 3.5])
    cfg = DriftConfig()
    loss, stats = drifting_loss(gen, pos, unc, omega, cfg)
    loss.backward()
    expected_loss = 0.0
    for k, (l, c) in shapes.items():
        assert pos[k].grad is None and unc[k].grad is None
        as_problems = lambda f: f.detach().transpose(1, 2).reshape(nc * l, f.shape[1], c)  # noqa: E731
        w = cfg_weight(omega, g, u).repeat_interleave(l)
        V, sigma = drift(as_problems(gen[k]), as_problems(pos[k]), as_problems(unc[k]), w, cfg, return_scale=True)
        V = V.view(nc, l, g, c).transpose(1, 2)
        N = gen[k].numel()
        # sigma and V are constants: d/dx mean((x/sigma - sg(x/sigma + V))^2) = -2 V / (N sigma)
        torch.testing.assert_close(gen[k].grad, -2 * V / (N * sigma), rtol=1e-5, atol=1e-9)
        assert float(stats[f"{k}/sigma"]) == pytest.approx(float(sigma))
        expected_loss += float(V.square().mean())
    assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-5)
    floats = D.stats_to_floats(stats)
    assert floats["loss"] == pytest.approx(float(loss.detach())) and "map/theta_0.02" in floats


def test_mixture_of_gaussians_toy():
    """Learnable 2-D points trained with the loss (features = the points: one key, L = 1) land on the modes
    of a 6-mode mixture (mode std 0.05 on a circle of radius 3). The points start spread over the modes'
    region: started in a small blob far inside the circle, the official affinity floor (every pair gets
    A >= 1e-3) pulls them toward the positives' centroid instead (see DriftConfig.affinity_floor)."""
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(0)
    angles = torch.arange(6) * (2 * math.pi / 6)
    modes = 3.0 * torch.stack([angles.cos(), angles.sin()], 1)
    n, steps = 128, 300
    x = (2.0 * torch.randn(n, 2, generator=rng)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    cfg = DriftConfig()

    def to_modes():
        return torch.cdist(x.detach(), modes).min(1).values

    start = float(to_modes().mean())
    for _ in range(steps):
        pos = modes[torch.randint(0, 6, (n,), generator=rng)] + 0.05 * torch.randn(n, 2, generator=rng)
        loss, _ = drifting_loss({"x": x.view(1, n, 1, 2)}, {"x": pos.view(1, n, 1, 2)}, None, torch.ones(1), cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    end = to_modes()
    assert float(end.mean()) < start / 5, (start, float(end.mean()))
    assert float(end.median()) < 0.1  # the typical point sits inside a mode (data: 0.05 sqrt(pi/2) = 0.063)
    # every mode is covered, not just the nearest ones
    assert torch.bincount(torch.cdist(x.detach(), modes).argmin(1), minlength=6).min() >= 15


# ---- config, CFG helpers, corner cases -----------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"temperatures": []}, {"temperatures": [0.02, 0.0]}, {"temperatures": [-0.1]}, {"sinkhorn_iters": 0},
    {"coupling": "ot"}, {"metric": "l1"}, {"affinity_floor": 1.5}, {"chunk_size": -1}, {"self_mask": -1.0},
    {"coupling": "sinkhorn", "partial_form": "kernel"},
    {"coupling": "sinkhorn", "sinkhorn_marginal": "weighted_cols", "cfg_weighting": "logit"},
])
def test_bad_config_values_raise(bad):
    with pytest.raises(ConfigError, match=r"drift\.\w+"):
        from_dict(DriftConfig, bad, prefix="drift")  # from YAML / CLI
    with pytest.raises(ConfigError, match=r"drift\.\w+"):
        DriftConfig(**bad).validate()  # built in code


def test_sinkhorn_uniform_marginal_is_infeasible_at_omega_one():
    cfg = from_dict(DriftConfig, {"coupling": "sinkhorn", "sinkhorn_marginal": "none", "temperatures": "0.05,0.2"})
    assert cfg.temperatures == [0.05, 0.2]
    with pytest.raises(ConfigError, match="infeasible"):
        check_feasible(cfg, 1.0)
    with pytest.raises(ConfigError, match="infeasible"):
        cfg.validate(omega_min=1.0)
    check_feasible(cfg, 1.5)
    check_feasible(dataclasses.replace(cfg, sinkhorn_marginal="weighted_cols"), 1.0)
    gen, pos, unc, w = problems([1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="infeasible"):  # also caught at run time
        drift(gen, pos, unc, w, cfg)


def test_cfg_weight_and_omega_sampler():
    assert cfg_weight(3.0, 64, 16) == pytest.approx(2 * 63 / 16)
    w = cfg_weight(3.0, 64, 16)
    assert 16 * w / (63 + 16 * w) == pytest.approx((3.0 - 1) / 3.0)  # uncond mass fraction (omega-1)/omega
    state = torch.random.get_rng_state()
    a = sample_omega(200_000, torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never used
    assert torch.equal(a, sample_omega(200_000, torch.Generator().manual_seed(3)))
    assert a.min() >= 1.0 and a.max() <= 4.0
    # E[omega] under p ∝ omega^-3 on [1, 4] is (1 - 1/4) / ((1 - 1/16) / 2) = 1.6
    assert float(a.double().mean()) == pytest.approx(1.6, abs=5e-3)
    assert float((a < 2).double().mean()) == pytest.approx((1 - 1 / 4) / (1 - 1 / 16), abs=5e-3)  # CDF at 2
    b = sample_omega(10_000, torch.Generator().manual_seed(3), no_cfg_frac=0.5)
    assert float((b == 1.0).double().mean()) == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("kw", [c for c in CONFIGS if c.get("sinkhorn_marginal") != "none"], ids=cid)
def test_no_nan_at_omega_one_or_constant_features(kw):
    cfg = DriftConfig(**kw)
    gen, pos, unc, w = problems([1.0, 1.0, 1.0])
    assert (w == 0).all()
    v = drift(gen, pos, unc, w, cfg)
    assert torch.isfinite(v).all() and v.abs().max() > 0
    const = torch.full((2, 3, 1, 4), 0.7, requires_grad=True)
    feats = lambda n: {"k": torch.full((2, n, 1, 4), 0.7)}  # noqa: E731
    loss, _ = drifting_loss({"k": const}, feats(5), feats(2), torch.tensor([1.0, 2.5]), cfg)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(const.grad).all()
