"""Multislice (abTEM) 4D-STEM validation data of WS2 and a WS2/WSe2 heterostructure.

The patterns are computed by abTEM from atom positions, independently of the project's own
kinematic simulator (:mod:`ccstae_hpc.sim.simulate`); the ground truth is computed from the same
atom positions.  ``abtem`` and ``ase`` are imported lazily, so this module (and the truth, which
needs neither) imports without them.

Conventions (those of :mod:`ccstae_hpc.core.strain` and :mod:`ccstae_hpc.sim.simulate`):

* real space: lab coordinates ``(x, y)`` in Angstrom, ``x`` along scan columns, ``y`` along
  scan rows; probe ``(row, col)`` sits at ``(x, y) = step * (col, row)``;
* data are ``(scan_y, scan_x, k_y, k_x)``: abTEM's ``(k_x, k_y)`` diffraction arrays are
  transposed, so ``k_x`` runs along detector columns, parallel to scan ``x``; the (000) beam is
  at ``truth["origin"]`` = ``(k_y, k_x)`` = ``(Q/2, Q/2)`` for every pattern; the reciprocal
  pixel is ``1 / BOX`` = ``PIXEL_SIZE``;
* the sample is a map ``x = c + R0 (X + u(X))`` of the *reference lattice* -- relaxed WS2
  (``a = 3.153``, basis ``a1 = a(1, 0)``, ``a2 = a(1/2, sqrt(3)/2)``, metal on the lattice
  sites, chalcogens above and below ``(a1 + a2) / 3``) -- with ``c`` the scan centre, ``R0`` a
  global rotation and ``u`` a smooth displacement (:class:`_SingleField`,
  :class:`_InterfaceField`); WSe2 is the same lattice, so the interface is coherent;
* ``truth["F"]`` is the real-space deformation gradient of the local lattice relative to that
  one reference lattice (for WSe2 too: its relaxed lattice reads ``exx = eyy ~ 4.1 %``), acting
  on column vectors ``(x, y)``; it is a probe-intensity weighted least-squares affine fit of the
  metal atoms in the box against their reference sites; ``F = R U`` (right polar decomposition),
  ``exx, eyy, exy`` from ``U - I``, ``theta`` in degrees turning +x toward +y; a disk of
  reference reciprocal vector ``g`` (no ``2 pi``) sits at
  ``(col, row) = origin[::-1] + F^-T g / PIXEL_SIZE``;
* ``truth["phase"]``: 0 vacuum (less than half the probe-weighted chalcogen sites are
  occupied), else 1 WS2 / 2 WSe2 by the probe-weighted majority of the chalcogens; vacuum
  strain, theta and ``F`` are NaN.

Each probe position sees the atoms of the global sample inside a fixed periodic box of side
``BOX`` centred on the probe (same box, hence same detector sampling, for every position; only
the lattice deforms).  The box cuts the lattice, so its edges are seams (a ~27 A away from the
probe, where the probe intensity is ~1e-3 of its peak).  One slice (a monolayer), an
aberration-free probe at ``ENERGY_EV``, no thermal diffuse scattering.  Patterns are cropped to
``Q x Q`` around the central beam and scaled to sum to ``NOMINAL_TOTAL``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ccstae_hpc.core.strain import polar_decompose, rotation_matrix
from ccstae_hpc.sim.simulate import LATTICE_A, NOMINAL_TOTAL, basis_vectors

__all__ = [
    "BOX",
    "DETECTOR",
    "DISK_RADIUS_PX",
    "ENERGY_EV",
    "PIXEL_SIZE",
    "add_poisson",
    "disk_centres",
    "homogeneous_pattern",
    "imposed_field",
    "predicted_centres",
    "load_multislice",
    "multislice_truth",
    "reference_reciprocal",
    "save_multislice",
    "validation_set",
    "VALIDATION_SETS",
    "simulate_multislice",
    "simulate_patterns",
]

# optics and sampling ---------------------------------------------------------------------------
ENERGY_EV = 200e3  # beam energy
PIXEL_SIZE = 0.0183  # 1/A per detector pixel (the project's detector: WS2 {100} at ~20 px)
BOX = 1.0 / PIXEL_SIZE  # A, side of the periodic simulation box (sampling 1/BOX in k)
DETECTOR = 128  # px, detector side after cropping around the central beam
DISK_RADIUS_PX = 4.5  # Bragg disk radius: semi-angle = DISK_RADIUS_PX * PIXEL_SIZE * wavelength
GPTS = 320  # real-space grid: sampling BOX / GPTS = 0.171 A, antialias limit ~106 px
MAX_VALID_FRACTION = 2.0 / 3.0  # abTEM's antialias aperture, fraction of the Nyquist frequency
SCAN_STEP = 5.0  # A between probe positions
# sample ----------------------------------------------------------------------------------------
REF_PHASE = 1  # the reference lattice is relaxed WS2
MX2_THICKNESS = {1: 3.14, 2: 3.34}  # A, chalcogen-chalcogen height per phase
SLAB_VACUUM = 2.0  # A of vacuum above and below the monolayer in the cell
FORMULA = {1: "WS2", 2: "WSe2"}
METAL, CHALCOGEN = {1: "W", 2: "W"}, {1: "S", 2: "Se"}
VACUUM_COVERAGE = 0.5  # below this probe-weighted chalcogen occupancy a position is vacuum
# imposed fields --------------------------------------------------------------------------------
SINGLE_ROTATION_DEG = 15.0  # global rotation of the single-phase sample
# linear fields over normalised reference coordinates s = X / (half scan extent):
# value = c0 + cx * s_x + cy * s_y; the rotation (radians) follows from compatibility
SINGLE_EXX = (0.001, 0.004, -0.005)
SINGLE_EYY = (-0.001, 0.004, 0.005)
SINGLE_EXY = (0.0005, 0.006, -0.002)
INTERFACE_ROTATION_DEG = 12.0  # global rotation of the heterostructure
INTERFACE_NORMAL_DEG = 20.0  # lab angle of the interface normal, pointing WS2 -> WSe2
INTERFACE_STRAIN = 0.02  # tangential stretch of WS2 at the interface (coherent: WSe2 matches)
INTERFACE_DECAY = 25.0  # A, e-folding length of the interface strain
INTERFACE_OFFSET = -6.0  # A, interface position along its normal from the scan centre
POISSON_RATIO = 0.25  # normal response to the tangential interface strain
VACUUM_CUT = 1.6  # vacuum where col / (nx - 1) + row / (ny - 1) > VACUUM_CUT (lab position)
_FIXED_POINT_ITERATIONS = 60  # inverse map X = phi^-1(x) by fixed-point iteration
_COVER_MARGIN = 2.0  # extra lattice constants around the region any box can see
_MIN_FIT_ATOMS = 6  # fewer metal atoms in the box: no affine fit (vacuum)


def wavelength(energy_ev: float = ENERGY_EV) -> float:
    """Relativistic electron wavelength in Angstrom."""
    h, m0, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    p = math.sqrt(2.0 * m0 * e * energy_ev * (1.0 + e * energy_ev / (2.0 * m0 * c * c)))
    return h / p * 1e10


def semiangle_mrad(energy_ev: float = ENERGY_EV) -> float:
    """Convergence semi-angle (mrad) giving disks of ``DISK_RADIUS_PX`` pixels."""
    return DISK_RADIUS_PX * PIXEL_SIZE * wavelength(energy_ev) * 1e3


def reference_reciprocal(order: int = 1) -> np.ndarray:
    """Reciprocal vectors ``(n, 2)`` as ``(x, y)`` in 1/A of the reference lattice.

    ``order`` 1: the six {100}; 2: the six {100} and the six {110}.
    """
    _, B = basis_vectors(LATTICE_A[REF_PHASE])
    hk = [(1, 0), (0, 1), (-1, 1), (-1, 0), (0, -1), (1, -1)]
    if order >= 2:
        hk += [(1, 1), (-1, 2), (-2, 1), (-1, -1), (1, -2), (2, -1)]
    return np.asarray(hk, dtype=np.float64) @ B.T


# ------------------------------------------------------------------------------------------------
# imposed fields: x - c = R0 (X + u(X)) with X in the reference frame
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SingleField:
    """Smooth strain and rotation: ``grad u`` linear in ``s = X / scale`` (u quadratic)."""

    scale: float  # A, half the scan extent
    rotation_deg: float = SINGLE_ROTATION_DEG
    exx: tuple[float, float, float] = SINGLE_EXX
    eyy: tuple[float, float, float] = SINGLE_EYY
    exy: tuple[float, float, float] = SINGLE_EXY

    def _coeffs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``grad u = G0 + Gx s_x + Gy s_y`` with a compatible (curl-free) displacement."""
        exx, eyy, exy = (np.asarray(v) for v in (self.exx, self.eyy, self.exy))
        # rotation gradients from compatibility: d(w)/dx = d(exy)/dx - d(exx)/dy, etc.
        w = np.array([0.0, exy[1] - exx[2], eyy[1] - exy[2]])
        G = np.array([[exx, exy - w], [exy + w, eyy]])  # (2, 2, 3): constant, s_x, s_y
        return G[..., 0], G[..., 1], G[..., 2]

    def grad(self, X: np.ndarray) -> np.ndarray:
        """``grad u`` at reference points ``X`` (n, 2): (n, 2, 2), ``[i, j] = du_i/dX_j``."""
        G0, Gx, Gy = self._coeffs()
        s = np.asarray(X, dtype=np.float64) / self.scale
        return G0 + s[:, 0, None, None] * Gx + s[:, 1, None, None] * Gy

    def disp(self, X: np.ndarray) -> np.ndarray:
        """Displacement ``u(X)`` (n, 2) in A."""
        G0, Gx, Gy = self._coeffs()
        s = np.asarray(X, dtype=np.float64) / self.scale
        sx, sy = s[:, 0:1], s[:, 1:2]
        u = s @ G0.T + 0.5 * sx**2 * Gx[:, 0] + sx * sy * Gx[:, 1] + 0.5 * sy**2 * Gy[:, 1]
        return self.scale * u

    def species(self, X: np.ndarray) -> np.ndarray:
        """Phase code (1 WS2, 2 WSe2) of the formula unit on metal site ``X``."""
        return np.ones(len(X), dtype=np.uint8)

    def params(self) -> dict[str, Any]:
        """The imposed field, for the truth config."""
        G0, Gx, Gy = self._coeffs()
        return {
            "type": "single",
            "map": "x - c = R0 (X + u(X)), grad u = G0 + Gx s_x + Gy s_y, s = X / scale",
            "rotation_deg": self.rotation_deg,
            "scale_A": self.scale,
            "exx_c0_cx_cy": list(self.exx),
            "eyy_c0_cx_cy": list(self.eyy),
            "exy_c0_cx_cy": list(self.exy),
            "G0": G0.tolist(),
            "Gx": Gx.tolist(),
            "Gy": Gy.tolist(),
        }


