"""Synthetic 4D-STEM generator and CRB: numbers checked against the ground truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.core.strain import (
    polar_decompose,
    reference_deformation,
    relative_strain,
    rotation_matrix,
)
from ccstae_hpc.sim import simulate as sim
from ccstae_hpc.sim.crb import (
    cramer_rao,
    in_frame,
    pattern_from_params,
    scan_floor,
    truth_params,
)
from ccstae_hpc.sim.simulate import (
    NOMINAL_TOTAL,
    load_simulation,
    phase_lattice_scale,
    reflections,
    render_pattern,
    save_simulation,
    simulate,
    simulate_rows,
    truth_rows,
)

A = {1: 3.153, 2: 3.282}  # Angstrom, independent of the module's constants


def _g(phase: int, h: int, k: int) -> np.ndarray:
    """Reciprocal vector (x, y) in 1/A from the task's definition, not the module's."""
    a = A[phase]
    basis = np.array([[a, a / 2], [0.0, a * math.sqrt(3) / 2]])  # columns a1, a2
    B = np.linalg.inv(basis).T  # columns b1, b2 with a_i . b_j = delta_ij
    return h * B[:, 0] + k * B[:, 1]


def _disk_centroid(img: np.ndarray, row: float, col: float, R: float) -> tuple[float, float]:
    """Centroid of a disk after removing a plane fitted on the annulus around it (iterated)."""
    img = np.asarray(img, dtype=np.float64)
    h = int(math.ceil(R)) + 5
    for _ in range(3):
        r0, c0 = int(round(row)), int(round(col))
        yy, xx = np.mgrid[r0 - h : r0 + h + 1, c0 - h : c0 + h + 1]
        win = img[r0 - h : r0 + h + 1, c0 - h : c0 + h + 1]
        d = np.hypot(yy - row, xx - col)
        ann = (d > R + 1.5) & (d < R + 4.5)
        X = np.stack([np.ones(ann.sum()), yy[ann], xx[ann]], 1)
        coef = np.linalg.lstsq(X, win[ann], rcond=None)[0]
        w = win - (coef[0] + coef[1] * yy + coef[2] * xx)
        w = np.where(d < R + 1.5, w, 0.0)
        row, col = (w * yy).sum() / w.sum(), (w * xx).sum() / w.sum()
    return float(row), float(col)


def _hot_mask(truth: dict[str, np.ndarray], Q: int) -> np.ndarray:
    m = np.zeros((Q, Q), dtype=bool)
    m[truth["hot_pixels"][:, 0], truth["hot_pixels"][:, 1]] = True
    return m


# ---------------------------------------------------------------------------------------------
# shapes, determinism, chunking
# ---------------------------------------------------------------------------------------------


def test_shapes_and_dtypes(sim_small, make_sim) -> None:
    data, truth, cfg = sim_small
    ny, nx = cfg.scan
    Q = cfg.detector
    assert data.shape == (ny, nx, Q, Q) and data.dtype == np.float32
    for k in ("exx", "eyy", "exy", "theta"):
        assert truth[k].shape == (ny, nx) and truth[k].dtype == np.float64
    assert truth["phase"].shape == (ny, nx) and truth["phase"].dtype == np.uint8
    assert truth["F"].shape == (ny, nx, 2, 2)
    assert truth["origin"].shape == (ny, nx, 2)
    assert truth["hot_pixels"].shape == (cfg.n_hot_pixels, 2)
    assert np.issubdtype(truth["hot_pixels"].dtype, np.integer)
    noisy, _, _ = make_sim(dose=1000)
    assert noisy.shape == data.shape and noisy.dtype == np.uint16


def test_noise_free_sums_to_nominal(make_sim) -> None:
    data, _, _ = make_sim(n_hot_pixels=0)
    np.testing.assert_allclose(data.sum((2, 3), dtype=np.float64), NOMINAL_TOTAL, rtol=1e-6)
    assert (data > 0).all()


def test_deterministic_in_seed(make_sim) -> None:
    cfg = SimConfig(scan=(3, 5), dose=800)
    d1, t1 = simulate(cfg)
    d2, t2 = simulate(cfg)
    np.testing.assert_array_equal(d1, d2)
    for k in t1:
        np.testing.assert_array_equal(t1[k], t2[k])
    d3, t3 = simulate(cfg.replace(seed=1))
    assert not np.array_equal(d1, d3)
    assert not np.array_equal(t1["hot_pixels"], t3["hot_pixels"])


@pytest.mark.parametrize("dose", [800.0, 9000.0])
def test_noise_seed_draws_other_noise_of_the_same_sample(dose) -> None:
    """``noise_seed``: a repeated acquisition, same truth and hot pixels, other shot noise
    (both dose regimes of the sampler); 0 is the seed's own noise."""
    cfg = SimConfig(scan=(3, 5), dose=dose)
    d0, t0 = simulate(cfg)
    d_zero, _ = simulate(cfg.replace(noise_seed=0))
    np.testing.assert_array_equal(d0, d_zero)
    d1, t1 = simulate(cfg.replace(noise_seed=1))
    d2, _ = simulate(cfg.replace(noise_seed=2))
    for k in t0:
        np.testing.assert_array_equal(t0[k], t1[k])
    assert not np.array_equal(d0, d1) and not np.array_equal(d1, d2)
    hot = _hot_mask(t0, cfg.detector)
    # the detector's hot pixels are the same
    np.testing.assert_allclose(d1[..., hot].mean(), d0[..., hot].mean(), rtol=0.2)
    # the same expectation: the draws' totals agree within their Poisson spread
    tot = np.array([d.sum((2, 3), dtype=np.float64).mean() for d in (d0, d1, d2)])
    assert np.ptp(tot) < 4 * np.sqrt(dose / 15) + 0.01 * dose, tot
    with pytest.raises(ValueError, match="noise_seed"):
        SimConfig(noise_seed=-1)


