"""Analysis products (issue 13): derived maps, dislocations and ripples, numbers against truth.

The simulator's truth ``F = R(theta) (I + eps)`` is relative to the unrotated relaxed WS2
lattice; the maps a user gets are relative to the sample's own reference lattice, i.e.
``T = F R(-global_rotation)``, which is how the truth is fed to the analysis here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from ccstae_hpc.core import analysis as an
from ccstae_hpc.core.config import AnalyzeConfig, SimConfig
from ccstae_hpc.core.strain import polar_decompose, rotation_matrix
from ccstae_hpc.sim.simulate import (
    LATTICE_A,
    basis_vectors,
    burgers_vector_px,
    dislocation_distortion,
    save_simulation,
    truth_rows,
)
from ccstae_hpc.stages.analyze import analysis_dataset, analyze_store
from ccstae_hpc.stages.ingest import ingest
from ccstae_hpc.stages.map import map_store
from ccstae_hpc.stages.prep import preprocess_store
from ccstae_hpc.stages.store import StageExistsError
from ccstae_hpc.stages.train import train_store

# the tolerances
CORE_TOL_PX = 1.5
WAVELENGTH_TOL = 0.10
AMPLITUDE_TOL = 0.20
# single-pattern noise of the strain maps at ~1e3 e-/pattern (test_pipeline: MAE <= 0.35 %
# and 0.15 deg before pooling), as standard deviations
NOISE_STRAIN = 0.004
NOISE_THETA_DEG = 0.2

MAP_NAMES = {"dilatation", "lattice_change", "max_shear", "e1", "e2", "principal_direction",
             "dtheta_dx", "dtheta_dy", "lattice_curvature", "closure_failure",
             "closure_significance"}
TABLE_NAMES = {"y", "x", "burgers_x", "burgers_y", "burgers_h", "burgers_k", "confidence"}
RIPPLE_NAMES = {"ripple_wavelength_px", "ripple_direction_deg", "ripple_amplitude_deg"}

# three cores inside the WS2 triangle of a 64 x 64 heterostructure, >= 7 px from the interface
DISLOCATIONS = ((22.0, 22.0, 1, 0), (40.0, 26.0, 0, 1), (26.0, 40.0, -1, 1))


def _strain_from_truth(cfg: SimConfig, truth: dict, rng: np.random.Generator | None = None
                       ) -> xr.Dataset:
    """A ``strain`` Dataset as the map stage writes it, from the truth (+ Gaussian noise),
    relative to the sample's lattice (the relaxed WS2 lattice turned by the global rotation)."""
    T = truth["F"] @ rotation_matrix(-cfg.global_rotation_deg)
    theta, U = polar_decompose(T)
    st = {"exx": U[..., 0, 0] - 1, "eyy": U[..., 1, 1] - 1, "exy": U[..., 0, 1], "theta": theta}
    if rng is not None:
        for k in st:
            st[k] = st[k] + rng.normal(0, NOISE_THETA_DEG if k == "theta" else NOISE_STRAIN,
                                       theta.shape)
    A, _ = basis_vectors(LATTICE_A[1])
    basis = (rotation_matrix(cfg.global_rotation_deg) @ A).T  # rows a1, a2 in the scan frame
    dims = ("scan_y", "scan_x")
    return xr.Dataset(
        {**{k: (dims, v.astype(np.float32)) for k, v in st.items()},
         "phase": (dims, truth["phase"].astype(np.int16))},
        attrs={"reference_lattice": json.dumps({"found": True,
                                                "real_basis_A": basis.tolist()})})


def _calibration(cfg: SimConfig) -> dict:
    return {"scan_step_nm": cfg.scan_step_A / 10, "detector_pixel_size_inv_A": cfg.pixel_size}


