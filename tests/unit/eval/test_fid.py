"""FID math against closed forms and torchmetrics, the clean-fid Inception protocol, stats files, grids."""
from __future__ import annotations

import functools
import http.server
import re
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from raygen.eval.fid import (
    FeatureExtractor,
    InceptionExtractor,
    extract,
    feature_stats,
    fid_from_features,
    frechet_distance,
    load_stats,
    save_stats,
)
from raygen.core.grid import save_grid, to_uint8

# ---------------------------------------------------------------- Fréchet distance


def diagonal_fid(mu1, s1, mu2, s2):
    """Closed form for covariances sharing eigenvectors, with eigenvalues s1, s2."""
    return float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())


def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    expected = diagonal_fid(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # same spectra in a rotated basis: full matrices
    rotated = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_identical_stats_is_zero():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(24, 24))
    mu, sigma = rng.normal(size=24), a @ a.T
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_handles_rank_deficient_covariances():
    """Fewer samples than dimensions: rank-deficient covariances still give the eigenvalue answer."""
    rng = np.random.default_rng(2)
    (mu1, s1), (mu2, s2) = feature_stats(rng.normal(size=(6, 10))), feature_stats(rng.normal(1, 2, size=(6, 10)))
    eig_trace = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * eig_trace
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no eps*I retry and no singular-matrix warning on this route
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-3)


def test_frechet_distance_of_an_exactly_singular_pair_matches_the_closed_form():
    """An exactly singular pair on which a general matrix square root breaks down (scipy's sqrtm returned
    inf here before scipy 1.17): sigma1 sigma2 = x (sigma2 x)^T has the single eigenvalue x^T sigma2 x = 8,
    so the distance is tr(sigma1) + tr(sigma2) - 2 sqrt(8), and it must come out finite and exact."""
    x = np.array([1.0, -1.0, -1.0, 0.0])
    sigma1 = np.outer(x, x)
    sigma2 = np.array([[3.0, -1, 0, -2], [-1, 1, 0, 0], [0, 0, 2, 0], [-2, 0, 0, 2]])
    assert np.linalg.matrix_rank(sigma1 @ sigma2) == 1  # the case being tested
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the eigenvalue route neither regularises nor warns
        fid = frechet_distance(np.zeros(4), sigma1, np.zeros(4), sigma2)
    assert fid == pytest.approx(11 - 2 * np.sqrt(8), abs=1e-6)


def test_frechet_distance_rejects_non_psd_and_mismatched_inputs():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)  # sqrt(-I) = iI
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))


def test_feature_stats():
    x = np.random.default_rng(3).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = feature_stats(x)
    centered = x.astype(np.float64) - x.mean(0, dtype=np.float64)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.mean(0, dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(x[:1])
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        feature_stats(x[0])


# ---------------------------------------------------------------- extractor protocol, vs torchmetrics


class RandomFeatures(nn.Module):
    """Deterministic non-linear features [N, 16] of [N, 3, 8, 8] images, in float64."""

    num_features = 16

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(3 * 8 * 8, self.num_features, generator=g, dtype=torch.float64) / 8)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(imgs.flatten(1).double() @ self.w)


class ModuleExtractor(FeatureExtractor):
    """Wraps a module and records each call's batch size and whether autograd was on."""

    name = "random-features"
    dim = RandomFeatures.num_features

    def __init__(self, module: nn.Module):
        self.module = module
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        self.calls.append((len(images), torch.is_grad_enabled()))
        return self.module(images).numpy()


def test_extract_batches_without_autograd():
    ext = ModuleExtractor(RandomFeatures())
    images = torch.rand(10, 3, 8, 8) * 2 - 1
    feats = extract(ext, images, batch_size=4)
    assert ext.calls == [(4, False), (4, False), (2, False)]
    np.testing.assert_array_equal(feats, RandomFeatures()(images).numpy())
    assert extract(ext, images[:0]).shape == (0, ext.dim)


