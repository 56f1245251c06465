"""The sharp-disk forward model (``ccstae_hpc.core.disks``) and its use in the refinement.

Truth comes from the simulator's renderer: its disks are anti-aliased hard disks of radius
``R`` (a linear ramp in the distance over one pixel, 90 % to 10 % over 0.8 px), so the
measured profile, the fitted disk centres and the fits' precision are checked against known
numbers and against the Cramer-Rao floor of the same pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from ccstae_hpc.core import refine as refine_module
from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.core.disks import (
    bragg_region,
    extend_model,
    fit_entries,
    lattice_labels,
    measure_profile,
    render_entry,
)
from ccstae_hpc.core.geometry import ring_inner_radius
from ccstae_hpc.core.mapping import neighbour_scatter
from ccstae_hpc.core.patterns import central_disk, disk_mask, recorded_pixels, ring_mask
from ccstae_hpc.core.phases import disk_labels
from ccstae_hpc.core.refine import DiskEntries, refine
from ccstae_hpc.core.strain import rotation_matrix
from ccstae_hpc.sim import crb
from ccstae_hpc.sim.simulate import base_origin, reflections, render_pattern

DOSE = 1e4
N = 160
SEED = 3


@pytest.fixture(scope="module")
def sim() -> dict:
    """Noisy WS2 patterns with random small strains, rotations and sub-pixel shifts."""
    cfg = SimConfig(scan=(16, 16), dose=DOSE, seed=SEED, heterostructure=False)
    Q, tg, o = cfg.detector, cfg.global_rotation_deg, base_origin(cfg)
    template = render_pattern(cfg, rotation_matrix(tg), o, 1, total=DOSE)
    rng = np.random.default_rng(0)
    eps = rng.normal(0, 0.003, (N, 3))
    dth = rng.normal(0, 0.2, N)
    shift = rng.uniform(-0.5, 0.5, (N, 2))
    x = np.empty((N, Q, Q))
    for i in range(N):
        F = rotation_matrix(tg + dth[i]) @ (np.eye(2) + np.array([[eps[i, 0], eps[i, 2]],
                                                                   [eps[i, 2], eps[i, 1]]]))
        x[i] = rng.poisson(render_pattern(cfg, F, o + shift[i], 1, total=DOSE))
    cy, cx, rad = central_disk(template)
    ring = ring_mask((Q, Q), (cy, cx), ring_inner_radius(rad))
    return {"cfg": cfg, "template": template, "x": x / DOSE, "eps": eps, "dth": dth,
            "center": (cy, cx), "radius": rad, "ring": ring, "origin": o}


def test_measured_profile_is_the_simulators_disk(sim: dict) -> None:
    prof = measure_profile(sim["x"], sim["center"], sim["radius"])
    R = sim["cfg"].disk_radius
    assert abs(prof.radius - R) < 0.05, prof.radius
    # the renderer's ramp: 90 % at R - 0.4, 10 % at R + 0.4
    assert abs(prof.edge_px - 0.8) < 0.1, prof.edge_px
    np.testing.assert_allclose(prof(np.array([0.0, R - 1.0, R + 1.0])), [1, 1, 0], atol=0.03)
    assert np.all(np.diff(prof.values) <= 1e-12)  # non-increasing


@pytest.mark.parametrize("blur", [0.0, 0.7])
def test_entry_disk_centres_are_the_true_ones(sim: dict, blur: float) -> None:
    """Centres of the disks of an entry, sharp or blurred as a learned average is."""
    cfg = sim["cfg"]
    d = ndimage.gaussian_filter(sim["template"], blur) if blur else sim["template"]
    mask = disk_mask(d, sim["ring"])
    labels = disk_labels(d, mask)[None]
    prof = measure_profile(sim["x"], sim["center"], sim["radius"])
    model = fit_entries(d[None], labels, np.array([0]), prof, sim["center"])
    n = int(labels.max())
    got = model.centers[0, 1:n + 1]
    refl = reflections(cfg, 1)
    F = rotation_matrix(cfg.global_rotation_deg)
    true = sim["origin"][::-1] + (np.linalg.inv(F).T @ refl["g"].T).T / cfg.pixel_size
    err = np.hypot(got[:, None, 0] - true[None, :, 0], got[:, None, 1] - true[None, :, 1]).min(1)
    assert n >= 12
    assert np.mean(err) < (0.02 if blur == 0 else 0.05), err
    # the model redraws the sharp entry to within a few per cent of its disk pixels
    if blur == 0:
        m = render_entry(model, 0, labels)
        inside = labels[0] > 0
        assert np.abs(m - d)[inside].sum() / d[inside].sum() < 0.05


def _errors(fit, sim: dict, centred: bool = True) -> np.ndarray:
    """Errors of the fitted (exx, eyy, exy, theta) against the truth, median removed unless
    not ``centred``."""
    B = np.linalg.inv(fit.theta[:, :, :2].double().numpy())
    R0 = rotation_matrix(sim["cfg"].global_rotation_deg)
    M = np.einsum("ij,njk,kl->nil", R0.T, B, R0)  # (I + eps) R(-dtheta)
    got = np.stack([M[:, 0, 0] - 1, M[:, 1, 1] - 1, (M[:, 0, 1] + M[:, 1, 0]) / 2,
                    np.rad2deg((M[:, 0, 1] - M[:, 1, 0]) / 2)], 1)
    err = got - np.c_[sim["eps"], sim["dth"]]
    return err - np.median(err, 0) if centred else err


def _floor(sim: dict, pixels: np.ndarray) -> np.ndarray:
    """Cramer-Rao standard deviations of (exx, eyy, exy, theta) on ``pixels``."""
    cfg = sim["cfg"]
    o = sim["origin"]
    p0 = np.array([0, 0, 0, cfg.global_rotation_deg, o[1], o[0]])
    mu = crb.pattern_from_params(cfg, p0, 1, DOSE)[pixels]
    J = []
    for i, h in enumerate((1e-4, 1e-4, 1e-4, 1e-2, 1e-2, 1e-2)):
        e = np.zeros(6)
        e[i] = h
        J.append((crb.pattern_from_params(cfg, p0 + e, 1, DOSE)[pixels]
                  - crb.pattern_from_params(cfg, p0 - e, 1, DOSE)[pixels]) / (2 * h))
    J = np.array(J)
    return np.sqrt(np.diag(np.linalg.inv((J / (mu + 1e-12)) @ J.T)))[:4]


def test_disk_model_fits_reach_near_the_floor_of_their_pixels(sim: dict) -> None:
    """With the sharp-disk model the fits come within 1.35x of the Cramer-Rao floor of the
    pixels they use; the interpolated entry image stays near 1.6x."""
    d, ring = sim["template"], sim["ring"]
    mask = disk_mask(d, ring)
    labels = disk_labels(d, mask)
    D = (d / d.sum())[None].astype(np.float32)
    prof = measure_profile(sim["x"], sim["center"], sim["radius"])
    model = fit_entries(D, labels[None], np.array([0]), prof, sim["center"])
    x = torch.from_numpy(sim["x"].astype(np.float32))
    th0 = torch.zeros(N, 2, 3)
    th0[:, 0, 0] = th0[:, 1, 1] = 1
    cls = torch.zeros(N, dtype=torch.long)
    floor = _floor(sim, ring > 0)
    sd_disk = _errors(refine(x, cls, th0, D, mask[None], ring,
                             disks=DiskEntries.from_model(model, labels[None])), sim).std(0)
    sd_image = _errors(refine(x, cls, th0, D, mask[None], ring), sim).std(0)
    ratio_disk, ratio_image = sd_disk / floor, sd_image / floor
    assert np.all(ratio_disk < 1.35), ratio_disk
    assert np.all(ratio_disk < 0.85 * ratio_image), (ratio_disk, ratio_image)


@pytest.fixture(scope="module")
def whole(sim: dict) -> dict:
    """The sim's patterns fitted with the annulus' disks, and the model grown from them over
    the whole detector (:func:`extend_model`)."""
    d, ring = sim["template"], sim["ring"]
    mask = disk_mask(d, ring)
    labels = disk_labels(d, mask)[None]
    D = (d / d.sum())[None].astype(np.float32)
    prof = measure_profile(sim["x"], sim["center"], sim["radius"])
    ring_model = fit_entries(D, labels, np.array([0]), prof, sim["center"])
    x = torch.from_numpy(sim["x"].astype(np.float32))
    th0 = torch.zeros(N, 2, 3)
    th0[:, 0, 0] = th0[:, 1, 1] = 1
    cls = torch.zeros(N, dtype=torch.long)
    ring_fit = refine(x, cls, th0, D, mask[None], ring,
                      disks=DiskEntries.from_model(ring_model, labels))
    r_in = ring_inner_radius(sim["radius"])
    model = extend_model(x, ring_fit.theta, np.zeros(N, int), ring_model, labels,
                         np.array([0]), sim["center"], r_in)
    return {"x": x, "start": th0, "cls": cls, "D": D, "mask": mask[None], "labels": labels,
            "ring_fit": ring_fit, "model": model, "r_in": r_in}


def test_whole_detector_model_from_the_registered_patterns(sim: dict, whole: dict) -> None:
    """The model grown over the detector from the patterns' registered mean: its disks are
    the true reflections (also those the annulus and the detector's edge cut: a disc that
    runs off the detector is not whole, whatever of it lies on the detector), and its fits
    come within 1.25x of the floor of the whole detector beyond the annulus and scatter
    less than the annulus model's fits (whose floor is ~1.17x higher; measured 7-12 %
    less here, 160 patterns)."""
    cfg, d, ring = sim["cfg"], sim["template"], sim["ring"]
    model, labels = whole["model"], whole["labels"]
    n = int(model.labels.max())
    assert n > int(labels.max()) + 6, (n, int(labels.max()))
    refl = reflections(cfg, 1)
    F = rotation_matrix(cfg.global_rotation_deg)
    true = sim["origin"][::-1] + (np.linalg.inv(F).T @ refl["g"].T).T / cfg.pixel_size
    got = model.centers[0, 1:n + 1]
    err = np.hypot(got[:, None, 0] - true[None, :, 0], got[:, None, 1] - true[None, :, 1]).min(1)
    strong = model.amps[0, 1:n + 1] > 0.2 * np.median(model.amps[0, 1:n + 1])
    assert np.max(err[strong]) < 0.05, err
    region = bragg_region(d.shape, sim["center"], whole["r_in"])
    sd_whole = _errors(refine(whole["x"], whole["cls"], whole["start"], whole["D"],
                              whole["mask"], ring, disks=DiskEntries.from_model(model, labels)),
                       sim).std(0)
    sd_ring = _errors(whole["ring_fit"], sim).std(0)
    ratio = sd_whole / _floor(sim, region)
    assert np.all(ratio < 1.25), ratio
    assert np.all(sd_whole < 0.95 * sd_ring), (sd_whole, sd_ring)


def _mean_error(fit, sim: dict) -> np.ndarray:
    """Mean error of the fitted (exx, eyy, exy, theta) against the truth."""
    return np.mean(_errors(fit, sim, centred=False), 0)


def test_fits_weigh_only_the_pixels_a_pattern_recorded(sim: dict, whole: dict) -> None:
    """Re-centring by (3, 3) px leaves an empty strip along two edges of the detector, over
    outer disks.  Told which pixels were recorded (``recorded_pixels``), the fits find what
    they find on the whole patterns (measured: mean errors within 0.02 floor, spread
    1-4 % wider for the lost pixels); taking the strip for counts moves the mean strain by
    0.4-0.6 floor."""
    Q = sim["cfg"].detector
    rec = torch.from_numpy(recorded_pixels(np.tile([3, 3], (N, 1)), np.zeros((Q, Q), bool), Q))
    assert not rec[:, -3:].any() and not rec[:, :, -3:].any() and rec[:, :-3, :-3].all()
    disks = DiskEntries.from_model(whole["model"], whole["labels"])
    args = (whole["cls"], whole["start"], whole["D"], whole["mask"], sim["ring"])
    floor = _floor(sim, np.ones((Q, Q), bool))
    full = _mean_error(refine(whole["x"], *args, disks=disks), sim) / floor
    cut = whole["x"] * rec
    told = _mean_error(refine(cut, *args, disks=disks, recorded=rec), sim) / floor
    naive = _mean_error(refine(cut, *args, disks=disks), sim) / floor
    assert np.all(np.abs(told - full) < 0.1), (told, full)
    assert np.max(np.abs(naive - full)) > 0.3, (naive, full)


def test_likelihood_mean_evaluates_only_the_pixels_its_draws_move(
        sim: dict, whole: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The likelihood's mean is evaluated on the pixels some draw can move (a pixel beyond
    the profile's reach under every draw adds a constant that the importance weights'
    normalisation cancels): the fits are those of every weighed disk pixel to float32
    rounding.  With a slack of 1000 px no pixel is provably still and all are evaluated."""
    # the first 32 patterns' classes and starts; the entries, masks and ring whole
    args = (whole["cls"][:32], whole["start"][:32], whole["D"], whole["mask"], sim["ring"])
    disks = DiskEntries.from_model(whole["model"], whole["labels"])
    # one count normalised, at a dose where the likelihood's draws spread over ~0.1 px
    x = torch.poisson(whole["x"][:32] * 500.0, generator=torch.Generator().manual_seed(0)) / 500.0
    scale = torch.full((32,), 1.0 / 500.0)
    fits = []
    for slack in (refine_module.MOVING_SLACK_PX, 1e3):
        monkeypatch.setattr(refine_module, "MOVING_SLACK_PX", slack)
        fits.append(refine(x, *args, disks=disks, scale=scale, posterior=True).theta)
    assert torch.isfinite(fits[0]).all()
    assert float((fits[0] - fits[1]).abs().max()) < 2e-6
    # and the mean moved the fits off the likelihood's maximum (the test can fail)
    mode = refine(x, *args, disks=disks, scale=scale).theta
    assert float((fits[0] - mode).abs().max()) > 1e-4


