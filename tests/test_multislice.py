"""Multislice (abTEM) validation data: the cached sets, truth from atoms, disk physics."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from ccstae_hpc.core.strain import polar_decompose
from ccstae_hpc.sim import multislice as ms
from ccstae_hpc.sim.evaluate import load_truth

# the sets are simulated on first use into tests/data (the session fixture)
pytestmark = pytest.mark.usefixtures("multislice_files")
DATA = Path(__file__).parent / "data"
FILES = {
    "single": (DATA / "ws2_multislice_12x12.npy", (12, 12)),
    "interface": (DATA / "ws2_wse2_multislice_16x16.npy", (16, 16)),
}
KEYS = {"exx", "eyy", "exy", "theta", "phase", "F", "origin", "hot_pixels", "config"}
A_WS2 = 3.153  # Angstrom: the reference lattice, independent of the module's constants
PIXEL = 0.0183  # 1/A per detector pixel
Q = 128
COM_RADIUS = 6.5  # px: centre-of-mass window around each predicted disk
IMPOSED_TOL = {"single": 2e-4, "interface": 5e-4}  # |F_atoms - F_imposed| away from interface
LATTICE_TOL = 2e-3  # measured reciprocal lattice vs truth F
FAR = 30.0  # A from the interface and the vacuum edge: the imposed field is ~linear there
FAR_DISKS = 20.0  # A: the patterns show one lattice (and both phases are in the set)
has_abtem = importlib.util.find_spec("abtem") is not None


def _first_order() -> np.ndarray:
    """The six {100} reciprocal vectors (x, y) of the reference lattice, 1/A (no 2 pi)."""
    A = A_WS2 * np.array([[1.0, 0.5], [0.0, math.sqrt(3.0) / 2.0]])
    B = np.linalg.inv(A).T
    ang = np.arange(6) * math.pi / 3.0
    hk = np.rint(np.stack([np.cos(ang), np.sin(ang)], 1) @ np.linalg.inv(B).T)
    return hk @ B.T


def _com(pattern: np.ndarray, centres: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Plain centre of mass ``(n, 2)`` as ``(col, row)`` within ``COM_RADIUS`` of ``centres``."""
    rows, cols = np.mgrid[0 : pattern.shape[0], 0 : pattern.shape[1]]
    c = np.array(centres, dtype=np.float64)
    for _ in range(iterations):
        for i, (x, y) in enumerate(c):
            w = pattern * ((cols - x) ** 2 + (rows - y) ** 2 <= COM_RADIUS**2)
            c[i] = (w * cols).sum() / w.sum(), (w * rows).sum() / w.sum()
    return c


def _measured_lattice(data: np.ndarray, truth: dict, mask: np.ndarray) -> np.ndarray:
    """``Mrec`` with ``q = Mrec g`` from the first-order disks, per masked pixel (n, 2, 2)."""
    g = _first_order()
    out = []
    for (r, c) in np.argwhere(mask):
        F, origin = truth["F"][r, c], truth["origin"][r, c]
        o = origin[::-1]  # (col, row)
        guess = o + (np.linalg.inv(F).T @ g.T).T / PIXEL
        q = (_com(data[r, c].astype(np.float64), guess) - o) * PIXEL
        out.append(np.linalg.lstsq(g, q, rcond=None)[0].T)
    return np.array(out)


def _away(kind: str, scan: tuple[int, int], far: float = FAR) -> np.ndarray:
    """Positions at least ``far`` A from the interface and from the vacuum cut."""
    truth = load_truth(FILES[kind][0].with_suffix(".truth.npz"))
    ok = truth["phase"] > 0
    if kind == "single":
        return ok
    sample = ms.build_sample(kind, scan, seed=0)
    pos = sample.probe_positions()
    d = sample.field.distance(sample.to_reference(pos.reshape(-1, 2))).reshape(scan)
    ny, nx = scan
    rows, cols = np.mgrid[0:ny, 0:nx]
    step = truth["config"]["scan_step_A"]
    norm = math.hypot(1.0 / ((nx - 1) * step), 1.0 / ((ny - 1) * step))
    to_vacuum = (ms.VACUUM_CUT - cols / (nx - 1) - rows / (ny - 1)) / norm
    return ok & (np.abs(d) >= far) & (to_vacuum >= far)


