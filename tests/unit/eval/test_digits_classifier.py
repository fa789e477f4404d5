"""The shipped digits classifier: files match their recorded sha256, the network is accurate at every
shipped resolution, loading is reproducible and never trains or writes to the cache."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch

import raygen.eval.digits_classifier as digits_classifier
from raygen.config import ConfigError
from raygen.data.embedded import digits
from raygen.eval.digits_classifier import WEIGHTS_SHA256, DigitsClassifier, DigitsNet, weights_path

SHIPPED = sorted(WEIGHTS_SHA256)


def test_shipped_resolutions_are_the_digits_preset_resolutions():
    assert SHIPPED == [16, 32]


@pytest.mark.parametrize("resolution", SHIPPED)
def test_shipped_file_has_the_recorded_sha256(resolution):
    path = weights_path(resolution)
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == WEIGHTS_SHA256[resolution]


@pytest.mark.parametrize("resolution", SHIPPED)
def test_shipped_classifier_is_accurate(resolution):
    classifier = DigitsClassifier(resolution)
    assert classifier.name == "digits" and classifier.dim == 128
    assert isinstance(classifier.net, DigitsNet)
    assert classifier.test_accuracy() >= 0.97


@pytest.mark.parametrize("resolution", SHIPPED)
def test_independent_loads_give_bit_identical_features_and_write_nothing(resolution, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RAYGEN_CACHE", str(cache))
    x, _ = digits(resolution, "test")
    images = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    first, second = DigitsClassifier(resolution), DigitsClassifier(resolution)
    features_first, features_second = first(images), second(images)
    assert features_first.shape == (len(images), first.dim) and features_first.dtype == np.float64
    assert np.array_equal(features_first, features_second)
    assert np.array_equal(first.predict(images), second.predict(images))
    assert not cache.exists() or not any(cache.rglob("*"))


def test_unshipped_resolution_is_a_config_error_naming_the_shipped_ones_and_the_script():
    with pytest.raises(ConfigError, match=r"resolution 24.*\[16, 32\].*scripts/make_digits_classifier\.py"):
        DigitsClassifier(24)


def test_modified_weights_are_refused(tmp_path, monkeypatch):
    """A weights directory whose r16 file differs by one byte from the shipped one."""
    corrupted = weights_path(16, tmp_path)
    shutil.copyfile(weights_path(16), corrupted)
    data = bytearray(corrupted.read_bytes())
    data[-1] ^= 0x01
    corrupted.write_bytes(bytes(data))
    monkeypatch.setattr(digits_classifier, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(RuntimeError, match=r"digits_classifier_r16\.safetensors.*sha256.*make_digits_classifier"):
        DigitsClassifier(16)
    corrupted.unlink()
    with pytest.raises(FileNotFoundError, match="make_digits_classifier"):
        DigitsClassifier(16)