LOW_DOSE = 1e3
N_LOW = 240


def test_likelihood_mean_scatters_less_than_its_maximum_at_low_dose(sim: dict) -> None:
    """At 1e3 e-/pattern the fits that report the likelihood's mean (``posterior``, the
    map's default) scatter less about the truth than its maximum, on the same Poisson draws
    (measured 1-4 % less per component here, with the annulus' disks only; 2-8 % on
    the map's own fits of the heterostructure, benchmarks/bench_fit_spread.py); on a
    noise-free pattern the two agree to a fraction of the floor."""
    cfg, d, ring = sim["cfg"], sim["template"], sim["ring"]
    Q, tg, o = cfg.detector, cfg.global_rotation_deg, sim["origin"]
    rng = np.random.default_rng(1)
    eps = rng.normal(0, 0.003, (N_LOW, 3))
    dth = rng.normal(0, 0.2, N_LOW)
    shift = rng.uniform(-0.5, 0.5, (N_LOW, 2))
    x = np.empty((N_LOW + 1, Q, Q))
    for i in range(N_LOW):
        F = rotation_matrix(tg + dth[i]) @ (np.eye(2) + np.array([[eps[i, 0], eps[i, 2]],
                                                                   [eps[i, 2], eps[i, 1]]]))
        x[i] = rng.poisson(render_pattern(cfg, F, o + shift[i], 1, total=LOW_DOSE))
    x[N_LOW] = render_pattern(cfg, rotation_matrix(tg), o, 1, total=LOW_DOSE)
    low = {**sim, "eps": np.vstack([eps, np.zeros(3)]), "dth": np.append(dth, 0.0)}
    mask = disk_mask(d, ring)
    labels = disk_labels(d, mask)[None]
    D = (d / d.sum())[None].astype(np.float32)
    prof = measure_profile(sim["x"], sim["center"], sim["radius"])
    disks = DiskEntries.from_model(fit_entries(D, labels, np.array([0]), prof, sim["center"]),
                                   labels)
    xt = torch.from_numpy((x / LOW_DOSE).astype(np.float32))
    th0 = torch.zeros(N_LOW + 1, 2, 3)
    th0[:, 0, 0] = th0[:, 1, 1] = 1
    cls = torch.zeros(N_LOW + 1, dtype=torch.long)
    scale = torch.full((N_LOW + 1,), 1.0 / LOW_DOSE)  # one count, normalised
    err = {}
    for posterior in (False, True):
        fit = refine(xt, cls, th0, D, mask[None], ring, disks=disks, scale=scale,
                     posterior=posterior)
        assert torch.isfinite(fit.theta).all()
        e = _errors(fit, low)
        err[posterior] = e + np.median(e[:N_LOW], 0) - np.median(e, 0)  # same centring
    sd_mode, sd_mean = err[False][:N_LOW].std(0), err[True][:N_LOW].std(0)
    assert np.all(sd_mean < sd_mode), (sd_mean, sd_mode)
    assert np.mean(sd_mean / sd_mode) < 0.985, (sd_mean, sd_mode)  # measured 0.971
    # noise-free: a smooth likelihood's mean is near its maximum (measured 0.07-0.11 of
    # the floor apart, the 64 draws' own sampling noise included)
    floor = _floor(sim, ring > 0) * np.sqrt(DOSE / LOW_DOSE)
    assert np.all(np.abs(err[True][N_LOW] - err[False][N_LOW]) < 0.25 * floor)