def _match(cfg: SimConfig, ds: xr.Dataset, basis_hk: bool = True) -> list[dict]:
    """Each true core with its nearest found core: distance (px), found (h, k), b error (A).
    Asserts one found core per true core and no other."""
    found = np.stack([ds["y"].values, ds["x"].values], 1)
    b = np.stack([ds["burgers_x"].values, ds["burgers_y"].values], 1)
    b_true = burgers_vector_px(cfg) * cfg.scan_step_A
    out, used = [], set()
    for (y, x, h, k), bt in zip(cfg.dislocations, b_true, strict=True):
        d = np.hypot(found[:, 0] - y, found[:, 1] - x)
        i = int(np.argmin(d))
        used.add(i)
        out.append({"dist": float(d[i]), "hk": (ds["burgers_h"].values[i],
                                                  ds["burgers_k"].values[i]),
                    "hk_true": (h, k), "b_err_A": float(np.hypot(*(b[i] - bt))),
                    "confidence": float(ds["confidence"].values[i])})
    assert len(found) == len(cfg.dislocations) == len(used), (found, out)
    return out


# ---------------------------------------------------------------------------- derived maps


def test_derived_maps_against_analytic_fields() -> None:
    ny, nx = 20, 30
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    exx = 0.01 * np.sin(xx / 5)
    eyy = -0.005 + 0.0002 * yy
    exy = 0.003 * np.cos(yy / 4)
    theta = 0.5 + 0.01 * xx - 0.02 * yy + 0.001 * xx * yy  # bilinear: differences are exact
    exx[3, 4] = np.nan  # vacuum pixel
    m = an.derived_maps(exx, eyy, exy, theta)
    U = np.stack([np.stack([1 + exx, exy], -1), np.stack([exy, 1 + eyy], -1)], -2)
    ok = np.isfinite(exx)
    w, v = np.linalg.eigh(np.where(ok[..., None, None], U, np.eye(2)))
    np.testing.assert_allclose(m["e1"][ok], w[ok][:, 1] - 1, atol=1e-12)
    np.testing.assert_allclose(m["e2"][ok], w[ok][:, 0] - 1, atol=1e-12)
    np.testing.assert_allclose(m["max_shear"][ok], (w[ok][:, 1] - w[ok][:, 0]) / 2, atol=1e-12)
    det = (1 + exx) * (1 + eyy) - exy**2
    np.testing.assert_allclose(m["dilatation"][ok], det[ok] - 1, atol=1e-12)
    np.testing.assert_allclose(m["lattice_change"][ok], np.sqrt(det[ok]) - 1, atol=1e-12)
    # the e1 axis: the eigenvector of the larger eigenvalue, as an angle in (-90, 90]
    e1 = v[ok][:, :, 1]
    ang = np.degrees(np.arctan2(e1[:, 1], e1[:, 0]))
    ang = (ang + 90) % 180 - 90
    ang[ang == -90] = 90
    np.testing.assert_allclose(m["principal_direction"][ok], ang, atol=1e-6)
    np.testing.assert_allclose(m["dtheta_dx"][ok], (0.01 + 0.001 * yy)[ok], atol=1e-12)
    np.testing.assert_allclose(m["dtheta_dy"][ok], (-0.02 + 0.001 * xx)[ok], atol=1e-12)
    np.testing.assert_allclose(m["lattice_curvature"][ok],
                               np.hypot(0.01 + 0.001 * yy, -0.02 + 0.001 * xx)[ok], atol=1e-12)
    for v_ in m.values():
        assert np.isnan(v_[3, 4])


def test_circuits_close_on_compatible_fields_and_stay_on_one_phase() -> None:
    """A displacement gradient (quadratic u: the trapezoid rule is exact) closes on zero;
    circuits touching vacuum or two phases do not count, interior pixels do not matter."""
    ny, nx = 16, 18
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    # u = (0.01 x^2 + 0.02 x y - 0.005 y^2, -0.003 x^2 + 0.004 x y + 0.01 y^2)
    beta = np.stack([np.stack([0.02 * xx + 0.02 * yy, 0.02 * xx - 0.01 * yy], -1),
                     np.stack([-0.006 * xx + 0.004 * yy, 0.004 * xx + 0.02 * yy], -1)], -2)
    label = np.ones((ny, nx), int)
    label[:, 12:] = 2
    beta[5, 5] = np.nan  # an interior pixel of some circuits
    sums, ok = an.circuit_sums(beta, label, 4, 4)
    assert ok[3, 3] and ok[3, 2]  # pixel (5, 5) inside
    assert not ok[5, 5] and not ok[1, 1]  # pixel (5, 5) on the circuit
    assert ok[0, 7] and not ok[0, 8] and ok[0, 12]  # phase 1 | across | phase 2
    np.testing.assert_allclose(sums[ok], 0, atol=1e-12)


