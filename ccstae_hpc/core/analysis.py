"""What follows from a strain map: derived maps, dislocations and ripples (numpy kernels).

Conventions (as :mod:`ccstae_hpc.core.strain`): maps on ``(scan_y, scan_x)``; ``x`` = scan
columns, ``y`` = scan rows; 2x2 matrices act on ``(x, y)`` column vectors; ``theta`` in degrees,
positive turning +x toward +y; strain relative to ONE reference lattice.  The deformation
``T = R(theta) (I + eps)`` maps the reference lattice vectors onto the local ones, so the
lattice distortion is ``beta = T - I``.

Burgers vectors: ``b = closed integral of beta dl`` around a circuit run counter-clockwise in
the ``(x, y)`` frame (turning +x toward +y), in scan steps; to first order in the distortion
this is the FS/RH Burgers vector for the line direction ``xi = x * y`` (into the screen when
``y`` points down).  Circuits are rectangles through pixel centres; an edge between neighbours
is integrated with the trapezoid rule, and a circuit counts only when every pixel on it is
sample of one phase (a circuit across a phase boundary measures the misfit between the
phases' lattices, not a dislocation).  Interior pixels do not enter, so a failed fit at a core
does not hide it.

Detection thresholds come from the data: the closure failures of all circuits of one size
have a robust (MAD) noise level per component, and a circuit is significant when its
chi-square over that noise exceeds the level at which ``false_alarms`` circuits of the whole
map would pass by chance (a Bonferroni bound for a chi-square with 2 degrees of freedom).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from ccstae_hpc.core.strain import rotation_matrix

__all__ = [
    "FALSE_ALARMS",
    "MAD_TO_SIGMA",
    "DislocationTable",
    "Ripple",
    "auto_loop_px",
    "burgers_in_lattice",
    "chi2_threshold",
    "circuit_sums",
    "deformation_from_strain",
    "derived_maps",
    "dislocation_rotation",
    "find_dislocations",
    "fit_ripple",
    "index_burgers",
    "robust_spread",
    "valley",
]

# valley: a density's valley counts (in windows of a given half-width, stepped by VALLEY_STEP
# of it) this many standard errors and this fraction below the smaller of the peaks on its
# two sides.  A gradient, or the arcsine distribution of a ripple, has no such valley; two
# lattices 6 spreads apart do
VALLEY_SIGNIFICANCE = 4.0
VALLEY_DEPTH = 0.25
VALLEY_STEP = 0.25
VALLEY_MAX_STEPS = 400
# expected number of false detections per map: sets every detection threshold
FALSE_ALARMS = 0.01
# the median absolute deviation of a normal distribution is 0.6745 sigma
MAD_TO_SIGMA = 1.4826
# fewest circuits of one size from which a noise level is estimated
MIN_NOISE_SAMPLES = 20
# ripples shorter than this (scan px) are not searched: pooling and the probe blur them
RIPPLE_MIN_WAVELENGTH_PX = 4.0
# FFT starts tried for the least-squares ripple fit (local maxima of the power, strongest first)
RIPPLE_STARTS = 3
# zero padding of the ripple FFT: a finer grid of start frequencies for short fields
RIPPLE_PAD = 4
# re-centrings of a core's centroid window
CENTROID_ITERATIONS = 3
# smallest circuit half-width (scan px): a 4 x 4 circuit averages the noise of 16 edges
MIN_LOOP_HALF = 2
# keeps divisions finite on noise-free input (scan steps or degrees, far below any signal)
_TINY = 1e-12


# ------------------------------------------------------------------------------ derived maps


def deformation_from_strain(exx: np.ndarray, eyy: np.ndarray, exy: np.ndarray,
                            theta: np.ndarray) -> np.ndarray:
    """``T = R(theta) (I + eps)`` ``(..., 2, 2)`` from the strain maps (theta in degrees)."""
    eps = np.stack([np.stack([exx, exy], -1), np.stack([exy, eyy], -1)], -2)
    return rotation_matrix(theta) @ (np.eye(2) + np.asarray(eps, np.float64))


def derived_maps(exx: np.ndarray, eyy: np.ndarray, exy: np.ndarray, theta: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """Maps that follow from one strain map (NaN wherever the strain is NaN).

    Returns ``dilatation`` (``det U - 1``, area change), ``lattice_change``
    (``sqrt(det U) - 1``, mean lattice parameter), ``max_shear`` (``(e1 - e2) / 2``, tensor
    shear on the planes at 45 deg to the principal axes), ``e1 >= e2`` (principal strains),
    ``principal_direction`` (deg of the ``e1`` axis from +x toward +y, in (-90, 90]) and the
    rotation gradient ``dtheta_dx``, ``dtheta_dy`` and its magnitude ``lattice_curvature``
    (deg per scan step; central differences, one-sided at the edges of the valid region).
    """
    exx, eyy, exy, theta = (np.asarray(a, np.float64) for a in (exx, eyy, exy, theta))
    det = (1 + exx) * (1 + eyy) - exy**2
    mean, half = (exx + eyy) / 2, np.hypot((exx - eyy) / 2, exy)
    direction = np.degrees(0.5 * np.arctan2(2 * exy, exx - eyy))
    direction = np.where(direction <= -90, direction + 180, direction)
    dy, dx = _gradient(theta)
    bad = ~(np.isfinite(exx) & np.isfinite(eyy) & np.isfinite(exy) & np.isfinite(theta))
    out = {"dilatation": det - 1, "lattice_change": np.sqrt(np.clip(det, 0, None)) - 1,
           "max_shear": half, "e1": mean + half, "e2": mean - half,
           "principal_direction": direction, "dtheta_dx": dx, "dtheta_dy": dy,
           "lattice_curvature": np.hypot(dx, dy)}
    for v in out.values():
        v[bad] = np.nan
    return out


def _gradient(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(d/dy, d/dx)`` per scan step: central where both neighbours are finite, else one-sided."""
    out = []
    for axis in (0, 1):
        fwd = np.full(f.shape, np.nan)
        bwd = np.full(f.shape, np.nan)
        d = np.diff(f, axis=axis)
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        fwd[tuple(lo)] = d
        bwd[tuple(hi)] = d
        g = np.where(np.isfinite(fwd) & np.isfinite(bwd), (fwd + bwd) / 2,
                     np.where(np.isfinite(fwd), fwd, bwd))
        out.append(g)
    return out[0], out[1]