# --- (a) the validation sets ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["single", "interface"])
def test_validation_sets_load(kind: str) -> None:
    path, scan = FILES[kind]
    data, truth, config = ms.load_multislice(path)
    assert data.shape == (*scan, Q, Q) and data.dtype == np.float32
    assert set(load_truth(path.with_suffix(".truth.npz"))) == KEYS
    assert truth["F"].shape == (*scan, 2, 2) and truth["origin"].shape == (*scan, 2)
    assert truth["phase"].dtype == np.uint8 and truth["hot_pixels"].shape == (0, 2)
    assert config["kind"] == kind and config["abtem"] and config["energy_eV"] > 0
    assert config["box_A"] == pytest.approx(1.0 / PIXEL)
    sums = data.sum(axis=(-2, -1), dtype=np.float64)
    np.testing.assert_allclose(sums, ms.NOMINAL_TOTAL, rtol=1e-3)
    phases = set(np.unique(truth["phase"]).tolist())
    assert phases == ({1} if kind == "single" else {0, 1, 2})
    vac = truth["phase"] == 0
    assert np.isnan(truth["F"][vac]).all() and np.isfinite(truth["F"][~vac]).all()
    theta, U = polar_decompose(truth["F"][~vac])
    np.testing.assert_allclose(theta, truth["theta"][~vac], atol=1e-9)
    np.testing.assert_allclose(U[:, 0, 0] - 1.0, truth["exx"][~vac], atol=1e-9)
    np.testing.assert_allclose(U[:, 0, 1], truth["exy"][~vac], atol=1e-9)


@pytest.mark.parametrize("kind", ["single", "interface"])
def test_truth_from_atoms_matches_imposed_field(kind: str) -> None:
    path, scan = FILES[kind]
    _, truth, _ = ms.load_multislice(path)
    again = ms.multislice_truth(kind, scan)  # recomputed from the atoms, no abTEM needed
    np.testing.assert_array_equal(again["phase"], truth["phase"])
    np.testing.assert_allclose(again["F"], truth["F"], atol=1e-12)
    away = _away(kind, scan)
    assert away.sum() >= 12
    imposed = ms.imposed_field(kind, scan)
    err = np.abs(truth["F"] - imposed).max(axis=(-2, -1))[away]
    assert err.max() < IMPOSED_TOL[kind], err.max()


def test_interface_strain_profile() -> None:
    """WS2 is stretched and WSe2 compressed next to the interface (vs their relaxed lattices)."""
    _, truth, _ = ms.load_multislice(FILES["interface"][0])
    sample = ms.build_sample("interface", (16, 16), seed=0)
    pos = sample.probe_positions().reshape(-1, 2)
    d = sample.field.distance(sample.to_reference(pos)).reshape(16, 16)
    ratio = 3.282 / A_WS2
    sample_F = np.where(truth["phase"][..., None, None] > 0, truth["F"], np.eye(2))
    mean_stretch = np.sqrt(np.linalg.det(sample_F))  # isotropic part vs WS2
    near_s = (truth["phase"] == 1) & (d > -12.0) & (d < -6.0)
    far_s = (truth["phase"] == 1) & (d < -35.0)
    near_se = (truth["phase"] == 2) & (d > 6.0) & (d < 12.0)
    assert mean_stretch[near_s].mean() > mean_stretch[far_s].mean() + 2e-3
    assert mean_stretch[near_se].mean() < ratio - 2e-3


# --- (b) one position simulated alone equals the same position of the whole set ----------


@pytest.mark.skipif(not has_abtem, reason="abtem not installed")
def test_regenerate_two_positions() -> None:
    for kind, pos in (("single", (3, 8)), ("interface", (8, 8))):
        path, scan = FILES[kind]
        data, _, _ = ms.load_multislice(path)
        new = ms.simulate_patterns(kind, [pos], scan)[0]
        stored = data[pos]
        # the files hold float16: relative rounding <= 2^-11
        np.testing.assert_allclose(new, stored, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not has_abtem, reason="abtem not installed")
