"""Preprocessing kernels: pure functions on numpy blocks ``(..., k_y, k_x)``.

Everything here is derived from the data: hot pixels from the mean pattern, the central
disk and the Bragg ring from the mean pattern, Bragg-disk masks from a dictionary pattern.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "find_hot_pixels",
    "repair_hot_pixels",
    "normalise",
    "central_disk",
    "ring_mask",
    "radial_background",
    "kmeans",
    "disk_mask",
    "disk_contrast",
]


def find_hot_pixels(mean_pattern: np.ndarray, nsigma: float = 8.0, n: int | None = None
                    ) -> np.ndarray:
    """Boolean mask of detector pixels far brighter than their neighbourhood.

    A pixel is hot when the mean pattern exceeds the 3x3 median of its neighbours by more
    than ``nsigma`` standard deviations *and* by a factor of 3: Bragg-disk edges are smooth
    in the mean and never pass both tests.  The deviation combines the robust spread of the
    difference image with, when the mean is over ``n`` patterns of counts, the Poisson noise
    of the neighbourhood level (sparse low-dose data would otherwise flag every pixel that
    caught a few more electrons than its neighbours).
    """
    m = np.asarray(mean_pattern, dtype=np.float64)
    med = ndimage.median_filter(m, size=3, mode="nearest")
    d = m - med
    mad = np.median(np.abs(d - np.median(d))) * 1.4826 + 1e-12
    var = mad**2 + (np.maximum(med, 1.0 / n) / n if n else 0.0)
    return (d > nsigma * np.sqrt(var)) & (m > 3.0 * np.maximum(med, 1e-12))


def repair_hot_pixels(block: np.ndarray, hot: np.ndarray, copy: bool = True) -> np.ndarray:
    """Replace hot pixels by the mean of their non-hot 8-neighbours.

    Returns a float32 copy, or repairs ``block`` in place (any dtype; integer counts get the
    rounded mean) when ``copy=False``.
    """
    out = np.array(block, dtype=np.float32) if copy else block
    if not hot.any():
        return out
    Q0, Q1 = hot.shape
    integer = np.issubdtype(out.dtype, np.integer)
    for r, c in zip(*np.nonzero(hot), strict=True):
        rr = slice(max(r - 1, 0), min(r + 2, Q0))
        cc = slice(max(c - 1, 0), min(c + 2, Q1))
        good = ~hot[rr, cc]
        v = (out[..., rr, cc] * good).sum((-1, -2), dtype=np.float64) / max(int(good.sum()), 1)
        out[..., r, c] = np.rint(v) if integer else v
    return out


def normalise(block: np.ndarray) -> np.ndarray:
    """Scale each pattern to mean 1 over the detector (float32).

    Removes dose fluctuations between probe positions so one dictionary fits all; empty
    patterns stay zero.
    """
    b = np.asarray(block, dtype=np.float32)
    m = b.mean(axis=(-1, -2), keepdims=True)
    return np.divide(b, m, out=np.zeros_like(b), where=m > 0)


def central_disk(mean_pattern: np.ndarray) -> tuple[float, float, float]:
    """Centre ``(row, col)`` and radius of the central (000) disk of a mean pattern.

    The central disk is the brightest connected region above half of the pattern maximum
    (after a light blur); its radius comes from its area.
    """
    m = ndimage.gaussian_filter(np.asarray(mean_pattern, dtype=np.float64), 1.0)
    lab, n = ndimage.label(m > 0.5 * m.max())
    if n == 0:
        raise ValueError("no central disk found: is the dataset empty or all zero?")
    k = int(np.argmax(ndimage.maximum(m, lab, index=np.arange(1, n + 1)))) + 1
    region = lab == k
    r, c = ndimage.center_of_mass(m * region)
    radius = float(np.sqrt(region.sum() / np.pi))
    return float(r), float(c), radius


def ring_mask(shape: tuple[int, int], center: tuple[float, float], r_in: float, margin: float = 2.0
              ) -> np.ndarray:
    """Annulus from ``r_in`` to the detector edge minus ``margin`` (float32 0/1)."""
    yy, xx = np.indices(shape, dtype=np.float64)
    r = np.hypot(yy - center[0], xx - center[1])
    r_out = min(center[0], center[1], shape[0] - 1 - center[0], shape[1] - 1 - center[1]) - margin
    return ((r >= r_in) & (r <= r_out)).astype(np.float32)


def radial_background(mean_pattern: np.ndarray, center: tuple[float, float], r_min: float,
                      disks: np.ndarray | None = None) -> np.ndarray:
    """Radially symmetric diffuse background of a mean pattern, as an image.

    Per 1-px annulus about ``center``, the mean of the pixels outside the Bragg disks
    (``disks``, boolean); annuli with no such pixel are interpolated from their neighbours.
    Inside ``r_min`` (the central disk and its rim) the value at ``r_min``.  A mean, not a
    quantile: the mean pattern of sparse counts is itself quantised.
    """
    m = np.asarray(mean_pattern, dtype=np.float64)
    yy, xx = np.indices(m.shape, dtype=np.float64)
    r = np.hypot(yy - center[0], xx - center[1])
    rb = np.floor(r).astype(np.int64)
    keep = np.ones(m.shape, bool) if disks is None else ~np.asarray(disks, bool)
    n = np.bincount(rb[keep], minlength=rb.max() + 1).astype(np.float64)
    tot = np.bincount(rb[keep], weights=m[keep], minlength=rb.max() + 1)
    k = np.arange(len(n))
    ok = n >= 8
    prof = np.interp(k, k[ok], tot[ok] / n[ok]) if ok.any() else np.zeros(len(n))
    k0 = min(int(np.ceil(r_min)), len(prof) - 1)
    prof[:k0] = prof[k0]
    return np.interp(r, k + 0.5, prof).astype(np.float32)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50, restarts: int = 4
           ) -> np.ndarray:
    """Plain k-means (k-means++ seeding, a few restarts); returns labels ``(N,)``."""
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    x = np.asarray(x, dtype=np.float64)
    for _ in range(restarts):
        cent = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = np.min(((x[:, None] - np.asarray(cent)[None]) ** 2).sum(-1), axis=1)
            p = d2 / d2.sum() if d2.sum() > 0 else None
            cent.append(x[rng.choice(len(x), p=p)])
        cent = np.asarray(cent)
        for _ in range(iters):
            d2 = ((x[:, None] - cent[None]) ** 2).sum(-1)
            lab = d2.argmin(1)
            new = np.array([x[lab == j].mean(0) if np.any(lab == j) else cent[j] for j in range(k)])
            if np.allclose(new, cent):
                break
            cent = new
        cost = d2.min(1).sum()
        if cost < best_cost:
            best, best_cost = lab, cost
    return best


def disk_mask(pattern: np.ndarray, ring: np.ndarray, dilate: int = 2) -> np.ndarray:
    """Bragg-disk mask of a (dictionary) pattern inside ``ring`` (float32 0/1).

    Pixels whose top-hat (contrast over the local background) exceeds 5% of the
    brightest disk contrast, dilated by ``dilate`` px so that the disk edges, where the
    strain information lives, are in.
    """
    p = ndimage.gaussian_filter(np.asarray(pattern, dtype=np.float64), 0.7)
    inside = ring > 0
    if not inside.any():
        return np.zeros_like(ring)
    # white top-hat: disks relative to the local diffuse background, whatever its slope
    th = p - ndimage.grey_opening(p, size=(13, 13))
    top = np.percentile(th[inside], 99.5)
    if top <= 1e-6 * max(float(np.abs(p).max()), 1e-12):
        return np.zeros_like(ring)
    m = (th > 0.05 * top) & inside
    m = ndimage.binary_dilation(m, iterations=dilate) & inside
    return m.astype(np.float32)


def disk_contrast(pattern: np.ndarray, ring: np.ndarray) -> float:
    """Bragg-disk contrast of a pattern: 99.5th percentile of its top-hat inside ``ring``.

    Relative to the diffuse background, so a vacuum pattern scores near zero.
    """
    p = ndimage.gaussian_filter(np.asarray(pattern, dtype=np.float64), 0.7)
    th = p - ndimage.grey_opening(p, size=(13, 13))
    inside = ring > 0
    return float(np.percentile(th[inside], 99.5)) if inside.any() else 0.0
