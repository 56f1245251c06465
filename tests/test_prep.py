"""Preprocessing stage on real Zarr stores, on threads and on a real Dask cluster."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.core.patterns import find_hot_pixels, fit_descan
from ccstae_hpc.sim.simulate import save_simulation
from ccstae_hpc.stages.ingest import ingest
from ccstae_hpc.stages.prep import PrepConfig, PrepError, preprocess_store, read_patterns
from ccstae_hpc.stages.store import StageExistsError


@pytest.fixture(scope="module")
def sim_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    cfg = SimConfig(scan=(24, 20), dose=1000.0, seed=5, drift_px=4.0)
    npy, truth_path = save_simulation(d / "sim.npy", cfg)
    truth = dict(np.load(truth_path))
    store = d / "s.zarr"
    ingest(npy, store)
    return store, truth, cfg


@pytest.fixture(scope="module")
def prepped(sim_store):
    store, truth, cfg = sim_store
    g = preprocess_store(store, PrepConfig(rows_per_block=5, max_train=300, shard_size=128))
    return g, truth, cfg


def test_dead_pixels_found_in_counts_only():
    """Zeroed detector pixels (one inside a Bragg disk, one in the background, single ones
    along the detector's edge) are found in a mean of counts wherever their neighbours'
    counts make the loss significant (here: >= 2 nsigma^2 expected counts over the
    patterns), and nothing else is, at 1e4 and 1e3 e-/pattern; float data (no Poisson
    scale) flag none; neither is the 32x32 heterostructure at 1e4 e-, whose disks cut by
    the detector's edge looked dead to a version that mirrored the edge."""
    from ccstae_hpc.core.patterns import find_dead_pixels
    from ccstae_hpc.sim.simulate import simulate

    nsigma = 8.0
    for dose in (1e4, 1e3):
        x, _ = simulate(SimConfig(scan=(16, 16), dose=dose, seed=2))
        x = x.reshape(-1, *x.shape[-2:]).astype(np.float64)
        m = x.mean(0)
        assert not find_dead_pixels(m, nsigma, len(x)).any()
        dead = np.zeros(m.shape, bool)
        dead[np.unravel_index(np.argsort(m, axis=None)[-200], m.shape)] = True  # in a disk
        dead[40, 100] = True
        c = int(np.argmax(m[0]))  # single pixels on the edge row's brightest stretch
        dead[0, max(c - 6, 0):c + 7:3] = True
        x[:, dead] = 0
        found = find_dead_pixels(x.mean(0), nsigma, len(x))
        assert not (found & ~dead).any(), np.argwhere(found & ~dead)
        findable = dead & (m * len(x) >= 2 * nsigma**2)
        assert np.all(found[findable]), (dose, np.argwhere(findable & ~found))
        assert found[0].any() if dose == 1e4 else found.any()
        assert not find_dead_pixels(x.mean(0), nsigma, None).any()
    x, _ = simulate(SimConfig(scan=(32, 32), dose=1e4, seed=3))
    x = x.reshape(-1, *x.shape[-2:])
    assert not find_dead_pixels(x.mean(0, dtype=np.float64), nsigma, len(x)).any()


def test_dead_pixels_repaired_and_never_fitted(sim_store, tmp_path):
    """A store whose detector has dead pixels (one row along its edge, one pixel inside):
    preprocessing finds them, repairs them like hot pixels, records them in
    ``prep/hot_pixels`` and ``n_dead_pixels``, and no fit sees them as recorded counts."""
    import shutil

    from ccstae_hpc.stages.prep import read_recorded

    store = tmp_path / "dead.zarr"
    shutil.copytree(sim_store[0], store)
    raw = zarr.open_array(str(store), path="raw", mode="r+")
    x = raw[...]
    m = x.reshape(-1, *x.shape[-2:]).mean(0, dtype=np.float64)
    dead = np.zeros(m.shape, bool)
    # pixels that receive enough electrons for their loss to show at 1e3 e-/pattern: in the
    # Bragg disks
    for rank in (100, 150, 200, 300):
        dead[np.unravel_index(np.argsort(m, axis=None)[-rank], m.shape)] = True
    r, c = np.argwhere(dead)[0]
    x[..., dead] = 0
    raw[...] = x
    g = preprocess_store(store, PrepConfig(rows_per_block=5, max_train=64, shard_size=64),
                         overwrite=True)
    bad = g["hot_pixels"][...]
    assert np.all(bad[dead]) and g.attrs["n_dead_pixels"] == int(dead.sum())
    hot_truth = {tuple(p) for p in sim_store[1]["hot_pixels"]}
    # the hot pixels are the detector's, none next to a dead one
    assert {tuple(p) for p in np.argwhere(bad & ~dead)} == hot_truth
    assert g.attrs["n_hot_pixels"] == len(hot_truth)
    rec = read_recorded(store, 0, 2)
    shift = g["shift"][0:2].reshape(-1, 2)
    for one, (dy, dx) in zip(rec, shift, strict=True):
        # the dead pixels, where the re-centring moved them, hold no recorded count
        assert not one[r - dy, c - dx]


def test_descan_recovered_to_005_px(prepped):
    g, truth, _ = prepped
    err = np.abs(g["origin_fit"][...] - truth["origin"])
    assert err.max() < 0.05, err.max()


def test_hot_pixels_and_vacuum(prepped):
    g, truth, _ = prepped
    hot = np.argwhere(g["hot_pixels"][...])
    assert sorted(map(tuple, hot)) == sorted(map(tuple, truth["hot_pixels"]))
    assert np.mean(g["vacuum"][...] == (truth["phase"] == 0)) >= 0.99


def test_patterns_recentred_and_normalised(sim_store, prepped):
    g, truth, _ = prepped
    store = sim_store[0]
    counts = g["patterns"][...]
    # counts stay counts (lossless): the raw integer dtype, hot pixels repaired to integers
    assert counts.shape == (24, 20, 128, 128) and counts.dtype == np.uint16
    pat = read_patterns(store, 0, 24)
    assert pat.dtype == np.float32
    np.testing.assert_allclose(pat, counts * g["scale"][...][..., None, None], rtol=1e-6)
    assert np.allclose(pat.mean((-1, -2)), 1.0, atol=1e-4)
    # integer re-centring: every residual origin offset is under a pixel
    rest = truth["origin"] - g["shift"][...] - 63.5
    assert np.abs(rest).max() < 1.0
    # hot pixels were repaired before re-centring: none survive in the mean pattern
    assert not find_hot_pixels(g["mean"][...], n=480).any()


def test_training_shards_and_attrs(prepped):
    g, _, cfg = prepped
    t = g["train"]
    assert t.shape == (300, 128, 128) and t.chunks[0] == 128 and t.dtype == np.uint16
    # the shuffled shards are patterns of prep/patterns with their scale
    pat = g["patterns"][...].reshape(-1, 128 * 128)
    ts = g["train_scale"][...]
    idx = g["train_index"][...]
    assert idx.shape == (300,) and len(np.unique(idx)) == 300
    for j in (0, 150, 299):
        hit = np.nonzero((pat == t[j].ravel()).all(1))[0]
        assert len(hit) == 1 and g["scale"][...].ravel()[hit[0]] == ts[j]
        # train_index says where each training pattern sits in the scan
        assert hit[0] == idx[j]
    assert g.attrs["complete"] and g.attrs["config"]["max_train"] == 300
    lat = g.attrs["lattice"]
    assert lat["found"] and abs(lat["angle_deg"] - 60) < 2
    # first-order disks at 19.2-20 px (WSe2/WS2) for the simulator's pixel size
    assert all(18.5 < v < 20.7 for v in lat["lengths_px"])
    assert g["mask"][...].sum() > 0


def test_rerun_is_a_no_op_and_other_settings_need_overwrite(sim_store, prepped):
    store, _, _ = sim_store
    cfg = PrepConfig(rows_per_block=5, max_train=300, shard_size=128)
    before = zarr.open_group(str(store), mode="r")["prep"].attrs["elapsed_s"]
    g = preprocess_store(store, cfg)
    assert g.attrs["elapsed_s"] == before
    with pytest.raises(StageExistsError, match="--overwrite"):
        preprocess_store(store, PrepConfig(rows_per_block=5, max_train=200))


def test_dask_cluster_gives_identical_patterns(sim_store, prepped, tmp_path):
    from distributed import Client, LocalCluster

    store, _, _ = sim_store
    g0, _, _ = prepped
    ref = g0["patterns"][...]
    import shutil

    other = tmp_path / "copy.zarr"
    shutil.copytree(store, other)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cl, Client(cl) as client:
        g = preprocess_store(other, PrepConfig(rows_per_block=5, max_train=300, shard_size=128),
                             client=client, overwrite=True)
        np.testing.assert_array_equal(g["patterns"][...], ref)


def test_raw_missing_gives_clear_error(tmp_path):
    zarr.open_group(str(tmp_path / "e.zarr"), mode="w", zarr_format=3)
    with pytest.raises(PrepError, match="ccstae ingest"):
        preprocess_store(tmp_path / "e.zarr")


def test_fit_descan_is_robust_to_outliers():
    ny, nx = 30, 30
    yy, xx = np.mgrid[0:ny, 0:nx] / 29.0
    o = np.stack([60 + 3 * yy + 0.5 * xx**2, 64 - 2 * xx], -1)
    bad = o.copy()
    bad[3, 4] += 25
    fit, _ = fit_descan(bad, 2)
    assert np.abs(fit - o).max() < 1e-6


def test_subpixel_recentring_puts_every_origin_on_the_centre(sim_store, tmp_path):
    """recentre="subpixel": the re-centred patterns' own disk centres fit to the detector
    centre within 0.05 px over the scan (4 px of simulated descan drift removed)."""
    import shutil

    from ccstae_hpc.core.patterns import measure_origins

    store = tmp_path / "sub.zarr"
    shutil.copytree(sim_store[0], store)
    g = preprocess_store(store, PrepConfig(rows_per_block=5, max_train=64, shard_size=64,
                                           recentre="subpixel"), overwrite=True)
    pat = g["patterns"][...]
    assert pat.dtype == np.float32 and g["shift"].dtype == np.float32
    c = np.array(g.attrs["center"])
    np.testing.assert_allclose(c, 63.5, atol=0.05)
    origin, _ = measure_origins(pat.copy(), np.zeros(pat.shape[-2:], bool), c,
                         g.attrs["disk_radius"], 2 * g.attrs["disk_radius"] + 2)
    fit, _ = fit_descan(origin, 2)
    assert np.abs(fit - 63.5).max() < 0.05, np.abs(fit - 63.5).max()


def test_binning_sums_counts_exactly():
    from ccstae_hpc.core.patterns import recentred

    rng = np.random.default_rng(0)
    block = rng.poisson(3.0, (2, 3, 256, 260)).astype(np.uint16)
    want = block.astype(np.int64).reshape(2, 3, 128, 2, 130, 2).sum((3, 5))[..., :, 1:129]
    counts, scale = recentred(block.copy(), np.zeros((256, 260), bool),
                               np.zeros((2, 3, 2), np.int64), 128)
    assert counts.dtype == np.uint32
    np.testing.assert_array_equal(counts, want)
    np.testing.assert_allclose(scale, 128 * 128 / want.sum((-1, -2)), rtol=1e-6)


@pytest.mark.parametrize(("raw", "size", "subpixel"), [(64, 64, False), (130, 64, False),
                                                      (64, 64, True)])
def test_recorded_pixels_are_those_recentring_filled_with_counts(raw, size, subpixel):
    """``recorded_pixels`` marks the pixels of ``recentred``'s output made only of detector
    pixels: not the strips a shift uncovers, nor bins or interpolations that reach into
    them, nor a repaired hot pixel.  Reference: ``recentred`` of a detector that reads 1
    everywhere except 0 on its hot pixels gives the full value exactly there."""
    from ccstae_hpc.core.patterns import recentred, recorded_pixels

    rng = np.random.default_rng(1)
    hot = np.zeros((raw, raw), bool)
    hot[5, 7] = hot[raw // 2, 0] = True
    if subpixel:
        shift = rng.uniform(-3.5, 3.5, (2, 5, 2)).astype(np.float32)
    else:
        shift = rng.integers(-3, 4, (2, 5, 2)).astype(np.int16)
    shift[0, 0] = 0
    ones = np.broadcast_to((~hot).astype(np.float32), (2, 5, raw, raw)).copy()
    out, _ = recentred(ones, np.zeros_like(hot), shift, size)
    full = (raw // size) ** 2
    want = np.isclose(out, full, rtol=0, atol=1e-5)
    rec = recorded_pixels(shift, hot, size).reshape(out.shape)
    np.testing.assert_array_equal(rec, want)
    if not subpixel:
        assert (~rec[0, 0]).sum() == 2  # unshifted: only the two hot pixels
    assert (~rec).sum() > 5 * size  # the strips


def test_radial_background_removes_the_diffuse_halo(sim_store, prepped, tmp_path):
    """background="radial": between the Bragg disks the model input drops to ~0 (the
    simulator's diffuse Lorentzian halo); the disks and the stored counts stay."""
    import shutil

    from ccstae_hpc.core.patterns import ring_mask

    g0 = prepped[0]
    store = tmp_path / "bg.zarr"
    shutil.copytree(sim_store[0], store)
    g = preprocess_store(store, PrepConfig(rows_per_block=5, max_train=64, shard_size=64,
                                           background="radial"), overwrite=True)
    np.testing.assert_array_equal(g["patterns"][...], g0["patterns"][...])
    assert not g0["background"][...].any()
    bg = g["background"][...]
    x0 = read_patterns(sim_store[0], 0, 24).mean((0, 1))
    x1 = read_patterns(store, 0, 24).mean((0, 1))
    np.testing.assert_allclose(x1, x0 - bg, rtol=1e-4, atol=1e-5)
    r_in = 2 * g0.attrs["disk_radius"] + 2
    ring = ring_mask((128, 128), tuple(g0.attrs["center"]), r_in + 2) > 0
    off = ring & (g0["mask"][...] == 0)
    halo0, halo1 = x0[off].mean(), x1[off].mean()
    assert halo0 > 0.05 and abs(halo1) < 0.05 * halo0, (halo0, halo1)
    # the disks keep their intensity above the halo
    disks = ring & (g0["mask"][...] > 0)
    assert np.percentile(x1[disks], 90) > 0.8 * np.percentile(x0[disks], 90)
    assert g.attrs["config"]["background"] == "radial"


def test_cli_preprocess_on_workers_matches_threads_and_closes_its_cluster(sim_store, tmp_path):
    """`ccstae preprocess --workers 2` as a user runs it: the same patterns as in this
    process, and no worker process left behind once the command returns."""
    import shutil

    import psutil

    from ccstae_hpc import cli

    store, _, _ = sim_store
    a, b = (shutil.copytree(store, tmp_path / n, ignore=shutil.ignore_patterns("prep*"))
            for n in ("a.zarr", "b.zarr"))
    assert cli.main(["preprocess", str(a)]) == 0
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    assert cli.main(["preprocess", str(b), "--workers", "2"]) == 0
    # multiprocessing's own helpers (fork server, resource tracker) live with this process
    helpers = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")
    left = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in before and p.is_running()
            and not any(h in " ".join(p.cmdline()) for h in helpers)]
    assert not left, [p.cmdline() for p in left]
    ga = zarr.open_group(str(a), mode="r")["prep"]
    gb = zarr.open_group(str(b), mode="r")["prep"]
    np.testing.assert_array_equal(ga["patterns"][...], gb["patterns"][...])
    np.testing.assert_array_equal(ga["vacuum"][...], gb["vacuum"][...])
