"""EDM's non-leaking augmentation (Karras et al., arXiv 2206.00364, Appendix C; the geometric ops of
StyleGAN2-ADA, Karras et al., arXiv 2006.06676, Appendix B).

Each training image is transformed by a random flip/scale/rotation/anisotropic-stretch/translation,
and the network is told which transform it got through 9 *augmentation labels* (its `augment_dim`
conditioning input). At sampling time the labels are zero, so the network generates un-augmented
images while training sees more varied ones: the augmentations do not leak into the samples.

Every op fires independently per sample with probability `strength * p`. EDM's strengths are
xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1: the huge xflip strength means
"whenever augmentation is on at all, flip horizontally with probability 1/2" (an x-flip is a natural
symmetry of the data, so it is always worth using); the other ops fire with probability p.

The 9 labels, in order (EDM's layout; a disabled op keeps its slot at zero, so the width is always 9):
    0 xflip (0/1)   1 yflip (0/1)   2 scale: log2(s)/scale_std   3-4 rotation: cos(a) - 1, sin(a)
    5-6 aniso: w cos(r), w sin(r)   7-8 translation: t_x, t_y in units of translate_frac_std * size

How it differs from NVlabs/edm (docs/methods/edm.md, "Augmentation"): flips are exact pixel flips as
there; the geometric ops are one 3x3 matrix per sample applied with a single bilinear `grid_sample`
with reflection padding, where EDM reflect-pads, upsamples 2x with a sym6 wavelet filter, resamples
and downsamples. Ours is cheaper and slightly blurrier; the label semantics are the same.
All random draws go through `raygen.core.rng` with the caller's generator.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raygen.core.rng import rand, randn

AUGMENT_DIM = 9  # the number of augmentation labels (the network's augment_dim)


# ---- 3x3 homogeneous matrices, one per sample [B, 3, 3], acting on centred pixel coordinates ------
def _eye(n: int, device) -> torch.Tensor:
    return torch.eye(3, device=device).expand(n, 3, 3).clone()


def scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    m = _eye(len(sx), sx.device)
    m[:, 0, 0], m[:, 1, 1] = sx, sy
    return m


def rotate2d(angle: torch.Tensor) -> torch.Tensor:
    c, s = angle.cos(), angle.sin()
    m = _eye(len(angle), angle.device)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = c, -s, s, c
    return m


def translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    m = _eye(len(tx), tx.device)
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


class AugmentPipe:
    """EDM's augmentation pipeline: `pipe(images, generator) -> (images, labels [B, 9])`.

    `p` is the overall probability; each `<op>` argument is that op's strength (0 disables it), the
    `*_std`/`*_max` arguments are the magnitudes of StyleGAN2-ADA (arXiv 2006.06676, Appendix B.2)."""

    def __init__(self, p: float, xflip: float = 1e8, yflip: float = 1, scale: float = 1, rotate_frac: float = 1,
                 aniso: float = 1, translate_frac: float = 1, scale_std: float = 0.2, rotate_frac_max: float = 1,
                 aniso_std: float = 0.2, aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125):
        self.p = float(p)
        self.xflip, self.yflip, self.scale, self.rotate_frac = xflip, yflip, scale, rotate_frac
        self.aniso, self.translate_frac = aniso, translate_frac
        self.scale_std, self.rotate_frac_max = scale_std, rotate_frac_max
        self.aniso_std, self.aniso_rotate_prob, self.translate_frac_std = aniso_std, aniso_rotate_prob, translate_frac_std

    def _fires(self, generator, strength: float, n: int, device) -> torch.Tensor:
        """A per-sample Bernoulli(min(strength * p, 1)) gate."""
        return rand(generator, (n,), device) < strength * self.p

    def __call__(self, images: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = images.shape
        dev = images.device
        labels = torch.zeros(n, AUGMENT_DIM, device=dev)
        if self.p <= 0:
            return images, labels
        zero = torch.zeros(n, device=dev)

        # Flips are exact pixel permutations ("pixel blitting"): a fair coin, gated by the op's probability.
        for slot, strength, dim in ((0, self.xflip, 3), (1, self.yflip, 2)):
            if strength > 0:
                coin = (rand(generator, (n,), dev) < 0.5).float()
                flip = torch.where(self._fires(generator, strength, n, dev), coin, zero)
                images = torch.where(flip.view(n, 1, 1, 1) > 0, images.flip(dim), images)
                labels[:, slot] = flip

        # Geometric ops compose into G_inv, which maps an output pixel to where it is read in the input.
        g_inv = _eye(n, dev)
        if self.scale > 0:  # isotropic scaling by s = 2^(scale_std * N(0,1))
            z = torch.where(self._fires(generator, self.scale, n, dev), randn(generator, (n,), dev), zero)
            s = torch.exp2(z * self.scale_std)
            g_inv = g_inv @ scale2d(1 / s, 1 / s)
            labels[:, 2] = z
        if self.rotate_frac > 0:  # rotation by a ~ U(-pi, pi) * rotate_frac_max
            a = (rand(generator, (n,), dev) * 2 - 1) * (math.pi * self.rotate_frac_max)
            a = torch.where(self._fires(generator, self.rotate_frac, n, dev), a, zero)
            g_inv = g_inv @ rotate2d(a)
            labels[:, 3], labels[:, 4] = a.cos() - 1, a.sin()
        if self.aniso > 0:  # stretch by (s, 1/s) along a random axis r (axis-aligned with probability 1/2)
            z = torch.where(self._fires(generator, self.aniso, n, dev), randn(generator, (n,), dev), zero)
            r = (rand(generator, (n,), dev) * 2 - 1) * math.pi
            r = torch.where(rand(generator, (n,), dev) < self.aniso_rotate_prob, r, zero)
            s = torch.exp2(z * self.aniso_std)
            g_inv = g_inv @ rotate2d(-r) @ scale2d(1 / s, s) @ rotate2d(r)
            labels[:, 5], labels[:, 6] = z * r.cos(), z * r.sin()
        if self.translate_frac > 0:  # shift by N(0, (translate_frac_std * size)^2) pixels per axis
            fires = self._fires(generator, self.translate_frac, n, dev)
            tx = torch.where(fires, randn(generator, (n,), dev), zero)
            ty = torch.where(fires, randn(generator, (n,), dev), zero)
            g_inv = g_inv @ translate2d(-tx * (w * self.translate_frac_std), -ty * (h * self.translate_frac_std))
            labels[:, 7], labels[:, 8] = tx, ty

        moved = (labels[:, 2:] != 0).any(dim=1)
        if moved.any():
            images = torch.where(moved.view(n, 1, 1, 1), resample(images, g_inv), images)
        return images, labels


def resample(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Apply per-sample G_inv (centred pixel coordinates) with bilinear sampling and reflection padding.

    With align_corners=False a normalised coordinate u in [-1, 1] is the pixel coordinate u * size/2
    measured from the image centre, so the normalised matrix is D^-1 G_inv D with D = diag(W/2, H/2, 1)."""
    n, _, h, w = images.shape
    d = torch.diag(torch.tensor([w / 2, h / 2, 1.0], device=images.device))
    theta = (torch.linalg.inv(d) @ g_inv.float() @ d)[:, :2, :]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.to(images.dtype)


def augment_batch(images: torch.Tensor, p: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM's augmentation with its default op strengths at overall probability `p`:
    (augmented images, float32 labels [B, 9]). p = 0 returns the images unchanged and zero labels."""
    return AugmentPipe(p)(images, generator)