# ------------------------------------------------------------------- simulated dislocations


def test_simulated_edge_dislocation_is_consistent() -> None:
    """The simulator's dislocation: its distortion closes on b around the core, the truth's
    strain and rotation reproduce F, and an empty list changes nothing."""
    cfg = SimConfig(scan=(32, 32), dislocations=((15.0, 16.0, 1, 0),))
    b = burgers_vector_px(cfg)[0]
    assert math.isclose(np.hypot(*b), LATTICE_A[1] / cfg.scan_step_A, rel_tol=1e-12)
    phi = np.linspace(0, 2 * np.pi, 2001)[:-1]
    for r, frac in ((2.0, 1 - math.exp(-2)), (6.0, 1.0)):
        beta = dislocation_distortion(cfg, 15 + r * np.sin(phi), 16 + r * np.cos(phi))
        dl = np.stack([-np.sin(phi), np.cos(phi)], -1) * r * (phi[1] - phi[0])
        np.testing.assert_allclose((beta @ dl[..., None])[..., 0].sum(0), frac * b, atol=1e-6)
    # its rotation field far from the core, as the analysis removes it before a ripple fit
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    beta = dislocation_distortion(cfg, yy, xx)
    far = np.hypot(yy - 15, xx - 16) > 6
    np.testing.assert_allclose(np.degrees(0.5 * (beta[..., 1, 0] - beta[..., 0, 1]))[far],
                               an.dislocation_rotation(15, 16, b, yy, xx)[far], atol=1e-6)
    t = truth_rows(cfg)
    eps = np.stack([np.stack([t["exx"], t["exy"]], -1), np.stack([t["exy"], t["eyy"]], -1)], -2)
    np.testing.assert_allclose(rotation_matrix(t["theta"]) @ (np.eye(2) + eps), t["F"],
                               atol=1e-12)
    plain = truth_rows(cfg.replace(dislocations=()))
    ref = truth_rows(SimConfig(scan=(32, 32)))
    for k in ("exx", "theta", "F"):
        np.testing.assert_array_equal(plain[k], ref[k])
    assert SimConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="lattice vector"):
        SimConfig(dislocations=((5, 5, 0.5, 0),))
    with pytest.raises(ValueError, match="inside the scan"):
        SimConfig(scan=(16, 16), dislocations=((20, 5, 1, 0),))


@pytest.mark.parametrize("seed, noisy", [(0, True), (1, True), (2, True), (0, False)])
def test_dislocations_in_truth(seed: int, noisy: bool) -> None:
    """Truth F (heterostructure, ripple, strain fields) + Gaussian noise of single-pattern
    fits at ~1e3 e- (and without noise): every core within 1.5 px, its Burgers vector
    right, no other core."""
    cfg = SimConfig(scan=(64, 64), dislocations=DISLOCATIONS, seed=seed)
    truth = truth_rows(cfg)
    rng = np.random.default_rng(seed) if noisy else None
    ds = analysis_dataset(_strain_from_truth(cfg, truth, rng), AnalyzeConfig(),
                          _calibration(cfg))
    for m in _match(cfg, ds):
        assert m["dist"] <= CORE_TOL_PX, m
        assert m["hk"] == m["hk_true"], m
        assert m["b_err_A"] < 0.15 * LATTICE_A[1], m
    assert ds.attrs["burgers_unit"] == "Angstrom"


