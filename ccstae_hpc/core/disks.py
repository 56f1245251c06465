"""Sharp-disk forward model of the dictionary entries, from the data's own disk profile.

A learned dictionary entry is an average over many patterns: its disk edges are blurred by
the strain and registration spread of the patterns it was learned from, and warping a
pixelated image by interpolation blurs them again.  Both throw away the information a disk
edge carries (measured: single-pattern fits at ~1.6x the Cramer-Rao floor of their own
pixels with even the exact noise-free pattern as the dictionary).  The final registration
therefore fits each pattern with a model rendered at any sub-pixel position:

``D(k) = sum_j a_j f(|k - c_j|) + background(k)``

* ``f``, the radial profile of one disk as a detector pixel records it (pixel integration
  and detector blur included), is measured on the patterns themselves: every Bragg disk is
  an image of the same probe-forming aperture as the central disk, whose sharp, bright edge
  is measured at sub-pixel resolution by binning the pixels of many patterns by their
  distance from each pattern's own fitted disk centre (:func:`measure_profile`);
* the disk centres ``c_j`` and amplitudes ``a_j`` of each entry are fitted to the entry with
  that profile (:func:`fit_entries`); a symmetric blur of the entry moves no centre, so the
  model keeps the entry's geometry and its relations to the other entries;
* ``background`` is the entry's smooth remainder between the disks.

The learned entries were trained on the Bragg annulus only; the model then grows over the
whole detector (:func:`extend_model`): patterns registered onto an entry are averaged in its
frame (:func:`registered_mean`), the entry's lattice labels every disk the registered
patterns reach (:func:`lattice_labels`: the corners, the disks cut by the annulus or by the
detector's edge), and the disks are fitted there, each centred on its lattice point.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["DiskProfile", "DiskModel", "blur_profile", "measure_profile", "fit_entries",
           "render_entry",
           "registered_mean", "lattice_labels", "LatticeLabels", "extend_model", "bragg_region",
           "PROFILE_STEP_PX"]

# radial bin of the measured profile: a tenth of a pixel resolves a one-pixel edge
PROFILE_STEP_PX = 0.1
# the profile is measured out to the disk radius plus this (the edge and its blur)...
PROFILE_REACH_PX = 3.0
# ... and its level outside the disk between these distances beyond the radius
OUTSIDE_RING_PX = (1.5, 3.0)
# the plateau is the mean inside this fraction of the radius
PLATEAU_FRACTION = 0.6
# alternations of (profile, per-pattern centres) when measuring the profile
PROFILE_ROUNDS = 3
# Gauss-Newton steps of each centre fit
CENTRE_STEPS = 3
# a disk centre step larger than this (px) is not trusted (a fit thrown off by noise)
MAX_CENTRE_STEP_PX = 1.0
# blurs (px) tried for the entry's disks when their centres are fitted: a learned entry is an
# average over patterns, its edges blurred by their spread; a centre fitted with a profile
# sharper than the disk is pulled by truncated and neighbouring disks (0.06 px measured)
ENTRY_BLURS_PX = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
# smooth background between the disks: normalised convolution of the entry's non-disk
# pixels with a Gaussian of this many disk radii
BACKGROUND_SIGMA_RADII = 2.0
# a lattice point's label is a disc this many px wider than the disk (its edge and blur,
# and the few-per-cent strain of the patterns that the fit's start leaves)
LABEL_MARGIN_PX = 2.0
# lattice indices from the labelled disks: every disk within this (px) of its lattice point,
# else the entry's lattice is not trusted and the model keeps the annulus
LATTICE_TOLERANCE_PX = 1.0
# A few labelled "disks" of a low-dose entry are noise (measured: 2 of 38 on the 32x32
# heterostructure at 500 e-/pattern, where a lattice through all of them failed and the
# model kept only the annulus): the lattice is taken through at least this fraction of
# them, its basis searched among the centres nearest the pattern's centre, fitted again
# LATTICE_REFITS times on the centres it places within LATTICE_TOLERANCE_PX
LATTICE_MIN_INLIERS = 0.8
LATTICE_BASIS_CANDIDATES = 8
LATTICE_REFITS = 3
# cells within this fraction of each other are one lattice's (different bases, rounding)
LATTICE_SAME_CELL = 0.01
# a lattice point joins the model when this fraction of its label disc lies on pixels that
# at least REGISTERED_COVERAGE of the registered patterns reach; it is whole (its fitted
# centre places the lattice) from WHOLE_DISC on
DISC_ON_DETECTOR = 0.25
WHOLE_DISC = 0.99
REGISTERED_COVERAGE = 0.5


def blur_profile(values: np.ndarray, step: float, sigma: float) -> np.ndarray:
    """A radial profile sampled every ``step`` px with its edge blurred by a Gaussian of
    ``sigma`` px along ``r`` (the disks are many pixels wide), plateau kept."""
    v = np.asarray(values)
    if sigma <= 0:
        return v
    pad = int(np.ceil(4 * sigma / step))
    # even about r = 0, zero beyond the end
    ext = np.concatenate([v[pad:0:-1], v, np.zeros(pad)])
    return ndimage.gaussian_filter1d(ext, sigma / step, mode="nearest")[pad:pad + len(v)]


@dataclass(frozen=True)
class DiskProfile:
    """Radial profile ``f(r)`` of one disk: ``values[i]`` at ``r = i * step`` px, 1 on the
    plateau, 0 outside (linear between samples, 0 beyond the last)."""

    values: np.ndarray
    step: float
    radius: float  # px, where the profile crosses 1/2
    edge_px: float  # 90 % to 10 % width of the edge, px

    def __call__(self, r: np.ndarray) -> np.ndarray:
        grid = np.arange(len(self.values)) * self.step
        return np.interp(r, grid, self.values, right=0.0)

    def blurred(self, sigma: float) -> DiskProfile:
        """The profile with its edge blurred by a Gaussian of ``sigma`` px (see
        :func:`blur_profile`)."""
        if sigma <= 0:
            return self
        return DiskProfile(blur_profile(self.values, self.step, sigma), self.step, self.radius,
                           float(np.hypot(self.edge_px, 2.56 * sigma)))

    def derivative(self, r: np.ndarray) -> np.ndarray:
        """``df/dr`` of the piecewise-linear profile (0 beyond its last sample)."""
        slope = np.append(np.diff(self.values) / self.step, 0.0)
        idx = np.clip((np.asarray(r) / self.step).astype(np.int64), 0, len(slope) - 1)
        return slope[idx]


@dataclass(frozen=True)
class DiskModel:
    """The sharp-disk model of every entry of a dictionary (``K`` entries, ``n`` disks at
    most; row 0 of ``centers``/``amps`` is "no disk" so that a label indexes them)."""

    centers: np.ndarray  # (K, n + 1, 2) disk centres (x, y), detector px of the entry
    amps: np.ndarray  # (K, n + 1) disk amplitudes (profile plateau), 0 in row 0
    background: np.ndarray  # (K, Q, Q) smooth remainder between the disks
    profile: DiskProfile
    # the model's own disk labels (K, Q, Q) and the detector pixels its fits use (Q, Q bool)
    # when it reaches beyond the Bragg annulus (:func:`extend_model`); None: the dictionary
    # analysis' labels and the annulus
    labels: np.ndarray | None = None
    region: np.ndarray | None = None

    def to_dict(self) -> dict:
        """Plain arrays (for a Dask payload)."""
        p = self.profile
        return {"centers": self.centers, "amps": self.amps, "background": self.background,
                "profile": {"values": p.values, "step": p.step, "radius": p.radius,
                            "edge_px": p.edge_px},
                "labels": self.labels, "region": self.region}

    @classmethod
    def from_dict(cls, d: dict) -> DiskModel:
        return cls(d["centers"], d["amps"], d["background"], DiskProfile(**d["profile"]),
                   d.get("labels"), d.get("region"))


def _non_increasing(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-increasing fit of ``v`` (pool adjacent violators)."""
    vals, wts, lens = [], [], []
    for vi, wi in zip(v.tolist(), w.tolist(), strict=True):
        vals.append(vi)
        wts.append(wi)
        lens.append(1)
        while len(vals) > 1 and vals[-2] < vals[-1]:
            wsum = wts[-2] + wts[-1]
            vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / max(wsum, 1e-300)
            wts[-2] = wsum
            lens[-2] += lens[-1]
            del vals[-1], wts[-1], lens[-1]
    return np.repeat(vals, lens)


