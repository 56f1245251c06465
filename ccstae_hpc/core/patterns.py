"""Pattern kernels: pure functions on numpy blocks ``(..., k_y, k_x)``, no I/O.

Everything here is derived from the data: hot pixels from the mean pattern, the central
disk and the Bragg ring from the mean pattern, Bragg-disk masks from a dictionary pattern;
and the per-block passes of preprocessing (origins, re-centring, binning, descan and
lattice fits) that :mod:`ccstae_hpc.stages.prep` runs over chunks of scan rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "find_hot_pixels",
    "find_dead_pixels",
    "repair_hot_pixels",
    "normalise",
    "central_disk",
    "ring_mask",
    "radial_background",
    "kmeans",
    "disk_mask",
    "disk_contrast",
    "measure_origins",
    "bin_crop",
    "pattern_dtype",
    "recentred",
    "recorded_pixels",
    "normalised",
    "fit_descan",
    "fit_lattice",
    "otsu_threshold",
]

# otsu_threshold: bins of the histogram the threshold is found on, between the 1st and 99th
# percentiles (the tails of failed fits or hot patterns do not stretch it)
OTSU_BINS = 128


def _neighbour_deviation(m: np.ndarray, n: int | None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mean pattern ``m`` against the 3x3 median of its neighbourhood (the edge
    repeated): the difference, its standard deviation (the robust spread of the difference
    image and, for a mean of ``n`` patterns of counts, the Poisson noise of the
    neighbourhood level) and the median."""
    med = ndimage.median_filter(m, size=3, mode="nearest")
    d = m - med
    mad = np.median(np.abs(d - np.median(d))) * 1.4826 + 1e-12
    var = mad**2 + (np.maximum(med, 1.0 / n) / n if n else 0.0)
    return d, np.sqrt(var), med


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
    d, sd, med = _neighbour_deviation(m, n)
    return (d > nsigma * sd) & (m > 3.0 * np.maximum(med, 1e-12))


def find_dead_pixels(mean_pattern: np.ndarray, nsigma: float = 8.0, n: int | None = None
                     ) -> np.ndarray:
    """Boolean mask of detector pixels far darker than their neighbourhood (dead, or
    switched off), in a mean of ``n`` patterns of counts: :func:`find_hot_pixels`' mirror,
    ``nsigma`` standard deviations *and* a factor of 3 below the 3x3 median of its
    neighbours.  A region that receives nothing (beyond an aperture, in a beam stop's
    shadow) is not dead: its median is as low as its pixels.  Nor is a whole dead run along
    the detector's edge: beside it, a disk's edge parallel to the detector's is the same
    3x3 picture (mirroring the edge flagged 6 pixels of the simulator's 32x32 scan at 1e4 e-
    there); a dead pixel on the edge row between live ones is found.  Without counts (``n`` None:
    float data, no Poisson scale) none are flagged: on noise-free multislice patterns the
    test took sharp dynamical structure for dead pixels (38 on abTEM's single-phase set).
    """
    m = np.asarray(mean_pattern, dtype=np.float64)
    if not n:
        return np.zeros(m.shape, bool)
    d, sd, med = _neighbour_deviation(m, n)
    return (-d > nsigma * sd) & (3.0 * m < med)


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
    """Plain k-means (k-means++ seeding, a few restarts); returns labels ``(N,)``.

    Distances come from ``|x|^2 - 2 x.c + |c|^2`` (one matrix product per iteration).
    """
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    x = np.asarray(x, dtype=np.float64)
    xx = (x * x).sum(1)

    def dist2(cent: np.ndarray) -> np.ndarray:
        return np.maximum(xx[:, None] - 2.0 * x @ cent.T + (cent * cent).sum(1)[None], 0.0)

    for _ in range(restarts):
        cent = x[rng.integers(len(x))][None]
        for _ in range(1, k):
            d2 = dist2(cent).min(1)
            p = d2 / d2.sum() if d2.sum() > 0 else None
            cent = np.concatenate([cent, x[rng.choice(len(x), p=p)][None]])
        for _ in range(iters):
            d2 = dist2(cent)
            lab = d2.argmin(1)
            counts = np.bincount(lab, minlength=k)
            sums = np.zeros_like(cent)
            np.add.at(sums, lab, x)
            new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], cent)
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