def test_fid_agrees_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(4)
    real = torch.rand(300, 3, 8, 8, generator=g) * 2 - 1
    fake = (torch.rand(300, 3, 8, 8, generator=g) * 1.6 - 0.6).clamp(-1, 1)
    module = RandomFeatures()
    # With a custom module torchmetrics feeds update()'s images to it unchanged (normalize only
    # picks the dtype of its dimension probe, skipped here thanks to `num_features`).
    metric = FrechetInceptionDistance(feature=module, normalize=True)
    for i in range(0, 300, 100):
        metric.update(real[i : i + 100], real=True)
        metric.update(fake[i : i + 100], real=False)
    theirs = metric.compute().item()
    ours = fid_from_features(extract(ModuleExtractor(module), real, 64), extract(ModuleExtractor(module), fake, 64))
    assert theirs > 0.05  # the two sets really differ, so agreement is not trivially 0 == 0
    assert ours == pytest.approx(theirs, rel=1e-3)


# ---------------------------------------------------------------- Inception extractor (clean-fid protocol)


class TinyInception(nn.Module):
    """Stand-in for the NVlabs export: asserts its input protocol, 8-d pool features, 2-d 'logits'."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 5, stride=8)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.float32 and x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299, "bad shape"
        assert bool(x.min() >= 0.0) and bool(x.max() <= 255.0), "expected values in [0, 255]"
        feats = self.conv(x / 255.0).mean(dim=(2, 3))
        return feats if return_features else feats[:, :2]


class InputProbe(nn.Module):
    """Returns its input flattened as the 'features', so tests can see exactly what the network got."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.flatten(1) if return_features else x.mean(dim=(1, 2, 3))


class PlainModule(nn.Module):
    """A TorchScript module without the `return_features` keyword."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def scripted(module: nn.Module, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated; NVlabs ships TorchScript
        torch.jit.script(module).save(str(path))
    return str(path)


def uint8_like_a_png(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] -> uint8 HWC per image, written independently of the library's `to_uint8`."""
    pixels = np.clip(np.rint((images.numpy().astype(np.float64) + 1) * 127.5), 0, 255)
    return pixels.astype(np.uint8).transpose(0, 2, 3, 1)


def test_inception_extractor_uses_return_features_and_expands_grayscale(tmp_path):
    ext = InceptionExtractor(scripted(TinyInception(), tmp_path / "tiny.pt"))
    assert ext.dim == 8  # from the features output, not the 2-d 'logits'
    gray = torch.rand(3, 1, 16, 16) * 2 - 1
    feats = ext(gray)
    assert feats.shape == (3, 8)
    np.testing.assert_allclose(feats, ext(gray.repeat(1, 3, 1, 1)), rtol=1e-6)
    assert extract(ext, gray, batch_size=2).shape == (3, 8)


def test_inception_extractor_falls_back_to_plain_call(tmp_path):
    ext = InceptionExtractor(scripted(PlainModule(), tmp_path / "plain.pt"))
    assert ext.dim == 3
    assert ext(torch.zeros(2, 3, 8, 8)).shape == (2, 3)


def test_inception_input_is_pil_bicubic_resize_of_uint8_pixels(tmp_path):
    ext = InceptionExtractor(scripted(InputProbe(), tmp_path / "probe.pt"))
    # Mid-range pixels: bicubic overshoot past [0, 255] would be clipped between PIL's two 8-bit passes.
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) - 0.5
    got = ext(images).reshape(2, 3, 299, 299)
    assert ext.dim == 3 * 299 * 299
    np.testing.assert_array_equal(ext(torch.full((1, 3, 4, 4), 1.5)), 255.0)  # saturates like a PNG

    def pil_resized(img: np.ndarray, resample) -> np.ndarray:
        return np.asarray(Image.fromarray(img).resize((299, 299), resample), np.float32).transpose(2, 0, 1)

    pixels = uint8_like_a_png(images)
    # PIL's 8-bit RGB bicubic rounds after each of its two passes; clean-fid resizes in float.
    for g, img in zip(got, pixels):
        assert np.abs(g - pil_resized(img, Image.BICUBIC)).max() < 1.5
        assert np.abs(g - pil_resized(img, Image.BILINEAR)).max() > 10  # the check can tell filters apart

    gray = ext(images[:, :1]).reshape(2, 3, 299, 299)
    np.testing.assert_array_equal(gray[:, 0], gray[:, 2])
    np.testing.assert_array_equal(gray[:, 1], got[:, 0])


