"""Cramer-Rao lower bounds of a single simulated pattern under Poisson noise.

The bound uses the simulator's own renderer (:func:`ccstae_hpc.sim.simulate.render_pattern`), so
it is the precision floor for any estimator on these data: strain, rotation and pattern origin
cannot be recovered from one pattern at a given dose more precisely than this.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.core.strain import polar_decompose, rotation_matrix
from ccstae_hpc.sim.simulate import LATTICE_A, base_origin, render_pattern, render_patterns

__all__ = ["PARAMS", "pattern_from_params", "patterns_from_params", "fisher_information",
           "cramer_rao", "render_pattern", "pattern_floor", "scan_floor", "truth_params",
           "in_frame", "pattern_covariance", "model_jacobian"]

PARAMS = ("exx", "eyy", "exy", "theta_deg", "origin_x", "origin_y")
# sub-pixel samples per detector pixel and axis when a measured pattern is warped: a
# pixel-integrated warp, so that sharp disk edges do not turn the interpolant's kinks into
# spurious information
SUPERSAMPLE = 4
# central-difference steps: small enough for the piecewise-linear disk edges (a strain step of
# 1e-4 moves an outer disk by ~0.006 px), large enough for float64 round-off
_STEPS = np.array([1e-4, 1e-4, 1e-4, 1e-2, 1e-2, 1e-2])
# patterns per phase whose floors are averaged by scan_floor: one pattern's floor moves by
# +-8 % with its sub-pixel origin alone (the disks' edges fall differently on the pixels),
# so the mean of 64 is known to ~1 %
SCAN_FLOOR_PATTERNS = 64


def patterns_from_params(cfg: SimConfig, p: np.ndarray, phase: int, dose: float
                         ) -> np.ndarray:
    """Expected counts ``(m, Q, Q)`` for ``m`` parameter rows ``p`` ``(m, 6)`` ordered as
    :data:`PARAMS`, rendered together: the renderer's cost is per reflection and call, so
    one call for a pattern and its finite differences is several times faster than a call
    each (:func:`scan_floor` of a 32x32 scan 5.1 -> 0.9 s, the floors equal to 11 digits)."""
    p = np.atleast_2d(np.asarray(p, np.float64))
    exx, eyy, exy, theta, ox, oy = p.T
    e = np.stack([np.stack([exx, exy], -1), np.stack([exy, eyy], -1)], -2)  # (m, 2, 2)
    F = rotation_matrix(theta) @ (np.eye(2) + e)
    return render_patterns(cfg, F, np.stack([oy, ox], -1), np.full(len(p), phase),
                           total=dose, dtype=np.float64)


def model_jacobian(model: Callable[[np.ndarray], np.ndarray], p: np.ndarray,
                   steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A model at parameters ``p`` ``(n,)`` and its central-difference Jacobian ``(n, P)``
    (step ``steps[i]`` along parameter ``i``), from one call of ``model`` (rows of
    parameters ``(m, n)`` -> ``(m, P)``) on ``p`` and its ``2 n`` shifted copies."""
    p = np.asarray(p, np.float64)
    h = np.asarray(steps, np.float64)
    m = model(np.concatenate([p[None], p + np.diag(h), p - np.diag(h)]))
    n = len(p)
    return m[0], (m[1:1 + n] - m[1 + n:]) / (2.0 * h[:, None])


def pattern_from_params(cfg: SimConfig, p: np.ndarray, phase: int, dose: float) -> np.ndarray:
    """Expected counts ``(Q, Q)`` for parameters ``p`` ordered as :data:`PARAMS`."""
    return patterns_from_params(cfg, np.asarray(p)[None], phase, dose)[0]


def in_frame(cov: np.ndarray, frame_deg: float) -> np.ndarray:
    """A covariance of :data:`PARAMS` with its strains turned into a frame ``frame_deg``
    (degrees, positive turning +x toward +y) from the lattice's own.

    :func:`pattern_from_params` takes the strain in the lattice's frame (``F = R (I + e)``),
    but the maps (and the truth re-referenced on them) report ``R_ref e R_ref^T``, the strain
    in the scan's frame, turned by the reference's orientation (to first order: the
    differences of two pixels' re-referenced truth and of their ``e`` turned by it agree to
    1e-5 where they are small, to 1 % where they are 1 %).  The
    floors are nearly isotropic (turned by 17 deg they change by 1-2 %), but a floor must be
    of the components the maps report.
    """
    R = rotation_matrix(frame_deg)
    # (exx, eyy, exy) of R e R^T, linear in those of e: column j is the image of the unit
    # tensor of component j (exy is the tensor shear, e_xy = e_yx)
    T = np.eye(len(PARAMS))
    for j, E in enumerate(([[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]],
                           [[0.0, 1.0], [1.0, 0.0]])):
        turned = R @ np.asarray(E) @ R.T
        T[:3, j] = turned[0, 0], turned[1, 1], turned[0, 1]
    return T @ cov @ T.T


