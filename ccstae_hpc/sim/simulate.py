"""Vectorised synthetic 4D-STEM of a WS2/WSe2 lateral heterostructure, with ground truth.

Conventions (see :mod:`ccstae_hpc.core.strain`):

* data are ``(scan_y, scan_x, k_y, k_x)``; detector pixel centres sit at integer ``(row, col)``;
  detector axes are parallel to the scan axes (``x`` = columns, ``y`` = rows);
* the truth is relative to ONE reference lattice for the whole field of view, the relaxed
  WS2 lattice (basis ``a1 = a(1, 0)``, ``a2 = a(1/2, sqrt(3)/2)``, ``a = LATTICE_A[1]``): the
  truth ``F = R(theta) @ (I + eps)`` of a relaxed WSe2 pixel is ``a_WSe2 / a_WS2`` (4.1 %
  dilatation), so a method that references every phase to one lattice is compared with what
  it should show; reciprocal vectors (``a_i . b_j = delta_ij``, no ``2 pi``) deform as
  ``g' = F^-T g`` and a disk centre is ``(col, row) = (origin_col, origin_row) + g' / pixel_size``;
* the renderers (:func:`render_patterns`, :func:`render_pattern`) take ``F`` relative to the
  phase's own relaxed lattice: ``F_own = F / phase_lattice_scale(phase)``;
* ``truth["origin"]`` is ``(k_y, k_x)`` = ``(row, col)`` of the (000) disk centre.

Intensity scale: every pattern sums to ``NOMINAL_TOTAL`` (noise-free, float32) or has expected
total ``cfg.dose`` (uint16 Poisson counts) before the hot pixels are added.

Random numbers: global quantities (strain-field phases, base origin, hot pixels) come from
``cfg.seed``; Poisson noise comes from a per-row generator seeded with ``(cfg.seed, row)`` so that
any row range can be generated on its own (:func:`simulate_rows`) and equals the same rows of
:func:`simulate`.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.core.strain import polar_decompose, rotation_matrix

__all__ = [
    "LATTICE_A",
    "NOMINAL_TOTAL",
    "PHASE_NAMES",
    "base_origin",
    "phase_lattice_scale",
    "basis_vectors",
    "reflections",
    "render_patterns",
    "render_pattern",
    "truth_rows",
    "burgers_vector_px",
    "dislocation_distortion",
    "simulate_rows",
    "simulate",
    "save_simulation",
    "load_simulation",
]

NOMINAL_TOTAL = 1.0e5  # counts per noise-free pattern
PHASE_NAMES = {0: "vacuum", 1: "WS2", 2: "WSe2"}
LATTICE_A = {1: 3.153, 2: 3.282}  # Angstrom
_Z = {1: (74, 16), 2: (74, 34)}  # (metal, chalcogen) atomic numbers
DEBYE_WALLER_B = 3.0  # A^2: f ~ exp(-B s^2), s = |g| / 2; outer disks ~5-20x weaker, visible
DIFFUSE_GAMMA = 0.08  # diffuse Lorentzian half-width, fraction of the detector size
BACKGROUND_GAMMA = 0.01  # Auto4DSTEM noise model: 1 / (1 + q^2 / 0.01^2), q in cycles/px
VACUUM_DIFFUSE = 0.2  # vacuum diffuse fraction, relative to cfg.diffuse_fraction
HOT_FACTOR = 20.0  # hot pixel value / typical first-order Bragg-disk pixel
WS2_AREA = 0.32  # triangle area, fraction of the scan
VACUUM_AREA = 0.15  # corner cut, fraction of the scan
_BLOCK_ELEMENTS = 1 << 22  # float32 elements per rendering block (16 MiB) bounds memory
POISSON_RATIO = 0.25  # in-plane Poisson ratio of the dislocations' elastic field (WS2 ~0.22)
DISLOCATION_CORE_PX = 1.0  # Gaussian core width (scan px) regularising the 1/r singularity


def _rng(cfg: SimConfig, *key: int) -> np.random.Generator:
    # SeedSequence needs non-negative entropy; mask keeps negative seeds usable and distinct
    return np.random.default_rng([int(cfg.seed) & 0xFFFFFFFFFFFFFFFF, *key])


def basis_vectors(a: float) -> tuple[np.ndarray, np.ndarray]:
    """Real and reciprocal bases of the hexagonal lattice as matrix columns, ``(x, y)`` rows.

    Returns ``(A, B)`` with ``A[:, i] = a_i`` and ``B[:, j] = b_j``, ``A.T @ B = I`` (no 2 pi).
    """
    A = a * np.array([[1.0, 0.5], [0.0, math.sqrt(3.0) / 2.0]])
    return A, np.linalg.inv(A).T


class _Tables(NamedTuple):
    hk: np.ndarray  # (n, 2) int, row 0 is (0, 0)
    ghat: np.ndarray  # (n, 2) reciprocal vectors (x, y) for a = 1 (scale by 1 / a)
    amp: np.ndarray  # (3, n) fraction of the pattern in each disk, per phase
    diffuse: np.ndarray  # (3,) diffuse fraction per phase
    inv_a: np.ndarray  # (3,) 1 / a per phase (vacuum: WS2 value, unused)
    typical_pixel: float  # mean pixel of a WS2 first-order disk, fraction of the pattern


def _structure_intensity(phase: int, hk: np.ndarray) -> np.ndarray:
    """Kinematic ``|F_hk|^2`` with ``F = f_M + 2 f_X exp(2 pi i (h + k) / 3)``.

    The metal sits at the origin and the two chalcogens project onto the hollow site
    ``(a1 + a2) / 3``, i.e. fractional ``(1/3, 1/3)`` in this 60-degree basis.  (The textbook
    ``(h + 2k)`` form belongs to the 120-degree basis ``a2 = a(-1/2, sqrt(3)/2)``; with the
    60-degree basis it would put the chalcogen off the hollow site and break the 6-fold
    symmetry of the pattern.)
    """
    a = LATTICE_A[phase]
    _, B = basis_vectors(a)
    s2 = (np.linalg.norm(hk @ B.T, axis=1) / 2.0) ** 2
    zm, zx = _Z[phase]
    fm = zm**0.7 * np.exp(-DEBYE_WALLER_B * s2)
    fx = zx**0.7 * np.exp(-DEBYE_WALLER_B * s2)
    F = fm + 2.0 * fx * np.exp(2j * np.pi * (hk[:, 0] + hk[:, 1]) / 3.0)
    return np.abs(F) ** 2


@lru_cache(maxsize=32)
def _tables(cfg: SimConfig) -> _Tables:
    Q, ps = cfg.detector, cfg.pixel_size
    c, d = cfg.central_fraction, cfg.diffuse_fraction
    if not (c >= 0 and d >= 0 and c + d < 1):
        raise ValueError("central_fraction and diffuse_fraction must be >= 0 with sum < 1")
    if not (cfg.disk_radius > 0 and ps > 0):
        raise ValueError("disk_radius and pixel_size must be positive")
    # farthest a disk centre can be from the origin and still touch the detector; the margin
    # covers compressive strain (bounded by ~2 (amplitude + interface)), which pushes disks out
    r_max = math.sqrt(2.0) * (Q / 2.0 + abs(cfg.drift_px) + 1.0) + cfg.disk_radius + 1.0
    r_max *= 1.05 + 2.0 * (abs(cfg.strain_amplitude) + abs(cfg.interface_strain))
    _, Bhat = basis_vectors(1.0)
    a_min = min(LATTICE_A.values())
    n = int(math.ceil(r_max * ps * a_min * 2.0 / math.sqrt(3.0))) + 2
    h, k = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    hk = np.stack([h.ravel(), k.ravel()], 1)
    ghat = hk @ Bhat.T
    radius_px = np.linalg.norm(ghat, axis=1) / (a_min * ps)
    keep = radius_px <= r_max
    hk, ghat, radius_px = hk[keep], ghat[keep], radius_px[keep]
    order = np.lexsort((np.arctan2(ghat[:, 1], ghat[:, 0]), radius_px))
    hk, ghat = hk[order], ghat[order]  # (0, 0) first, then by radius

    amp = np.zeros((3, len(hk)))
    amp[0, 0] = 1.0 - VACUUM_DIFFUSE * d
    typical = 0.0
    for p in (1, 2):
        inten = _structure_intensity(p, hk)
        inten[0] = 0.0
        # nominal Bragg share refers to the reflections within the circle of the detector's
        # area (at least the first order, for tiny detectors)
        r_p = np.linalg.norm(ghat, axis=1) / (LATTICE_A[p] * ps)
        norm = inten[r_p <= max(Q / math.sqrt(math.pi), 1.01 * r_p[1])].sum()
        amp[p] = (1.0 - c - d) * inten / norm
        amp[p, 0] = c
        if p == 1:
            first = np.isclose(r_p, r_p[1])
            typical = float(amp[p, first].mean()) / (math.pi * cfg.disk_radius**2)
    diffuse = np.array([VACUUM_DIFFUSE * d, d, d])
    inv_a = np.array([1.0 / LATTICE_A[1], 1.0 / LATTICE_A[1], 1.0 / LATTICE_A[2]])
    return _Tables(hk, ghat, amp, diffuse, inv_a, typical)


def reflections(cfg: SimConfig, phase: int = 1) -> dict[str, np.ndarray]:
    """Reflections rendered by the simulator for ``phase``.

    Returns ``hk`` (n, 2), ``g`` (n, 2) reciprocal vectors in 1/A as ``(x, y)`` of the relaxed,
    unrotated lattice, and ``fraction`` (n,) nominal share of the pattern in each disk
    (row 0 is the central beam).
    """
    t = _tables(cfg)
    return {"hk": t.hk.copy(), "g": t.ghat / LATTICE_A[phase], "fraction": t.amp[phase].copy()}


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _lorentz_nodes(x_max: float, accurate: bool) -> tuple[np.ndarray, np.ndarray]:
    # 1 / (1 + x) = int exp(s - e^s (1 + x)) ds: a trapezoid rule in s turns the Lorentzian into
    # a sum of Gaussians, each separable in (k_y, k_x), so an image costs one batched matmul.
    # accurate: relative error < 0.2 % for x <= x_max (20 nodes, the benchmark background);
    # otherwise < 2 % (9 nodes, enough for the smooth diffuse halo)
    step, pad, top = (1.0, 6.0, 3.5) if accurate else (1.5, 4.0, 3.0)
    s = np.arange(-math.log(max(x_max, 1.0)) - pad, top + 1e-9, step)
    t = np.exp(s)
    return t, step * t * np.exp(-t)


def _lorentz_factors(
    origin: np.ndarray, gamma: float, Q: int, weight: np.ndarray, dtype: type, accurate: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``(Gy (B,Q,K), Gx (B,K,Q))``; ``Gy @ Gx`` are Lorentzians summing to ``weight``.

    The Lorentzian is ``1 / (1 + r^2 / gamma^2)`` centred on ``origin`` ``(k_y, k_x)``, sampled
    at the pixel centres and normalised over the detector.
    """
    t, w = _lorentz_nodes(round(2.0 * (Q + 8.0) ** 2 / gamma**2), accurate)
    k = np.arange(Q, dtype=np.float64)
    dy2 = ((k[None, :] - origin[:, 0:1]) / gamma) ** 2  # (B, Q)
    dx2 = ((k[None, :] - origin[:, 1:2]) / gamma) ** 2
    # float32 exp is ~3x faster than float64; float64 is kept for the CRB's finite differences
    ct = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    tt = t.astype(ct)
    gy = np.exp(-dy2.astype(ct)[:, :, None] * tt)  # (B, Q, K)
    gx = np.exp(-dx2.astype(ct)[:, None, :] * tt[:, None])  # (B, K, Q)
    total = np.einsum("bk,bk,k->b", gy.sum(1, dtype=np.float64), gx.sum(2, dtype=np.float64), w)
    gy *= (w[None, None, :] * (weight / total)[:, None, None]).astype(ct)
    return gy.astype(dtype, copy=False), gx.astype(dtype, copy=False)


