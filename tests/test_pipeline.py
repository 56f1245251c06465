"""Accuracy of what users run: `ccstae run` (ingest -> prep -> train -> map through the store)
against the simulator's ground truth, with default options.

Truth is relative to one reference lattice for the whole field (relaxed WS2), like the
result's default; errors re-reference both on the same pixels (`evaluate.strain_errors`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from ccstae_hpc import cli
from ccstae_hpc.core.config import SimConfig, TrainConfig
from ccstae_hpc.core.mapping import rereference
from ccstae_hpc.sim.evaluate import strain_errors, truth_relative
from ccstae_hpc.sim.simulate import save_simulation, truth_rows

pytestmark = pytest.mark.slow


def _run(tmp: Path, cfg: SimConfig, *extra: str) -> tuple[xr.Dataset, dict]:
    npy, _ = save_simulation(tmp / "data.npy", cfg)
    out = tmp / "data.zarr"
    assert cli.main(["run", str(npy), "--out", str(out), "--engine", "direct", "--quiet",
                     *extra]) == 0
    return xr.open_zarr(out, group="strain").load(), truth_rows(cfg)


@pytest.fixture(scope="module")
def hetero(tmp_path_factory: pytest.TempPathFactory) -> tuple[xr.Dataset, dict]:
    """Noise-free WS2 core / WSe2 shell (4.1 % mismatch) with vacuum, default options."""
    return _run(tmp_path_factory.mktemp("hetero"), SimConfig(scan=(48, 48), seed=3))


def test_heterostructure_two_phases_and_vacuum(hetero) -> None:
    ds, truth = hetero
    err = strain_errors(ds, truth)
    assert err["n_phases"] == 2, ds.attrs["phase_map"]
    assert err["acc_sample"] >= 0.99 and err["acc_phase"] >= 0.99, err


def test_heterostructure_strain_relative_to_the_core(hetero) -> None:
    """The issue's figures: against the core (WS2) lattice, noise-free MAE <= 0.05 % and
    0.03 deg, and the shell's mismatch (lattice parameter) within 0.05 %."""
    ds, truth = hetero
    core = (truth["phase"] == 1) & np.asarray(ds["sample"].values)
    err = strain_errors(rereference(ds, core), truth)
    for k in ("exx", "eyy", "exy"):
        assert err[f"mae_{k}"] <= 5e-4, (k, err)
    assert err["mae_theta"] <= 0.03, err
    assert err["lattice_change_err_WSe2"] <= 5e-4, err
    # the mismatch is there to see: the shell reads ~+4 % against the core
    shell = np.asarray(ds["phase"].values) == np.bincount(
        np.asarray(ds["phase"].values)[truth["phase"] == 2]).argmax()
    lc = np.nanmedian(rereference(ds, core)["lattice_change"].values[shell])
    assert 0.03 < lc < 0.05


def test_default_reference_is_one_lattice_for_the_field(hetero) -> None:
    ds, truth = hetero
    assert ds.attrs["reference_mode"] == "global"
    assert "largest phase" in ds.attrs["reference"]
    err = strain_errors(ds, truth)  # against the automatic reference
    for k in ("exx", "eyy", "exy"):
        assert err[f"mae_{k}"] <= 5e-4, (k, err)
    lattice = json.loads(ds.attrs["reference_lattice"])
    assert lattice["found"] and abs(lattice["angle_deg"] - 120) < 1.0
    phases = json.loads(ds.attrs["phases"])
    assert [p["phase"] for p in phases] == [0, 1, 2]
    assert sum(p["pixels"] for p in phases) == 48 * 48


def test_single_phase_is_one_phase_whatever_num_base(tmp_path: Path) -> None:
    """One phase (no shell) with the default --num-base 3 ends with one sample phase, and its
    strain carries no offsets between dictionary entries."""
    cfg = SimConfig(scan=(32, 32), seed=1, heterostructure=False)
    ds, truth = _run(tmp_path, cfg)
    err = strain_errors(ds, truth)
    assert err["n_phases"] == 1, ds.attrs["phase_map"]
    assert err["acc_sample"] >= 0.99, err
    for k in ("exx", "eyy", "exy"):
        assert err[f"mae_{k}"] <= 5e-4, (k, err)
    assert err["mae_theta"] <= 0.03, err