def test_missing_weights_file_says_where_to_get_it(tmp_path):
    missing = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as err:
        InceptionExtractor(missing)
    assert "nvlabs-fi-cdn.nvidia.com" in str(err.value)


def test_unreachable_url_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYGEN_CACHE", str(tmp_path))
    url = "http://127.0.0.1:9/inception.pt"
    with pytest.raises(RuntimeError, match=re.escape(url)):
        InceptionExtractor(url)
    assert list(tmp_path.iterdir()) == []  # no partial download left behind


def test_url_weights_are_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    served, cache = tmp_path / "served", tmp_path / "cache"
    served.mkdir()
    scripted(TinyInception(), served / "tiny.pt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("RAYGEN_CACHE", str(cache))
    url = f"http://127.0.0.1:{server.server_port}/tiny.pt"
    try:
        assert InceptionExtractor(url).dim == 8
    finally:
        server.shutdown()
        server.server_close()
    assert [p.name for p in cache.iterdir()] == ["tiny.pt"]
    assert InceptionExtractor(url).dim == 8  # server is gone: this one comes from the cache


# ---------------------------------------------------------------- stats files and grids


def test_stats_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = rng.normal(size=5), np.cov(rng.normal(size=(20, 5)), rowvar=False)
    path = save_stats(tmp_path / "stats" / "mnist.npz", mu, sigma, extractor="inception-v3-clean", n=20, ids=[0, 1, 2])
    mu2, sigma2, meta = load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert meta["extractor"] == "inception-v3-clean" and meta["n"] == 20
    np.testing.assert_array_equal(meta["ids"], np.arange(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["mnist.npz"]  # temp file renamed away
    with pytest.raises(ValueError, match="pickle"):
        save_stats(tmp_path / "bad.npz", mu, sigma, note=None)


def test_to_uint8_rounds_and_clamps():
    assert to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0, 0, 128, 255, 255]


def test_save_grid_grayscale_layout(tmp_path):
    images = torch.rand(5, 1, 16, 16) * 2 - 1
    path = save_grid(images, tmp_path / "a" / "b" / "grid.png", nrow=3, pad=1, upscale=2)
    img = Image.open(path)
    assert img.mode == "L"
    assert img.size == (3 * (16 * 2 + 1) + 1, 2 * (16 * 2 + 1) + 1)  # (width, height): 3 columns, 2 rows
    grid = np.asarray(img)
    tile = uint8_like_a_png(images[4:5])[0, :, :, 0].repeat(2, 0).repeat(2, 1)  # image 4: row 1, column 1
    np.testing.assert_array_equal(grid[1 + 33 : 1 + 33 + 32, 1 + 33 : 1 + 33 + 32], tile)
    assert (grid[0] == 255).all() and (grid[:, 33] == 255).all()  # border and separator


def test_save_grid_rgb_from_numpy(tmp_path):
    images = np.random.default_rng(7).uniform(-1, 1, size=(2, 3, 8, 8)).astype(np.float32)
    img = Image.open(save_grid(images, tmp_path / "rgb.png"))
    assert img.mode == "RGB" and img.size == (2 * 9 + 1, 1 * 9 + 1)
    with pytest.raises(ValueError, match="shape"):
        save_grid(images[:, :2], tmp_path / "bad.png")
