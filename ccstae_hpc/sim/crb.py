"""Cramer-Rao lower bounds of a single simulated pattern under Poisson noise.

The bound uses the simulator's own renderer (:func:`ccstae_hpc.sim.simulate.render_pattern`), so
it is the precision floor for any estimator on these data: strain, rotation and pattern origin
cannot be recovered from one pattern at a given dose more precisely than this.
"""

from __future__ import annotations

import math

import numpy as np

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.core.strain import rotation_matrix
from ccstae_hpc.sim.simulate import base_origin, render_pattern

__all__ = ["PARAMS", "pattern_from_params", "fisher_information", "cramer_rao", "render_pattern"]

PARAMS = ("exx", "eyy", "exy", "theta_deg", "origin_x", "origin_y")
# central-difference steps: small enough for the piecewise-linear disk edges (a strain step of
# 1e-4 moves an outer disk by ~0.006 px), large enough for float64 round-off
_STEPS = np.array([1e-4, 1e-4, 1e-4, 1e-2, 1e-2, 1e-2])


def pattern_from_params(cfg: SimConfig, p: np.ndarray, phase: int, dose: float) -> np.ndarray:
    """Expected counts ``(Q, Q)`` for parameters ``p`` ordered as :data:`PARAMS`."""
    exx, eyy, exy, theta, ox, oy = (float(v) for v in p)
    F = rotation_matrix(theta) @ (np.eye(2) + np.array([[exx, exy], [exy, eyy]]))
    return render_pattern(cfg, F, np.array([oy, ox]), phase, total=dose, dtype=np.float64)


def fisher_information(
    cfg: SimConfig, dose: float, phase: int = 1, p0: np.ndarray | None = None
) -> np.ndarray:
    """Poisson Fisher matrix ``I_ij = sum_k dmu_k/dp_i dmu_k/dp_j / mu_k`` (6 x 6, :data:`PARAMS`).

    ``p0`` defaults to the unstrained pattern of ``phase`` at the global rotation and the
    un-drifted origin.  Derivatives are central finite differences of the noise-free pattern.
    """
    if p0 is None:
        oy, ox = base_origin(cfg)
        p0 = np.array([0.0, 0.0, 0.0, cfg.global_rotation_deg, ox, oy])
    mu = pattern_from_params(cfg, p0, phase, dose).ravel()
    J = np.empty((len(PARAMS), mu.size))
    for i, h in enumerate(_STEPS):
        e = np.zeros(len(PARAMS))
        e[i] = h
        up = pattern_from_params(cfg, p0 + e, phase, dose).ravel()
        down = pattern_from_params(cfg, p0 - e, phase, dose).ravel()
        J[i] = (up - down) / (2.0 * h)
    # the floor keeps empty pixels (if any) from dividing by zero; it is ~1e-12 of a count
    mu = mu + 1e-12 * dose / mu.size
    return (J / mu) @ J.T


def cramer_rao(cfg: SimConfig, dose: float, phase: int = 1) -> dict[str, float]:
    """CRB standard deviations and implied mean-absolute-error floors for one pattern.

    Parameters
    ----------
    cfg : simulation config (detector, optics, ``background_weight``; ``cfg.dose`` is ignored).
    dose : electrons per pattern (Poisson).
    phase : 1 WS2 or 2 WSe2; the pattern is unstrained at the global rotation.

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
    cov = np.linalg.inv(fisher_information(cfg, dose, phase))
    std = np.sqrt(np.diag(cov))
    out: dict[str, float] = {}
    for name, s in zip(PARAMS, std, strict=True):
        out[f"std_{name}"] = float(s)
        out[f"mae_{name}"] = float(s * math.sqrt(2.0 / math.pi))
    return out