def fisher_information(
    cfg: SimConfig, dose: float, phase: int = 1, p0: np.ndarray | None = None
) -> np.ndarray:
    """Poisson Fisher matrix ``I_ij = sum_k dmu_k/dp_i dmu_k/dp_j / mu_k`` (6 x 6, :data:`PARAMS`).

    The strains of ``p`` are against the phase's own relaxed lattice, as the renderer takes
    them; ``p0`` defaults to the relaxed pattern at the global rotation and the un-drifted
    origin.  Derivatives are central finite differences of the noise-free pattern.
    """
    if p0 is None:
        oy, ox = base_origin(cfg)
        p0 = np.array([0.0, 0.0, 0.0, cfg.global_rotation_deg, ox, oy])
    # the pattern and its 2 x 6 central differences in one render
    mu, J = model_jacobian(
        lambda q: patterns_from_params(cfg, q, phase, dose).reshape(len(q), -1), p0, _STEPS)
    # the floor keeps empty pixels (if any) from dividing by zero; it is ~1e-12 of a count
    mu = mu + 1e-12 * dose / mu.size
    return (J / mu) @ J.T


def cramer_rao(cfg: SimConfig, dose: float, phase: int = 1) -> dict[str, float]:
    """CRB standard deviations and implied mean-absolute-error floors for one pattern.

    Parameters
    ----------
    cfg : simulation config (detector, optics, ``background_weight``; ``cfg.dose`` is ignored).
    dose : electrons per pattern (Poisson).
    phase : 1 WS2 or 2 WSe2; the pattern is relaxed (its own lattice) at the global rotation.
        Strains are against that lattice, in the scan's frame (:func:`in_frame`, turned by
        the global rotation), as the maps report them.

    Returns
    -------
    dict with ``std_<p>`` and ``mae_<p>`` (= sqrt(2/pi) std, the MAE of an unbiased Gaussian
    estimator at the bound) for ``p`` in :data:`PARAMS`: strains as fractions, ``theta_deg`` in
    degrees, origins in detector pixels.
    """
    if phase not in (1, 2):
        raise ValueError("phase must be 1 (WS2) or 2 (WSe2): vacuum carries no strain")
    if dose <= 0:
        raise ValueError("dose must be positive")
    cov = in_frame(np.linalg.inv(fisher_information(cfg, dose, phase)), cfg.global_rotation_deg)
    std = np.sqrt(np.diag(cov))
    out: dict[str, float] = {}
    for name, s in zip(PARAMS, std, strict=True):
        out[f"std_{name}"] = float(s)
        out[f"mae_{name}"] = float(s * math.sqrt(2.0 / math.pi))
    return out


def truth_params(truth: dict[str, np.ndarray], y: int, x: int) -> np.ndarray:
    """The parameters (:data:`PARAMS`) of :func:`pattern_from_params` that render the
    simulated pattern at scan position ``(y, x)``: the truth's ``F`` against the pattern's
    own phase's relaxed lattice, and its origin."""
    p = int(truth["phase"][y, x])
    if p not in LATTICE_A:
        raise ValueError(f"scan position {(y, x)} is vacuum: no pattern parameters")
    theta, U = polar_decompose(np.asarray(truth["F"][y, x], np.float64)
                               / (LATTICE_A[p] / LATTICE_A[1]))
    oy, ox = truth["origin"][y, x]
    return np.array([U[0, 0] - 1.0, U[1, 1] - 1.0, U[0, 1], float(theta), ox, oy])


def pattern_covariance(cfg: SimConfig, truth: dict[str, np.ndarray], y: int, x: int,
                       dose: float) -> np.ndarray:
    """The Cramer-Rao covariance of :data:`PARAMS` of the simulated pattern at scan position
    ``(y, x)`` at ``dose`` (its :func:`truth_params`), strains against its own phase's
    lattice and in the scan's frame (:func:`in_frame`, the global rotation)."""
    p0 = truth_params(truth, y, x)
    # the information is proportional to the dose: one electron's, scaled
    cov = np.linalg.inv(fisher_information(cfg, 1.0, int(truth["phase"][y, x]), p0)) / dose
    return in_frame(cov, cfg.global_rotation_deg)