def test_heterostructure_at_1e3_with_a_larger_dictionary(hetero_1e3_run,
                                                         hetero_1e3_single) -> None:
    """1e3 e-/pattern, --num-base 4 (one more entry than phases + vacuum): still two phases.
    With the default, data-chosen pooling the errors fall well below the single-pattern
    floor; the single-pattern fits (``ccstae map --pool-sigma 0`` on the same store) sit near
    the Cramer-Rao floor (0.14 % at this dose), and their standard errors match their scatter
    about the truth."""
    store, cfg = hetero_1e3_run
    ds, truth = xr.open_zarr(store, group="strain").load(), truth_rows(cfg)
    err = strain_errors(ds, truth)
    assert err["n_phases"] == 2, ds.attrs["phase_map"]
    assert err["acc_sample"] >= 0.98 and err["acc_phase"] >= 0.98, err
    pooling = json.loads(ds.attrs["pooling"])["phases"]
    assert all(v["sigma_px"] > 0 for v in pooling.values()), pooling
    for k in ("exx", "eyy", "exy"):
        assert err[f"mae_{k}"] <= 0.0018, (k, err)
    assert err["mae_theta"] <= 0.08, err

    # the same store re-mapped by `ccstae map --pool-sigma 0`
    single = xr.open_zarr(hetero_1e3_single, group="strain").load()
    err1 = strain_errors(single, truth)
    for k in ("exx", "eyy"):
        assert err1[f"mae_{k}"] <= 0.0035, (k, err1)
    assert err1["mae_exy"] <= 0.0025 and err1["mae_theta"] <= 0.15, err1
    tr = truth_relative(single, truth)
    for k in ("exx", "eyy", "exy", "theta"):
        d = single[k].values - tr[k]
        sd = single[f"{k}_std"].values
        m = np.isfinite(d) & np.isfinite(sd) & single["fit_ok"].values
        # errors over their own standard errors: ~N(0, 1) when the errors are calibrated
        z = d[m] / sd[m]
        inside = float(np.mean(np.abs(z) <= 1))
        assert 0.58 <= inside <= 0.78, (k, inside)


def test_strong_diffuse_background_keeps_vacuum_and_both_phases(tmp_path: Path) -> None:
    """The original paper's diffuse background at weight 0.5 (half of every pattern in the
    Lorentzian halo) at 1e3 e-/pattern: the learned vacuum entry keeps 0.15 of the strongest
    entry's Bragg contrast there (0.01 without background), so vacuum is decided from
    preprocessing's data-derived vacuum flags of the entries' patterns; two sample phases,
    vacuum where the truth has it, and the strain of a pooled map (was: a third "phase" of
    vacuum pixels, WS2 in the wrong frame, exx MAE 1.6 %)."""
    cfg = SimConfig(scan=(32, 32), dose=1000.0, seed=3, background_weight=0.5)
    ds, truth = _run(tmp_path, cfg)
    err = strain_errors(ds, truth)
    assert err["n_phases"] == 2, ds.attrs["phase_map"]
    # the maps record that the flags decided: every entry holding calibration patterns
    record = json.loads(ds.attrs["vacuum_entries"])
    assert any(record["vacuum"]) and "flags" in record["decided_by"], record
    assert record["decided_by"][record["vacuum"].index(True)] == "flags", record
    # 94 % of the sample pixels in their phase (99 % without background): the halo halves
    # the Bragg signal that tells WS2 from WSe2 near the interface
    assert err["acc_sample"] >= 0.99 and err["acc_phase"] >= 0.92, err
    for k in ("exx", "eyy"):
        assert err[f"mae_{k}"] <= 0.004, (k, err)
    assert err["mae_exy"] <= 0.002 and err["mae_theta"] <= 0.2, err


def test_small_scan_trains_long_enough_to_keep_the_phases(tmp_path: Path) -> None:
    """A 20x20 scan is 6 steps per epoch: the default (at least TrainConfig.min_steps steps)
    separates WS2/WSe2."""
    steps = TrainConfig().min_steps
    assert TrainConfig().epochs_for(6) == -(-steps // 6) and TrainConfig().epochs_for(64) == 6
    assert TrainConfig(epochs=2).epochs_for(6) == 2
    ds, truth = _run(tmp_path, SimConfig(scan=(20, 20), detector=64, dose=1000.0, seed=0))
    assert json.loads(ds.attrs["train_config"])["epochs"] is None
    err = strain_errors(ds, truth)
    assert err["acc_sample"] >= 0.98 and err["acc_phase"] >= 0.98, err


def test_result_contract(hetero) -> None:
    ds, _ = hetero
    for v in ("exx", "eyy", "exy", "theta", "lattice_change", "dilatation", "phase", "entry",
              "sample", "residual", "reference", "fit_ok", "exx_std", "eyy_std", "exy_std",
              "theta_std"):
        assert ds[v].dims == ("scan_y", "scan_x"), v
    assert ds["deformation"].dims == ("scan_y", "scan_x", "i", "j")
    assert ds["sample"].dtype == bool
    assert np.isnan(ds["exx"].values[~ds["sample"].values]).all()
    for a in ("conventions", "model_config", "train_config", "map_config", "reference",
              "reference_mode", "reference_lattice", "reference_deformation", "phases",
              "phase_map", "entry_relations", "pooling"):
        assert a in ds.attrs, a