@dataclass(frozen=True)
class _InterfaceField:
    """Coherent WS2/WSe2 interface through the scan centre.

    In the interface frame (normal ``n`` from WS2 to WSe2, tangent ``t``; ``d = n.X``,
    ``tau = t.X``) the tangential stretch ``g(d)`` goes from 1 (relaxed WS2) through
    ``1 + strain`` at the interface (WS2 stretched, WSe2 compressed) to ``a_WSe2 / a_WS2``
    (relaxed WSe2), each side relaxing with e-folding ``decay``; the normal stretch ``h(d)``
    responds with ``-poisson`` times the interface strain.  ``u_n = int (h - 1) dd`` and
    ``u_t = (g(d) - 1) tau`` (``d`` measured from the interface, ``offset`` from the scan
    centre) make a compatible displacement; its ``du_t/dn = g'(d) tau`` term
    adds shear and rotation near the interface that grow along it from the scan centre.
    """

    rotation_deg: float = INTERFACE_ROTATION_DEG
    normal_deg: float = INTERFACE_NORMAL_DEG
    strain: float = INTERFACE_STRAIN
    decay: float = INTERFACE_DECAY
    poisson: float = POISSON_RATIO
    offset: float = INTERFACE_OFFSET

    @property
    def ratio(self) -> float:
        return LATTICE_A[2] / LATTICE_A[REF_PHASE]

    @property
    def strain_wse2(self) -> float:
        """Tangential compression of WSe2 at the interface (coherence)."""
        return 1.0 - (1.0 + self.strain) / self.ratio

    def _frame(self) -> np.ndarray:
        """``Q = [n t]`` in the reference frame (columns)."""
        ang = math.radians(self.normal_deg - self.rotation_deg)
        n = np.array([math.cos(ang), math.sin(ang)])
        return np.stack([n, np.array([-n[1], n[0]])], 1)

    def _profiles(self, d: np.ndarray) -> tuple[np.ndarray, ...]:
        """``g - 1, g', h - 1, u_n`` at signed distances ``d`` (A, > 0 on the WSe2 side)."""
        L, e1, e2, r, nu = self.decay, self.strain, self.strain_wse2, self.ratio, self.poisson
        left = d < 0
        em = np.exp(np.minimum(d, 0.0) / L)  # WS2 side
        ep = np.exp(-np.maximum(d, 0.0) / L)  # WSe2 side
        g1 = np.where(left, e1 * em, r * (1.0 - e2 * ep) - 1.0)
        dg = np.where(left, e1 * em / L, r * e2 * ep / L)
        h1 = np.where(left, -nu * e1 * em, r * (1.0 + nu * e2 * ep) - 1.0)
        un = np.where(
            left,
            -nu * e1 * L * (em - 1.0),
            (r - 1.0) * d + r * nu * e2 * L * (1.0 - ep),
        )
        return g1, dg, h1, un

    def grad(self, X: np.ndarray) -> np.ndarray:
        """``grad u`` at reference points ``X`` (n, 2): (n, 2, 2), ``[i, j] = du_i/dX_j``."""
        Q = self._frame()
        nt = np.asarray(X, dtype=np.float64) @ Q - [self.offset, 0.0]  # (d, tau)
        g1, dg, h1, _ = self._profiles(nt[:, 0])
        K = np.zeros((len(nt), 2, 2))
        K[:, 0, 0] = h1
        K[:, 1, 0] = dg * nt[:, 1]
        K[:, 1, 1] = g1
        return Q @ K @ Q.T

    def disp(self, X: np.ndarray) -> np.ndarray:
        """Displacement ``u(X)`` (n, 2) in A."""
        Q = self._frame()
        nt = np.asarray(X, dtype=np.float64) @ Q - [self.offset, 0.0]
        g1, _, _, un = self._profiles(nt[:, 0])
        return np.stack([un, g1 * nt[:, 1]], 1) @ Q.T

    def distance(self, X: np.ndarray) -> np.ndarray:
        """Signed distance (A, reference frame) of points ``X`` from the interface."""
        return np.asarray(X, dtype=np.float64) @ self._frame()[:, 0] - self.offset

    def species(self, X: np.ndarray) -> np.ndarray:
        """Phase code (1 WS2, 2 WSe2) of the formula unit on metal site ``X``."""
        d = self.distance(X)
        return np.where(d < 0, 1, 2).astype(np.uint8)

    def params(self) -> dict[str, Any]:
        """The imposed field, for the truth config."""
        return {
            "type": "interface",
            "map": "x - c = R0 (X + u(X)); u_n = int (h - 1) dd, u_t = (g(d) - 1) tau",
            "rotation_deg": self.rotation_deg,
            "normal_deg_lab": self.normal_deg,
            "interface_strain_ws2": self.strain,
            "interface_strain_wse2": -self.strain_wse2,
            "decay_A": self.decay,
            "offset_A": self.offset,
            "poisson_ratio": self.poisson,
            "lattice_ratio": self.ratio,
            "vacuum": f"col / (nx - 1) + row / (ny - 1) > {VACUUM_CUT} (atom lab positions)",
        }


