"""The few-shot evaluation protocol: the small trained CNN, per-class / own-vs-other FID, accuracy,
intra-class diversity and the support grid, on coloured squares drawn here with numpy."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from sklearn.metrics import accuracy_score

from raygen.eval.fewshot import FewShotClassifier, score_fewshot, support_grid, train_classifier
from raygen.eval.fid import FeatureExtractor, extract, feature_stats, fid_from_features, frechet_distance

COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 90, 240]], np.float32)
SIZE = 12
LABEL_VALUES = np.array([100, 103, 106, 109, 112, 115])  # not 0..C-1: predictions must answer in these


def squares(per_class: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """6 classes = 3 colours x (top, bottom half): a jittered 4x4 square of jittered colour on a noisy
    dark background, [N, 3, 12, 12] in [-1, 1], class-major, labels from LABEL_VALUES."""
    rng = np.random.default_rng(seed)
    n = 6 * per_class
    cls = np.repeat(np.arange(6), per_class)
    img = rng.uniform(0, 40, size=(n, SIZE, SIZE, 3)).astype(np.float32)
    for i, c in enumerate(cls):
        colour, bottom = divmod(c, 2)
        y = (7 if bottom else 1) + rng.integers(0, 2)
        x = rng.integers(1, SIZE - 5)
        img[i, y : y + 4, x : x + 4] = np.clip(COLOURS[colour] + rng.uniform(-25, 25, 3), 0, 255)
    return torch.from_numpy(img).permute(0, 3, 1, 2) / 127.5 - 1, LABEL_VALUES[cls]


@pytest.fixture(scope="module")
def data():
    train = squares(40, seed=0)  # classifier training images
    reference = squares(30, seed=1)  # held-out real images: the reference of the scores
    heldout = squares(30, seed=2)  # more held-out real images: a perfect "generator"
    clf = train_classifier(*train, seed=0, steps=100)
    return clf, train, reference, heldout


class ColourPosition(FeatureExtractor):
    """A fixed 5-d feature: mean colour and the brightness-weighted centroid; full-rank per class."""

    name = "colour-position"
    dim = 5

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.double() + 1
        weight = x.sum(1)
        grid = torch.arange(SIZE, dtype=torch.float64)
        cy = (weight * grid[:, None]).sum((1, 2)) / weight.sum((1, 2))
        cx = (weight * grid[None, :]).sum((1, 2)) / weight.sum((1, 2))
        return torch.cat([x.mean((2, 3)), cy[:, None], cx[:, None]], 1).numpy()


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook FID in float64 from numpy means / covariances and scipy's matrix square root."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(root).real)


def gram_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID for rank-deficient covariances from eigenvalues: with S2 = B^T B (B the centred rows of b over
    sqrt(n - 1)), the non-zero eigenvalues of S1 S2 are those of the small symmetric B S1 B^T."""
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    bc = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh(bc @ s1 @ bc.T), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_root)


# ---------------------------------------------------------------- classifier


def test_classifier_learns_the_classes_and_answers_in_their_labels(data):
    clf, train, reference, _ = data
    assert isinstance(clf, FeatureExtractor) and clf.dim == 64
    assert sorted(clf.classes.tolist()) == LABEL_VALUES.tolist()
    pred = clf.predict(reference[0])
    assert set(pred.tolist()) <= set(LABEL_VALUES.tolist())
    assert clf.accuracy(*reference) >= 0.95  # chance is 1/6
    feats = clf.features(reference[0])
    assert feats.shape == (len(reference[0]), 64) and np.isfinite(feats).all()
    np.testing.assert_array_equal(feats, extract(clf, reference[0], batch_size=7))


def test_training_is_deterministic_by_seed(data):
    x, y = data[1]
    threads = torch.get_num_threads()
    a, b, c = (train_classifier(x, y, seed=s, steps=5) for s in (3, 3, 4))
    assert torch.get_num_threads() == threads  # training's one thread does not leak into the process
    assert a.name == b.name != c.name  # the name is a digest of the weights
    np.testing.assert_array_equal(a.features(x[:20]), b.features(x[:20]))


def test_classifier_rejects_images_of_another_shape(data):
    with pytest.raises(ValueError, match="trained on"):
        data[0].predict(torch.zeros(2, 1, SIZE, SIZE))


# ---------------------------------------------------------------- scores


def test_fid_per_class_matches_independent_float64_computation():
    gen, gen_labels = squares(30, seed=3)
    ref, ref_labels = squares(30, seed=4)
    ext = ColourPosition()
    scores = score_fewshot(gen, gen_labels, ref, ref_labels, extractor=ext, classifier=None)
    gf, rf = ext(gen), ext(ref)
    for c in LABEL_VALUES:
        expected = reference_fid(gf[gen_labels == c], rf[ref_labels == c])
        assert scores["fid_per_class"][c] == pytest.approx(expected, rel=1e-6)
        others = [reference_fid(gf[gen_labels == c], rf[ref_labels == o]) for o in LABEL_VALUES if o != c]
        assert scores["fid_own_vs_other"][c]["other_mean"] == pytest.approx(np.mean(others), rel=1e-6)
    assert scores["fid_class_mean"] == pytest.approx(np.mean(list(scores["fid_per_class"].values())))
    assert scores["fid_all"] == pytest.approx(reference_fid(gf, rf), rel=1e-6)
    assert scores["fewshot_accuracy"] is None and scores["chance"] == pytest.approx(1 / 6)


