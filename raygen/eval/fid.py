"""Fréchet distance between feature distributions (FID) with pluggable feature extractors.

FID values are only comparable when every step matches, so the Inception extractor follows
clean-fid's 'clean' protocol (Parmar et al., arXiv 2104.11222) with the Inception-v3 TorchScript
export used by StyleGAN2-ADA / StyleGAN3 / EDM: samples are quantized to uint8 exactly as a saved
PNG would be, resized to 299x299 with PIL bicubic (antialiased, unlike `F.interpolate`) in float,
and fed as float values in [0, 255]. Reference statistics are saved as npz so the real-data side
is computed once per dataset and extractor.
"""
from __future__ import annotations

import abc
import http.client
import os
import shutil
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from raygen.core.files import atomic_write, cache_dir
from raygen.core.grid import to_uint8

INCEPTION_PT_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_PKL_URL = (
    "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl"
)
INCEPTION_SIZE = 299
# an eigenvalue of an input below -NEGATIVE_TOLERANCE times its largest magnitude is not round-off (not
# even of statistics accumulated in float32): the input is not a covariance
NEGATIVE_TOLERANCE = 1e-4


def _psd_eigh(sigma: np.ndarray, name: str, vectors: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Eigenvalues (and eigenvectors if `vectors`) of a symmetric PSD matrix, those within round-off
    of 0 set to 0.

    Round-off leaves eigenvalues of order d * eps * max|w| with either sign in the null space of a
    singular covariance; their square roots (~1e-7 of the scale each) would add up over the null
    directions, so they are zeroed at the usual numerical-rank tolerance.
    """
    w, v = np.linalg.eigh(sigma) if vectors else (np.linalg.eigvalsh(sigma), None)
    scale = np.abs(w).max(initial=0.0)
    if w.size and w.min() < -NEGATIVE_TOLERANCE * scale:
        raise ValueError(
            f"{name} has eigenvalue {w.min():.3g} (largest magnitude {scale:.3g}); "
            "it is not positive semi-definite, so not a covariance"
        )
    w[w <= len(w) * np.finfo(np.float64).eps * scale] = 0.0
    return w, v


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), computed in float64.

    Only the trace of the square root enters, and sigma1 sigma2 has the same eigenvalues as the
    symmetric PSD matrix M = sigma1^(1/2) sigma2 sigma1^(1/2), so Tr (sigma1 sigma2)^(1/2) is the sum
    of the square roots of M's eigenvalues, from symmetric eigendecompositions (`eigh`). Unlike a
    general matrix square root (`scipy.linalg.sqrtm`), this stays accurate for the singular covariances
    of fewer samples than dimensions (per-class FID with a handful of images in a 64-d feature space):
    no eps*I regularisation, no complex round-off, no warning. An input with a clearly negative
    eigenvalue is an error rather than a silently wrong number.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("the means and covariances must be finite (no NaN or inf)")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    w1, v1 = _psd_eigh(sigma1, "sigma1")
    _psd_eigh(sigma2, "sigma2", vectors=False)  # only checked: sigma2 enters M as it is
    root1 = (v1 * np.sqrt(w1)) @ v1.T
    inner = root1 @ sigma2 @ root1
    w, _ = _psd_eigh((inner + inner.T) / 2, "sigma1^(1/2) sigma2 sigma1^(1/2)", vectors=False)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(w).sum())


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [d] and unbiased covariance [d, d] (float64) of features [N, d]."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be a [N, d] array, got shape {f.shape}")
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors to estimate a covariance, got {len(f)}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two sets of features [N, d] from the same extractor."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] with C = 1 or 3 -> [N, 3, H, W]; grayscale is repeated for RGB-only networks."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1)


class FeatureExtractor(abc.ABC):
    """Maps images (float in [-1, 1], [N, C, H, W], C = 1 or 3) to features [N, dim].

    FID is only meaningful between statistics from the same extractor, so `name` identifies it
    (store it with `save_stats(..., extractor=ext.name)` and compare before mixing statistics).
    """

    name: str
    dim: int

    @abc.abstractmethod
    def __call__(self, images: torch.Tensor) -> np.ndarray: ...


def extract(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Features of all `images`, in batches to bound memory, with autograd off."""
    with torch.no_grad():
        chunks = [np.asarray(extractor(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks) if chunks else np.empty((0, extractor.dim), np.float32)


def resolve_weights(weights: str | os.PathLike) -> Path:
    """Local file for `weights`: an existing path, or an http(s) URL downloaded once into `cache_dir()`."""
    weights = str(weights)
    url = urlparse(weights)
    if url.scheme in ("http", "https"):
        dest = cache_dir() / Path(url.path).name
        if not dest.is_file():
            _download(weights, dest)
        return dest
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}. Download the TorchScript export from {INCEPTION_PT_URL} "
            f"(the same network pickled for NVlabs' dnnlib is at {INCEPTION_PKL_URL}, but only the .pt loads here) "
            "and pass its local path, e.g. InceptionExtractor('/data/inception-2015-12-05.pt'), "
            "or pass the URL to download it into the cache ($RAYGEN_CACHE or ~/.cache/raygen)."
        )
    return path


def _download(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_write(dest) as f:
            shutil.copyfileobj(response, f)
    except (OSError, http.client.HTTPException) as e:
        raise RuntimeError(
            f"could not download {url} ({e}); download it on a machine with network access "
            f"and pass the local path instead, e.g. InceptionExtractor('/data/{dest.name}')"
        ) from e


def clean_resize(images: torch.Tensor) -> torch.Tensor:
    """clean-fid 'clean' preprocessing: [-1, 1] images -> float32 [N, 3, 299, 299] in [0, 255].

    Quantize to uint8 (what a saved sample holds), then resize each channel as a float ('F' mode)
    PIL image with bicubic filtering and clip, without re-quantizing, like clean-fid's resizer.
    """
    u8 = to_uint8(images).cpu().numpy()
    if u8.ndim != 4 or u8.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, C, H, W] with C = 1 or 3, got shape {tuple(u8.shape)}")
    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    out = np.empty((*u8.shape[:2], *size), np.float32)
    for i, img in enumerate(u8):
        for c, channel in enumerate(img):
            out[i, c] = np.asarray(Image.fromarray(channel.astype(np.float32)).resize(size, Image.BICUBIC))
    return as_rgb(torch.from_numpy(out.clip(0, 255)))


class InceptionExtractor(FeatureExtractor):
    """2048-d Inception-v3 pool features of the NVlabs TorchScript export, clean-fid protocol.

    `weights` is a local TorchScript file or an http(s) URL (cached on first use). The NVlabs model
    takes float input in [0, 255] and returns pool features for `return_features=True`; a module
    without that keyword is called as `model(x)`, which is decided once on a probe batch so errors
    from real batches are never masked. `dim` is read from the probe's output.
    """

    name = "inception-v3-clean"

    def __init__(self, weights: str | os.PathLike, device: str | torch.device = "cpu"):
        path = resolve_weights(weights)
        self.device = torch.device(device)
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format NVlabs ships
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit\.load")
            self.model = torch.jit.load(str(path), map_location="cpu").eval().to(self.device)
        probe = torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, device=self.device)
        with torch.no_grad():
            try:
                out = self.model(probe, return_features=True)
                self._kwargs = {"return_features": True}
            except (TypeError, RuntimeError):
                out = self.model(probe)
                self._kwargs = {}
        self.dim = out.reshape(1, -1).shape[1]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = clean_resize(images).to(self.device)
        return self.model(x, **self._kwargs).reshape(len(x), -1).float().cpu().numpy()


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **meta) -> Path:
    """Write reference statistics and metadata (scalars, strings, arrays; no pickled objects) to npz."""
    arrays = {k: np.asarray(v) for k, v in meta.items()}
    bad = [k for k, v in arrays.items() if v.dtype == object]
    if bad:
        raise ValueError(f"metadata {bad} cannot be stored without pickle; use numbers, strings or arrays")
    with atomic_write(path) as f:
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **arrays)
    return Path(path)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read `save_stats` output: (mu, sigma, meta) with 0-d metadata turned back into Python scalars."""
    with np.load(path, allow_pickle=False) as z:
        meta = {k: z[k].item() if z[k].ndim == 0 else z[k] for k in z.files if k not in ("mu", "sigma")}
        return z["mu"], z["sigma"], meta