def _binned(r: np.ndarray, v: np.ndarray, n_bins: int) -> np.ndarray:
    """Mean of ``v`` in radial bins of :data:`PROFILE_STEP_PX`, made non-increasing: a disk
    is an image of the round aperture, bright inside and dark outside; the constraint removes
    the noise of the few pixels near its centre without blurring its edge."""
    idx = np.clip(np.rint(r / PROFILE_STEP_PX).astype(np.int64), 0, n_bins - 1)
    s = np.bincount(idx, v, n_bins)
    c = np.bincount(idx, None, n_bins)
    out = _non_increasing(s / np.maximum(c, 1), c.astype(np.float64))
    # the few pixels nearest the centre would otherwise stand above the plateau
    return np.minimum(out, out[np.argmax(c > 0) + int(np.ceil(1.0 / PROFILE_STEP_PX))])


def _crossings(values: np.ndarray) -> tuple[float, float]:
    """Radius (1/2 crossing) and 90-10 % edge width of a falling profile, px."""
    grid = np.arange(len(values)) * PROFILE_STEP_PX

    def cross(level: float) -> float:
        below = np.flatnonzero(values < level)
        if len(below) == 0 or below[0] == 0:
            return float(grid[-1] if len(below) == 0 else 0.0)
        i = below[0]
        f0, f1 = values[i - 1], values[i]
        return float(grid[i - 1] + (f0 - level) / max(f0 - f1, 1e-12) * PROFILE_STEP_PX)

    return cross(0.5), cross(0.1) - cross(0.9)