_Field = _SingleField | _InterfaceField


@dataclass(frozen=True, eq=False)
class _Sample:
    """Global atoms of one sample and the scan geometry."""

    kind: str
    scan: tuple[int, int]
    step: float
    field: _Field
    R0: np.ndarray  # (2, 2) global rotation
    centre: np.ndarray  # (2,) lab (x, y) of the scan centre
    metal_X: np.ndarray  # (m, 2) reference sites of the metals (one per formula unit)
    metal_x: np.ndarray  # (m, 2) lab positions of the metals
    chalc_x: np.ndarray  # (m, 2) lab positions of the chalcogen pair of each formula unit
    species: np.ndarray  # (m,) phase code per formula unit
    present: np.ndarray  # (m,) bool: False in the vacuum region

    def to_lab(self, X: np.ndarray) -> np.ndarray:
        """Lab positions of reference points ``X`` (n, 2)."""
        return self.centre + (X + self.field.disp(X)) @ self.R0.T

    def to_reference(self, x: np.ndarray) -> np.ndarray:
        """Inverse map by fixed-point iteration (``|grad u| << 1``)."""
        y = (np.atleast_2d(x) - self.centre) @ self.R0
        X = y.copy()
        for _ in range(_FIXED_POINT_ITERATIONS):
            X = y - self.field.disp(X)
        return X

    def imposed_F(self, x: np.ndarray) -> np.ndarray:
        """The imposed deformation gradient ``R0 (I + grad u)`` at lab points ``x`` (n, 2)."""
        return self.R0 @ (np.eye(2) + self.field.grad(self.to_reference(x)))

    def probe_positions(self) -> np.ndarray:
        """Lab ``(x, y)`` of every probe, ``(ny, nx, 2)``."""
        ny, nx = self.scan
        rows, cols = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        return self.step * np.stack([cols, rows], -1).astype(np.float64)


