"""Improved precision/recall against a float64 brute force (scipy cdist, per-point loops) and closed
forms; the intra-class diversity ratio against closed forms and per-class numpy traces."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from raygen.eval.quality import diversity_ratio, precision_recall


def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The definition of arXiv 1904.06991 Sec. 2 spelled out: full float64 distance matrices, radii from
    each point's sorted distances to the other points of its set, and a loop over query points."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)

    def radii(x):
        dist = cdist(x, x)
        return np.array([np.sort(np.delete(dist[i], i))[k - 1] for i in range(len(x))])

    def fraction_inside(points, centres, centre_radii):
        dist = cdist(points, centres)
        return sum(bool(np.any(dist[i] <= centre_radii)) for i in range(len(points))) / len(points)

    return fraction_inside(fake, real, radii(real)), fraction_inside(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_brute_force_on_overlapping_gaussians(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(300, 8))
    fake = rng.normal(0.6, 0.8, size=(250, 8))
    expected = brute_force_precision_recall(real, fake, k)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95  # neither trivial answer
    assert precision_recall(real, fake, k=k) == expected


def test_matches_brute_force_with_a_large_common_offset_and_float32_input():
    """Non-negative, far-from-origin features (like ReLU outputs) stress the Gram expansion."""
    rng = np.random.default_rng(10)
    real = (1e3 + rng.gamma(2.0, size=(200, 16))).astype(np.float32)
    fake = (1e3 + rng.gamma(2.2, 1.1, size=(220, 16))).astype(np.float32)
    expected = brute_force_precision_recall(real, fake, 3)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95
    assert precision_recall(real, fake, k=3) == expected


def test_chunking_does_not_change_the_result():
    rng = np.random.default_rng(11)
    real, fake = rng.normal(size=(203, 5)), rng.normal(0.3, 1.2, size=(157, 5))
    assert precision_recall(real, fake, chunk=7) == precision_recall(real, fake, chunk=10_000)
    assert precision_recall(real, fake, chunk=1) == precision_recall(real, fake)


def test_identical_sets_give_one_and_one_even_with_duplicates():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(150, 6))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    with_duplicates = np.concatenate([x, np.repeat(x[:5], 4, axis=0)])  # radius 0 at those points
    assert precision_recall(with_duplicates, with_duplicates.copy(), k=3) == (1.0, 1.0)


def test_disjoint_sets_give_zero_and_zero():
    rng = np.random.default_rng(13)
    real, fake = rng.normal(size=(120, 4)), rng.normal(1000.0, 1.0, size=(90, 4))
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_a_small_cluster_of_real_points_has_full_precision_and_low_recall():
    """Fake = the 40 real points nearest one real point: every fake point is a real point (precision 1),
    but its manifold covers only that corner of the real one."""
    rng = np.random.default_rng(14)
    real = rng.normal(size=(400, 2))
    nearest = np.argsort(np.linalg.norm(real - real[0], axis=1))[:40]
    fake = real[nearest]
    precision, recall = precision_recall(real, fake)
    assert precision == 1.0
    assert recall < 0.2
    assert (precision, recall) == brute_force_precision_recall(real, fake, 3)


@pytest.mark.parametrize(
    "real, fake, k, match",
    [
        (np.zeros(10), np.zeros((10, 1)), 3, "2-D"),
        (np.zeros((10, 3)), np.zeros((10, 4)), 3, "dimension"),
        (np.zeros((3, 2)), np.ones((10, 2)), 3, "real has 3 vectors"),
        (np.zeros((10, 2)), np.ones((4, 2)), 4, "fake has 4 vectors"),
        (np.zeros((10, 2)), np.ones((10, 2)), 0, "positive integer"),
        (np.full((10, 2), np.nan), np.ones((10, 2)), 3, "non-finite"),
    ],
)
def test_precision_recall_rejects_bad_inputs(real, fake, k, match):
    with pytest.raises(ValueError, match=match):
        precision_recall(real, fake, k=k)


# ---------------------------------------------------------------- diversity ratio


def labelled_gaussians(rng, sizes: dict[int, int], d: int = 6):
    features = np.concatenate([rng.normal(c, 1.0 + c, size=(n, d)) for c, n in sizes.items()])
    labels = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    return features, labels


def test_identical_sets_have_ratio_one():
    rng = np.random.default_rng(20)
    real, labels = labelled_gaussians(rng, {0: 30, 1: 20, 2: 25})
    assert diversity_ratio(real, labels, real.copy(), labels.copy()) == pytest.approx(1.0, rel=1e-14)
    assert diversity_ratio(real, None, real.copy(), None) == pytest.approx(1.0, rel=1e-14)


def test_per_class_scaling_about_the_class_mean_gives_the_mean_squared_scale():
    """fake_c = mean_c + a_c (real_c - mean_c) scales the class covariance by a_c^2."""
    rng = np.random.default_rng(21)
    real, labels = labelled_gaussians(rng, {0: 30, 1: 20, 2: 25})
    scales = {0: 0.5, 1: 1.0, 2: 2.0}
    fake = real.copy()
    for c, a in scales.items():
        mean = real[labels == c].mean(axis=0)
        fake[labels == c] = mean + a * (real[labels == c] - mean)
    expected = np.mean([a**2 for a in scales.values()])
    assert diversity_ratio(real, labels, fake, labels) == pytest.approx(expected, rel=1e-12)
    one = labels == 2
    assert diversity_ratio(real[one], None, fake[one], None) == pytest.approx(4.0, rel=1e-12)


def test_collapsed_classes_have_ratio_zero():
    rng = np.random.default_rng(22)
    real, labels = labelled_gaussians(rng, {0: 30, 1: 20})
    fake = np.concatenate([np.tile(real[labels == c][:1], (12, 1)) for c in (0, 1)])
    fake_labels = np.repeat([0, 1], 12)
    assert diversity_ratio(real, labels, fake, fake_labels) == 0.0


def test_only_classes_with_two_vectors_in_both_sets_are_averaged():
    """Class 3 is only real, class 4 has one fake vector, class 5 only fake: the mean is over 0, 1, 2."""
    rng = np.random.default_rng(23)
    real, real_labels = labelled_gaussians(rng, {0: 17, 1: 9, 2: 30, 3: 11, 4: 8})
    fake, fake_labels = labelled_gaussians(rng, {0: 5, 1: 40, 2: 3, 4: 1, 5: 7})
    fake = fake * rng.uniform(0.2, 1.5, size=fake.shape[1])
    ratios = []
    for c in (0, 1, 2):
        r, f = real[real_labels == c], fake[fake_labels == c]
        ratios.append(np.trace(np.cov(f.T)) / np.trace(np.cov(r.T)))
    assert diversity_ratio(real, real_labels, fake, fake_labels) == pytest.approx(np.mean(ratios), rel=1e-12)


def test_diversity_ratio_rejects_unusable_inputs():
    rng = np.random.default_rng(24)
    real, fake = rng.normal(size=(10, 3)), rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match="no class"):
        diversity_ratio(real, np.zeros(10), fake, np.ones(10))
    with pytest.raises(ValueError, match="no class"):
        diversity_ratio(real, np.arange(10), fake, np.arange(10))  # one vector per class
    with pytest.raises(ValueError, match="both"):
        diversity_ratio(real, np.zeros(10), fake, None)
    with pytest.raises(ValueError, match="shape"):
        diversity_ratio(real, np.zeros(9), fake, np.zeros(10))
    with pytest.raises(ValueError, match="dimension"):
        diversity_ratio(real, None, fake[:, :2], None)
    with pytest.raises(ValueError, match="zero variance"):
        diversity_ratio(np.ones((5, 3)), None, fake, None)