def measure_profile(x: np.ndarray, center: tuple[float, float], radius: float) -> DiskProfile:
    """The disk profile of the central disk of patterns ``x`` ``(n, Q, Q)``.

    Each pattern's own disk centre is fitted (the recentring leaves up to half a pixel), its
    pixels are normalised by their plateau and outside level, and all patterns' pixels are
    binned by their distance from their centre: sub-pixel sampling of the edge.  Centres and
    profile are alternated :data:`PROFILE_ROUNDS` times.

    Parameters
    ----------
    x : (n, Q, Q) patterns (counts or normalised counts).
    center : (row, col) of the central disk in the mean pattern, px.
    radius : its radius, px.
    """
    x = np.asarray(x, np.float64)
    n, Q, _ = x.shape
    reach = radius + PROFILE_REACH_PX
    half = int(np.ceil(reach + MAX_CENTRE_STEP_PX + 1))
    r0, c0 = int(round(center[0])), int(round(center[1]))
    rows = np.clip(np.arange(r0 - half, r0 + half + 1), 0, Q - 1)
    cols = np.clip(np.arange(c0 - half, c0 + half + 1), 0, Q - 1)
    win = x[:, rows][:, :, cols]  # (n, W, W)
    yy, xx = np.meshgrid(rows.astype(np.float64), cols.astype(np.float64), indexing="ij")
    cy = np.full(n, float(center[0]))
    cx = np.full(n, float(center[1]))
    n_bins = int(np.ceil(reach / PROFILE_STEP_PX)) + 1
    values = None
    for _ in range(PROFILE_ROUNDS):
        dy = yy[None] - cy[:, None, None]
        dx = xx[None] - cx[:, None, None]
        r = np.hypot(dy, dx)
        inner = r < PLATEAU_FRACTION * radius
        outer = (r > radius + OUTSIDE_RING_PX[0]) & (r < radius + OUTSIDE_RING_PX[1])
        top = (win * inner).sum((1, 2)) / np.maximum(inner.sum((1, 2)), 1)
        out = (win * outer).sum((1, 2)) / np.maximum(outer.sum((1, 2)), 1)
        height = top - out
        ok = height > 0
        v = (win - out[:, None, None]) / np.where(ok, height, 1.0)[:, None, None]
        sel = (r <= reach) & ok[:, None, None]
        values = _binned(r[sel], v[sel], n_bins)
        values = np.maximum(values, 0.0)  # no negative intensity (noise of the outside level)
        values[-1] = 0.0
        prof = DiskProfile(values, PROFILE_STEP_PX, radius, 1.0)
        # each pattern's centre, one Gauss-Newton fit of its disk with this profile
        for _ in range(CENTRE_STEPS):
            dy = yy[None] - cy[:, None, None]
            dx = xx[None] - cx[:, None, None]
            r = np.maximum(np.hypot(dy, dx), 1e-6)
            m = out[:, None, None] + height[:, None, None] * prof(r)
            fp = height[:, None, None] * prof.derivative(r)
            jx, jy = -fp * dx / r, -fp * dy / r  # d model / d centre
            res = win - m
            w = (r <= reach).astype(np.float64)
            hxx, hyy, hxy = (w * jx * jx).sum((1, 2)), (w * jy * jy).sum((1, 2)), \
                (w * jx * jy).sum((1, 2))
            gx, gy = (w * jx * res).sum((1, 2)), (w * jy * res).sum((1, 2))
            det = hxx * hyy - hxy * hxy
            good = ok & (det > 1e-12 * np.maximum(hxx * hyy, 1e-300))
            det = np.where(good, det, 1.0)
            sx = np.where(good, (hyy * gx - hxy * gy) / det, 0.0)
            sy = np.where(good, (hxx * gy - hxy * gx) / det, 0.0)
            cx += np.clip(sx, -MAX_CENTRE_STEP_PX, MAX_CENTRE_STEP_PX)
            cy += np.clip(sy, -MAX_CENTRE_STEP_PX, MAX_CENTRE_STEP_PX)
    assert values is not None
    rad, edge = _crossings(values)
    return DiskProfile(values, PROFILE_STEP_PX, rad, edge)