def _chalcogen_offset() -> np.ndarray:
    """In-plane offset of the chalcogen pair from the metal, reference lattice, ``(x, y)``."""
    A, _ = basis_vectors(LATTICE_A[REF_PHASE])
    return A @ np.array([1.0, 1.0]) / 3.0


def build_sample(
    kind: str, scan: tuple[int, int], seed: int, step: float = SCAN_STEP
) -> _Sample:
    """Atoms covering every box of the scan, mapped by the field of ``kind``."""
    ny, nx = (int(v) for v in scan)
    if ny < 2 or nx < 2:
        raise ValueError("scan must be at least 2 x 2")
    extent = step * np.array([nx - 1, ny - 1], dtype=np.float64)
    centre = extent / 2.0
    if kind == "single":
        field: _Field = _SingleField(scale=float(extent.max() / 2.0))
    elif kind == "interface":
        field = _InterfaceField()
    else:
        raise ValueError(f"kind must be 'single' or 'interface', not {kind!r}")
    R0 = rotation_matrix(field.rotation_deg)
    a = LATTICE_A[REF_PHASE]
    A, _ = basis_vectors(a)
    # lattice translation relative to the scan centre: the only use of the seed
    shift = A @ np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x4D53]).uniform(0.0, 1.0, 2)
    radius = math.hypot(*(extent / 2.0 + BOX / 2.0)) / (1.0 - 0.1) + _COVER_MARGIN * a
    n = int(math.ceil(2.0 * radius / (a * math.sqrt(3.0) / 2.0))) + 1
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    X = np.stack([i.ravel(), j.ravel()], 1) @ A.T + shift
    X = X[np.hypot(X[:, 0], X[:, 1]) < radius]
    species = field.species(X)
    sample = _Sample(kind, (ny, nx), step, field, R0, centre, X, np.empty((0, 2)),
                     np.empty((0, 2)), species, np.ones(len(X), dtype=bool))
    metal_x = sample.to_lab(X)
    chalc_x = sample.to_lab(X + _chalcogen_offset())
    present = np.ones(len(X), dtype=bool)
    if kind == "interface":
        # vacuum corner: formula units whose chalcogens sit beyond the straight cut
        present = chalc_x[:, 0] / extent[0] + chalc_x[:, 1] / extent[1] <= VACUUM_CUT
    return _Sample(kind, (ny, nx), step, field, R0, centre, X, metal_x, chalc_x, species,
                   present)


# ------------------------------------------------------------------------------------------------
# ground truth from the atoms
# ------------------------------------------------------------------------------------------------


