"""Embedded datasets and the one batch path: digits/shapes arrays and a real image folder on disk all
become {image: float32 [C,H,W] in [-1,1], label: int64} rows of a Ray Dataset."""
import numpy as np
import pytest
from PIL import Image

from raygen.config import ConfigError, from_dict
from raygen.data import embedded
from raygen.data.images import ImageDataConfig, build_dataset, class_names


def test_digits_split_is_fixed_stratified_and_disjoint():
    xtr, ytr = embedded.digits(16, "train")
    xte, yte = embedded.digits(16, "test")
    assert xtr.shape == (1437, 16, 16, 1) and xte.shape == (360, 16, 16, 1) and xtr.dtype == np.uint8
    assert len(ytr) + len(yte) == 1797
    # stratified: every class has 20% +- one image in the test split
    counts = np.bincount(yte, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # the upsampled images are the bundled 8x8 digits: downsampling recovers them closely
    x8, _ = embedded.digits(8, "train")
    small = np.stack([np.asarray(Image.fromarray(im[..., 0]).resize((8, 8), Image.BOX)) for im in xtr[:50]])
    assert np.abs(small.astype(int) - x8[:50, ..., 0].astype(int)).mean() < 12


def test_shapes_are_deterministic_and_labelled():
    a, la = embedded.shapes(32, 90, seed=3)
    b, lb = embedded.shapes(32, 90, seed=3)
    c, _ = embedded.shapes(32, 90, seed=4)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    assert np.bincount(la).tolist() == [10] * 9 and len(embedded.shapes_class_names()) == 9
    # a red shape has more red than green/blue inside its foreground
    red = [i for i, lab in enumerate(la) if embedded.shapes_class_names()[lab].startswith("red")]
    fg = a[red].reshape(-1, 3)
    fg = fg[fg.max(1) > 100]
    assert fg[:, 0].mean() > fg[:, 1].mean() + 50


def test_image_folder_goes_through_the_same_batch_path(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    cfg = from_dict(ImageDataConfig, {"source": "image_folder", "path": str(tmp_path), "resolution": 8})
    assert class_names(cfg) == ["cat", "dog"]
    rows = build_dataset(cfg).take_all()
    assert len(rows) == 6
    assert sorted(int(r["label"]) for r in rows) == [0, 0, 0, 1, 1, 1]
    img = rows[0]["image"]
    assert img.shape == (3, 8, 8) and img.dtype == np.float32 and -1.0 <= img.min() and img.max() <= 1.0

    digits = build_dataset(from_dict(ImageDataConfig, {"source": "digits"})).take(4)
    assert digits[0]["image"].shape == (1, 16, 16) and digits[0]["image"].dtype == np.float32


def test_image_folder_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        from_dict(ImageDataConfig, {"source": "image_folder"})
    with pytest.raises(ConfigError, match="not a directory"):
        from_dict(ImageDataConfig, {"source": "image_folder", "path": str(tmp_path / "missing")})