@pytest.mark.parametrize("dose", [None, 700.0, 9000.0])
def test_rows_equal_slice_of_full_simulation(make_sim, monkeypatch, dose) -> None:
    data, truth, cfg = make_sim(dose=dose)
    rows, rtruth = simulate_rows(cfg, 5, 9)
    np.testing.assert_array_equal(rows, data[5:9])
    for k in ("exx", "theta", "phase", "F", "origin"):
        np.testing.assert_array_equal(rtruth[k], truth[k][5:9])
    # one-row rendering blocks must give the same numbers as the default blocking
    monkeypatch.setattr(sim, "_BLOCK_ELEMENTS", 1)
    np.testing.assert_array_equal(simulate_rows(cfg, 7, 12)[0], data[7:12])


def test_save_and_load_round_trip(tmp_path) -> None:
    cfg = SimConfig(scan=(3, 4), detector=64, dose=300, seed=3)
    npy, tru = save_simulation(tmp_path / "out.npy", cfg)
    assert npy.name == "out.npy" and tru.name == "out.truth.npz"
    data, truth = simulate(cfg)
    np.testing.assert_array_equal(np.load(npy), data)
    with np.load(tru) as z:
        assert SimConfig.from_dict(json.loads(str(z["config"]))) == cfg
        np.testing.assert_array_equal(z["F"], truth["F"])
    d2, t2, c2 = load_simulation(npy)
    assert c2 == cfg and d2.shape == data.shape
    np.testing.assert_array_equal(t2["phase"], truth["phase"])


# ---------------------------------------------------------------------------------------------
# noise model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dose", [1000.0, 9000.0])  # inverse-CDF sampler, rng.poisson
def test_poisson_dose_and_mean(make_sim, dose) -> None:
    noisy, _, cfg = make_sim(dose=dose, n_hot_pixels=0)
    clean, _, _ = make_sim(n_hot_pixels=0)
    n = noisy.shape[0] * noisy.shape[1]
    sums = noisy.sum((2, 3), dtype=np.float64).ravel()
    assert abs(sums.mean() - dose) < 5 * math.sqrt(dose / n)
    assert 0.6 < sums.var() / dose < 1.5  # Poisson total: variance = dose
    # the mean pattern matches the expected counts pixel by pixel: a shift of the sampler by
    # one pixel would blow this chi^2 (E = 1 for exact Poisson means) far above 1
    mu = clean.reshape(n, -1).astype(np.float64).mean(0) * dose / NOMINAL_TOTAL
    mean = noisy.reshape(n, -1).mean(0)
    chi2 = np.mean((mean - mu) ** 2 / (mu / n))
    assert 0.9 < chi2 < 1.1