def _fit_disks(d: np.ndarray, labels: np.ndarray, prof: DiskProfile,
               center: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(n, 2)`` (x, y) and amplitudes ``(n,)`` of the labelled disks of one entry,
    with the profile blurred as much as the entry's disks are (the blur of
    :data:`ENTRY_BLURS_PX` of least squared residual)."""
    pixels = _disk_pixels(d, labels, prof, center)
    best = None
    for sigma in ENTRY_BLURS_PX:
        c, a, sse = _fit_disks_with(d, pixels, prof.blurred(sigma))
        if best is None or sse < best[2]:
            best = (c, a, sse)
    assert best is not None
    return best[0], best[1]


def _disk_pixels(d: np.ndarray, labels: np.ndarray, prof: DiskProfile,
                 center: tuple[float, float]) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Each labelled disk's whole neighbourhood: the pixels within the profile's reach of its
    centroid that are nearer to it than to any other disk or the central disk.  The labels
    stop at the Bragg annulus; a disk cut there would be pulled inward or outward by its
    missing side, and differently in each entry (a false lattice mismatch)."""
    n = int(labels.max())
    yy, xx = np.indices(d.shape, dtype=np.float64)
    cents = np.full((n + 1, 2), np.nan)
    cents[0] = center[1], center[0]
    for j in range(1, n + 1):
        m = labels == j
        if m.sum() < 4:
            continue
        v = d[m].astype(np.float64)
        w = np.clip(v - np.percentile(v, 10), 0, None)
        if w.sum() > 0:
            cents[j] = (w * xx[m]).sum() / w.sum(), (w * yy[m]).sum() / w.sum()
    ok = np.isfinite(cents[:, 0])
    dist = np.full((n + 1,) + d.shape, np.inf)
    dist[ok] = np.hypot(xx[None] - cents[ok, 0, None, None], yy[None] - cents[ok, 1, None, None])
    nearest = dist.argmin(0)
    reach = len(prof.values) * prof.step
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None]
    for j in range(1, n + 1):
        if not ok[j]:
            out.append(None)
            continue
        m = (nearest == j) & (dist[j] <= reach)
        out.append((m, cents[j].copy()))
    return out


