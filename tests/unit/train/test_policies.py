"""The loop's policies against closed forms: EMA as a decay or as an EDM half-life, Adam vs AdamW, the
two loss reductions, and replacing non-finite gradients."""
import math

import pytest
import torch

from raygen.config import ConfigError
from raygen.train.config import OptimConfig, TrainConfig
from raygen.train.state import EMA, build_optimizer, ema_decay, reduce_loss, sanitize_grads


def test_ema_decay_with_warmup_is_min_of_decay_and_the_warmup_ramp():
    cfg = TrainConfig(ema_decay=0.999, ema_warmup=True)
    for n in (0, 5, 100, 10**6):
        assert ema_decay(cfg, n) == pytest.approx(min(0.999, (1 + n) / (10 + n)))
    assert ema_decay(TrainConfig(ema_decay=0.99, ema_warmup=False), 0) == 0.99


def test_ema_halflife_in_images_matches_edm():
    """beta = 0.5 ** (B / h) with h = min(halflife_kimg * 1000, rampup * images seen) (arXiv 2206.00364 App. F)."""
    cfg = TrainConfig(batch_size=512, ema_halflife_kimg=500, ema_rampup_ratio=0.05)
    for n in (0, 10, 10_000, 10**6):
        seen = (n + 1) * 512
        h = min(500_000, 0.05 * seen)
        assert ema_decay(cfg, n) == pytest.approx(0.5 ** (512 / h))
    no_ramp = TrainConfig(batch_size=512, ema_halflife_kimg=500, ema_rampup_ratio=None)
    assert ema_decay(no_ramp, 0) == pytest.approx(0.5 ** (512 / 500_000))
    # after `halflife` images without ramp-up, the weight of the start has halved
    steps = 500_000 / 512
    assert ema_decay(no_ramp, 0) ** steps == pytest.approx(0.5)


def test_ema_update_is_the_lerp():
    net = torch.nn.Linear(2, 1)
    ema = EMA(net, TrainConfig(ema_decay=0.9, ema_warmup=False))
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, 0)
    torch.testing.assert_close(ema.state_dict()["weight"], 0.9 * w0 + 0.1 * (w0 + 1))


def test_optimizer_kinds():
    p = [torch.nn.Parameter(torch.ones(3))]
    assert type(build_optimizer(p, OptimConfig(kind="adamw", weight_decay=0.1))) is torch.optim.AdamW
    adam = build_optimizer(p, OptimConfig(kind="adam", betas=(0.9, 0.99), eps=1e-8))
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["weight_decay"] == 0
    with pytest.raises(ConfigError, match="optim.kind=adam takes no weight decay"):
        OptimConfig(kind="adam", weight_decay=0.1).validate()


def test_loss_reductions():
    loss = torch.arange(24, dtype=torch.float32).reshape(4, 2, 3)
    assert reduce_loss(loss, "mean") == loss.mean()
    assert reduce_loss(loss, "sum") == loss.sum() / 4  # EDM: per-sample sum, mean over the batch
    scalar = torch.tensor(2.5)
    assert reduce_loss(scalar, "sum") == 2.5 and reduce_loss(scalar, "mean") == 2.5


def test_nan_to_num_gradients():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    sanitize_grads([p])
    assert torch.isfinite(p.grad).all() and p.grad[0] == 1 and p.grad[1] == 0
    assert p.grad[2] > 0 > p.grad[3]