@pytest.mark.parametrize("seed, noisy", [(0, True), (1, True), (2, False)])
def test_no_dislocation_no_core(seed: int, noisy: bool) -> None:
    """The interface's misfit and the ripple's rotation gradient close on much less than a
    lattice vector: no core."""
    cfg = SimConfig(scan=(64, 64), seed=seed)
    rng = np.random.default_rng(seed) if noisy else None
    ds = analysis_dataset(_strain_from_truth(cfg, truth_rows(cfg), rng), AnalyzeConfig(),
                          _calibration(cfg))
    assert ds.sizes["dislocation"] == 0, ds["confidence"].values


# ---------------------------------------------------------------------------- ripples


def _true_ripple_direction(cfg: SimConfig, truth: dict) -> float:
    """The simulator's ripple direction: the angle whose sinusoid reproduces the truth."""
    yy, xx = np.mgrid[0:cfg.scan[0], 0:cfg.scan[1]].astype(np.float64)
    ok = np.isfinite(truth["theta"])
    best, err = 0.0, np.inf
    for d in np.linspace(0, np.pi, 1801)[:-1]:
        along = xx[ok] * np.cos(d) + yy[ok] * np.sin(d)
        model = cfg.global_rotation_deg + cfg.ripple_amplitude_deg * np.sin(
            2 * np.pi * along / cfg.ripple_wavelength)
        e = np.abs(model - truth["theta"][ok]).max()
        if e < err:
            best, err = d, e
    assert err < 0.05  # deg: the 0.1 deg grid
    return math.degrees(best)


def _angle_diff(a: float, b: float) -> float:
    return abs((a - b + 90) % 180 - 90)


@pytest.mark.parametrize("seed", [0, 1])
def test_ripple_in_noisy_truth(seed: int) -> None:
    cfg = SimConfig(scan=(64, 64), seed=seed)
    truth = truth_rows(cfg)
    ds = analysis_dataset(_strain_from_truth(cfg, truth, np.random.default_rng(seed)))
    lam = float(ds["ripple_wavelength_px"])
    amp = float(ds["ripple_amplitude_deg"])
    assert abs(lam / cfg.ripple_wavelength - 1) <= WAVELENGTH_TOL, lam
    assert abs(amp / cfg.ripple_amplitude_deg - 1) <= AMPLITUDE_TOL, amp
    direction = float(ds["ripple_direction_deg"])
    assert 0 <= direction < 180
    assert _angle_diff(direction, _true_ripple_direction(cfg, truth)) < 3.0, direction


def test_no_ripple_is_nan_with_a_reason() -> None:
    cfg = SimConfig(scan=(64, 64), ripple_amplitude_deg=0.0)
    ds = analysis_dataset(_strain_from_truth(cfg, truth_rows(cfg), np.random.default_rng(0)))
    for k in RIPPLE_NAMES:
        assert np.isnan(float(ds[k])), (k, float(ds[k]))
        assert "no significant ripple" in ds[k].attrs["reason"]


# --------------------------------------------------------------------- through the store


def _pipeline(tmp: Path, cfg: SimConfig) -> Path:
    """ingest (with the scan and detector calibration) -> prep -> train -> map."""
    npy, _ = save_simulation(tmp / "data.npy", cfg)
    store = tmp / "data.zarr"
    ingest(npy, store, calibration=_calibration(cfg))
    preprocess_store(store)
    train_store(store)
    map_store(store, workers=1)
    return store


@pytest.fixture(scope="module")
def dislocated_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimConfig]:
    """48 x 48 WS2 (+ vacuum corner, default ripple and strain fields) with three edge
    dislocations at 1e3 e-/pattern, through ingest, prep, train, map and analyze (one run
    for every test below: training is most of it)."""
    cfg = SimConfig(scan=(48, 48), dose=1000.0, seed=5, heterostructure=False,
                    dislocations=((13.0, 14.0, 1, 0), (31.0, 28.0, 0, 1), (12.0, 34.0, -1, 1)))
    store = _pipeline(tmp_path_factory.mktemp("dislocations"), cfg)
    analyze_store(store)
    return store, cfg