def _splat(
    buf: np.ndarray,
    Q: int,
    b: np.ndarray,
    ycen: np.ndarray,
    xcen: np.ndarray,
    amp: np.ndarray,
    R: float,
) -> np.ndarray:
    """Add anti-aliased disks (one per entry) into the flat pattern buffer ``buf``.

    ``b`` indexes patterns and must not repeat (the scatter-add keeps one write per duplicate
    index).  The last element of ``buf`` is a sink for pixels off the
    detector.  Returns the intensity that landed on the detector, per entry.
    """
    dtype = buf.dtype
    QQ = Q * Q
    hw = int(math.ceil(R + 0.5))
    off = np.arange(-hw, hw + 1)
    rows = np.floor(ycen).astype(np.intp)[:, None] + off  # (n, W)
    cols = np.floor(xcen).astype(np.intp)[:, None] + off
    dy = (rows - ycen[:, None]).astype(dtype)
    dx = (cols - xcen[:, None]).astype(dtype)
    # anti-aliased edge: a linear ramp in the distance ~ the pixel area inside the disk
    cov = np.sqrt(dy[:, :, None] ** 2 + dx[:, None, :] ** 2)
    np.subtract(R + 0.5, cov, out=cov)
    np.clip(cov, 0.0, 1.0, out=cov)
    # normalising by the window sum gives every disk exactly its share at any sub-pixel position
    cov *= (amp / cov.sum((1, 2), dtype=np.float64)).astype(dtype)[:, None, None]
    ok_r = (rows >= 0) & (rows < Q)
    ok_c = (cols >= 0) & (cols < Q)
    idx = (b * QQ)[:, None, None] + (rows * Q)[:, :, None] + cols[:, None, :]
    if ok_r.all() and ok_c.all():
        sums = np.asarray(amp, dtype=np.float64)
    else:
        ok = ok_r[:, :, None] & ok_c[:, None, :]
        idx = np.where(ok, idx, len(buf) - 1)
        sums = np.where(ok, cov, 0).sum((1, 2), dtype=np.float64)
    buf[idx] += cov
    return sums