def probe_weight(r: np.ndarray) -> np.ndarray:
    """Intensity of the aberration-free probe at distance ``r`` (A), peak 1 (Airy).

    The aperture radius in 1/A (``DISK_RADIUS_PX * PIXEL_SIZE``) fixes it at any energy.
    """
    from scipy.special import j1

    v = 2.0 * math.pi * DISK_RADIUS_PX * PIXEL_SIZE * np.asarray(r, dtype=np.float64)
    safe = np.where(v > 1e-12, v, 1.0)
    return np.where(v > 1e-12, (2.0 * j1(safe) / safe) ** 2, 1.0)


def _in_box(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.all(np.abs(x - p) < BOX / 2.0, axis=1)


def _truth_at(sample: _Sample, p: np.ndarray) -> tuple[int, np.ndarray]:
    """``(phase, F)`` at probe position ``p`` from the atoms in its box."""
    box = _in_box(sample.metal_x, p)
    w_all = probe_weight(np.hypot(*(sample.chalc_x[box] - p).T))
    occ = sample.present[box]
    spec = sample.species[box]
    total = w_all.sum()
    w_s, w_se = w_all[occ & (spec == 1)].sum(), w_all[occ & (spec == 2)].sum()
    if total <= 0 or (w_s + w_se) / total < VACUUM_COVERAGE:
        return 0, np.full((2, 2), np.nan)
    phase = 1 if w_s >= w_se else 2
    sel = box & sample.present
    if sel.sum() < _MIN_FIT_ATOMS:
        return 0, np.full((2, 2), np.nan)
    x = sample.metal_x[sel] - p
    X = sample.metal_X[sel]
    X = X - X.mean(0)
    sw = np.sqrt(probe_weight(np.hypot(x[:, 0], x[:, 1])))
    D = np.column_stack([X, np.ones(len(X))]) * sw[:, None]
    coef, *_ = np.linalg.lstsq(D, x * sw[:, None], rcond=None)
    return phase, coef[:2].T


def _truth(sample: _Sample, detector: int = DETECTOR) -> dict[str, np.ndarray]:
    ny, nx = sample.scan
    pos = sample.probe_positions()
    F = np.empty((ny, nx, 2, 2))
    phase = np.empty((ny, nx), dtype=np.uint8)
    for r in range(ny):
        for c in range(nx):
            phase[r, c], F[r, c] = _truth_at(sample, pos[r, c])
    theta, U = polar_decompose(F)
    origin = np.full((ny, nx, 2), detector // 2, dtype=np.float64)  # abTEM's zero frequency
    vac = phase == 0
    out = {
        "exx": U[..., 0, 0] - 1.0,
        "eyy": U[..., 1, 1] - 1.0,
        "exy": U[..., 0, 1],
        "theta": theta,
        "phase": phase,
        "F": F,
        "origin": origin,
        "hot_pixels": np.zeros((0, 2), dtype=np.int64),
    }
    for k in ("exx", "eyy", "exy", "theta"):
        out[k][vac] = np.nan
    return out


def multislice_truth(
    kind: str,
    scan: tuple[int, int] = (12, 12),
    seed: int = 0,
    step: float = SCAN_STEP,
    detector: int = DETECTOR,
) -> dict[str, np.ndarray]:
    """Ground truth of :func:`simulate_multislice` (no abTEM needed).

    Same keys and conventions as :func:`ccstae_hpc.sim.simulate.truth_rows`, except that ``F`` (and
    so the strain) is relative to the relaxed WS2 reference lattice for both phases.
    """
    return _truth(build_sample(kind, scan, seed, step), detector)


def imposed_field(
    kind: str, scan: tuple[int, int] = (12, 12), seed: int = 0, step: float = SCAN_STEP
) -> np.ndarray:
    """The analytic deformation gradient at every probe position, ``(ny, nx, 2, 2)``."""
    sample = build_sample(kind, scan, seed, step)
    pos = sample.probe_positions()
    return sample.imposed_F(pos.reshape(-1, 2)).reshape(*pos.shape[:2], 2, 2)


# ------------------------------------------------------------------------------------------------
# multislice
# ------------------------------------------------------------------------------------------------


def _configure_abtem() -> Any:
    import abtem

    # numpy FFTs and float64 make the patterns reproducible run to run (FFTW planning is not)
    abtem.config.set(
        {"fft": "numpy", "precision": "float64", "diagnostics.progress_bar": False}
    )
    return abtem


def _box_atoms(sample: _Sample, p: np.ndarray) -> Any:
    """``ase.Atoms`` of the formula units in the box centred on ``p``, in box coordinates."""
    import ase
    from ase.build import mx2

    sel = _in_box(sample.metal_x, p) & sample.present
    height = max(MX2_THICKNESS.values()) + 2.0 * SLAB_VACUUM
    symbols: list[str] = []
    xyz: list[np.ndarray] = []
    for ph in (1, 2):
        m = sel & (sample.species == ph)
        if not m.any():
            continue
        cell = mx2(formula=FORMULA[ph], kind="2H", a=LATTICE_A[REF_PHASE],
                   thickness=MX2_THICKNESS[ph], vacuum=SLAB_VACUUM)
        z = cell.positions[:, 2] - cell.positions[0, 2] + height / 2.0  # metal mid-cell
        for site, sym in enumerate(cell.get_chemical_symbols()):
            src = sample.metal_x if sym == METAL[ph] else sample.chalc_x
            if sym != METAL[ph]:
                # the chalcogen projects onto (a1 + a2) / 3 of the reference lattice
                off = cell.positions[site, :2] - cell.positions[0, :2]
                if not np.allclose(off, _chalcogen_offset(), atol=1e-6):
                    raise RuntimeError(f"unexpected mx2 chalcogen offset {off}")
            pts = src[m] - p + BOX / 2.0
            xyz.append(np.column_stack([pts, np.full(len(pts), z[site])]))
            symbols += [sym] * len(pts)
    positions = np.concatenate(xyz) if xyz else np.zeros((0, 3))
    return ase.Atoms(symbols, positions=positions, cell=[BOX, BOX, height], pbc=True)


def _pattern(atoms: Any, detector: int, energy_ev: float) -> np.ndarray:
    """One ``(k_y, k_x)`` pattern of the probe at the box centre, summing to ``NOMINAL_TOTAL``."""
    abtem = _configure_abtem()
    probe = abtem.Probe(energy=energy_ev, semiangle_cutoff=semiangle_mrad(energy_ev),
                        extent=BOX, gpts=GPTS)
    centre = np.array([[BOX / 2.0, BOX / 2.0]])
    if len(atoms):
        potential = abtem.Potential(atoms, gpts=GPTS, slice_thickness=atoms.cell[2, 2],
                                    projection="infinite", parametrization="lobato")
        exit_wave = probe.multislice(potential, scan=centre, lazy=False)
    else:
        exit_wave = probe.build(scan=centre, lazy=False)
    dp = exit_wave.diffraction_patterns(max_angle="full", parity="same")
    arr = np.asarray(dp.array, dtype=np.float64)  # (k_x, k_y), zero frequency at n // 2
    n = arr.shape[0]
    if arr.shape != (GPTS, GPTS) or not np.allclose(dp.sampling, PIXEL_SIZE):
        raise RuntimeError(f"unexpected abTEM pattern {arr.shape}, sampling {dp.sampling}")
    lo = n // 2 - detector // 2
    crop = arr[lo : lo + detector, lo : lo + detector].T  # -> (k_y, k_x)
    return crop * (NOMINAL_TOTAL / crop.sum())


def simulate_patterns(
    kind: str,
    positions: Sequence[tuple[int, int]],
    scan: tuple[int, int] = (12, 12),
    detector: int = DETECTOR,
    seed: int = 0,
    step: float = SCAN_STEP,
    energy_ev: float = ENERGY_EV,
) -> np.ndarray:
    """Patterns ``(n, Q, Q)`` float32 at the probe positions ``(row, col)`` of a scan."""
    valid_px = MAX_VALID_FRACTION * GPTS / 2.0
    if detector > GPTS or detector / 2.0 * math.sqrt(2.0) > valid_px + 1.0:
        raise ValueError(f"detector {detector} exceeds the antialiased region ({valid_px:.0f} px)")
    sample = build_sample(kind, scan, seed, step)
    pos = sample.probe_positions()
    out = np.empty((len(positions), detector, detector), dtype=np.float32)
    for i, (r, c) in enumerate(positions):
        out[i] = _pattern(_box_atoms(sample, pos[r, c]), detector, energy_ev)
    return out


def homogeneous_pattern(
    F: np.ndarray, detector: int = DETECTOR, seed: int = 0, energy_ev: float = ENERGY_EV
) -> np.ndarray:
    """Pattern ``(Q, Q)`` of WS2 deformed by one constant ``F`` (2, 2), probe at the box centre.

    For checks of the detector orientation: the metals sit at ``F X`` for reference sites ``X``.
    """
    from dataclasses import replace

    base = build_sample("single", (2, 2), seed)
    F = np.asarray(F, dtype=np.float64)
    X = base.metal_X
    sample = replace(
        base,
        R0=np.eye(2),
        metal_x=base.centre + X @ F.T,
        chalc_x=base.centre + (X + _chalcogen_offset()) @ F.T,
    )
    return _pattern(_box_atoms(sample, base.centre), detector, energy_ev).astype(np.float32)


def simulate_multislice(
    kind: str,
    scan: tuple[int, int] = (12, 12),
    detector: int = DETECTOR,
    seed: int = 0,
    step: float = SCAN_STEP,
    energy_ev: float = ENERGY_EV,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Noise-free multislice 4D-STEM of ``kind`` ("single" or "interface") with its truth.

    Parameters
    ----------
    kind : "single" (2H-WS2 under a smooth strain + rotation field) or "interface"
        (coherent WS2/WSe2 lateral interface with a vacuum corner).
    scan : ``(ny, nx)`` probe positions, ``step`` A apart.
    detector : side of the cropped detector in pixels.
    seed : lattice translation relative to the scan (the fields are fixed).
    step : scan step in A.
    energy_ev : beam energy; the semi-angle follows from ``DISK_RADIUS_PX``.
    progress : print one line per scan row to stderr.

    Returns
    -------
    data : float32 ``(ny, nx, Q, Q)``, each pattern summing to ``NOMINAL_TOTAL``.
    truth : dict as :func:`multislice_truth`.
    """
    ny, nx = scan
    data = np.empty((ny, nx, detector, detector), dtype=np.float32)
    for r in range(ny):
        data[r] = simulate_patterns(kind, [(r, c) for c in range(nx)], scan, detector, seed,
                                    step, energy_ev)
        if progress:
            print(f"row {r + 1}/{ny}", file=sys.stderr, flush=True)
    return data, multislice_truth(kind, scan, seed, step, detector)


def config_dict(
    kind: str,
    scan: tuple[int, int],
    detector: int = DETECTOR,
    seed: int = 0,
    step: float = SCAN_STEP,
    energy_ev: float = ENERGY_EV,
) -> dict[str, Any]:
    """Everything needed to regenerate the data, for the truth file's ``config``."""
    try:
        import abtem
        import ase

        versions = {"abtem": abtem.__version__, "ase": ase.__version__}
    except ImportError:
        versions = {}
    sample = build_sample(kind, scan, seed, step)
    return {
        "generator": "ccstae_hpc.sim.multislice",
        "kind": kind,
        "scan": [int(v) for v in scan],
        "seed": int(seed),
        "scan_step_A": step,
        "detector": detector,
        "energy_eV": energy_ev,
        "wavelength_A": wavelength(energy_ev),
        "semiangle_mrad": semiangle_mrad(energy_ev),
        "disk_radius_px": DISK_RADIUS_PX,
        "pixel_size": PIXEL_SIZE,
        "box_A": BOX,
        "gpts": GPTS,
        "sampling_A": BOX / GPTS,
        "slices": 1,
        "projection": "infinite",
        "parametrization": "lobato",
        "lattice_a": {FORMULA[k]: v for k, v in LATTICE_A.items()},
        "reference_lattice": "WS2 a=3.153, a1=a(1,0), a2=a(1/2,sqrt(3)/2), metal at sites",
        "chalcogen_thickness_A": {FORMULA[k]: v for k, v in MX2_THICKNESS.items()},
        "origin_kykx": [float(detector // 2)] * 2,
        "abtem_config": {"fft": "numpy", "precision": "float64"},
        "nominal_total": NOMINAL_TOTAL,
        "field": sample.field.params(),
        "truth": "probe-weighted (Airy) least-squares affine fit of metal atoms vs reference sites",
        **versions,
    }


# ------------------------------------------------------------------------------------------------
# noise, disk measurement, files
# ------------------------------------------------------------------------------------------------


def add_poisson(data: np.ndarray, dose: float, seed: int = 0) -> np.ndarray:
    """uint16 Poisson counts with mean total ``dose`` per pattern (``data`` ``(..., Q, Q)``)."""
    x = np.asarray(data, dtype=np.float64)
    total = x.sum(axis=(-2, -1), keepdims=True)
    lam = x * (dose / np.where(total > 0, total, 1.0))
    counts = np.random.default_rng(seed).poisson(lam)
    return np.minimum(counts, np.iinfo(np.uint16).max).astype(np.uint16)


def disk_centres(
    patterns: np.ndarray,
    guess: np.ndarray,
    radius: float = DISK_RADIUS_PX + 2.0,
    iterations: int = 3,
) -> np.ndarray:
    """Centre-of-mass disk centres ``(..., n, 2)`` as ``(col, row)``.

    ``patterns`` ``(..., Q, Q)``; ``guess`` ``(..., n, 2)`` starting ``(col, row)``.  Each
    centre is the intensity-weighted mean over the pixels within ``radius`` of the previous
    estimate.
    """
    P = np.asarray(patterns, dtype=np.float64)
    lead = P.shape[:-2]
    Q = P.shape[-1]
    P = P.reshape(-1, Q, Q)
    c = np.asarray(guess, dtype=np.float64).reshape(len(P), -1, 2).copy()
    k = np.arange(Q, dtype=np.float64)
    for _ in range(iterations):
        dx = k[None, None, :] - c[..., 0:1]  # (B, n, Q)
        dy = k[None, None, :] - c[..., 1:2]
        inside = (dy[..., :, None] ** 2 + dx[..., None, :] ** 2) <= radius**2  # (B, n, Q, Q)
        w = inside * P[:, None]
        s = w.sum((-2, -1))
        cx = (w * k[None, None, None, :]).sum((-2, -1)) / s
        cy = (w * k[None, None, :, None]).sum((-2, -1)) / s
        c = np.stack([cx, cy], -1)
    return c.reshape(*lead, -1, 2)


def predicted_centres(F: np.ndarray, origin: np.ndarray, order: int = 1) -> np.ndarray:
    """Disk centres ``(..., n, 2)`` as ``(col, row)`` predicted by ``F`` (..., 2, 2)."""
    g = reference_reciprocal(order)
    gp = np.einsum("...ji,nj->...ni", np.linalg.inv(F), g)  # F^-T g
    o = np.asarray(origin)[..., None, ::-1]  # (k_y, k_x) -> (col, row)
    return o + gp / PIXEL_SIZE


def _max_disk_shift(a: np.ndarray, b: np.ndarray, truth: dict[str, np.ndarray]) -> float:
    """Largest centre-of-mass shift (px) of the first two disk orders between two datasets.

    The windows are fixed at the disks predicted by the truth (one iteration), so the measure
    is a continuous function of the data: re-centred windows would let a pixel enter or leave
    a window and turn a 1e-4 px change into a jump.
    """
    ok = truth["phase"] > 0
    guess = predicted_centres(truth["F"][ok], truth["origin"][ok], order=2)
    ca = disk_centres(a[ok], guess, iterations=1)
    cb = disk_centres(b[ok], guess, iterations=1)
    return float(np.abs(ca - cb).max())


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix == ".npy" else path
    return stem.parent / (stem.name + ".npy"), stem.parent / (stem.name + ".truth.npz")


def save_multislice(
    path: str | Path,
    data: np.ndarray,
    truth: dict[str, np.ndarray],
    config: dict[str, Any],
    float16: bool = False,
    max_shift_px: float = 1e-3,
) -> tuple[Path, Path]:
    """Write ``OUT.npy`` and ``OUT.truth.npz`` (truth + ``config`` JSON), as ``save_simulation``.

    With ``float16`` a float ``data`` is stored as float16 if that moves no disk centre of mass
    by more than ``max_shift_px`` (else float32); the outcome is recorded in ``config``.
    Returns ``(npy_path, truth_path)``.
    """
    npy_path, truth_path = _paths(path)
    npy_path.parent.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    out = np.asarray(data)
    if np.issubdtype(out.dtype, np.floating):
        out = out.astype(np.float32)
        if float16:
            half = out.astype(np.float16)
            shift = _max_disk_shift(out, half.astype(np.float32), truth)
            config["float16_max_disk_shift_px"] = shift
            if shift <= max_shift_px:
                out = half
    config["stored_dtype"] = str(out.dtype)
    np.save(npy_path, out)
    np.savez(truth_path, **truth, config=np.array(json.dumps(config, sort_keys=True)))
    return npy_path, truth_path


def load_multislice(
    path: str | Path, mmap: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Read :func:`save_multislice` output: ``(data, truth, config)``; float data as float32."""
    npy_path, truth_path = _paths(path)
    data = np.load(npy_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if data.dtype == np.float16:
        data = data.astype(np.float32)
    with np.load(truth_path, allow_pickle=False) as z:
        truth = {k: z[k] for k in z.files if k != "config"}
        config = json.loads(str(z["config"]))
    return data, truth, config


# the validation sets tests and benchmarks use, simulated on first use (seed 0, float16):
# name -> (kind, scan)
VALIDATION_SETS = {"ws2_multislice_12x12": ("single", (12, 12)),
                   "ws2_wse2_multislice_16x16": ("interface", (16, 16))}


def validation_set(directory: str | Path, name: str) -> Path:
    """The ``.npy`` of a named set of :data:`VALIDATION_SETS` in ``directory``, simulated and
    saved there on first use (10-20 s each on two cores; needs abTEM).

    Both files are written under temporary names and renamed, the data last, so an existing
    ``.npy`` always has its truth beside it.
    """
    kind, scan = VALIDATION_SETS[name]
    npy, truth_path = _paths(Path(directory) / name)
    if npy.exists() and truth_path.exists():
        return npy
    data, truth = simulate_multislice(kind, scan, seed=0)
    tmp = Path(directory) / f".{name}.tmp-{os.getpid()}"
    tmp_npy, tmp_truth = save_multislice(tmp, data, truth, config_dict(kind, scan, seed=0),
                                         float16=True)
    os.replace(tmp_truth, truth_path)
    os.replace(tmp_npy, npy)
    return npy


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ccstae_hpc.sim.multislice OUT.npy --kind single|interface ...``."""
    ap = argparse.ArgumentParser(prog="python -m ccstae_hpc.sim.multislice", description=__doc__
                                 .split("\n\n")[0])
    ap.add_argument("out", help="output .npy (the truth goes to OUT.truth.npz)")
    ap.add_argument("--kind", choices=("single", "interface"), required=True)
    ap.add_argument("--scan", type=int, nargs=2, metavar=("NY", "NX"), default=None)
    ap.add_argument("--dose", type=float, default=None, help="Poisson counts per pattern")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--float16", action="store_true",
                    help="store noise-free data as float16 if disk centres move < 1e-3 px")
    args = ap.parse_args(argv)
    scan = tuple(args.scan) if args.scan else ((12, 12) if args.kind == "single" else (16, 16))
    t0 = time.perf_counter()
    data, truth = simulate_multislice(args.kind, scan, seed=args.seed, progress=True)
    elapsed = time.perf_counter() - t0
    config = config_dict(args.kind, scan, seed=args.seed)  # no timing: files stay deterministic
    if args.dose is not None:
        data = add_poisson(data, args.dose, args.seed)
        config["dose"] = args.dose
    npy, tr = save_multislice(args.out, data, truth, config, float16=args.float16)
    print(f"wrote {npy} and {tr}: {scan[0]}x{scan[1]} patterns in {elapsed:.1f} s "
          f"({elapsed / (scan[0] * scan[1]):.2f} s/pattern)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