# ------------------------------------------------------------------------------ dislocations


def auto_loop_px(pool_sigma: float) -> int:
    """Circuit side (scan px, even) for maps pooled with a Gaussian of ``pool_sigma`` px: the
    circuit reaches two pooling widths either side of its centre, so a core's smeared
    closure falls mostly inside it."""
    return 2 * max(MIN_LOOP_HALF, math.ceil(2 * max(pool_sigma, 0.0)))


def chi2_threshold(n_tests: int, false_alarms: float = FALSE_ALARMS) -> float:
    """Chi-square (2 degrees of freedom) passed by ``false_alarms`` of ``n_tests`` by chance:
    ``P(chi2 > t) = exp(-t / 2) = false_alarms / n_tests``."""
    return 2.0 * math.log(max(n_tests, 1) / false_alarms)


def circuit_sums(beta: np.ndarray, label: np.ndarray, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Closure failure of every ``height x width`` rectangular circuit (module docstring).

    Parameters
    ----------
    beta : (ny, nx, 2, 2) lattice distortion (NaN where unknown).
    label : (ny, nx) int, 0 where a pixel may not lie on a circuit (vacuum, no fit), else its
        phase: a circuit counts only when all its pixels carry one label.
    height, width : circuit size in scan steps (rows, columns).

    Returns
    -------
    sums : (ny - height, nx - width, 2) ``(b_x, b_y)`` in scan steps of the circuit whose
        corner nearest the origin is pixel ``(y0, x0)`` (centre ``(y0 + height/2,
        x0 + width/2)``); NaN where the circuit does not count.
    ok : the same shape without the last axis, True where the circuit counts.
    """
    beta = np.asarray(beta, np.float64)
    good = (np.asarray(label) > 0) & np.isfinite(beta).all(axis=(-2, -1))
    lab = np.where(good, label, 0)
    b = np.where(good[..., None, None], beta, 0.0)
    # trapezoid integrals along the edges between neighbours: column j of beta is d(beta)/dl_j
    eh = 0.5 * (b[:, :-1, :, 0] + b[:, 1:, :, 0])  # (ny, nx-1, 2), +x step
    ev = 0.5 * (b[:-1, :, :, 1] + b[1:, :, :, 1])  # (ny-1, nx, 2), +y step
    bad_h = ~((lab[:, :-1] > 0) & (lab[:, :-1] == lab[:, 1:]))
    bad_v = ~((lab[:-1] > 0) & (lab[:-1] == lab[1:]))
    sh, nh = _window(eh, width, 1), _window(bad_h.astype(np.float64), width, 1)
    sv, nv = _window(ev, height, 0), _window(bad_v.astype(np.float64), height, 0)
    h, w = height, width
    # counter-clockwise: bottom (+x), right (+y), top (-x), left (-y)
    sums = sh[:-h] + sv[:, w:] - sh[h:] - sv[:, :-w]
    bad = nh[:-h] + nv[:, w:] + nh[h:] + nv[:, :-w]
    ok = bad < 0.5
    sums[~ok] = np.nan
    return sums, ok


def _window(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Sums of ``n`` consecutive entries along ``axis`` (length shrinks by ``n - 1``)."""
    c = np.cumsum(a, axis=axis)
    c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
    return np.take(c, np.arange(n, c.shape[axis]), axis=axis) - \
        np.take(c, np.arange(0, c.shape[axis] - n), axis=axis)


def _smooth_background(a: np.ndarray, sigma: float) -> np.ndarray:
    """Local quadratic regression of ``a`` ``(ny, nx, c)`` (NaN: no sample) with Gaussian
    weights of width ``sigma`` px, evaluated at every pixel.

    A quadratic follows a smooth field through its extrema (a local mean or median flattens
    a ripple's peaks) and bridges masked cores from the pixels around them.  Where the
    weights hold less than one sample, the median of the whole map.
    """
    ny, nx, nc = a.shape
    valid = np.isfinite(a).all(-1)
    v = valid.astype(np.float64)
    r = int(math.ceil(3 * sigma))
    d = np.arange(-r, r + 1) / sigma  # offsets in units of sigma keep the system conditioned
    dy, dx = np.meshgrid(d, d, indexing="ij")
    w = np.exp(-0.5 * (dx * dx + dy * dy))
    powers = [(i, j) for i in range(3) for j in range(3 - i)]  # dx^i dy^j, degree <= 2
    n = len(powers)

    # local: scipy.signal takes 0.6 s to import, and the map stage imports this module for
    # its constants only
    from scipy import signal

    def conv(img: np.ndarray, i: int, j: int) -> np.ndarray:
        # sum over q of w(q - p) (q - p)^(i, j) img(q): a correlation with the moment kernel
        # (by FFT: the kernel spans 6 sigma, large for large loops)
        return signal.fftconvolve(img, (w * dx**i * dy**j)[::-1, ::-1], mode="same")

    moments = {}
    for i in range(5):
        for j in range(5 - i):
            moments[i, j] = conv(v, i, j)
    M = np.empty((ny, nx, n, n))
    for p_, (i1, j1) in enumerate(powers):
        for q_, (i2, j2) in enumerate(powers):
            M[..., p_, q_] = moments[i1 + i2, j1 + j2]
    Minv = np.linalg.pinv(M)
    out = np.empty(a.shape)
    filled = np.where(valid[..., None], a, 0.0)
    for c in range(nc):
        rhs = np.stack([conv(filled[..., c], i, j) for i, j in powers], -1)
        out[..., c] = np.einsum("yxk,yxk->yx", Minv[..., 0, :], rhs)
    glob = np.median(a[valid], axis=0) if valid.any() else np.zeros(nc)
    return np.where((moments[0, 0] >= 1.0)[..., None], out, glob)


def _robust_sigma(v: np.ndarray) -> np.ndarray:
    """Per-component robust standard deviation (MAD about the median) of ``v`` ``(n, 2)``."""
    med = np.median(v, axis=0)
    return np.maximum(MAD_TO_SIGMA * np.median(np.abs(v - med), axis=0), _TINY)


class DislocationTable(NamedTuple):
    """Result of :func:`find_dislocations` (positions and vectors in scan steps)."""

    y: np.ndarray  # (n,) core rows (scan px)
    x: np.ndarray  # (n,) core columns
    burgers: np.ndarray  # (n, 2) (b_x, b_y), from the circuits around the core
    confidence: np.ndarray  # (n,) chi of b over its standard error
    circuit: np.ndarray  # (n, 4) int (y0, y1, x0, x1) of each core's outermost circuit
    closure: np.ndarray  # (ny, nx, 2) closure of the loop_px circuit centred on each pixel
    significance: np.ndarray  # (ny, nx) sqrt(chi2) of that closure over the noise
    loop_px: int
    noise: np.ndarray  # (2,) robust noise of the loop_px circuits (b_x, b_y), scan steps
    threshold: float  # sqrt of the chi2 level a circuit must exceed


def find_dislocations(T: np.ndarray, label: np.ndarray, loop_px: int = 4,
                      false_alarms: float = FALSE_ALARMS) -> DislocationTable:
    """Dislocation cores from the closure failure of ``beta = T - I`` (module docstring).

    The closure of every ``loop_px`` square circuit, less its smooth part (a local
    quadratic of the closure per unit area, fitted away from the cores: the incompatibility
    of slowly varying fields such as a ripple's rotation grows with the circuit's area), is
    tested against the robust noise of all of them.  Each local maximum of the significance
    (the strongest first, a loop apart) starts a core; the core sits at the centroid of the
    circuit centres within a loop of it, weighted by their closure along their summed
    closure.  Its Burgers vector comes from the concentric squares around it from just over
    one to 1.5 loops wide (those inside the map and the phase and clear of other cores),
    extrapolated to zero area (``_enclose``); ``confidence`` is its chi over its standard
    error from the noise of equal circuits clear of the cores, and a core is kept when it is
    significant on its own.  Cores closer than a loop read as one (the stronger; its
    circuits hold both Burgers vectors).

    Parameters
    ----------
    T : (ny, nx, 2, 2) deformation relative to the reference (NaN where unknown).
    label : (ny, nx) phase (0: vacuum or unknown).
    loop_px : even side of the test circuits (scan px), >= 2.
    false_alarms : expected number of false detections per map.
    """
    if loop_px < 2 or loop_px % 2:
        raise ValueError(f"loop_px must be an even number >= 2, got {loop_px}")
    T = np.asarray(T, np.float64)
    ny, nx = T.shape[:2]
    beta = T - np.eye(2)
    s, half = loop_px, loop_px // 2
    closure = np.full((ny, nx, 2), np.nan)
    signif = np.full((ny, nx), np.nan)
    empty = DislocationTable(np.zeros(0), np.zeros(0), np.zeros((0, 2)), np.zeros(0),
                             np.zeros((0, 4), np.int64), closure, signif, s,
                             np.full(2, np.nan), np.nan)
    if ny <= s or nx <= s:
        return empty
    raw, ok = circuit_sums(beta, label, s, s)
    if ok.sum() < MIN_NOISE_SAMPLES:
        return empty
    # closure per unit area of the circuit centred on each pixel, and its smooth part: a
    # slowly varying incompatibility (rotation gradients of ripples, strain gradients) that
    # is no core but grows with the circuit's area
    density = np.full((ny, nx, 2), np.nan)
    density[half:ny - half, half:nx - half] = raw / s**2
    level = chi2_threshold(int(ok.sum()), false_alarms)
    flagged = np.zeros(ok.shape, bool)
    # twice: the second background leaves out the circuits around the cores of the first
    for _ in range(2):
        masked = density.copy()
        masked[half:ny - half, half:nx - half][
            ndimage.binary_dilation(flagged, np.ones((3, 3), bool), iterations=s)] = np.nan
        smooth = _smooth_background(masked, s)
        sums = raw - s**2 * smooth[half:ny - half, half:nx - half]
        noise = _robust_sigma(sums[ok])
        chi2 = ((sums / noise) ** 2).sum(-1)
        flagged = ok & (chi2 > level)
    closure[half:ny - half, half:nx - half] = np.where(ok[..., None], sums, np.nan)
    signif[half:ny - half, half:nx - half] = np.sqrt(chi2)
    table = empty._replace(noise=noise, threshold=math.sqrt(level))
    if not flagged.any():
        return table

    # candidate cores: the strongest significant circuits, at least a loop apart (a core's
    # circuits form a plateau about a loop wide; two cores closer than that read as one)
    score = np.where(flagged, chi2, 0.0)
    peaks = np.argwhere(flagged & (score == ndimage.maximum_filter(score, size=s + 1)))
    peaks = peaks[np.argsort(score[peaks[:, 0], peaks[:, 1]])[::-1]]
    accepted: list[np.ndarray] = []
    for pk in peaks:
        if all(np.abs(pk - q).max() > s for q in accepted):
            accepted.append(pk)
    # pixels inside any significant circuit: circuits used as noise samples stay clear of them
    defect = np.zeros((ny, nx), bool)
    fy, fx = flagged.shape
    for dy in range(s + 1):
        for dx in range(s + 1):
            defect[dy:dy + fy, dx:dx + fx] |= flagged
    by, bx = np.mgrid[0:fy, 0:fx]
    centres = []
    for pk in accepted:
        # centroid of the circuits within a loop (the whole plateau of circuits holding the
        # core, wherever on it the peak fell), weighted by their closure along the summed
        # closure, re-centred
        cy, cx = float(pk[0]), float(pk[1])
        for _ in range(CENTROID_ITERATIONS):
            sel = ok & (np.abs(by - cy) <= s) & (np.abs(bx - cx) <= s)
            w = _centroid_weights(sums[sel])
            cy, cx = float((w * by[sel]).sum()), float((w * bx[sel]).sum())
        # two peaks of one core converge on it
        if all(math.hypot(cy - q[0], cx - q[1]) >= s for q in centres):
            centres.append((cy, cx))
    cores = []
    for cy, cx in centres:
        # squares from just wider than a loop (which holds a core smeared by pooling: the
        # loop reaches two pooling widths) to 1.5 loops, none holding another core
        others = [max(abs(cy - q[0]), abs(cx - q[1])) for q in centres if q != (cy, cx)]
        r_max = min([s + half] + [int(d) - 1 for d in others])
        centre = (int(round(cy)) + half, int(round(cx)) + half)
        core = _enclose(beta, label, smooth, defect, centre, range(half + 1, r_max + 1),
                        noise * math.sqrt(0.5 / s), false_alarms)
        if core is not None:
            cores.append((cy + half, cx + half, *core))
    if not cores:
        return table
    y, x, b, conf, box = zip(*cores, strict=True)
    return table._replace(y=np.array(y), x=np.array(x), burgers=np.array(b),
                          confidence=np.array(conf), circuit=np.array(box, np.int64))


def _centroid_weights(sums: np.ndarray) -> np.ndarray:
    """Normalised weights of circuits ``sums`` (n, 2): their closure along their summed
    closure, negative parts clipped."""
    b = sums.sum(0)
    w = np.clip(sums @ (b / max(float(np.hypot(*b)), _TINY)), 0, None)
    w = w if w.sum() > 0 else np.ones(len(sums))
    return w / w.sum()


def _enclose(beta: np.ndarray, label: np.ndarray, smooth: np.ndarray, defect: np.ndarray,
             centre: tuple[int, int], radii: range, edge_noise: np.ndarray,
             false_alarms: float) -> tuple[np.ndarray, float, tuple[int, int, int, int]] | None:
    """Burgers vector, confidence and outermost circuit of the core at pixel ``centre``.

    The closures ``b(r)`` of the concentric square circuits of half-width ``r`` in ``radii``
    that count (inside the map, on one phase), less the smooth density over their area, are
    fitted with ``b0 + 4 r^2 rho`` (weighted least squares): what is left of a smooth
    incompatibility grows with the area, the core's closure does not (the linear part of the
    density cancels on a centred square).  ``b0`` is the Burgers vector, its chi over its
    standard error the confidence; None when no circuit counts or ``b0`` is not significant.

    ``smooth`` (ny, nx, 2) is the smooth closure density (per px^2); each circuit's noise is
    the robust spread of equal circuits clear of the cores (``defect``), or ``edge_noise``
    (per component, per unit edge) scaled by the number of edges when too few are clear.
    """
    ny, nx = label.shape
    fin = np.isfinite(smooth).all(-1)
    dens = np.where(fin[..., None], smooth, 0.0)
    iy, ix = centre
    rs, vals, sig = [], [], []
    for r in radii:
        a0, c0, n = iy - r, ix - r, 2 * r
        if a0 < 0 or c0 < 0 or a0 + n >= ny or c0 + n >= nx:
            continue
        sums, ok = circuit_sums(beta, label, n, n)
        if not ok[a0, c0]:
            continue
        # mean smooth density over each circuit's pixels, times its area
        tot = _window(_window(dens, n + 1, 0), n + 1, 1)
        cnt = _window(_window(fin.astype(np.float64), n + 1, 0), n + 1, 1)
        sums = sums - n * n * tot / np.maximum(cnt, 1.0)[..., None]
        area = _window(_window(defect.astype(np.float64), n + 1, 0), n + 1, 1)
        clear = ok & (area < 0.5)
        rs.append(r)
        vals.append(sums[a0, c0])
        sig.append(_robust_sigma(sums[clear]) if clear.sum() >= MIN_NOISE_SAMPLES
                   else edge_noise * math.sqrt(4 * n))
    if not rs:
        return None
    vals_a, sig_a = np.array(vals), np.array(sig)
    if len(rs) >= 3:
        X = np.stack([np.ones(len(rs)), 4.0 * np.array(rs, np.float64) ** 2], 1)
        b, se = np.empty(2), np.empty(2)
        for c in range(2):
            w = 1.0 / sig_a[:, c] ** 2
            cov = np.linalg.inv(X.T @ (w[:, None] * X))
            b[c] = (cov @ X.T @ (w * vals_a[:, c]))[0]
            se[c] = math.sqrt(cov[0, 0])
    else:
        b, se = vals_a[-1], sig_a[-1]
    chi2 = float(((b / se) ** 2).sum())
    if chi2 <= chi2_threshold(1, false_alarms):
        return None
    r = rs[-1]
    return b, math.sqrt(chi2), (iy - r, iy + r, ix - r, ix + r)


def burgers_in_lattice(b: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Components ``(h, k)`` of Burgers vectors ``b`` ``(n, 2)`` (``(x, y)``) in the lattice
    basis ``basis`` (rows ``a1, a2`` as ``(x, y)``, same unit): ``b = h a1 + k a2``
    (not rounded)."""
    b = np.asarray(b, np.float64).reshape(-1, 2)
    A = np.asarray(basis, np.float64).T  # columns a1, a2
    return np.linalg.solve(A, b.T).T


def index_burgers(b: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Burgers vectors ``b`` (n, 2) as lattice vectors of ``basis`` (rows ``a1, a2``).

    Returns ``(hk, lattice)``: the nearest integer ``(h, k)`` (float array) and whether it is
    a translation of the lattice (not ``(0, 0)``): a closure failure shorter than half a
    lattice vector is no perfect dislocation.
    """
    hk = np.rint(burgers_in_lattice(b, basis)) + 0.0  # + 0.0: no negative zeros
    return hk, (hk != 0).any(axis=1)


def dislocation_rotation(y0: float, x0: float, b: np.ndarray, yy: np.ndarray, xx: np.ndarray
                         ) -> np.ndarray:
    """Lattice rotation (deg) of an edge dislocation with Burgers vector ``b`` (scan px,
    ``(x, y)``) at ``(y0, x0)``: ``omega = -(b . r) / (2 pi r^2)`` (isotropic elasticity,
    independent of the Poisson ratio); 0 at the core."""
    dx, dy = xx - x0, yy - y0
    r2 = dx * dx + dy * dy
    om = -(b[0] * dx + b[1] * dy) / (2 * np.pi * np.where(r2 > 0, r2, 1.0))
    return np.degrees(np.where(r2 > 0, om, 0.0))


# ------------------------------------------------------------------------------ ripples


class Ripple(NamedTuple):
    """Result of :func:`fit_ripple` (NaN when ``found`` is False; ``reason`` says why)."""

    found: bool
    wavelength_px: float
    direction_deg: float  # wave vector, from +x toward +y, in [0, 180)
    amplitude_deg: float
    significance: float  # chi of the sinusoid's amplitude over its standard error
    threshold: float
    reason: str


def fit_ripple(theta: np.ndarray, valid: np.ndarray, corr_px: int = 3,
               false_alarms: float = FALSE_ALARMS) -> Ripple:
    """Periodic rotation modulation ``theta = plane + A sin(2 pi k . r + phi)``.

    The FFT of the plane-detrended, masked map gives start frequencies (its strongest local
    maxima between ``RIPPLE_MIN_WAVELENGTH_PX`` and the field's extent); a least-squares fit
    of the plane and the sinusoid together refines each, and the best one is kept.  Its
    amplitude counts when the chi-square of the sinusoid's two amplitudes over their
    covariance (the fit's, widened by the residuals' spatial correlation summed over lags up
    to ``corr_px``: pooled maps have correlated noise) exceeds the level passed by
    ``false_alarms`` of the frequencies searched.
    """
    theta = np.asarray(theta, np.float64)
    valid = np.asarray(valid, bool) & np.isfinite(theta)
    ny, nx = theta.shape
    nan = float("nan")

    def none(reason: str, chi: float = nan, thr: float = nan) -> Ripple:
        return Ripple(False, nan, nan, nan, chi, thr, reason)

    yy, xx = np.nonzero(valid)
    if yy.size < 4 * MIN_NOISE_SAMPLES:
        return none(f"too few valid pixels ({yy.size}) for a ripple fit")
    v = theta[yy, xx]
    ym, xm = yy.mean(), xx.mean()
    X = np.stack([np.ones_like(v), xx - xm, yy - ym], 1)
    resid = v - X @ np.linalg.lstsq(X, v, rcond=None)[0]
    extent = float(max(yy.max() - yy.min(), xx.max() - xx.min()) + 1)

    # FFT starts
    P = int(2 ** math.ceil(math.log2(RIPPLE_PAD * max(ny, nx))))
    img = np.zeros((P, P))
    img[yy, xx] = resid
    power = np.abs(np.fft.rfft2(img)) ** 2
    ky = np.fft.fftfreq(P)[:, None]
    kx = np.fft.rfftfreq(P)[None, :]
    kk = np.hypot(kx, ky)
    band = (kk >= 1.0 / extent) & (kk <= 1.0 / RIPPLE_MIN_WAVELENGTH_PX)
    band &= ~((kx == 0) & (ky < 0))  # k and -k are one ripple
    peak = band & (power == ndimage.maximum_filter(power, size=3, mode="wrap"))
    order = np.argsort(power[peak])[::-1][:RIPPLE_STARTS]
    starts = np.stack([np.broadcast_to(kx, power.shape)[peak][order],
                       np.broadcast_to(ky, power.shape)[peak][order]], 1)
    if not len(starts):
        return none("no frequency in the search band")
    from scipy import optimize  # local, as scipy.signal above

    def design(k: np.ndarray) -> np.ndarray:
        ph = 2 * np.pi * (k[0] * xx + k[1] * yy)
        return np.concatenate([X, np.cos(ph)[:, None], np.sin(ph)[:, None]], 1)

    def residual(p: np.ndarray) -> np.ndarray:
        return design(p[:2]) @ p[2:] - v

    best = None
    for k0 in starts:
        lin = np.linalg.lstsq(design(k0), v, rcond=None)[0]
        res = optimize.least_squares(residual, np.concatenate([k0, lin]), method="lm")
        if best is None or res.cost < best.cost:
            best = res
    p = best.x
    k = p[:2]
    knorm = float(np.hypot(*k))
    if not (1.0 / extent <= knorm <= 1.0 / RIPPLE_MIN_WAVELENGTH_PX):
        return none(f"the best sinusoid ({1 / max(knorm, _TINY):.3g} px) is outside the "
                    f"searched wavelengths [{RIPPLE_MIN_WAVELENGTH_PX}, {extent:.0f}] px")
    r = best.fun
    dof = max(len(v) - len(p), 1)
    J = best.jac
    cov = np.linalg.pinv(J.T @ J) * (r @ r) / dof * _correlation_factor(r, yy, xx, corr_px)
    ab = p[-2:]
    chi2 = float(ab @ np.linalg.pinv(cov[-2:, -2:]) @ ab)
    n_freq = int(band.sum() * (ny * nx) / (P * P))  # independent frequencies of the field
    level = chi2_threshold(max(n_freq, 1), false_alarms)
    if chi2 <= level:
        return none(f"no significant ripple: chi {math.sqrt(chi2):.2f} of the best sinusoid "
                    f"is below the detection level {math.sqrt(level):.2f}",
                    math.sqrt(chi2), math.sqrt(level))
    direction = float(np.degrees(np.arctan2(k[1], k[0])) % 180.0)
    return Ripple(True, 1.0 / knorm, direction, float(np.hypot(*ab)), math.sqrt(chi2),
                  math.sqrt(level), "")


def _correlation_factor(r: np.ndarray, yy: np.ndarray, xx: np.ndarray, lags: int) -> float:
    """Sum of the residuals' spatial autocorrelation over lags within ``lags`` px (>= 1):
    the factor by which correlated noise widens a least-squares fit's covariance."""
    ny, nx = yy.max() + 1, xx.max() + 1
    shape = (ny + lags, nx + lags)
    img = np.zeros(shape)
    msk = np.zeros(shape)
    img[yy, xx] = r
    msk[yy, xx] = 1.0
    fi, fm = np.fft.rfft2(img), np.fft.rfft2(msk)
    acf = np.fft.irfft2(fi * fi.conj(), shape)
    cnt = np.fft.irfft2(fm * fm.conj(), shape)
    lag = np.r_[0:lags + 1, -lags:0]
    sub = np.ix_(lag % shape[0], lag % shape[1])
    c = acf[sub] / np.maximum(np.rint(cnt[sub]), 1.0)
    return float(max(1.0, c.sum() / max(c[0, 0], _TINY)))


def robust_spread(a: np.ndarray) -> float:
    """Standard deviation of ``a`` from its median absolute deviation."""
    return float(MAD_TO_SIGMA * np.median(np.abs(a - np.median(a))))


def valley(v: np.ndarray, w: np.ndarray, lo: float, hi: float, width: float) -> float | None:
    """Where between ``lo`` and ``hi`` the weighted distribution of ``v`` has a significant
    valley, or None.

    A unimodal density is nowhere lower than at both of two points around it; the test
    counts the (weighted) patterns in windows of half-width ``width`` and finds the window
    that falls furthest below the smaller of the highest windows on its two sides, in
    standard errors (Poisson, with the weights).  A valley must be both significant
    (VALLEY_SIGNIFICANCE) and deep (below VALLEY_DEPTH of those peaks).
    """
    if not np.isfinite([lo, hi, width]).all() or width <= 0 or hi <= lo:
        return None
    # noise-free entries can be far narrower than their distance: a bounded grid
    width = max(width, (hi - lo) / (VALLEY_STEP * VALLEY_MAX_STEPS))
    grid = np.arange(lo, hi + 1e-12, width * VALLEY_STEP)
    if len(grid) < 3:
        return None
    inside = np.abs(v[None, :] - grid[:, None]) < width
    n = inside @ w
    var = inside @ (w * w)
    left = np.maximum.accumulate(n)
    right = np.maximum.accumulate(n[::-1])[::-1]
    left_at = np.array([int(np.argmax(n[:i + 1])) for i in range(len(n))])
    right_at = np.array([i + int(np.argmax(n[i:])) for i in range(len(n))])
    peak = np.minimum(left, right)
    peak_var = np.where(left <= right, var[left_at], var[right_at])
    z = (peak - n) / np.sqrt(peak_var + var + 1e-12)
    ok = (z > VALLEY_SIGNIFICANCE) & (n < VALLEY_DEPTH * peak)
    if not ok.any():
        return None
    return float(grid[int(np.argmax(np.where(ok, z, -np.inf)))])