def test_background_weight_mixes_lorentzian(make_sim) -> None:
    clean, truth, cfg = make_sim(n_hot_pixels=0)
    mixed, _, _ = make_sim(n_hot_pixels=0, background_weight=0.4)
    np.testing.assert_allclose(mixed.sum((2, 3), dtype=np.float64), NOMINAL_TOTAL, rtol=1e-4)
    bg = (mixed - 0.6 * clean) / 0.4  # the Lorentzian alone, same total
    assert (bg > -1e-2).all()
    np.testing.assert_allclose(bg.sum((2, 3), dtype=np.float64), NOMINAL_TOTAL, rtol=1e-4)
    # centred on the pattern origin: its peak is the pixel nearest the origin
    o = truth["origin"][4, 7]
    peak = np.unravel_index(np.argmax(bg[4, 7]), bg.shape[2:])
    assert abs(peak[0] - o[0]) <= 0.5 + 1e-9 and abs(peak[1] - o[1]) <= 0.5 + 1e-9


# ---------------------------------------------------------------------------------------------
# geometry of the diffraction pattern against the truth
# ---------------------------------------------------------------------------------------------


def test_truth_F_is_rotation_times_strain(sim_small) -> None:
    _, t, _ = sim_small
    s = t["phase"] > 0
    eps = np.stack([np.stack([t["exx"], t["exy"]], -1), np.stack([t["exy"], t["eyy"]], -1)], -2)
    F = rotation_matrix(t["theta"]) @ (np.eye(2) + eps)
    np.testing.assert_allclose(t["F"][s], F[s], atol=1e-12)
    v = ~s
    assert v.any()
    for k in ("exx", "eyy", "exy", "theta"):
        assert np.isnan(t[k][v]).all() and np.isfinite(t[k][s]).all()
    assert np.isnan(t["F"][v]).all()


@pytest.mark.parametrize("phase", [1, 2])
def test_disk_centroids_match_truth(sim_small, phase) -> None:
    """Bragg disks sit at origin + F^-T g / pixel_size, (x, y) = (col, row), to < 0.05 px, with
    ``g`` of the one reference (WS2) lattice for both phases: truth F carries the mismatch."""
    data, truth, cfg = sim_small
    Q, R = cfg.detector, cfg.disk_radius
    hot = truth["hot_pixels"]
    checked = 0
    for iy, ix in np.argwhere(truth["phase"] == phase)[::7]:
        F = truth["F"][iy, ix]
        oy, ox = truth["origin"][iy, ix]
        for h, k in [(1, 0), (0, 1), (-1, -1), (1, -1), (2, 0), (-1, 2)]:
            gx, gy = np.linalg.inv(F).T @ _g(1, h, k)
            col, row = ox + gx / cfg.pixel_size, oy + gy / cfg.pixel_size
            if min(row, col) < R + 8 or max(row, col) > Q - 1 - R - 8:
                continue
            if (np.hypot(hot[:, 0] - row, hot[:, 1] - col) < R + 6).any():
                continue
            r_fit, c_fit = _disk_centroid(data[iy, ix], row, col, R)
            assert abs(r_fit - row) < 0.05 and abs(c_fit - col) < 0.05, (h, k, r_fit - row)
            checked += 1
    assert checked >= 10