@pytest.mark.slow
def test_analysis_group_contract(dislocated_store) -> None:
    store, _ = dislocated_store
    ds = xr.open_zarr(store, group="analysis")
    assert MAP_NAMES | TABLE_NAMES | RIPPLE_NAMES <= set(ds.data_vars)
    for k in MAP_NAMES:
        assert ds[k].dims == ("scan_y", "scan_x"), k
    for k in TABLE_NAMES:
        assert ds[k].dims == ("dislocation",), k
    for k in RIPPLE_NAMES:
        assert ds[k].dims == (), k
    assert ds.attrs["complete"] and "counter-clockwise" in ds.attrs["circuit_convention"]
    assert ds.attrs["burgers_unit"] == "Angstrom"
    assert AnalyzeConfig.from_dict(json.loads(ds.attrs["analyze_config"])) == AnalyzeConfig()
    strain = xr.open_zarr(store, group="strain")
    vac = ~np.isfinite(strain["exx"].values)
    assert vac.any() and np.isnan(ds["dilatation"].values[vac]).all()
    with pytest.raises(StageExistsError):
        analyze_store(store)


@pytest.mark.slow
def test_dislocations_end_to_end_at_1e3(dislocated_store) -> None:
    """Every core within 1.5 probe positions, its Burgers vector right (as a vector and as
    (h, k) of the store's own reference basis), and no other core."""
    store, cfg = dislocated_store
    ds = xr.open_zarr(store, group="analysis").load()
    lattice = json.loads(xr.open_zarr(store, group="strain").attrs["reference_lattice"])
    hk_true = an.index_burgers(burgers_vector_px(cfg) * cfg.scan_step_A,
                               np.asarray(lattice["real_basis_A"]))[0]
    for m, hk in zip(_match(cfg, ds), hk_true, strict=True):
        assert m["dist"] <= CORE_TOL_PX, m
        assert m["b_err_A"] < 0.25 * LATTICE_A[1], m
        assert m["hk"] == tuple(hk), (m, hk)


@pytest.mark.slow
def test_ripple_end_to_end_at_1e3(dislocated_store) -> None:
    """The ripple beside the dislocations (their rotation fields are removed first)."""
    store, cfg = dislocated_store
    ds = xr.open_zarr(store, group="analysis").load()
    lam = float(ds["ripple_wavelength_px"])
    amp = float(ds["ripple_amplitude_deg"])
    assert abs(lam / cfg.ripple_wavelength - 1) <= WAVELENGTH_TOL, lam
    assert abs(amp / cfg.ripple_amplitude_deg - 1) <= AMPLITUDE_TOL, amp
    plain = cfg.replace(dislocations=())
    direction = _true_ripple_direction(plain, truth_rows(plain))
    assert _angle_diff(float(ds["ripple_direction_deg"]), direction) < 3.0


@pytest.mark.slow
def test_heterostructure_end_to_end_at_1e3(hetero_1e3_run) -> None:
    """The default WS2/WSe2 heterostructure (4 % misfit at the interface, vacuum, ripple) at
    1e3 e-/pattern, through `ccstae run`: no core anywhere, the ripple within the issue's
    tolerances."""
    store, cfg = hetero_1e3_run
    ds = xr.open_zarr(store, group="analysis").load()
    assert ds.sizes["dislocation"] == 0, ds["confidence"].values
    lam = float(ds["ripple_wavelength_px"])
    amp = float(ds["ripple_amplitude_deg"])
    assert abs(lam / cfg.ripple_wavelength - 1) <= WAVELENGTH_TOL, lam
    assert abs(amp / cfg.ripple_amplitude_deg - 1) <= AMPLITUDE_TOL, amp
    direction = _true_ripple_direction(cfg, truth_rows(cfg))
    assert _angle_diff(float(ds["ripple_direction_deg"]), direction) < 3.0


@pytest.mark.slow
def test_analyze_overwrite(dislocated_store) -> None:
    store, _ = dislocated_store
    again = analyze_store(store, AnalyzeConfig(loop_px=6), overwrite=True)
    assert again.attrs["loop_px"] == 6
    assert xr.open_zarr(store, group="analysis").attrs["loop_px"] == 6


def test_analyze_needs_a_strain_group(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ccstae run"):
        analyze_store(tmp_path / "missing.zarr")