def _fit_disks_with(d: np.ndarray, pixels: list, prof: DiskProfile
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """Centres, amplitudes and the summed squared residual of ``a f(|k - c|) + b`` fitted on
    each disk's pixels (:func:`_disk_pixels`) by Gauss-Newton from its centroid."""
    n = len(pixels) - 1
    centers = np.zeros((n, 2))
    amps = np.zeros(n)
    sse = 0.0
    yy, xx = np.indices(d.shape, dtype=np.float64)
    for j in range(1, n + 1):
        if pixels[j] is None:
            continue
        m, c = pixels[j]
        v, py, px = d[m].astype(np.float64), yy[m], xx[m]
        if len(v) < 4:
            continue
        base = float(np.percentile(v, 10))
        a, b = float(v.max() - base), base
        for _ in range(CENTRE_STEPS + 1):
            dx, dy = px - c[0], py - c[1]
            r = np.maximum(np.hypot(dx, dy), 1e-6)
            f, fp = prof(r), prof.derivative(r)
            # a and b are linear: solve them with the centre step in one system
            J = np.stack([-a * fp * dx / r, -a * fp * dy / r, f, np.ones_like(f)], 1)
            res = v - (a * f + b)
            step, *_ = np.linalg.lstsq(J, res, rcond=None)
            c = c + np.clip(step[:2], -MAX_CENTRE_STEP_PX, MAX_CENTRE_STEP_PX)
            a, b = a + step[2], b + step[3]
        r = np.hypot(px - c[0], py - c[1])
        sse += float(((v - a * prof(r) - b) ** 2).sum())
        centers[j - 1], amps[j - 1] = c, max(a, 0.0)
    return centers, amps, sse


def _smooth_background(d: np.ndarray, disks: np.ndarray, sigma: float,
                       center: tuple[float, float], central: float) -> np.ndarray:
    """The entry between its disks, smoothed (normalised convolution): the diffuse part.
    The central disk (within ``central`` px of ``center``) is left out: smoothed, its
    intensity (most of a thin sample's) would spill onto the first Bragg disks."""
    yy, xx = np.indices(d.shape, dtype=np.float64)
    near = np.hypot(yy - center[0], xx - center[1]) < central
    keep = (~disks & ~near).astype(np.float64)
    num = ndimage.gaussian_filter(d * keep, sigma)
    den = ndimage.gaussian_filter(keep, sigma)
    return (num / np.maximum(den, 1e-6)).astype(np.float32)


def fit_entries(patterns: np.ndarray, labels: np.ndarray, entries: np.ndarray,
                profile: DiskProfile, center: tuple[float, float]) -> DiskModel:
    """The sharp-disk model of the listed entries of a dictionary ``(K, Q, Q)`` (``labels``
    numbers each entry's disks; other entries get no disks, only their smooth remainder);
    ``center`` (row, col) is the central disk's, px."""
    K, Q, _ = patterns.shape
    n = max(int(labels.max()), 1)
    centers = np.zeros((K, n + 1, 2), np.float32)
    amps = np.zeros((K, n + 1), np.float32)
    background = np.zeros((K, Q, Q), np.float32)
    sigma = BACKGROUND_SIGMA_RADII * profile.radius
    for k in range(K):
        d = np.asarray(patterns[k], np.float64)
        if k in set(int(e) for e in entries) and labels[k].max() > 0:
            c, a = _fit_disks(d, labels[k], profile, center)
            centers[k, 1:len(c) + 1], amps[k, 1:len(a) + 1] = c, a
            background[k] = _smooth_background(d, labels[k] > 0, sigma, center,
                                               profile.radius + PROFILE_REACH_PX)
        else:
            background[k] = d
    return DiskModel(centers, amps, background, profile)


def render_entry(model: DiskModel, k: int, labels: np.ndarray) -> np.ndarray:
    """Entry ``k`` of the model on its own pixels (each pixel with its labelled disk)."""
    Q = model.background.shape[-1]
    yy, xx = np.indices((Q, Q), dtype=np.float64)
    lab = labels[k]
    c = model.centers[k][lab]
    r = np.hypot(xx - c[..., 0], yy - c[..., 1])
    return model.background[k] + model.amps[k][lab] * model.profile(r)


def bragg_region(shape: tuple[int, int], center: tuple[float, float], r_in: float
                 ) -> np.ndarray:
    """Detector pixels beyond the Bragg annulus' inner radius ``r_in`` about ``center``
    (row, col), out to the detector's edge: the annulus and the corners.  The outermost
    disks, cut by the edge, move most with strain (the Cramer-Rao floor of the annulus alone
    is 1.15-1.19x that of the whole detector on the project's simulator; leaving out 2 px
    along the edge raised WS2's by 2-4 %, 2026-12-06).  Which of these pixels each pattern
    really recorded (not a re-centring's empty strip) is the fits' business
    (:func:`ccstae_hpc.core.patterns.recorded_pixels`)."""
    yy, xx = np.indices(shape, dtype=np.float64)
    return np.hypot(yy - center[0], xx - center[1]) >= r_in


@torch.no_grad()
def registered_mean(x: torch.Tensor, theta: torch.Tensor, recorded: torch.Tensor | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Patterns ``x`` ``(n, Q, Q)`` carried into their entry's frame by their fitted affines
    ``theta`` ``(n, 2, 3)`` (``refine``'s convention: the entry at ``k`` is the pattern at
    ``A k + t``) and averaged: the entry as the data show it, sharp where the learned entry
    is blurred and defined where it was never trained (beyond the Bragg annulus).

    ``recorded`` ``(n, Q, Q)`` bool marks the pixels of each pattern that hold recorded
    counts (:func:`ccstae_hpc.core.patterns.recorded_pixels`; None: the whole detector).
    Returns the mean ``(Q, Q)`` and the fraction of patterns that reach each pixel.
    """
    n, Q, _ = x.shape
    grid = F.affine_grid(theta.float(), [n, 1, Q, Q], align_corners=False)
    total = torch.zeros(Q, Q)
    reach = torch.zeros(Q, Q)
    for i in range(0, n, 64):  # bounded work arrays
        g = grid[i:i + 64]
        on = (torch.ones(len(g), 1, Q, Q) if recorded is None
              else recorded[i:i + 64, None].float())
        # a pixel counts as reached where its whole bilinear footprint lies on recorded pixels
        w = F.grid_sample(on, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        hit = (w > 0.999).float()
        total += (F.grid_sample(x[i:i + 64, None].float() * on, g, mode="bilinear",
                                padding_mode="zeros", align_corners=False) * hit).sum((0, 1))
        reach += hit.sum((0, 1))
    mean = (total / reach.clamp(min=1.0)).numpy()
    return mean, (reach / max(n, 1)).numpy()


def _lattice(cents: np.ndarray, origin: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The 2-D lattice through disk centres ``cents`` ``(m, 2)`` (x, y) near ``origin``:
    ``coef`` ``(3, 2)`` (rows a, b, origin; least squares on the integer indices of the
    centres within LATTICE_TOLERANCE_PX of their lattice points) and the indices ``(m, 2)``
    of all centres.

    Robust to a few stray centres (a low-dose entry's noise labelled as a disk, seen at
    500 e-/pattern): every pair of the LATTICE_BASIS_CANDIDATES centres nearest the origin
    is tried as a basis, and of those that put at least LATTICE_MIN_INLIERS of the centres
    on their lattice the one with the largest cell is kept (a finer lattice than the
    crystal's, which a stray centre can span, fits every centre too).  None when no basis
    does (too few centres, or no lattice)."""
    if len(cents) < 4:
        return None
    rel = cents - origin
    near = np.argsort(np.hypot(rel[:, 0], rel[:, 1]))[:LATTICE_BASIS_CANDIDATES]
    need = max(4, int(np.ceil(LATTICE_MIN_INLIERS * len(cents))))
    found = []  # (cell area, inliers, rms, coef, inlier mask) of every basis that fits
    for i, j in itertools.combinations(near, 2):
        a, b = rel[i], rel[j]
        cross = abs(a[0] * b[1] - a[1] * b[0])
        if cross <= 0.5 * np.hypot(*a) * np.hypot(*b):
            continue  # nearly collinear
        hk = np.rint(np.linalg.solve(np.stack([a, b], 1), rel.T).T).astype(np.int64)
        inl = np.ones(len(cents), bool)
        for _ in range(LATTICE_REFITS):
            if inl.sum() < 3:
                break
            coef = _lattice_through(hk[inl], cents[inl])
            err = np.hypot(*(_lattice_points(hk, coef) - cents).T)
            inl = err <= LATTICE_TOLERANCE_PX
        if inl.sum() >= need:
            coef = _lattice_through(hk[inl], cents[inl])
            err = np.hypot(*(_lattice_points(hk[inl], coef) - cents[inl]).T)
            found.append((abs(float(np.linalg.det(coef[:2]))), int(inl.sum()),
                          float(np.sqrt(np.mean(err ** 2))), coef, inl))
    if not found:
        return None
    # the largest cell (bases of one lattice give the same cell to rounding), then the
    # most centres on it, then the closest fit
    big = max(f[0] for f in found)
    _, _, _, coef, inl = min((f for f in found if f[0] >= (1 - LATTICE_SAME_CELL) * big),
                             key=lambda f: (-f[1], f[2]))
    # the shortest basis of that lattice (Lagrange-Gauss reduction): lattice_labels walks
    # the indices up to the detector's diagonal over the shortest step, which covers the
    # detector only for a reduced basis
    a, b = coef[0].copy(), coef[1].copy()
    while True:
        if a @ a > b @ b:
            a, b = b, a
        m = round(float(a @ b) / float(a @ a))
        if m == 0:
            break
        b = b - m * a
    hk = np.rint(np.linalg.solve(np.stack([a, b], 1), (cents - coef[2]).T).T).astype(np.int64)
    return _lattice_through(hk[inl], cents[inl]), hk


def _lattice_points(hk: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """Points ``(m, 2)`` (x, y) of lattice indices ``hk`` ``(m, 2)`` on lattice ``coef``."""
    return np.column_stack([hk, np.ones(len(hk))]) @ coef


def _lattice_through(hk: np.ndarray, cents: np.ndarray) -> np.ndarray:
    """The lattice ``coef`` ``(3, 2)`` (rows a, b, origin) of least squares through centres
    ``cents`` ``(m, 2)`` with indices ``hk``."""
    coef, *_ = np.linalg.lstsq(np.column_stack([hk, np.ones(len(hk))]), cents, rcond=None)
    return coef


@dataclass(frozen=True)
class LatticeLabels:
    """Disk labels drawn from an entry's lattice (:func:`lattice_labels`)."""

    labels: np.ndarray  # (Q, Q) int: label j on the pixels of lattice point hk[j - 1]
    hk: np.ndarray  # (n, 2) lattice indices of labels 1..n
    whole: np.ndarray  # (n,) bool: the disk's whole disc lies on the allowed pixels


def lattice_labels(labels: np.ndarray, centers: np.ndarray, amps: np.ndarray,
                   center: tuple[float, float], radius: float, allowed: np.ndarray
                   ) -> LatticeLabels | None:
    """An entry's disk labels ``(Q, Q)`` drawn from its lattice.

    The lattice is fitted to the centres ``centers`` ``(n + 1, 2)`` (x, y; row 0 unused)
    of the labelled disks (``labels``) with ``amps > 0``; every lattice point whose disc
    (``radius`` + :data:`LABEL_MARGIN_PX`) lies at least :data:`DISC_ON_DETECTOR` on
    ``allowed`` pixels gets a label: the pixels of the disc nearer to it than to any other
    point, on ``allowed``.  Whole discs, also for the disks that the annulus' outer edge
    cuts (their labels stop there), and the outermost disks that the detector's edge cuts.
    None when the lattice cannot be fitted.
    """
    n = int(labels.max())
    ok = amps[1:n + 1] > 0
    lat = _lattice(np.asarray(centers[1:n + 1], np.float64)[ok],
                   np.array([center[1], center[0]], np.float64))
    if lat is None:
        return None
    coef, _ = lat
    Q0, Q1 = labels.shape
    step = min(np.hypot(*coef[0]), np.hypot(*coef[1]))
    reach = int(np.ceil(np.hypot(Q0, Q1) / max(step, 1.0))) + 1
    h, k = np.meshgrid(np.arange(-reach, reach + 1), np.arange(-reach, reach + 1))
    hk = np.column_stack([h.ravel(), k.ravel()])
    pts = _lattice_points(hk, coef)
    r_lab = radius + LABEL_MARGIN_PX
    inside = ((pts[:, 0] >= -r_lab) & (pts[:, 0] <= Q1 - 1 + r_lab)
              & (pts[:, 1] >= -r_lab) & (pts[:, 1] <= Q0 - 1 + r_lab))
    pts, hk = pts[inside], hk[inside]
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    dist = np.hypot(xx[None] - pts[:, 0, None, None], yy[None] - pts[:, 1, None, None])
    nearest = dist.argmin(0)
    # each disc's pixels counted on an unbounded grid: the part beyond the detector's edge
    # is part of the disc, not left out of it
    span = np.arange(-int(np.ceil(r_lab)) - 1, int(np.ceil(r_lab)) + 2)
    gx, gy = np.meshgrid(span, span)
    base = np.floor(pts)
    full = (np.hypot(base[:, 0, None, None] + gx - pts[:, 0, None, None],
                     base[:, 1, None, None] + gy - pts[:, 1, None, None]) <= r_lab).sum((1, 2))
    out = np.zeros_like(labels)
    kept, whole = [], []
    for j in range(len(pts)):
        disc = dist[j] <= r_lab
        on = (disc & allowed).sum() / max(int(full[j]), 1)
        if on < DISC_ON_DETECTOR:
            continue
        kept.append(j)
        whole.append(on >= WHOLE_DISC)
        out[disc & (nearest == j) & allowed] = len(kept)
    return LatticeLabels(out, hk[kept], np.array(whole, bool))


def _amplitudes(d: np.ndarray, labels: np.ndarray, centers: np.ndarray, prof: DiskProfile
                ) -> np.ndarray:
    """Amplitudes ``(n,)`` of ``a f(|k - c|) + b`` on each labelled disk of ``d`` with its
    centre fixed (least squares, ``a >= 0``)."""
    n = len(centers)
    amps = np.zeros(n)
    yy, xx = np.indices(d.shape, dtype=np.float64)
    for j in range(1, n + 1):
        m = labels == j
        if m.sum() < 4:
            continue
        f = prof(np.hypot(xx[m] - centers[j - 1, 0], yy[m] - centers[j - 1, 1]))
        X = np.column_stack([f, np.ones_like(f)])
        (a, _), *_ = np.linalg.lstsq(X, d[m].astype(np.float64), rcond=None)
        amps[j - 1] = max(float(a), 0.0)
    return amps


def extend_model(x: torch.Tensor, theta: torch.Tensor, cls: np.ndarray, ring_model: DiskModel,
                 labels: np.ndarray, entries: np.ndarray, center: tuple[float, float],
                 r_in: float, recorded: torch.Tensor | None = None) -> DiskModel:
    """The disk model re-fitted on the data and grown over the whole detector.

    For each listed entry, the patterns registered onto it (``x``, their affines ``theta``
    from fits with ``ring_model``, ``cls`` their entries) are averaged in its frame
    (:func:`registered_mean`); the entry's lattice, fitted to its labelled disks, labels
    its disks over the detector pixels the registered patterns reach
    (:func:`lattice_labels`).  The disks are fitted to the registered mean
    (:func:`fit_entries`); the lattice fitted again to the centres of the whole ones places
    every disk (Bragg disks lie on the reciprocal lattice; a disk the detector's edge cuts
    would be pulled by its missing side), and each amplitude is fitted with its centre
    there.  An entry with fewer than two registered patterns, or whose lattice cannot be
    fitted, keeps the ring model's disks.  ``labels`` are the dictionary analysis' labels.
    """
    K, Q, _ = ring_model.background.shape
    region = bragg_region((Q, Q), center, r_in)
    fits: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for k in entries:
        k = int(k)
        sel = np.flatnonzero(cls == k)
        if len(sel) < 2 or labels[k].max() == 0:
            continue
        mean, reach = registered_mean(x[sel], theta[sel],
                                      None if recorded is None else recorded[sel])
        lat = lattice_labels(labels[k], ring_model.centers[k], ring_model.amps[k], center,
                             ring_model.profile.radius,
                             region & (reach >= REGISTERED_COVERAGE))
        if lat is None or not lat.whole.any():
            continue
        m = fit_entries(mean[None], lat.labels[None], np.array([0]), ring_model.profile, center)
        n = len(lat.hk)
        c_fit = np.asarray(m.centers[0, 1:n + 1], np.float64)
        ok = lat.whole & (m.amps[0, 1:n + 1] > 0)
        if ok.sum() < 3:
            continue
        centers = _lattice_points(lat.hk, _lattice_through(lat.hk[ok], c_fit[ok]))
        amps = _amplitudes(mean, lat.labels, centers, ring_model.profile)
        fits[k] = (lat.labels, centers, amps, m.background[0])
    if not fits:
        return ring_model
    width = max(ring_model.centers.shape[1], max(len(f[1]) for f in fits.values()) + 1)
    centers = np.zeros((K, width, 2), np.float32)
    amps = np.zeros((K, width), np.float32)
    n_ring = ring_model.centers.shape[1]
    centers[:, :n_ring], amps[:, :n_ring] = ring_model.centers, ring_model.amps
    background = ring_model.background.copy()
    out_labels = labels.copy()
    for k, (lab, c, a, bg) in fits.items():
        centers[k], amps[k] = 0.0, 0.0
        centers[k, 1:len(c) + 1], amps[k, 1:len(a) + 1] = c, a
        background[k], out_labels[k] = bg, lab
    return DiskModel(centers, amps, background, ring_model.profile, out_labels, region)