def test_whole_detector_model_fits_patterns_of_an_entry_without_disks(sim: dict) -> None:
    """Patterns registered onto an entry the model has no disks for (vacuum) are fitted on
    the annulus, as before the model grew, without failing the others' fits."""
    d, ring = sim["template"], sim["ring"]
    mask = disk_mask(d, ring)
    labels = np.stack([disk_labels(d, mask), np.zeros_like(mask, dtype=np.int32)])
    D = np.stack([d / d.sum(), np.full_like(d, 1.0 / d.size)]).astype(np.float32)
    masks = np.stack([mask, np.zeros_like(mask)])
    prof = measure_profile(sim["x"], sim["center"], sim["radius"])
    ring_model = fit_entries(D, labels, np.array([0]), prof, sim["center"])
    n = 32
    x = torch.from_numpy(sim["x"][:n].astype(np.float32))
    th0 = torch.zeros(n, 2, 3)
    th0[:, 0, 0] = th0[:, 1, 1] = 1
    model = extend_model(x, th0, np.zeros(n, int), ring_model, labels, np.array([0]),
                         sim["center"], ring_inner_radius(sim["radius"]))
    cls = torch.tensor([0, 1] * (n // 2))
    fit = refine(x, cls, th0, D, masks, ring, disks=DiskEntries.from_model(model, labels))
    assert torch.isfinite(fit.theta[cls == 0]).all()
    assert torch.isfinite(fit.cov[cls == 0]).all()


def test_neighbour_scatter_measures_the_fits_noise() -> None:
    rng = np.random.default_rng(1)
    ny, nx, sd = 20, 24, 0.002
    theta = np.zeros((ny, nx, 2, 3))
    yy, xx = np.mgrid[:ny, :nx]
    theta[..., 0, 0] = 1 + 1e-4 * xx  # a smooth field: next to nothing between neighbours
    theta[..., 1, 1] = 1
    theta[..., :2] += rng.normal(0, sd, (ny, nx, 2, 2))
    phase = np.ones((ny, nx), int)
    entry = np.zeros((ny, nx), int)
    got = neighbour_scatter(theta, entry, phase)
    # the difference of two N(0, sd) has median |.| = 0.6745 sqrt(2) sd; four components
    assert abs(got / (4 * 0.6745 * np.sqrt(2) * sd) - 1) < 0.1, got
    # vacuum and pairs across entries do not count
    assert np.isnan(neighbour_scatter(theta, entry, np.zeros_like(phase)))
    checker = (yy + xx) % 2
    assert np.isnan(neighbour_scatter(theta, checker, phase))
    # fits a symmetry turn apart (A -> A S_k) are the same lattice, no scatter
    turned = theta.copy()
    turned[..., :2] = theta[..., :2] @ rotation_matrix(60.0 * rng.integers(-2, 3, (ny, nx)))
    assert neighbour_scatter(turned, entry, phase) == pytest.approx(got, rel=1e-9)


@pytest.mark.parametrize("stray", [0, 1, 2, 3])
def test_lattice_labels_ignore_stray_disks(stray: int) -> None:
    """A low-dose entry may label a few noise blobs as disks: the lattice drawn through its
    centres is still the crystal's, and not a finer lattice that a stray centre at half a
    lattice vector would span with every true disk on it (measured at 500 e-/pattern: two
    strays in 38 made the model fall back to the annulus)."""
    Q, step, centre = 128, 19.0, np.array([63.5, 63.5])  # x, y
    rng = np.random.default_rng(stray)
    a = step * np.array([np.cos(0.3), np.sin(0.3)])
    b = step * np.array([np.cos(0.3 + np.pi / 3), np.sin(0.3 + np.pi / 3)])
    hk = np.array([(h, k) for h in range(-5, 6) for k in range(-5, 6) if (h, k) != (0, 0)])
    pts = centre + hk @ np.stack([a, b]) + rng.normal(0, 0.1, (len(hk), 2))
    r = np.hypot(*(pts - centre).T)
    pts = pts[(r > 12) & (r < 60)]
    strays = [centre + 0.5 * a, centre + 0.4 * a + 0.45 * b, centre + 1.3 * b - 0.2 * a]
    allowed = np.ones((Q, Q), bool)

    def labels_of(cents: np.ndarray) -> np.ndarray:
        n = len(cents)
        lab = np.zeros((Q, Q), int)
        lab[0, :n] = np.arange(1, n + 1)  # only the count of labels is read
        c = np.vstack([np.zeros(2), cents])
        lat = lattice_labels(lab, c, np.ones(n + 1), (centre[1], centre[0]), 4.5, allowed)
        assert lat is not None
        return lat.labels

    clean = labels_of(pts)
    got = labels_of(np.vstack([pts, strays[:stray]]) if stray else pts)
    # the same discs are labelled (numbering may differ): the same pixels, one label each
    assert np.array_equal(got > 0, clean > 0)
    assert len(np.unique(got[got > 0])) == len(np.unique(clean[clean > 0]))
