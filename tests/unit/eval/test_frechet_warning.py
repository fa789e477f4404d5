"""frechet_distance on singular covariances: no "Matrix is singular" warning escapes, and the value
matches the trace of sqrt(sqrt(s1) s2 sqrt(s1)) computed from symmetric eigendecompositions."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg

from raygen.eval.fid import feature_stats, frechet_distance


def eigen_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Tr (sigma1 sigma2)^(1/2) = sum of sqrt(eigenvalues of sqrt(sigma1) sigma2 sqrt(sigma1)), a symmetric
    PSD matrix with the same spectrum as sigma1 sigma2, so eigh applies (float64 throughout)."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def integer_stats(rng, n: int, d: int):
    """Mean and covariance of n < d integer-valued samples: exactly rank-deficient products."""
    return feature_stats(rng.integers(-3, 4, size=(n, d)).astype(np.float64))


def sqrtm_warns(sigma1, sigma2) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scipy.linalg.sqrtm(sigma1 @ sigma2)
    return any("singular" in str(w.message).lower() for w in caught)


@pytest.mark.parametrize("n1, n2, d, seed", [(2, 2, 3, 0), (2, 2, 8, 1), (2, 2, 8, 3), (2, 5, 8, 2)])
def test_singular_covariances_give_no_warning_and_the_eigenvalue_answer(n1, n2, d, seed):
    rng = np.random.default_rng(seed)
    mu1, sigma1 = integer_stats(rng, n1, d)
    mu2, sigma2 = integer_stats(rng, n2, d)
    assert sqrtm_warns(sigma1, sigma2)  # the case being tested: scipy itself warns here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(fid)
    assert fid == pytest.approx(eigen_frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-7)


def test_rank_one_covariance_gives_the_closed_form():
    """sigma1 = x x^T, where scipy's sqrtm of sigma1 sigma2 is not finite: the product's single non-zero
    eigenvalue is x^T sigma2 x = 8, so the trace term is exactly 2 sqrt(8), with no offset added."""
    x = np.array([1.0, -1.0, -1.0, 0.0])
    sigma1 = np.outer(x, x)
    sigma2 = np.array([[3.0, -1, 0, -2], [-1, 1, 0, 0], [0, 0, 2, 0], [-2, 0, 0, 2]])
    assert sqrtm_warns(sigma1, sigma2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid = frechet_distance(np.zeros(4), sigma1, np.zeros(4), sigma2)
    reference = eigen_frechet_distance(np.zeros(4), sigma1, np.zeros(4), sigma2)
    assert reference == pytest.approx(11 - 2 * np.sqrt(8), rel=1e-7)
    assert np.isfinite(fid) and fid == pytest.approx(reference, rel=1e-7)

