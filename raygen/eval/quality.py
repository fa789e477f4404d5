"""Sample-quality metrics on feature vectors beyond FID: improved precision and recall, and the
intra-class diversity ratio.

Precision and recall follow Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing
Generative Models" (arXiv 1904.06991, Sec. 2): each set's manifold is the union of balls around its
feature vectors whose radii are the distance to the k-th nearest neighbour in the same set. Precision
is the fraction of generated vectors inside the real manifold (sample fidelity), recall the fraction of
real vectors inside the generated manifold (coverage).
"""
from __future__ import annotations

import numpy as np

CHUNK_BYTES = 64 * 2**20  # one block of float64 squared distances; peak use is about 3x this (argpartition)
# |fl(a.b) - a.b| <= d u |a| |b| for a d-term dot product (Higham, "Accuracy and Stability of Numerical
# Algorithms", 2nd ed., Sec. 3.1); squared distances from the Gram expansion within this many
# d * eps * (|a|^2 + |b|^2) of a radius are recomputed as sums of squared differences
GRAM_ERROR_FACTOR = 4.0


def _features(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, d] of feature vectors, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return x


def _rows_per_chunk(chunk: int | None, num_columns: int) -> int:
    if chunk is None:
        return max(1, CHUNK_BYTES // (8 * max(1, num_columns)))
    if int(chunk) < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    return int(chunk)


def _squared_distances(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """|a_i - b_j|^2 = |a_i|^2 + |b_j|^2 - 2 a_i.b_j for a block of rows, clipped at 0, in place."""
    out = a @ b.T
    out *= -2.0
    out += a_sq[:, None]
    out += b_sq[None, :]
    np.maximum(out, 0.0, out=out)
    return out


def _exact_squared(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise |a_i - b_i|^2 from the differences, without the Gram expansion's cancellation."""
    diff = a - b
    return np.einsum("ij,ij->i", diff, diff)


def kth_neighbour_radii(x: np.ndarray, k: int, chunk: int | None = None) -> np.ndarray:
    """Squared distance from each vector of x to its k-th nearest neighbour in x, itself excluded.

    The neighbour is found from Gram-expansion distances in row blocks; its distance is then
    recomputed from the difference, so duplicates give exactly 0.
    """
    n = len(x)
    x_sq = np.einsum("ij,ij->i", x, x)
    rows = _rows_per_chunk(chunk, n)
    radii = np.empty(n)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        d2 = _squared_distances(x[start:stop], x_sq[start:stop], x, x_sq)
        d2[np.arange(stop - start), np.arange(start, stop)] = np.inf  # the point itself
        neighbour = np.argpartition(d2, k - 1, axis=1)[:, k - 1]
        radii[start:stop] = _exact_squared(x[start:stop], x[neighbour])
    return radii


def inside_manifold(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Boolean [len(points)]: whether each point lies in at least one ball |p - c_j|^2 <= radii_j.

    Decided on Gram-expansion distances except within their error bound of a radius, where the
    distance is recomputed from the difference (nearest-to-inside candidates first, one per row).
    """
    d = points.shape[1]
    eps = np.finfo(np.float64).eps
    p_sq = np.einsum("ij,ij->i", points, points)
    c_sq = np.einsum("ij,ij->i", centres, centres)
    rows = _rows_per_chunk(chunk, len(centres))
    inside = np.zeros(len(points), dtype=bool)
    for start in range(0, len(points), rows):
        stop = min(start + rows, len(points))
        margin = _squared_distances(points[start:stop], p_sq[start:stop], centres, c_sq)
        margin -= radii[None, :]  # <= 0: inside that ball
        tolerance = GRAM_ERROR_FACTOR * d * eps * (p_sq[start:stop] + c_sq.max())
        block = (margin <= -tolerance[:, None]).any(axis=1)
        margin[margin > tolerance[:, None]] = np.inf  # certainly outside those balls
        undecided = np.flatnonzero(~block & np.isfinite(margin).any(axis=1))
        margin = margin[undecided]  # rows with a ball within round-off of the point only
        while len(undecided):
            candidate = np.argmin(margin, axis=1)
            rows_left = np.arange(len(undecided))
            has_candidate = np.isfinite(margin[rows_left, candidate])
            undecided, margin, candidate = undecided[has_candidate], margin[has_candidate], candidate[has_candidate]
            if not len(undecided):
                break
            exact = _exact_squared(points[start + undecided], centres[candidate]) <= radii[candidate]
            block[undecided[exact]] = True
            margin[np.arange(len(undecided)), candidate] = np.inf
            undecided, margin = undecided[~exact], margin[~exact]
        inside[start:stop] = block
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int | None = None) -> tuple[float, float]:
    """Improved precision and recall (arXiv 1904.06991, Sec. 2) of `fake` against `real`.

    real [N, d], fake [M, d]: feature vectors of the same extractor. k: neighbourhood size of the
    radii (the paper uses 3). chunk: rows per block of the distance matrices (None: blocks of at most
    64 MiB of float64: about 200 MB at peak beyond float64 copies of the inputs, whatever the set
    sizes). All arithmetic is float64.
    Returns (precision, recall), each in [0, 1].
    """
    real, fake = _features("real", real), _features("fake", fake)
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    for name, x in (("real", real), ("fake", fake)):
        if len(x) <= k:
            raise ValueError(f"{name} has {len(x)} vectors; the k-th nearest neighbour radii need more than k={k}")
    centre = real.mean(axis=0)  # distances are shift-invariant; centring shrinks the Gram expansion's error
    real, fake = real - centre, fake - centre
    real_radii = kth_neighbour_radii(real, k, chunk)
    fake_radii = kth_neighbour_radii(fake, k, chunk)
    precision = inside_manifold(fake, real, real_radii, chunk).mean()
    recall = inside_manifold(real, fake, fake_radii, chunk).mean()
    return float(precision), float(recall)


def _total_variance(x: np.ndarray) -> float:
    """Trace of the unbiased covariance: the summed per-feature variances. Shifting by one of the
    vectors first (variance is shift-invariant) makes identical vectors give exactly 0."""
    return float(np.var(x - x[0], axis=0, ddof=1).sum())


def _labels(name: str, labels, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{name} labels must have shape ({n},) to match the features, got {labels.shape}")
    return labels


def diversity_ratio(real: np.ndarray, real_labels, fake: np.ndarray, fake_labels) -> float:
    """Intra-class diversity ratio: the mean over classes of tr Cov(fake | class) / tr Cov(real | class).

    1.0: samples of a class vary as much as the data of that class; < 1: less (mode collapse toward a
    few samples per class); > 1: more. Classes count when both sets have at least 2 vectors of them.
    With both label arrays None the whole sets are compared as one class.
    """
    real, fake = _features("real", real), _features("fake", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    if (real_labels is None) != (fake_labels is None):
        raise ValueError("give labels for both real and fake, or for neither")
    if real_labels is None:
        groups = {None: (real, fake)}
    else:
        real_labels, fake_labels = _labels("real", real_labels, len(real)), _labels("fake", fake_labels, len(fake))
        shared = np.intersect1d(real_labels, fake_labels)
        groups = {c: (real[real_labels == c], fake[fake_labels == c]) for c in shared}
    ratios = []
    for label, (real_c, fake_c) in groups.items():
        if len(real_c) < 2 or len(fake_c) < 2:
            continue
        real_variance = _total_variance(real_c)
        if real_variance == 0.0:
            where = "the real set" if label is None else f"class {label!r} of the real set"
            raise ValueError(f"{where} has zero variance; the diversity ratio is undefined")
        ratios.append(_total_variance(fake_c) / real_variance)
    if not ratios:
        raise ValueError(
            "no class has at least 2 vectors in both the real and the fake set; the diversity ratio needs one"
        )
    return float(np.mean(ratios))