def test_rotation_sign_turns_x_toward_y(make_sim) -> None:
    """Unstrained, no drift, theta = 17 deg: the (1, 0) disk is at -30 + 17 degrees."""
    flat = dict(
        strain_amplitude=0.0,
        interface_strain=0.0,
        ripple_amplitude_deg=0.0,
        drift_px=0.0,
        n_hot_pixels=0,
        vacuum=False,
        scan=(2, 2),
    )
    data, truth, cfg = make_sim(**flat)
    np.testing.assert_allclose(truth["theta"], 17.0)
    oy, ox = truth["origin"][0, 0]
    p = int(truth["phase"][0, 0])
    assert p in (1, 2)
    g = np.linalg.norm(_g(p, 1, 0)) / cfg.pixel_size  # b1 = (1, -1/sqrt(3)) / a: at -30 deg
    ang = np.deg2rad(-30.0 + 17.0)  # +theta turns +x toward +y (= down the detector rows)
    row, col = oy + g * math.sin(ang), ox + g * math.cos(ang)
    r_fit, c_fit = _disk_centroid(data[0, 0], row, col, cfg.disk_radius)
    assert abs(r_fit - row) < 0.05 and abs(c_fit - col) < 0.05
    # and the central disk is at the origin
    r0, c0 = _disk_centroid(data[0, 0], oy, ox, cfg.disk_radius)
    assert abs(r0 - oy) < 0.05 and abs(c0 - ox) < 0.05


def test_render_pattern_is_the_simulator(sim_small) -> None:
    data, truth, cfg = sim_small
    hot = _hot_mask(truth, cfg.detector)
    for iy, ix in [(0, 0), (6, 6), (11, 11)]:
        p = int(truth["phase"][iy, ix])
        F = truth["F"][iy, ix] / phase_lattice_scale(p) if p else np.eye(2)
        img = render_pattern(cfg, F, truth["origin"][iy, ix], p, total=NOMINAL_TOTAL)
        np.testing.assert_allclose(img[~hot], data[iy, ix][~hot], rtol=1e-4, atol=1e-3)


def test_vacuum_has_no_bragg_intensity(sim_small) -> None:
    data, truth, cfg = sim_small
    Q, R = cfg.detector, cfg.disk_radius
    kk = np.arange(Q)
    hot = _hot_mask(truth, Q)

    def off_centre_max(iy: int, ix: int) -> float:
        oy, ox = truth["origin"][iy, ix]
        d = np.hypot(kk[:, None] - oy, kk[None, :] - ox)
        centre = data[iy, ix][d < R - 1].mean()
        return float(data[iy, ix][(d > R + 2) & ~hot].max() / centre)

    vac = np.argwhere(truth["phase"] == 0)
    smp = np.argwhere(truth["phase"] > 0)
    assert len(vac) >= 5
    assert max(off_centre_max(*p) for p in vac) < 0.005  # diffuse halo only
    assert min(off_centre_max(*p) for p in smp[::5]) > 0.02  # Bragg disks


def test_hot_pixels_at_truth_coordinates(make_sim) -> None:
    for dose in (None, 1000.0):
        data, truth, cfg = make_sim(dose=dose)
        ref, _, _ = make_sim(dose=dose, n_hot_pixels=0)
        diff = data.astype(np.float64) - ref.astype(np.float64)
        hot = _hot_mask(truth, cfg.detector)
        assert hot.sum() == cfg.n_hot_pixels
        assert np.abs(diff[:, :, ~hot]).max() < 1e-3  # nothing else changes
        vals = diff[:, :, hot]
        # the same defect value in every pattern (Poisson: up to uint16 clipping, none here)
        np.testing.assert_allclose(vals, np.broadcast_to(vals[:1, :1], vals.shape), atol=1e-2)
        nominal = NOMINAL_TOTAL if dose is None else dose
        frac = reflections(cfg, 1)["fraction"][1]  # a first-order WS2 disk
        typical = nominal * frac / (math.pi * cfg.disk_radius**2)
        assert (vals[0, 0] > 10 * typical).all() and (vals[0, 0] < 35 * typical).all()


# ---------------------------------------------------------------------------------------------
# sample layout and physics
# ---------------------------------------------------------------------------------------------


def test_phase_fractions() -> None:
    t = truth_rows(SimConfig(scan=(64, 64)))
    f = np.bincount(t["phase"].ravel(), minlength=3) / t["phase"].size
    assert 0.12 <= f[0] <= 0.18  # vacuum corner
    assert 0.25 <= f[1] <= 0.40  # WS2 core
    assert f[2] > 0.4  # WSe2 shell
    t = truth_rows(SimConfig(scan=(64, 64), vacuum=False))
    assert (t["phase"] > 0).all()