# -- per-block kernels of the preprocessing passes ------------------------------------------

def measure_origins(block: np.ndarray, hot: np.ndarray, center: np.ndarray, radius: float,
             r_in: float) -> tuple[np.ndarray, np.ndarray]:
    """Central-disk origin (row, col) and Bragg-ring intensity fraction per pattern.

    ``block`` is repaired in place (it is a fresh read).  Only a crop around the mean centre
    becomes float: the origin and the inside of the ring need nothing else, and the total
    comes from an integer sum, so this pass reads the data once and converts 1/10 of it.
    """
    b, nx, Q0, Q1 = block.shape
    x = repair_hot_pixels(block.reshape(b * nx, Q0, Q1), hot, copy=False)
    tot = x.sum((1, 2), dtype=np.float64).clip(min=1e-12)
    # half-width: the centroid window of disk_centroids, and the ring radius plus 8 px of
    # descan drift
    H = int(math.ceil(max(radius + 14.0, r_in + 9.0)))
    r0, c0 = (max(int(round(float(v))) - H, 0) for v in center)
    crop = x[:, r0:r0 + 2 * H + 1, c0:c0 + 2 * H + 1].astype(np.float32)
    yy = np.arange(crop.shape[1], dtype=np.float32)[None, :, None]
    xx = np.arange(crop.shape[2], dtype=np.float32)[None, None, :]

    def dist2(c: np.ndarray) -> np.ndarray:
        return (yy - c[:, :1, None]) ** 2 + (xx - c[:, 1:, None]) ** 2

    # centre of mass within radius + 6 px, re-centred once (follows drift of several px);
    # numpy, not torch: torch's OpenMP threads spin between calls and starve the other
    # block-worker threads
    cen = np.tile(np.asarray(center, np.float32) - [r0, c0], (len(x), 1))
    for _ in range(2):
        w = crop * (dist2(cen) <= (radius + 6.0) ** 2)
        sw = w.sum((1, 2)).clip(min=1e-12)
        cen = np.stack([w.sum(2) @ yy[0, :, 0], w.sum(1) @ xx[0, 0]], 1) / sw[:, None]
    # ring fraction about the measured origin: the share outside r_in (total - inside)
    inside = (crop * (dist2(cen) <= r_in**2)).sum((1, 2), dtype=np.float64)
    frac = 1.0 - inside / tot
    return (cen + [r0, c0]).reshape(b, nx, 2), frac.reshape(b, nx)