def test_own_class_is_closest_for_real_images_and_not_for_permuted_labels(data):
    clf, _, (ref, ref_labels), (held, held_labels) = data
    right = score_fewshot(held, held_labels, ref, ref_labels, extractor=clf, classifier=clf)
    assert right["own_closer_fraction"] == 1.0
    assert right["fid_class_mean"] < right["fid_other_mean"]
    assert all(np.isfinite(v) and v >= 0 for v in right["fid_per_class"].values())  # 30 images, 64 dims
    assert right["fewshot_accuracy"] >= 0.95 and right["real_accuracy"] >= 0.95
    shifted = dict(zip(LABEL_VALUES, np.roll(LABEL_VALUES, 1)))  # every class labelled as another one
    wrong_labels = np.array([shifted[v] for v in held_labels])
    wrong = score_fewshot(held, wrong_labels, ref, ref_labels, extractor=clf, classifier=clf)
    assert wrong["own_closer_fraction"] <= wrong["chance"]
    assert wrong["fewshot_accuracy"] <= wrong["chance"]
    assert wrong["fid_class_mean"] > wrong["fid_other_mean"]


def test_fewshot_accuracy_is_the_classifier_accuracy_on_generated(data):
    clf, _, (ref, ref_labels), (held, held_labels) = data
    rng = np.random.default_rng(5)
    labels = held_labels.copy()
    relabel = rng.random(len(labels)) < 0.5  # about half labelled with a random other class
    labels[relabel] = rng.choice(LABEL_VALUES, relabel.sum())
    scores = score_fewshot(held, labels, ref, ref_labels, extractor=clf, classifier=clf)
    expected = accuracy_score(labels, clf.predict(held))
    assert 0.3 < expected < 0.9  # non-trivial
    assert scores["fewshot_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert scores["real_accuracy"] == pytest.approx(accuracy_score(ref_labels, clf.predict(ref)), abs=1e-12)
    assert scores["chance"] == pytest.approx(1 / 6)


def test_intra_class_diversity_is_one_for_real_and_zero_for_collapse(data):
    clf, _, (ref, ref_labels), (held, held_labels) = data
    real = score_fewshot(held, held_labels, ref, ref_labels, extractor=clf, classifier=None)
    assert 0.6 < real["diversity_intra"] < 1.6
    assert real["precision"] > 0.7 and real["recall"] > 0.7
    first = {c: held[held_labels == c][0] for c in LABEL_VALUES}
    collapsed = torch.stack([first[c] for c in held_labels])  # one image per class, copied
    dead = score_fewshot(collapsed, held_labels, ref, ref_labels, extractor=clf, classifier=None)
    assert dead["diversity_intra"] == pytest.approx(0.0, abs=1e-12)
    assert dead["recall"] < real["recall"]


def test_classifier_must_know_the_reference_classes(data):
    clf, _, (ref, ref_labels), _ = data
    keep = ref_labels != LABEL_VALUES[0]
    with pytest.raises(ValueError, match="classifier knows classes"):
        score_fewshot(ref[keep], ref_labels[keep], ref[keep], ref_labels[keep], extractor=clf, classifier=clf)


@pytest.mark.parametrize("n1, n2, seed", [(5, 5, 0), (2, 15, 1), (21, 2, 2), (2, 6, 3), (14, 2, 4)])
def test_rank_deficient_fid_is_finite_and_matches_eigenvalues(n1, n2, seed):
    """Fewer samples than the 64 feature dimensions, ReLU-like features with dead dimensions (float32,
    as a network gives them): the covariances are singular, where a general matrix square root returns
    non-finite values or complex round-off."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(8, 64)) * rng.uniform(0, 3, 64)
    mix[:, rng.random(64) < 0.3] = -5.0
    a = np.maximum(rng.normal(size=(n1, 8)) @ mix, 0).astype(np.float32).astype(np.float64)
    b = np.maximum(rng.normal(0.3, 1, size=(n2, 8)) @ mix, 0).astype(np.float32).astype(np.float64)
    fid = fid_from_features(a, b)
    assert np.isfinite(fid) and fid >= 0
    assert fid == pytest.approx(gram_fid(a, b), rel=1e-6)
    assert frechet_distance(*feature_stats(a), *feature_stats(a)) == pytest.approx(0.0, abs=1e-9 * np.trace(np.cov(a.T)))


# ---------------------------------------------------------------- grid


def test_support_grid_rows_are_supports_gap_generations(tmp_path):
    g = torch.Generator().manual_seed(0)
    supports = torch.rand(4, 5, 3, 8, 8, generator=g) * 2 - 1
    generated = torch.rand(4, 3, 3, 8, 8, generator=g) * 2 - 1
    path = support_grid(supports, generated, tmp_path / "grid.png", max_classes=3, upscale=2)
    img = np.asarray(Image.open(path))
    tile = 8 * 2 + 1
    assert img.shape == (3 * tile + 1, (5 + 1 + 3) * tile + 1, 3)
    assert (img[1 : 1 + 16, 1 + 5 * tile : 1 + 5 * tile + 16] == 255).all()  # the blank gap tile
    expected = ((generated[2, 0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    x0, y0 = 1 + 6 * tile, 1 + 2 * tile  # class 2's first generation
    np.testing.assert_array_equal(img[y0 : y0 + 16 : 2, x0 : x0 + 16 : 2], expected)
    with pytest.raises(ValueError, match="same classes"):
        support_grid(supports[:2], generated, tmp_path / "bad.png")