def scan_floor(cfg: SimConfig, truth: dict[str, np.ndarray], dose: float,
               patterns: int = SCAN_FLOOR_PATTERNS, seed: int = 0) -> dict[int, dict[str, float]]:
    """Mean Cramer-Rao floor of a simulated scan's own patterns, per phase.

    Each pattern's floor is that of its true deformation, rotation and origin (``truth`` of
    :func:`ccstae_hpc.sim.simulate.truth_rows`: ``F = R(theta) (I + eps)`` against the one
    WS2 reference lattice, and ``origin``), its strains in the scan's frame as the maps
    report them (:func:`in_frame`, turned by the lattice's global rotation: the reference's
    orientation up to the ripple, whose +-1.5 deg change the floors by < 0.5 %), in the
    truth's units: the renderer takes ``F``
    against the phase's own lattice (``F / (a_phase / a_WS2)``), so a WSe2 pattern's strain
    floors are its own lattice's times ``a_WSe2 / a_WS2``.  The MAE of a method over a set of
    patterns is the mean of its errors, so its floor is the mean of theirs: one relaxed
    pattern's floor (:func:`cramer_rao`) sits up to 8 % off it, by where its disk edges fall
    on the pixels.

    Parameters
    ----------
    cfg : the scan's simulation config.
    truth : its truth (``F, origin, phase``).
    dose : electrons per pattern.
    patterns : patterns per phase averaged.
    seed : of the random choice of each phase's patterns.

    Returns
    -------
    phase -> ``mae_<p>`` (the mean over its patterns) for every phase present.
    """
    if dose <= 0:
        raise ValueError("dose must be positive")
    rng = np.random.default_rng(seed)
    phase = np.asarray(truth["phase"])
    out: dict[int, dict[str, float]] = {}
    for p in (int(v) for v in np.unique(phase[phase > 0])):
        where = np.argwhere(phase == p)
        pick = where[rng.choice(len(where), min(patterns, len(where)), replace=False)]
        ls = LATTICE_A[p] / LATTICE_A[1]
        to_truth = np.array([ls, ls, ls, 1.0, 1.0, 1.0])  # d eps_truth = ls d eps_own
        mae = []
        for y, x in pick:
            cov = pattern_covariance(cfg, truth, int(y), int(x), dose)
            mae.append(np.sqrt(np.diag(cov)) * to_truth * math.sqrt(2.0 / math.pi))
        out[p] = {f"mae_{name}": float(v)
                  for name, v in zip(PARAMS, np.mean(mae, 0), strict=True)}
    return out


def _warped(pattern: np.ndarray, center: np.ndarray, p: np.ndarray, dose: float) -> np.ndarray:
    """Expected counts of ``pattern`` under the deformation ``p`` (:data:`PARAMS`, origin
    shifts in px) about ``center`` ``(y, x)``: reciprocal vectors map by ``F^-T``, so the
    pattern is sampled at ``F^T (k - o) + c``, integrated over each pixel."""
    from scipy import ndimage

    exx, eyy, exy, theta, ox, oy = (float(v) for v in p)
    F = rotation_matrix(theta) @ (np.eye(2) + np.array([[exx, exy], [exy, eyy]]))
    A = F.T
    Q = pattern.shape[0]
    up = SUPERSAMPLE
    sub = (np.arange(Q * up) + 0.5) / up - 0.5
    yy, xx = np.meshgrid(sub, sub, indexing="ij")
    kx, ky = xx - center[1] - ox, yy - center[0] - oy
    sx = A[0, 0] * kx + A[0, 1] * ky + center[1]
    sy = A[1, 0] * kx + A[1, 1] * ky + center[0]
    m = ndimage.map_coordinates(pattern, [sy, sx], order=1, mode="constant")
    m = m.reshape(Q, up, Q, up).mean(axis=(1, 3))
    return np.clip(m, 0.0, None) * dose / pattern.sum()


def pattern_floor(pattern: np.ndarray, center: tuple[float, float], dose: float,
                  pixels: np.ndarray | None = None) -> dict[str, float]:
    """Cramer-Rao floor of one measured (e.g. multislice) noise-free ``pattern`` ``(Q, Q)``.

    The model moves the whole pattern with the lattice about ``center`` (the Bragg disks
    move as the reciprocal lattice), pixel-integrated (:data:`SUPERSAMPLE`); Poisson counts
    at ``dose`` electrons per pattern; only ``pixels`` (boolean ``(Q, Q)``, default all) are
    used.  The warp also scales the disks, which real disks (sized by the probe) do not: a
    few per cent of spurious information for Bragg disks ten radii out, but the central
    disk's edge would look like a strain gauge, so leave it out of ``pixels`` (it fixes
    only the origin, which the Bragg disks' Friedel pairs decouple from the strain).
    Returns ``std_<p>`` and ``mae_<p>`` as :func:`cramer_rao`.
    """
    P = np.asarray(pattern, np.float64)
    c = np.asarray(center, np.float64)
    sel = np.ones(P.shape, bool) if pixels is None else np.asarray(pixels, bool)
    mu = _warped(P, c, np.zeros(6), dose)[sel]
    J = np.empty((len(PARAMS), mu.size))
    for i, h in enumerate(_STEPS * 2):
        e = np.zeros(len(PARAMS))
        e[i] = h
        J[i] = ((_warped(P, c, e, dose) - _warped(P, c, -e, dose))[sel]) / (2.0 * h)
    # empty pixels carry no counts and no information; the floor keeps them finite
    mu = mu + 1e-3 * dose / P.size
    std = np.sqrt(np.diag(np.linalg.inv((J / mu) @ J.T)))
    out: dict[str, float] = {}
    for name, sd in zip(PARAMS, std, strict=True):
        out[f"std_{name}"] = float(sd)
        out[f"mae_{name}"] = float(sd * math.sqrt(2.0 / math.pi))
    return out