def bin_crop(x: np.ndarray, size: int, dtype: np.dtype | None = None) -> np.ndarray:
    """Sum ``f x f`` bins, ``f`` the largest integer factor keeping >= ``size`` px, then
    centre-crop to ``size``.  Sums (not means) keep counts integer; ``dtype`` holds them."""
    Q0, Q1 = x.shape[-2:]
    f = max(1, min(Q0, Q1) // size)
    if f > 1:
        q0, q1 = Q0 // f, Q1 // f
        x = x[..., : q0 * f, : q1 * f].reshape(*x.shape[:-2], q0, f, q1, f).sum(
            (-3, -1), dtype=dtype)
    q0, q1 = x.shape[-2:]
    a, c = (q0 - size) // 2, (q1 - size) // 2
    return x[..., a:a + size, c:c + size]


def pattern_dtype(raw_dtype: np.dtype, binned: bool, floats: bool = False) -> np.dtype:
    """Dtype of ``prep/patterns``: the raw counts' own dtype (uint32 for sums of bins of
    8/16-bit counts), float32 for float data, or when ``floats`` (sub-pixel re-centring,
    background subtraction)."""
    dt = np.dtype(raw_dtype)
    if floats:
        return np.dtype(np.float32)
    if np.issubdtype(dt, np.unsignedinteger) and dt.itemsize <= 4:
        return np.dtype(np.uint32) if binned and dt.itemsize < 4 else dt
    if np.issubdtype(dt, np.signedinteger) and dt.itemsize <= 4:
        return np.dtype(np.int32) if binned and dt.itemsize < 4 else dt
    return np.dtype(np.float32)


def _shift_slices(dy: int, dx: int, Q0: int, Q1: int
                  ) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Source and destination ``(rows, cols)`` slices of a whole-pixel shift by ``(dy, dx)``
    on a ``Q0 x Q1`` detector: ``out[dst] = x[src]``, the rest of ``out`` uncovered."""
    return ((slice(max(dy, 0), Q0 + min(dy, 0)), slice(max(dx, 0), Q1 + min(dx, 0))),
            (slice(max(-dy, 0), Q0 + min(-dy, 0)), slice(max(-dx, 0), Q1 + min(-dx, 0))))


def recorded_pixels(shift: np.ndarray, hot: np.ndarray, size: int) -> np.ndarray:
    """Which pixels of patterns re-centred by :func:`recentred` hold recorded counts.

    A shift uncovers a strip along the detector's edge that :func:`recentred` fills with
    zeros, and a repaired hot pixel holds its neighbours' mean: neither is a measurement, and
    a fit that took them for counts would see the disks near the edge darkened.  A binned
    pixel is recorded when all its ``f x f`` detector pixels are; a sub-pixel shift needs
    the pixels its interpolation reads, and leaves the last row and column empty.

    Parameters
    ----------
    shift : ``(..., 2)`` shifts (rows, cols) as :func:`recentred` takes them.
    hot : ``(Q0, Q1)`` hot-pixel mask of the raw detector.
    size : side of the re-centred patterns.

    Returns
    -------
    ``(n, size, size)`` bool, one mask per shift (in ``shift``'s order, flattened).
    """
    Q0, Q1 = hot.shape
    s = np.asarray(shift).reshape(-1, 2)
    subpixel = np.issubdtype(s.dtype, np.floating)
    if subpixel:
        whole = np.floor(s).astype(np.int64)
        part = (s - whole) > 0
    else:
        whole, part = s.astype(np.int64), np.zeros(s.shape, bool)
    keys = np.concatenate([whole, part], 1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    f = max(1, min(Q0, Q1) // size)
    masks = np.empty((len(uniq), size, size), bool)
    for i, (dy, dx, py, px) in enumerate(uniq):
        m = np.zeros((Q0, Q1), bool)
        src, dst = _shift_slices(int(dy), int(dx), Q0, Q1)
        m[dst] = ~hot[src]
        if py:
            m[:-1] &= m[1:]
        if px:
            m[:, :-1] &= m[:, 1:]
        if subpixel:  # the interpolation leaves its last row and column empty
            m[-1] = False
            m[:, -1] = False
        masks[i] = bin_crop(m[None].astype(np.int32), size)[0] == f * f
    return masks[inverse.reshape(-1)]


def recentred(block: np.ndarray, hot: np.ndarray, shift: np.ndarray, size: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Repair, shift each pattern by ``shift`` (rows, cols), bin/crop.

    Integer shifts copy pixels; a float ``shift`` is applied as its whole-pixel part, then a
    bilinear interpolation by the fractional rest.

    Returns the patterns in :func:`pattern_dtype` (counts stay counts: lossless, and half
    the bytes of float32) and the per-pattern scale ``1 / mean`` that normalises them.
    ``block`` (a fresh read) is repaired in place.
    """
    b, nx, Q0, Q1 = block.shape
    f = max(1, min(Q0, Q1) // size)
    subpixel = np.issubdtype(shift.dtype, np.floating)
    dt = pattern_dtype(block.dtype, f > 1, subpixel)
    x = repair_hot_pixels(block.reshape(b * nx, Q0, Q1), hot, copy=False)
    s = shift.reshape(-1, 2)
    if subpixel:
        whole = np.floor(s)
        rest, s = (s - whole).astype(np.float32), whole.astype(np.int64)
    if np.any(s):
        # into a new array, casting while copying: one pass over the data.  Grouped by shift:
        # one vectorised slice copy per distinct shift (a handful per block); only the
        # strips the shift uncovers are zeroed
        out = np.empty(x.shape, dt if f == 1 else x.dtype)
        keys = s[:, 0] * 4096 + s[:, 1]
        for key in np.unique(keys):
            sel = np.nonzero(keys == key)[0]
            dy, dx = (int(v) for v in s[sel[0]])
            sel = slice(sel[0], sel[-1] + 1) if sel[-1] - sel[0] + 1 == len(sel) else sel
            (src_y, src_x), (dst_y, dst_x) = _shift_slices(dy, dx, Q0, Q1)
            out[sel, dst_y, dst_x] = x[sel, src_y, src_x]
            for ys in (slice(0, max(-dy, 0)), slice(Q0 + min(-dy, 0), Q0)):
                out[sel, ys] = 0
            for xs in (slice(0, max(-dx, 0)), slice(Q1 + min(-dx, 0), Q1)):
                out[sel, dst_y, xs] = 0
        x = out
    if subpixel:
        x = _bilinear(x if x.dtype == dt else x.astype(dt), rest)
    x = bin_crop(x, size, dt)
    if x.dtype != dt:
        x = x.astype(dt)
    tot = x.sum((-1, -2), dtype=np.float64)
    scale = np.divide(size * size, tot, out=np.zeros_like(tot), where=tot > 0)
    return x.reshape(b, nx, size, size), scale.astype(np.float32).reshape(b, nx)


def _bilinear(x: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """``out[p] = x[p + rest]`` per pattern, ``0 <= rest < 1`` (rows, cols); the last row and
    column, which would need pixels beyond the detector, are zero."""
    fy, fx = rest[:, 0, None, None], rest[:, 1, None, None]
    out = np.zeros_like(x)
    out[:, :-1, :-1] = ((1 - fy) * (1 - fx) * x[:, :-1, :-1] + (1 - fy) * fx * x[:, :-1, 1:]
                        + fy * (1 - fx) * x[:, 1:, :-1] + fy * fx * x[:, 1:, 1:])
    return out


def normalised(patterns: np.ndarray, scale: np.ndarray, dtype: type = np.float32,
               background: np.ndarray | None = None) -> np.ndarray:
    """Model input from ``prep/patterns``, ``prep/scale`` (each pattern at mean 1) and
    ``prep/background`` (subtracted)."""
    out = np.asarray(patterns).astype(dtype)
    out *= np.asarray(scale, dtype)[..., None, None]
    if background is not None and np.any(background):
        out -= np.asarray(background, dtype)
    return out


def fit_descan(origin: np.ndarray, order: int = 2, weight: np.ndarray | None = None,
               iters: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Robust polynomial fit of the origin over the scan.

    Parameters
    ----------
    origin : (ny, nx, 2) measured origins (row, col).
    order : total polynomial degree in the scan coordinates.
    weight : (ny, nx) optional weights (0 excludes).

    Returns
    -------
    fitted : (ny, nx, 2) smooth origins; coef : (n_terms, 2) coefficients on scan
    coordinates normalised to [-1, 1].
    """
    ny, nx, _ = origin.shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    terms = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    X = np.stack([yy.ravel() ** i * xx.ravel() ** j for i, j in terms], 1)
    y = origin.reshape(-1, 2)
    w = np.ones(len(y)) if weight is None else weight.ravel().astype(np.float64)
    w = w * np.isfinite(y).all(1)
    y = np.nan_to_num(y)
    for _ in range(iters):
        sw = np.sqrt(w)[:, None]
        coef = np.linalg.lstsq(X * sw, y * sw, rcond=None)[0]
        r = np.linalg.norm(y - X @ coef, axis=1)
        s = 1.4826 * np.median(r[w > 0]) + 1e-6
        # Tukey-style reweighting: a few bad origins (e.g. a hot spot) cannot bend the fit
        w = w * (r < 4 * s) if np.any(w * (r < 4 * s)) else w
    return (X @ coef).reshape(ny, nx, 2), coef


def fit_lattice(mean_pattern: np.ndarray, center: Sequence[float], r_in: float
                ) -> dict[str, Any]:
    """Detect Bragg disks on a mean pattern and fit two reciprocal basis vectors.

    Peaks of the top-hat above 5% of the brightest; basis = the shortest peak vector and the
    shortest one not parallel to it; refined by least squares on every peak that indexes to
    within 0.2 of an integer.  Returns pixel units, ``(x, y)`` = ``(col, row)``.
    """
    p = ndimage.gaussian_filter(np.asarray(mean_pattern, np.float64), 1.0)
    th = p - ndimage.grey_opening(p, size=(13, 13))
    yy, xx = np.indices(p.shape)
    r = np.hypot(yy - center[0], xx - center[1])
    lm = (th == ndimage.maximum_filter(th, size=7)) & (th > 0.05 * th[r > r_in].max()) & (r > r_in)
    pk = np.argwhere(lm).astype(np.float64)
    if len(pk) < 4:
        return {"found": False, "n_peaks": int(len(pk))}
    # sub-pixel: centre of mass of the top-hat in a 5x5 window
    refined = []
    for yp, xp in pk.astype(int):
        win = th[max(yp - 2, 0):yp + 3, max(xp - 2, 0):xp + 3].clip(min=0)
        wy, wx = np.indices(win.shape)
        s = win.sum()
        refined.append([max(yp - 2, 0) + (win * wy).sum() / s,
                        max(xp - 2, 0) + (win * wx).sum() / s])
    v = np.asarray(refined)[:, ::-1] - np.asarray(center)[::-1]  # (x, y) relative to origin
    order = np.argsort(np.linalg.norm(v, axis=1))
    a = v[order[0]]
    def cross(p: np.ndarray, q: np.ndarray) -> float:
        return float(p[0] * q[1] - p[1] * q[0])

    b = next((v[i] for i in order[1:] if abs(cross(a, v[i])) > 0.3 * np.dot(a, a)), None)
    if b is None:
        return {"found": False, "n_peaks": int(len(pk))}
    G = np.stack([a, b], 1)
    hk = np.linalg.solve(G, v.T).T
    good = np.all(np.abs(hk - np.round(hk)) < 0.2, axis=1)
    H = np.round(hk[good])
    G = np.linalg.lstsq(H, v[good], rcond=None)[0].T
    resid = v[good] - H @ G.T
    return {
        "found": True,
        "n_peaks": int(len(pk)),
        "n_indexed": int(good.sum()),
        "basis_px": G.T.tolist(),  # rows: g1, g2 as (x, y) px
        "lengths_px": np.linalg.norm(G, axis=0).tolist(),
        "angle_deg": float(np.degrees(np.arccos(
            np.dot(G[:, 0], G[:, 1]) / np.prod(np.linalg.norm(G, axis=0))))),
        "rms_px": float(np.sqrt((resid ** 2).sum(1).mean())),
    }


def otsu_threshold(values: np.ndarray) -> float | None:
    """The 2-class Otsu threshold of ``values`` (1-D; OTSU_BINS bins between their 1st and
    99th percentiles), or None when they hold no spread.  It splits any distribution, one
    mode or two: callers test the classes it makes."""
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return None
    lo, hi = np.percentile(v, [1, 99])
    if hi - lo < 1e-6 * max(1.0, abs(hi)):
        return None
    hist, edges = np.histogram(v, bins=OTSU_BINS, range=(lo, hi))
    p = hist / hist.sum()
    mids = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(p)
    m = np.cumsum(p * mids)
    with np.errstate(invalid="ignore", divide="ignore"):
        between = (m[-1] * w0 - m) ** 2 / (w0 * (1 - w0))
    return float(mids[int(np.nanargmax(between))])
