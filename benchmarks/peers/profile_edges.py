"""Radial profiles of a diffraction pattern and the central disk's edge on them, for the
py4DSTEM peer script (``py4dstem_strain.py``) that builds its correlation kernel from them.

Plain numpy and scipy, importable from the peers' environment (numpy < 2) and from the
project's, so that the tests check these functions without py4DSTEM.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

__all__ = ["EDGE_FRACTION", "EDGE_SMOOTH_PX", "PROFILE_STEP_PX", "edge_width", "outer_edge",
           "radial_profile"]

# the disk's edge among the radial profile's steep drops (see ``outer_edge``): a drop at least
# this fraction as steep as the steepest, on the profile's slope smoothed over EDGE_SMOOTH_PX
EDGE_FRACTION = 0.1
EDGE_SMOOTH_PX = 0.5
PROFILE_STEP_PX = 0.25  # radial profiles' bin width


def radial_profile(img: np.ndarray, centre: tuple[float, float], step: float = PROFILE_STEP_PX
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Azimuthal mean of ``img`` about ``centre`` (row, col) in bins of ``step`` px."""
    yy, xx = np.indices(img.shape)
    rho = np.hypot(yy - centre[0], xx - centre[1]).ravel()
    idx = (rho / step).astype(int)
    s = np.bincount(idx, img.ravel())
    n = np.bincount(idx)
    keep = n > 0
    return (np.arange(len(s))[keep] + 0.5) * step, s[keep] / n[keep]


def _regular_slope(profile: tuple[np.ndarray, np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The radial profile on a regular grid of :data:`PROFILE_STEP_PX` (near the centre some
    bins hold no pixel) and its slope smoothed over :data:`EDGE_SMOOTH_PX`."""
    rho, prof = profile
    r = np.arange(rho[0], rho[-1], PROFILE_STEP_PX)
    p = np.interp(r, rho, prof)
    slope = gaussian_filter1d(np.gradient(p, r), EDGE_SMOOTH_PX / PROFILE_STEP_PX)
    return r, p, slope


def _local_extrema(slope: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the slope's local minima (steepest drops) and maxima (flattest points)."""
    inner = slope[1:-1]
    minima = np.flatnonzero((inner < slope[:-2]) & (inner <= slope[2:])) + 1
    maxima = np.flatnonzero((inner >= slope[:-2]) & (inner > slope[2:])) + 1
    return minima, maxima


def edge_width(profile: tuple[np.ndarray, np.ndarray], radius: float) -> float:
    """Width of the central disk's edge between 88 % and 12 % of its height: the definition of
    ``width`` in ``Probe.generate_synthetic_probe`` (logistic edge).

    The height is taken locally: from the flattest point of the profile inside the edge (the
    slope's nearest local maximum) to the point as far outside it.  On a flat disk and a flat
    surround these are the plateau and the diffuse level; under a halo peaked on the beam the
    profile falls inside and outside the disk, and levels far from the edge would count the
    halo's fall as the edge's."""
    r, p, slope = _regular_slope(profile)
    _, flat = _local_extrema(slope)
    edge = int(np.argmin(np.abs(r - radius)))
    before = flat[flat < edge]
    i0 = int(before.max()) if before.size else 0
    i1 = min(2 * edge - i0, len(r) - 1)
    level = (p[i0:i1 + 1] - p[i1]) / max(p[i0] - p[i1], 1e-30)
    r_in = r[i0:i1 + 1]
    # first radius where the normalised profile drops below each level (monotone in the rim)
    r88 = r_in[np.argmax(level < 0.88)]
    r12 = r_in[np.argmax(level < 0.12)]
    return float(max(r12 - r88, 0.5))


def outer_edge(profile: tuple[np.ndarray, np.ndarray]) -> float:
    """Radius of the outermost steep drop of the radial profile: the local minima of its slope
    at least :data:`EDGE_FRACTION` as steep as the steepest.

    A smooth halo has one steepest point, so only a disk edge adds another.  Under the original
    paper's background (a Lorentzian of 1.3 px half-width centred on the beam, weight 0.7) the
    halo's core is steeper than the disk's edge, which is 0.28-0.31 as steep; noise and the
    Bragg disks' rings make minima of at most 0.007 (measured on the benchmark's sets at 1e3
    e-/pattern and above)."""
    r, _, slope = _regular_slope(profile)
    minima, _ = _local_extrema(slope)
    steep = minima[slope[minima] <= EDGE_FRACTION * slope.min()]
    if not steep.size:
        return 0.0
    i = int(steep.max())
    # the vertex of the parabola through the slope's three bins about the minimum
    a, b, c = slope[i - 1], slope[i], slope[i + 1]
    curv = a - 2 * b + c
    return float(r[i] + (0.5 * (a - c) / curv * PROFILE_STEP_PX if curv > 0 else 0.0))
