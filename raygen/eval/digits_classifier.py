"""A small CNN on the embedded digits, shipped with the package as a fixed yardstick. Its penultimate
features give an FID against the digits test split, its predictions the class accuracy of conditional
samples.

The weights are trained once by scripts/make_digits_classifier.py and stored in raygen/eval/weights/
as safetensors; `DigitsClassifier` only loads and checks them (sha256) and never trains, so its numbers
are the same on every machine rather than depending on the BLAS and thread count of a first-use run.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from raygen.config import ConfigError
from raygen.data.embedded import digits
from raygen.eval.fid import FeatureExtractor

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REGENERATE_COMMAND = "python scripts/make_digits_classifier.py"
TRAIN_SEED = 0
TRAIN_EPOCHS = 40
# sha256 of the shipped weight files, by resolution (printed by scripts/make_digits_classifier.py)
WEIGHTS_SHA256 = {
    16: "18b94575179a20b2e3a090c743af1c8ef88e744075e73f0eec9b5cf372797144",
    32: "b33665867016597c3cb077f85a78ecfaae8a715c7fe1b22705e7aff4d9849ac5",
}


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


def train_digits_net(resolution: int, seed: int = TRAIN_SEED, epochs: int = TRAIN_EPOCHS) -> DigitsNet:
    """The training recipe, run only by scripts/make_digits_classifier.py (Adam + one-cycle schedule,
    random shifts of up to resolution/8 pixels so imperfect samples are still classified)."""
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


def weights_path(resolution: int, directory: Path | None = None) -> Path:
    return Path(WEIGHTS_DIR if directory is None else directory) / f"digits_classifier_r{resolution}.safetensors"


def load_net(path: Path, resolution: int) -> DigitsNet:
    """A DigitsNet with the tensors of a safetensors file, cast to float32 (files may store float16)."""
    net = DigitsNet(resolution)
    state = {k: v.float() for k, v in load_file(str(path), device="cpu").items()}
    net.load_state_dict(state, strict=True)
    return net.eval()


@torch.no_grad()
def accuracy_on_test_split(net: DigitsNet, resolution: int) -> float:
    x, y = digits(resolution, "test")
    return float((net(_to_input(x)).argmax(1).numpy() == y).mean())


def _verified_weights(resolution: int) -> Path:
    if resolution not in WEIGHTS_SHA256:
        raise ConfigError(
            f"no digits classifier is shipped for resolution {resolution}; shipped resolutions: "
            f"{sorted(WEIGHTS_SHA256)}. Evaluate digits at one of those, or train and ship weights for it "
            f"with `{REGENERATE_COMMAND} --resolutions {resolution}` (and add its sha256 to WEIGHTS_SHA256 in "
            f"{__name__})"
        )
    path = weights_path(resolution)
    if not path.is_file():
        raise FileNotFoundError(
            f"digits classifier weights {path} are missing from the installed package; "
            f"regenerate them with `{REGENERATE_COMMAND} --resolutions {resolution}`"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256[resolution]:
        raise RuntimeError(
            f"digits classifier weights {path} have sha256 {digest}, expected {WEIGHTS_SHA256[resolution]}: "
            f"the file was changed or corrupted. Restore it from the repository, or regenerate it with "
            f"`{REGENERATE_COMMAND} --resolutions {resolution}` and update WEIGHTS_SHA256 in {__name__}"
        )
    return path


class DigitsClassifier(FeatureExtractor):
    """Feature extractor (`name`, `dim`, `__call__`) plus `predict` for class accuracy, with the shipped
    weights for `resolution` (a ConfigError names the shipped resolutions for any other)."""

    name = "digits"

    def __init__(self, resolution: int = 16):
        self.resolution = resolution
        self.net = load_net(_verified_weights(resolution), resolution)
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
        return accuracy_on_test_split(self.net, self.resolution)
