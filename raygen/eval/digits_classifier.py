"""A small CNN trained once on the digits train split and cached on disk. Its penultimate features
give an FID against the digits test split, its predictions the class accuracy of conditional samples
(the MNIST seed shipped an untrained classifier and a 10-sample Inception FID: dit-ddpm.md §4)."""
from __future__ import annotations


import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raygen.data.embedded import digits
from raygen.core.files import cache_dir, save_torch
from raygen.eval.fid import FeatureExtractor

CLASSIFIER_VERSION = 1  # bump when the architecture or recipe changes: old caches are then ignored


class DigitsNet(nn.Module):
    def __init__(self, resolution: int, feature_dim: int = 128):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(64 * (resolution // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _to_input(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _train(resolution: int, seed: int = 0, epochs: int = 40) -> DigitsNet:
    x, y = digits(resolution, "train")
    x, y = _to_input(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitsNet(resolution)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(x) + 63) // 64))
    pad = max(1, resolution // 8)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            xb = F.pad(x[idx], (pad,) * 4, value=-1.0)  # random shifts: robust to imperfect samples
            dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
            xb = xb[:, :, dy : dy + resolution, dx : dx + resolution]
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


class DigitsClassifier(FeatureExtractor):
    """Feature extractor (`name`, `dim`, `__call__`) plus `predict` for class accuracy."""

    name = "digits"

    def __init__(self, resolution: int = 16):
        self.resolution = resolution
        path = cache_dir() / f"digits_classifier_r{resolution}_v{CLASSIFIER_VERSION}.pt"
        self.net = DigitsNet(resolution)
        if path.exists():
            self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            self.net = _train(resolution)
            save_torch(self.net.state_dict(), path)
        self.net.eval()
        self.dim = self.net.fc.out_features

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1:] != (1, self.resolution, self.resolution):
            raise ValueError(
                f"digits classifier expects [N,1,{self.resolution},{self.resolution}] images in [-1,1], "
                f"got {tuple(images.shape)}"
            )
        return images.float().cpu()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.net.features(self._check(images)).double().numpy()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.net(self._check(images)).argmax(1).numpy()

    def test_accuracy(self) -> float:
        x, y = digits(self.resolution, "test")
        return float((self.predict(_to_input(x)) == y).mean())