def test_interface_strain_sign_and_decay() -> None:
    cfg = SimConfig(scan=(64, 64), strain_amplitude=0.0, ripple_amplitude_deg=0.0)
    t = truth_rows(cfg)
    ws2, wse2 = t["phase"] == 1, t["phase"] == 2
    # truth is against the WS2 lattice: the shell's own strain is exx relative to WSe2
    own = (1 + t["exx"]) / phase_lattice_scale(t["phase"]) - 1
    np.testing.assert_allclose(np.median(t["exx"][wse2] - own[wse2]), 3.282 / 3.153 - 1,
                               atol=2e-3)
    t = {**t, "exx": own, "eyy": (1 + t["eyy"]) / phase_lattice_scale(t["phase"]) - 1,
         "exy": t["exy"] / phase_lattice_scale(t["phase"])}
    assert (t["exx"][ws2] > 0).all() and (t["exx"][wse2] < 0).all()  # coherent interface
    np.testing.assert_allclose(t["exx"][ws2 | wse2], t["eyy"][ws2 | wse2])  # isotropic
    assert np.nanmax(np.abs(t["exx"])) <= cfg.interface_strain
    assert np.abs(t["exy"][ws2 | wse2]).max() == 0
    assert np.abs(t["exx"][ws2]).min() < 0.2 * cfg.interface_strain  # decays into the core


def test_smooth_strain_and_ripples(sim_small) -> None:
    t = truth_rows(SimConfig(scan=(64, 64), interface_strain=0.0))
    s = t["phase"] == 1  # WS2: its own lattice is the reference
    A = 0.01
    for k, lo in (("exx", 0.5 * A), ("eyy", 0.5 * A), ("exy", 0.25 * A)):
        assert lo < np.abs(t[k][s]).max() < 1.5 * A
    assert not np.allclose(t["exx"][s], t["eyy"][s])
    th = t["theta"][s] - 17.0
    assert 1.3 < np.abs(th).max() <= 1.5 + 1e-9


def test_family_intensity_ratios_differ_between_phases() -> None:
    cfg = SimConfig()
    ratios = []
    for p in (1, 2):
        r = reflections(cfg, p)
        g = np.linalg.norm(r["g"], axis=1)
        first = np.isclose(g, g[1])
        second = np.isclose(g, g[1] * math.sqrt(3))
        assert first.sum() == 6 and second.sum() == 6
        f = r["fraction"]
        assert np.ptp(f[first]) < 1e-12 and np.ptp(f[second]) < 1e-12  # 6-fold symmetric
        ratios.append(f[second][0] / f[first][0])
    assert abs(ratios[0] - ratios[1]) > 0.1


def test_small_detector() -> None:
    cfg = SimConfig(scan=(2, 3), detector=64, dose=200)
    data, truth = simulate(cfg)
    assert data.shape == (2, 3, 64, 64)
    assert ((truth["origin"] > 25) & (truth["origin"] < 38)).all()


# ---------------------------------------------------------------------------------------------
# Cramer-Rao bound
# ---------------------------------------------------------------------------------------------


def test_cramer_rao_scales_with_dose() -> None:
    cfg = SimConfig()
    lo, hi = cramer_rao(cfg, 1000.0), cramer_rao(cfg, 4000.0)
    for k, v in lo.items():
        assert np.isfinite(v) and v > 0
        assert hi[k] == pytest.approx(v / 2, rel=1e-3)  # Fisher information ~ dose
    assert lo["mae_exx"] == pytest.approx(lo["std_exx"] * math.sqrt(2 / math.pi))
    # plausible scale: per-mille strain and sub-0.1 px origin at 1000 e-
    assert 1e-4 < lo["std_exx"] < 1e-2 and 0.005 < lo["std_origin_x"] < 0.1
    # background dilutes the information
    assert cramer_rao(cfg.replace(background_weight=0.5), 1000.0)["std_exx"] > lo["std_exx"]


