"""Per-item image transforms: PIL image in, float32 HWC RGB in [0, 1] out.

Every source (JPEG trees, zips, NPY slices, embedded arrays) hands its items to `apply`, so the
colour conversion and the crop are the same code for all of them. The crops follow the reference
implementations exactly (ADM's `center_crop_arr`, torchvision's `RandomResizedCrop`) because FID
and latent caches are only comparable across papers when the pre-processing is identical.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from raygen.config import ConfigError

__all__ = [
    "ItemError",
    "TransformConfig",
    "apply",
    "center_crop_adm",
    "hflip",
    "random_resized_crop",
    "resize_center_crop",
    "to_array",
    "to_rgb",
]


class ItemError(Exception):
    """One input item cannot be used; `str(e)` is the human reason (e.g. "zero-byte file").

    Raised per item so that ingest can skip (and report) the item instead of failing a whole run.
    """


# --------------------------------------------------------------------------- colour


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Transparent pixels become white, as a viewer shows them; dropping alpha would expose
    whatever colour the encoder left under alpha=0 (often black or garbage)."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _wide_gray_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit grayscale scaled by its bit depth into 0..255.

    PIL's own convert clips (every value above 255 becomes white). I;16* is 16-bit. Mode "I" is
    32-bit storage that PIL also uses for 16-bit PNG/TIFF, so values that fit in 0..65535 are taken
    as 16-bit, anything else as signed 32-bit with negatives clipped to 0.
    """
    a = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16") or (a.size and a.min() >= 0 and a.max() <= 65535):
        top = 65535.0
    else:
        top = float(2**31 - 1)
    g = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(g[..., None], 3, axis=-1))


def to_rgb(img: Image.Image) -> Image.Image:
    """Mode "RGB" for any PIL mode; mode "F" (float NPY slices in [0, 1]) is returned unchanged
    because converting it would quantise to 8 bits."""
    mode = img.mode
    if mode in ("RGB", "F"):
        return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img)
    if mode == "I" or mode.startswith("I;16"):
        return _wide_gray_to_rgb(img)
    try:
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    except (ValueError, OSError) as e:
        raise ItemError(f"unsupported image mode {mode!r}: {e}") from e


# --------------------------------------------------------------------------- crops


def center_crop_adm(img: Image.Image, res: int) -> Image.Image:
    """ADM's `center_crop_arr`: halve with BOX while the short side is >= 2*res (cheap, alias-free
    downsampling), then BICUBIC so the short side is res, then the central res x res crop."""
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = res / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    return _center_crop(img, res)


def _center_crop(img: Image.Image, res: int) -> Image.Image:
    w, h = img.size
    top, left = (h - res) // 2, (w - res) // 2
    return img.crop((left, top, left + res, top + res))


def resize_center_crop(img: Image.Image, res: int) -> Image.Image:
    """Bicubic resize of the short side to res in one step (no BOX pre-halving), then centre crop;
    the usual torchvision `Resize(res) + CenterCrop(res)` pipeline."""
    w, h = img.size
    scale = res / min(w, h)
    size = (res, max(res, round(h * scale))) if w <= h else (max(res, round(w * scale)), res)
    return _center_crop(img.resize(size, resample=Image.BICUBIC), res)


def _rrc_box(w: int, h: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`: (top, left, height, width) of the crop."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    in_ratio = w / h  # fallback: the central crop with the aspect ratio clamped into `ratio`
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        cw, ch = int(round(h * max(ratio))), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(img: Image.Image, res: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                        rng: np.random.Generator | None = None) -> Image.Image:
    """torchvision `RandomResizedCrop` (10 tries, then a clamped central crop), bicubic to res x res.
    Draws only from `rng` (required; never the global RNG), so augmentation is reproducible."""
    if rng is None:
        raise ValueError("random_resized_crop needs rng=np.random.Generator (it never uses the global RNG)")
    top, left, ch, cw = _rrc_box(img.size[0], img.size[1], scale, ratio, rng)
    return img.crop((left, top, left + cw, top + ch)).resize((res, res), resample=Image.BICUBIC)


def hflip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.FLIP_LEFT_RIGHT)


def to_array(img: Image.Image) -> np.ndarray:
    """float32 [H,W,3] in [0, 1]. Mode "F" is clipped and replicated to 3 channels (no 8-bit step)."""
    if img.mode == "F":
        a = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float32)), 0.0, 1.0)
        return np.repeat(a[..., None], 3, axis=-1)
    return np.asarray(to_rgb(img), dtype=np.float32) / 255.0


# --------------------------------------------------------------------------- config


@dataclass
class TransformConfig:
    # center_crop_adm: ADM/DiT/EDM-ImageNet pre-processing; resize_center_crop: Resize+CenterCrop;
    # random_resized_crop: MAE-style augmentation; none: native size (e.g. SigLIP's processor resizes)
    kind: Literal["center_crop_adm", "resize_center_crop", "random_resized_crop", "none"] = "center_crop_adm"
    resolution: int = 256
    scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # random_resized_crop area fraction
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])  # random_resized_crop w/h
    hflip_prob: float = 0.0  # random horizontal flip (augmentation)
    allow_upscale: bool = False  # images smaller than the crop are an error unless this is set

    def validate(self):
        if self.resolution < 8:
            raise ConfigError(f"transform.resolution must be >= 8, got {self.resolution}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(
                f"transform.scale must be [lo, hi] with 0 < lo <= hi <= 1, got {self.scale}; e.g. transform.scale=[0.2,1.0]"
            )
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(
                f"transform.ratio must be [lo, hi] with 0 < lo <= hi, got {self.ratio}; e.g. transform.ratio=[0.75,1.3333333]"
            )
        if not 0 <= self.hflip_prob <= 1:
            raise ConfigError(f"transform.hflip_prob must be in [0, 1], got {self.hflip_prob}")


def apply(cfg: TransformConfig, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """One item through the configured pipeline: float32 [H,W,3] in [0, 1].

    Upscaling a small image silently would put blurry images into a dataset that claims a
    resolution, so it is an ItemError unless `allow_upscale` is set.
    """
    img = to_rgb(img)
    if cfg.kind == "none":
        return to_array(img)
    res = cfg.resolution
    w, h = img.size
    if min(w, h) < res and not cfg.allow_upscale:
        raise ItemError(
            f"image is {w}x{h}, smaller than the {res}-pixel crop (set transform.allow_upscale=true to upscale)"
        )
    if cfg.kind == "center_crop_adm":
        img = center_crop_adm(img, res)
    elif cfg.kind == "resize_center_crop":
        img = resize_center_crop(img, res)
    elif cfg.kind == "random_resized_crop":
        img = random_resized_crop(img, res, cfg.scale, cfg.ratio, rng=rng)
    else:
        raise ValueError(f"unknown transform.kind {cfg.kind!r}")
    if cfg.hflip_prob > 0 and rng.random() < cfg.hflip_prob:
        img = hflip(img)
    return to_array(img)
