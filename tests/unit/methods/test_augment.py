"""EDM's augmentation pipeline: identity at p = 0, flips exactly as labelled, each geometric op moves
pixels the way its label says (checked on a linear ramp image, where bilinear resampling is exact),
the per-op firing rates, and reproducibility from the generator."""
import math

import numpy as np
import pytest
import torch

from raygen.core.rng import SeedStack
from raygen.methods.augment import AUGMENT_DIM, AugmentPipe, augment_batch

OFF = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)


def only(op, **extra):
    return AugmentPipe(p=1.0, **{**OFF, op: 1, **extra})


def test_p0_is_the_identity_with_zero_labels():
    x = torch.randn(5, 3, 8, 8)
    y, labels = augment_batch(x, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(y, x)
    assert labels.shape == (5, AUGMENT_DIM) == (5, 9) and labels.dtype == torch.float32 and not labels.any()


@pytest.mark.parametrize("op,slot,dim", [("xflip", 0, 3), ("yflip", 1, 2)])
def test_flip_iff_labelled(op, slot, dim):
    x = torch.randn(64, 2, 5, 7)
    y, labels = only(op)(x, torch.Generator().manual_seed(1))
    flipped = labels[:, slot] == 1
    assert set(labels[:, slot].tolist()) == {0.0, 1.0} and 10 < flipped.sum() < 54  # a fair coin
    assert torch.equal(y[flipped], x[flipped].flip(dim)) and torch.equal(y[~flipped], x[~flipped])
    others = [i for i in range(9) if i != slot]
    assert not labels[:, others].any()


def test_firing_rates_follow_edm_strengths():
    """EDM's strengths: xflip 1e8 (a coin flip whenever p > 0), the others fire with probability p."""
    n, p = 20_000, 0.2
    _, labels = augment_batch(torch.zeros(n, 1, 4, 4), p, torch.Generator().manual_seed(2))
    se = lambda q: 4 * math.sqrt(q * (1 - q) / n)  # noqa: E731
    assert abs((labels[:, 0] == 1).float().mean().item() - 0.5) < se(0.5)
    assert abs((labels[:, 1] == 1).float().mean().item() - p / 2) < se(p / 2)  # fires w.p. p, then a coin
    for slot in (2, 3, 5, 7):  # scale, rotation, aniso, translation
        rate = (labels[:, slot] != 0).float().mean().item()
        assert abs(rate - p) < se(p), slot


# ---- geometry: on f(X, Y) = a X + b Y + c (centred pixel coordinates) bilinear sampling is exact, so
# the output at pixel P must equal f(Q) where Q is the source point the label describes.
H = W = 16


def ramp(n):
    ys, xs = torch.meshgrid(torch.arange(H) - (H - 1) / 2, torch.arange(W) - (W - 1) / 2, indexing="ij")
    return (0.3 * xs - 0.2 * ys + 0.1).expand(n, 1, H, W).clone(), xs.double().numpy(), ys.double().numpy()


def source_points(op, lab, X, Y):
    """Q = where output pixel (X, Y) reads the input, from the label's documented meaning."""
    if op == "scale":  # content enlarged by s = 2^(0.2 z)
        s = 2 ** (0.2 * lab[2])
        return X / s, Y / s
    if op == "rotate_frac":  # angle a with labels (cos a - 1, sin a): Q = R(a) P
        a = math.atan2(lab[4], lab[3] + 1)
        return math.cos(a) * X - math.sin(a) * Y, math.sin(a) * X + math.cos(a) * Y
    if op == "aniso":  # axis-aligned stretch by (s, 1/s), s = 2^(0.2 z)
        s = 2 ** (0.2 * lab[5])
        return X / s, Y * s
    # translate_frac: content moved by (t_x W, t_y H) * 0.125 pixels
    return X - lab[7] * W * 0.125, Y - lab[8] * H * 0.125


@pytest.mark.parametrize("op", ["scale", "rotate_frac", "aniso", "translate_frac"])
def test_geometric_op_moves_pixels_as_labelled(op):
    x, X, Y = ramp(12)
    pipe = only(op, aniso_rotate_prob=0.0) if op == "aniso" else only(op)
    y, labels = pipe(x, torch.Generator().manual_seed(3))
    lim = (W - 1) / 2 - 1e-6
    checked = 0
    for k in range(12):
        lab = labels[k].double().numpy()
        qx, qy = source_points(op, lab, X, Y)
        inside = (np.abs(qx) <= lim) & (np.abs(qy) <= lim)
        want = 0.3 * qx - 0.2 * qy + 0.1
        np.testing.assert_allclose(y[k, 0].double().numpy()[inside], want[inside], atol=2e-5)
        checked += inside.sum()
    assert checked > 12 * H * W // 4
    assert labels.abs().sum(0).nonzero().flatten().tolist() == {"scale": [2], "rotate_frac": [3, 4], "aniso": [5],
                                                                "translate_frac": [7, 8]}[op]


def test_reflection_padding_keeps_values_in_range():
    x = torch.rand(32, 3, 8, 8) * 2 - 1
    y, labels = augment_batch(x, 1.0, torch.Generator().manual_seed(4))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6  # bilinear + reflection never extrapolates
    moved = (labels[:, 2:] != 0).any(1)
    assert moved.all() and not torch.allclose(y, x)


def test_reproducible_and_per_seed():
    x = torch.randn(4, 3, 8, 8)
    a = augment_batch(x, 0.5, torch.Generator().manual_seed(7))
    b = augment_batch(x, 0.5, torch.Generator().manual_seed(7))
    c = augment_batch(x, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    seeds = [3, 1, 4, 1]
    batch = augment_batch(x, 0.7, SeedStack(seeds))
    for k in (0, 2):
        alone = augment_batch(x[k:k + 1], 0.7, SeedStack([seeds[k]]))
        torch.testing.assert_close(alone[1][0], batch[1][k], rtol=0, atol=0)
        torch.testing.assert_close(alone[0][0], batch[0][k], rtol=1e-6, atol=1e-6)