def test_scan_floor_is_the_mean_of_its_patterns_floors() -> None:
    # a scan of one unstrained, unturned, undrifted phase: every pattern is cramer_rao's
    flat = SimConfig(scan=(6, 6), heterostructure=False, vacuum=False, strain_amplitude=0.0,
                     interface_strain=0.0, ripple_amplitude_deg=0.0, drift_px=0.0)
    f = scan_floor(flat, truth_rows(flat), 1000.0, patterns=3)
    assert set(f) == {1}
    one = cramer_rao(flat, 1000.0, phase=1)
    for k, v in f[1].items():
        assert v == pytest.approx(one[k], rel=1e-6)
    # the information is proportional to the dose
    f4 = scan_floor(flat, truth_rows(flat), 4000.0, patterns=3)
    assert f4[1]["mae_exx"] == pytest.approx(f[1]["mae_exx"] / 2, rel=1e-9)
    # a heterostructure: the floors' forward model renders each phase's patterns as the
    # simulator does (WSe2 against its own lattice) ...
    het = SimConfig(scan=(12, 12))
    t = truth_rows(het)
    data, _ = simulate_rows(het.replace(n_hot_pixels=0), 0, het.scan[0])
    for p in (1, 2):
        y, x = np.argwhere(t["phase"] == p)[0]
        mu = pattern_from_params(het, truth_params(t, int(y), int(x)), p, 1.0)
        d = data[y, x].astype(np.float64)
        assert np.abs(mu / mu.sum() - d / d.sum()).max() < 1e-5 * (d / d.sum()).max()
    # ... and each phase's patterns scatter about its relaxed pattern's floor (by their
    # strain, rotation and where their disk edges fall on the pixels)
    h = scan_floor(het, t, 1000.0, patterns=8)
    assert set(h) == {1, 2}
    for p in (1, 2):
        assert h[p]["mae_exx"] == pytest.approx(cramer_rao(het, 1000.0, p)["mae_exx"], rel=0.1)
    with pytest.raises(ValueError, match="dose"):
        scan_floor(flat, truth_rows(flat), 0.0)


def test_floors_are_of_the_strain_components_the_maps_report() -> None:
    # the maps (and the truth re-referenced on them) report R_ref e R_ref^T, e the strain in
    # the lattice's own frame that the floors' renderer takes: the difference of two pixels'
    # re-referenced truth is their e's difference turned by the reference's orientation
    cfg = SimConfig(scan=(12, 12))
    t = truth_rows(cfg)
    F = np.asarray(t["F"], np.float64)
    ws2 = t["phase"] == 1
    ref = reference_deformation(F, ws2)
    theta_ref = float(polar_decompose(ref)[0])
    (ya, xa), (yb, xb) = np.argwhere(ws2)[[0, -1]]
    rel = relative_strain(F[[ya, yb], [xa, xb]], ref)
    d_rel = np.array([rel[k][0] - rel[k][1] for k in ("exx", "eyy", "exy")])
    d_own = truth_params(t, int(ya), int(xa))[:3] - truth_params(t, int(yb), int(xb))[:3]
    C = np.zeros((6, 6))
    C[:3, :3] = np.outer(d_own, d_own)  # a rank-one covariance turns as its vector does
    turned = np.sqrt(np.diag(in_frame(C, theta_ref)))[:3]
    assert np.abs(d_rel).max() > 1e-3  # the two pixels differ
    # to first order: the reference's own strain and the 1 % differences leave ~1 %
    np.testing.assert_allclose(turned, np.abs(d_rel), rtol=0.03, atol=1e-5)
    # not turned, they would not agree
    assert np.abs(np.abs(d_own) - np.abs(d_rel)).max() > 0.2 * np.abs(d_rel).max()


def test_single_phase_sample_has_no_wse2_and_no_interface_strain(make_sim):
    data, truth, _ = make_sim(heterostructure=False)
    assert set(np.unique(truth["phase"])) == {0, 1}
    het = make_sim()[1]
    assert 2 in np.unique(het["phase"])
    # without the coherent-interface term only the smooth fields remain (|e| <= ~1.3 A)
    assert np.abs(truth["exx"][truth["phase"] == 1]).max() < 0.012  # 0.018 with the shell