def _render(
    cfg: SimConfig, F: np.ndarray, origin: np.ndarray, phase: np.ndarray, dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """Un-normalised patterns (diffuse + disks, no background mixing) and their sums."""
    t = _tables(cfg)
    Q, R = cfg.detector, float(cfg.disk_radius)
    QQ = Q * Q
    F = np.asarray(F, dtype=np.float64).reshape(-1, 2, 2)
    origin = np.asarray(origin, dtype=np.float64).reshape(-1, 2)
    phase = np.asarray(phase, dtype=np.intp).reshape(-1)
    B = len(phase)

    # one spare element at the end collects window pixels that fall off the detector, so the
    # scatter-add needs no mask and never holds a duplicate detector index
    buf = np.empty(B * QQ + 1, dtype=dtype)
    # the sink is read by the scatter-adds: uninitialised memory there could hold NaN or inf
    # (a RuntimeWarning "invalid value encountered in add", seen in one CI run)
    buf[-1] = 0.0
    img = buf[:-1].reshape(B, Q, Q)

    gy, gx = _lorentz_factors(origin, DIFFUSE_GAMMA * Q, Q, t.diffuse[phase], dtype, False)
    np.matmul(gy, gx, out=img)
    total = t.diffuse[phase].astype(np.float64)

    sample = phase > 0
    Fs = np.where(sample[:, None, None], F, np.eye(2))  # vacuum F is NaN; its disks are off
    FinvT = np.linalg.inv(Fs).transpose(0, 2, 1)
    scale = t.inv_a[phase] / cfg.pixel_size
    shift = np.einsum("bij,nj->bni", FinvT, t.ghat) * scale[:, None, None]  # (B, n, (x, y))
    cx = origin[:, 1:2] + shift[..., 0]
    cy = origin[:, 0:1] + shift[..., 1]
    amp = t.amp[phase]  # (B, n)
    reach = R + 1.0
    visible = (amp > 0) & (cx > -reach) & (cx < Q - 1 + reach) & (cy > -reach)
    visible &= cy < Q - 1 + reach

    # one scatter-add per reflection: within a reflection every pattern has its own window, so
    # no detector index repeats (only the sink does)
    for r in range(len(t.hk)):
        b = np.flatnonzero(visible[:, r])
        if b.size:
            total[b] += _splat(buf, Q, b, cy[b, r], cx[b, r], amp[b, r], R)
    return img, total


def _finish(
    cfg: SimConfig, img: np.ndarray, total: np.ndarray, origin: np.ndarray, scale: float
) -> np.ndarray:
    """Scale patterns in place to sum to ``scale`` and mix in the Lorentzian background."""
    w = cfg.background_weight
    factor = ((1.0 - w) * scale / total).astype(img.dtype)[:, None, None]
    img *= factor
    if w > 0:
        origin = np.asarray(origin, dtype=np.float64).reshape(-1, 2)
        ly, lx = _lorentz_factors(
            origin,
            BACKGROUND_GAMMA * cfg.detector,
            cfg.detector,
            np.full(len(img), w * scale),
            img.dtype,
            True,
        )
        img += np.matmul(ly, lx)
    return img


def render_patterns(
    cfg: SimConfig,
    F: np.ndarray,
    origin: np.ndarray,
    phase: np.ndarray,
    *,
    dtype: type = np.float32,
    total: float = 1.0,
) -> np.ndarray:
    """Noise-free patterns ``(B, Q, Q)`` summing to ``total``, background mixing included.

    Parameters
    ----------
    cfg : simulation config (detector, optics, fractions, ``background_weight``).
    F : (B, 2, 2) deformation gradients (ignored where ``phase == 0``).
    origin : (B, 2) pattern origins ``(k_y, k_x)`` in detector pixels.
    phase : (B,) 0 vacuum, 1 WS2, 2 WSe2.
    dtype : output dtype.
    total : sum of every pattern (no hot pixels are added).
    """
    img, s = _render(cfg, F, origin, phase, dtype)
    return _finish(cfg, img, s, origin, total)


def render_pattern(
    cfg: SimConfig,
    F: np.ndarray,
    origin: np.ndarray,
    phase: int,
    total: float = 1.0,
    dtype: type = np.float64,
) -> np.ndarray:
    """One noise-free ``(Q, Q)`` pattern summing to ``total``; the renderer of :func:`simulate`.

    ``F`` is the (2, 2) deformation gradient, ``origin`` ``(k_y, k_x)``; no hot pixels, no noise.
    """
    img = render_patterns(
        cfg,
        np.asarray(F)[None],
        np.asarray(origin)[None],
        np.array([phase]),
        dtype=dtype,
        total=total,
    )
    return img[0]


# --------------------------------------------------------------------------------------------
# ground truth
# --------------------------------------------------------------------------------------------


class _Globals(NamedTuple):
    base_origin: np.ndarray  # (2,) (k_y, k_x)
    phases: np.ndarray  # strain-field phases
    ripple_dir: float  # radians
    hot_pixels: np.ndarray  # (n, 2) (row, col)
    hot_scale: np.ndarray  # (n,) hot value / typical first-order disk pixel


@lru_cache(maxsize=32)
def _globals(cfg: SimConfig) -> _Globals:
    rng = _rng(cfg, 0x51_4D)
    Q = cfg.detector
    base = (Q - 1) / 2.0 + rng.uniform(-0.5, 0.5, 2)
    phases = rng.uniform(0, 2 * np.pi, 4)
    ripple_dir = float(rng.uniform(0, np.pi))
    # hot pixels come from their own stream so that n_hot_pixels changes nothing else
    hrng = _rng(cfg, 0x40_77)
    flat = hrng.choice(Q * Q, size=cfg.n_hot_pixels, replace=False)
    hot = np.stack([flat // Q, flat % Q], 1).astype(np.int64)
    hot_scale = HOT_FACTOR * hrng.uniform(0.8, 1.25, cfg.n_hot_pixels)
    return _Globals(base, phases, ripple_dir, hot, hot_scale)


def base_origin(cfg: SimConfig) -> np.ndarray:
    """Un-drifted pattern origin ``(k_y, k_x)``: detector centre + seeded sub-pixel offset."""
    return _globals(cfg).base_origin.copy()


def _triangle(nx: int, ny: int) -> np.ndarray:
    """WS2 triangle vertices in scan pixels ``(x, y)``; one edge faces the vacuum corner."""
    side = math.sqrt(4.0 * WS2_AREA / math.sqrt(3.0))
    circ = side / math.sqrt(3.0)
    centre = np.array([0.47, 0.47])
    ang = np.deg2rad([105.0, 225.0, 345.0])  # vertices pointing away from the (1, 1) corner
    v = centre + circ * np.stack([np.cos(ang), np.sin(ang)], 1)
    return v * np.array([nx - 1, ny - 1])


def _segment_distance(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / (ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(px - a[0] - t * ab[0], py - a[1] - t * ab[1])


def phase_lattice_scale(phase: np.ndarray) -> np.ndarray:
    """Lattice parameter of each phase relative to the reference (WS2) lattice; 1 for vacuum."""
    phase = np.asarray(phase)
    out = np.ones(phase.shape)
    for p, a in LATTICE_A.items():
        out[phase == p] = a / LATTICE_A[1]
    return out


def truth_rows(cfg: SimConfig, y0: int = 0, y1: int | None = None) -> dict[str, np.ndarray]:
    """Ground truth for scan rows ``y0:y1`` (cheap: no patterns are rendered).

    Keys: ``exx, eyy, exy`` (fractions vs the one reference lattice, relaxed WS2, for every
    phase: relaxed WSe2 reads +4.1 %), ``theta`` (degrees, absolute), ``phase`` (uint8),
    ``F`` (ny, nx, 2, 2), ``origin`` (ny, nx, 2) as ``(k_y, k_x)``, ``hot_pixels`` (n, 2) as
    ``(row, col)``.  Vacuum: strain, theta and F are NaN.
    """
    ny, nx = cfg.scan
    y1 = ny if y1 is None else y1
    if not 0 <= y0 <= y1 <= ny:
        raise ValueError(f"row range {y0}:{y1} is outside the scan of {ny} rows")
    g = _globals(cfg)
    yy, xx = np.meshgrid(
        np.arange(y0, y1, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij"
    )
    u, v = xx / (nx - 1), yy / (ny - 1)  # normalised scan coordinates in [0, 1]

    # phases: WS2 triangle, WSe2 shell, vacuum beyond a straight cut of the (1, 1) corner
    tri = _triangle(nx, ny)
    inside = np.ones(xx.shape, dtype=bool)
    dist = np.full(xx.shape, np.inf)
    for i in range(3):
        a, b, c = tri[i], tri[(i + 1) % 3], tri[(i + 2) % 3]
        n = np.array([a[1] - b[1], b[0] - a[0]])
        side = (xx - a[0]) * n[0] + (yy - a[1]) * n[1]
        inside &= side * ((c - a) @ n) >= 0
        dist = np.minimum(dist, _segment_distance(xx, yy, a, b))
    if not cfg.heterostructure:
        inside[...] = True
        dist[...] = np.inf
    phase = np.where(inside, 1, 2).astype(np.uint8)
    if cfg.vacuum:
        phase[u + v > 2.0 - math.sqrt(2.0 * VACUUM_AREA)] = 0

    # strain: coherent-interface term (WS2 stretched, WSe2 compressed) + smooth fields
    A = cfg.strain_amplitude
    ph = g.phases
    interface = cfg.interface_strain * np.exp(-dist / (0.1 * nx)) * np.where(inside, 1.0, -1.0)

    def bump(x0: float, y0_: float, s: float) -> np.ndarray:
        return np.exp(-((u - x0) ** 2 + (v - y0_) ** 2) / (2 * s * s))

    exx = A * (0.8 * np.sin(2 * np.pi * (0.9 * u + 0.35 * v) + ph[0]) + 0.5 * bump(0.3, 0.65, 0.14))
    eyy = A * (0.8 * np.cos(2 * np.pi * (-0.4 * u + 1.1 * v) + ph[1]) - 0.5 * bump(0.7, 0.3, 0.14))
    exy = 0.5 * A * np.sin(2 * np.pi * (0.6 * u + 0.7 * v) + ph[2])
    exx, eyy = exx + interface, eyy + interface
    along = xx * math.cos(g.ripple_dir) + yy * math.sin(g.ripple_dir)  # scan px
    ripple = np.sin(2 * np.pi * along / cfg.ripple_wavelength)
    theta = cfg.global_rotation_deg + cfg.ripple_amplitude_deg * ripple

    # strain of each phase against its own relaxed lattice, then against the one reference
    # lattice (a dilatation by a_phase / a_WS2 commutes with the rotation)
    ls = phase_lattice_scale(phase)
    exx, eyy, exy = ls * (1 + exx) - 1, ls * (1 + eyy) - 1, ls * exy
    eps = np.stack([np.stack([exx, exy], -1), np.stack([exy, eyy], -1)], -2)
    F = rotation_matrix(theta) @ (np.eye(2) + eps)

    # descan drift: linear ramp of up to +-drift_px plus a small quadratic term
    D = cfg.drift_px
    su, sv = 2 * u - 1, 2 * v - 1
    ox = g.base_origin[1] + D * (0.75 * su + 0.15 * sv + 0.1 * su * sv)
    oy = g.base_origin[0] + D * (-0.2 * su + 0.7 * sv + 0.1 * (su * su - 0.5))
    origin = np.stack([oy, ox], -1)

    if cfg.dislocations:
        # the lattice inherits the dislocations' distortion: a' = (I + beta) F a
        F = (np.eye(2) + dislocation_distortion(cfg, yy, xx)) @ F
        theta, U = polar_decompose(F)  # F = R(theta) (I + eps) again
        exx, eyy, exy = U[..., 0, 0] - 1, U[..., 1, 1] - 1, U[..., 0, 1]

    vac = phase == 0
    for arr in (exx, eyy, exy, theta):
        arr[vac] = np.nan
    F[vac] = np.nan
    return {
        "exx": exx,
        "eyy": eyy,
        "exy": exy,
        "theta": theta,
        "phase": phase,
        "F": F,
        "origin": origin,
        "hot_pixels": g.hot_pixels.copy(),
    }


def burgers_vector_px(cfg: SimConfig) -> np.ndarray:
    """Burgers vectors ``(n, 2)`` as ``(x, y)`` in scan pixels of ``cfg.dislocations``.

    ``b = R(global_rotation_deg) (h a1 + k a2) / scan_step_A`` with the relaxed WS2 basis
    (module docstring): a lattice vector of the (unstrained) sample lattice.
    """
    if not cfg.dislocations:
        return np.zeros((0, 2))
    A, _ = basis_vectors(LATTICE_A[1])
    hk = np.array([d[2:] for d in cfg.dislocations], dtype=np.float64)
    return (rotation_matrix(cfg.global_rotation_deg) @ A @ hk.T).T / cfg.scan_step_A


def dislocation_distortion(cfg: SimConfig, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Displacement gradient ``beta = grad u`` ``(..., 2, 2)`` of ``cfg.dislocations`` at scan
    positions ``(yy, xx)``: ``beta[..., i, j] = d u_i / d x_j`` with ``(x, y)`` components.

    Each is the isotropic Volterra edge dislocation (Hirth & Lothe eq. 3-45, Poisson ratio
    ``POISSON_RATIO``; line direction ``x * y``, slip plane along ``b``) whose displacement
    jumps by ``b`` (:func:`burgers_vector_px`) on a counter-clockwise circuit, i.e. the closed
    integral of ``beta dl`` is ``b``.  The ``1/r`` field is multiplied by
    ``1 - exp(-r^2 / (2 w^2))`` (``w = DISLOCATION_CORE_PX``): the Burgers vector is spread as
    a Gaussian of width ``w`` over the core, and the field stays finite.
    """
    nu = POISSON_RATIO
    beta = np.zeros(np.shape(xx) + (2, 2))
    for (y0, x0, _, _), b in zip(cfg.dislocations, burgers_vector_px(cfg), strict=True):
        bn = float(np.hypot(*b))
        e = b / bn
        Q = np.array([[e[0], -e[1]], [e[1], e[0]]])  # columns: along b, normal (turned +90)
        dx, dy = xx - x0, yy - y0
        x, y = e[0] * dx + e[1] * dy, -e[1] * dx + e[0] * dy  # the dislocation's frame
        r2 = x * x + y * y
        core = -np.expm1(-r2 / (2 * DISLOCATION_CORE_PX**2))
        r2 = np.where(r2 > 0, r2, 1.0)  # core == 0 there
        c = bn / (2 * np.pi) * core / r2
        r2b = r2 * 2 * (1 - nu)
        g = np.empty(np.shape(xx) + (2, 2))
        g[..., 0, 0] = c * (-y + y * (y * y - x * x) / r2b)
        g[..., 0, 1] = c * (x + x * (x * x - y * y) / r2b)
        g[..., 1, 0] = -c * ((1 - 2 * nu) * x / (2 * (1 - nu)) + 2 * x * y * y / r2b)
        g[..., 1, 1] = -c * ((1 - 2 * nu) * y / (2 * (1 - nu)) - 2 * x * x * y / r2b)
        beta += Q @ g @ Q.T
    return beta


# --------------------------------------------------------------------------------------------
# noise and assembly
# --------------------------------------------------------------------------------------------


def _poisson_row(
    rng: np.random.Generator,
    img: np.ndarray,
    total: np.ndarray,
    dose: float,
    hot: tuple[np.ndarray, np.ndarray, np.ndarray],
    out: np.ndarray,
) -> None:
    """Write Poisson counts with mean ``dose * img / total`` (+ hot pixels) into uint16 ``out``.

    ``img`` is ``(n, Q, Q)``; ``hot`` is ``(rows, cols, values)`` of the detector defects,
    added after the shot noise.  Work arrays are per pattern or per 64 patterns, so memory
    stays bounded for long scan rows.
    """
    n, Q, _ = img.shape
    QQ = Q * Q
    top = np.iinfo(np.uint16).max
    hr, hc, hv = hot
    if dose * 2 >= QQ:
        for p0 in range(0, n, 64):
            p1 = min(n, p0 + 64)
            lam = img[p0:p1] * (dose / total[p0:p1]).astype(img.dtype)[:, None, None]
            c = rng.poisson(lam)
            c[:, hr, hc] += hv
            np.minimum(c, top, out=c)  # counts are >= 0
            out[p0:p1] = c
        return
    # Low dose: a Poisson process is a Poisson number of electrons placed independently, so
    # draw N ~ Poisson(dose) per pattern and place each by inverse-CDF lookup.  This costs
    # ~0.1 ms + 45 ns per electron per pattern against ~0.55 ms for rng.poisson on 128 x 128
    # pixels (measured: 0.2 vs 0.5 ms at dose 1000, 0.47 vs 0.55 ms at dose 6000), hence the
    # switch at dose = Q^2 / 2.  The per-pattern loop keeps the float64 CDF in cache.
    counts = rng.poisson(dose, n)
    u_all = rng.random(int(counts.sum()))
    cdf = np.empty(QQ, dtype=np.float64)
    flat = img.reshape(n, QQ)
    o = 0
    for p in range(n):
        np.cumsum(flat[p], dtype=np.float64, out=cdf)
        u = u_all[o : o + counts[p]]
        o += counts[p]
        u *= cdf[-1]
        u.sort()  # sorted keys make the binary search cache-friendly
        k = np.searchsorted(cdf, u, side="right")
        np.minimum(k, QQ - 1, out=k)  # guards the float edge u == cdf[-1]
        c = np.bincount(k, minlength=QQ).reshape(Q, Q)
        c[hr, hc] += hv
        np.minimum(c, top, out=c)
        out[p] = c


def simulate_rows(cfg: SimConfig, y0: int, y1: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows ``y0:y1`` of :func:`simulate`: ``(data (y1-y0, nx, Q, Q), truth for those rows)``.

    Each row's noise comes from its own generator seeded with ``(cfg.seed, row)``, so the
    result equals the same slice of the full simulation whatever the chunking.
    """
    truth = truth_rows(cfg, y0, y1)
    ny, nx = y1 - y0, cfg.scan[1]
    Q = cfg.detector
    t, g = _tables(cfg), _globals(cfg)
    noisy = cfg.dose is not None
    nominal = float(cfg.dose) if noisy else NOMINAL_TOTAL
    hot_value = g.hot_scale * t.typical_pixel * nominal
    hr, hc = g.hot_pixels[:, 0], g.hot_pixels[:, 1]
    data = np.empty((ny, nx, Q, Q), dtype=np.uint16 if noisy else np.float32)
    rows_per_block = max(1, _BLOCK_ELEMENTS // (nx * Q * Q))
    for r0 in range(0, ny, rows_per_block):
        r1 = min(ny, r0 + rows_per_block)
        phase = truth["phase"][r0:r1].reshape(-1)
        F = truth["F"][r0:r1].reshape(-1, 2, 2) / phase_lattice_scale(phase)[:, None, None]
        origin = truth["origin"][r0:r1].reshape(-1, 2)
        img, total = _render(cfg, F, origin, phase, np.float32)
        if not noisy:
            img = _finish(cfg, img, total, origin, NOMINAL_TOTAL)
            img[:, hr, hc] += hot_value.astype(np.float32)
            data[r0:r1] = img.reshape(r1 - r0, nx, Q, Q)
            continue
        if cfg.background_weight > 0:
            img = _finish(cfg, img, total, origin, 1.0)
            total = np.ones(len(phase))
        img = img.reshape(r1 - r0, nx, Q, Q)
        hot = (hr, hc, np.rint(hot_value).astype(np.int64))
        for i in range(r1 - r0):
            # per-row stream: chunking-independent
            rng = _rng(cfg, 0x0D05E, y0 + r0 + i, *((cfg.noise_seed,) if cfg.noise_seed else ()))
            sl = slice(i * nx, (i + 1) * nx)
            _poisson_row(rng, img[i], total[sl], float(cfg.dose), hot, data[r0 + i])
    return data, truth


def simulate(cfg: SimConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Full dataset ``(data (ny, nx, Q, Q), truth)``; see :func:`truth_rows` for the keys.

    ``data`` is float32 expected counts summing to ``NOMINAL_TOTAL`` per pattern (plus hot
    pixels) when ``cfg.dose`` is None, else uint16 Poisson counts with mean total ``cfg.dose``.
    """
    return simulate_rows(cfg, 0, cfg.scan[0])


def save_simulation(path: str | Path, cfg: SimConfig) -> tuple[Path, Path]:
    """Write ``OUT.npy`` (data) and ``OUT.truth.npz`` (truth + config JSON under ``config``).

    The data are written block by block into a memory-mapped ``.npy`` so that memory stays
    bounded for large scans.  Returns ``(npy_path, truth_path)``.
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix == ".npy" else path
    npy_path = stem.parent / (stem.name + ".npy")
    truth_path = stem.parent / (stem.name + ".truth.npz")
    npy_path.parent.mkdir(parents=True, exist_ok=True)
    ny, nx = cfg.scan
    Q = cfg.detector
    dtype = np.uint16 if cfg.dose is not None else np.float32
    out = np.lib.format.open_memmap(npy_path, mode="w+", dtype=dtype, shape=(ny, nx, Q, Q))
    step = max(1, _BLOCK_ELEMENTS // (nx * Q * Q))
    for y0 in range(0, ny, step):
        y1 = min(ny, y0 + step)
        out[y0:y1] = simulate_rows(cfg, y0, y1)[0]
    out.flush()
    del out
    truth = truth_rows(cfg)
    np.savez(truth_path, **truth, config=np.array(json.dumps(cfg.to_dict(), sort_keys=True)))
    return npy_path, truth_path


def load_simulation(
    npy_path: str | Path, mmap: bool = True
) -> tuple[np.ndarray, dict[str, np.ndarray], SimConfig]:
    """Read back :func:`save_simulation` output: ``(data, truth, cfg)``."""
    npy_path = Path(npy_path)
    data = np.load(npy_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    stem = npy_path.with_suffix("")
    with np.load(stem.parent / (stem.name + ".truth.npz"), allow_pickle=False) as z:
        truth = {k: z[k] for k in z.files if k != "config"}
        cfg = SimConfig.from_dict(json.loads(str(z["config"])))
    return data, truth, cfg
