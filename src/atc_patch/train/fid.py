"""Fréchet distance between Gaussians fitted to image features (the arithmetic of FID).

``FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. The trace of the matrix square
root is computed without a general (non-symmetric) ``sqrtm``: with ``A = S1^(1/2)`` (symmetric,
from an eigendecomposition), ``S1 S2 = A (A S2 A) A^(-1)`` is similar to the symmetric PSD
matrix ``A S2 A``, so ``tr((S1 S2)^(1/2)) = sum(sqrt(eig(A S2 A)))``. This is exact for PSD
covariances, real-valued by construction and needs only ``numpy.linalg.eigh``.
"""

from __future__ import annotations

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of ``features`` ``(num_images, dim)``: mean ``(dim,)`` and unbiased
    covariance ``(dim, dim)`` (as clean-fid and pytorch-fid compute them)."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be (num_images >= 2, dim), got {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    vals, vecs = np.linalg.eigh((sigma + sigma.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    Args:
        mu1, mu2: ``(dim,)`` means.
        sigma1, sigma2: ``(dim, dim)`` symmetric positive semi-definite covariances.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}"
        )
    a = _psd_sqrt(s1)
    inner = a @ s2 @ a
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FID between two feature sets ``(n1, dim)`` and ``(n2, dim)``."""
    return frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2))