def test_uniaxial_strain_contracts_disks_along_kx() -> None:
    stretch = 1.05
    g = _first_order()
    origin = np.array([Q / 2.0, Q / 2.0])
    flat = _com(ms.homogeneous_pattern(np.eye(2)).astype(np.float64), origin + g / PIXEL)
    pattern = ms.homogeneous_pattern(np.diag([stretch, 1.0])).astype(np.float64)
    strained = _com(pattern, origin + g / PIXEL)
    # k_x (columns) contracts by 1 / stretch, k_y (rows) is unchanged
    np.testing.assert_allclose(strained[:, 0] - origin[1], (flat[:, 0] - origin[1]) / stretch,
                               atol=0.02)
    np.testing.assert_allclose(strained[:, 1], flat[:, 1], atol=0.02)


@pytest.mark.skipif(not has_abtem, reason="abtem not installed")
def test_cli_writes_loadable_files(tmp_path: Path) -> None:
    out = tmp_path / "tiny.npy"
    assert ms.main([str(out), "--kind", "interface", "--scan", "2", "3", "--dose", "1000"]) == 0
    data = np.load(out)
    assert data.shape == (2, 3, Q, Q) and data.dtype == np.uint16
    truth = load_truth(tmp_path / "tiny.truth.npz")
    assert set(truth) == KEYS and truth["config"]["dose"] == 1000


# --- (c) physics without the learned model --------------------------------------------------------


def test_vacuum_patterns_are_a_bare_disk_at_the_origin() -> None:
    data, truth, _ = ms.load_multislice(FILES["interface"][0])
    vac = np.argwhere(truth["phase"] == 0)
    r, c = vac[-1]  # deepest in the vacuum corner
    p = data[r, c].astype(np.float64)
    np.testing.assert_allclose(_com(p, truth["origin"][r, c][None, ::-1])[0], [Q / 2, Q / 2],
                               atol=1e-3)
    rows, cols = np.mgrid[0:Q, 0:Q]
    inside = np.hypot(rows - Q / 2, cols - Q / 2) <= ms.DISK_RADIUS_PX + 1.5
    assert p[inside].sum() / p.sum() > 0.999


@pytest.mark.parametrize("kind", ["single", "interface"])
def test_disks_move_with_truth_F(kind: str) -> None:
    """CoM reciprocal lattice vs ``F^-T`` (absolute) and vs ``(F_ref F^-1)^T`` (relative)."""
    path, scan = FILES[kind]
    data, truth, _ = ms.load_multislice(path)
    away = _away(kind, scan, FAR_DISKS)
    Mrec = _measured_lattice(data, truth, away)
    F = truth["F"][away]
    expect = np.swapaxes(np.linalg.inv(F), -1, -2)
    assert np.abs(Mrec - expect).max() < LATTICE_TOL
    # relative to a reference pixel: G = A G_ref with A = (F_ref F^-1)^T, i.e. M = A^-T
    A = Mrec @ np.linalg.inv(Mrec[0])
    A_true = np.swapaxes(F[0] @ np.linalg.inv(F), -1, -2)
    assert np.abs(A - A_true).max() < LATTICE_TOL
    # the imposed rotation and strain range are large against that tolerance
    theta, U = polar_decompose(np.swapaxes(np.linalg.inv(Mrec), -1, -2))
    np.testing.assert_allclose(theta, truth["theta"][away], atol=0.1)
    assert np.ptp(truth["exx"][away]) > 5 * LATTICE_TOL
    assert np.ptp(truth["theta"][away]) > 0.5  # degrees


def test_add_poisson_dose() -> None:
    data, _, _ = ms.load_multislice(FILES["single"][0])
    counts = ms.add_poisson(data[:4, :4], dose=2000.0, seed=3)
    assert counts.dtype == np.uint16 and counts.shape == (4, 4, Q, Q)
    totals = counts.sum(axis=(-2, -1), dtype=np.int64)
    assert abs(totals.mean() - 2000.0) < 4 * math.sqrt(2000.0 / 16)
    again = ms.add_poisson(data[:4, :4], dose=2000.0, seed=3)
    np.testing.assert_array_equal(counts, again)
