"""strain_errors against hand-built truth: F fields made with rotation_matrix, no simulator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from ccstae_hpc.core.config import MapConfig
from ccstae_hpc.core.strain import rotation_matrix
from ccstae_hpc.sim import evaluate

NY, NX = 18, 24
THETA0 = {1: 17.0, 2: 23.0}  # absolute lattice rotation per phase: the references must differ


def _truth() -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """Truth with vacuum | WS2 | WSe2 columns and analytically known relative strain.

    ``F = R(dtheta) U_lab R(theta0)``: with ``dtheta = 0`` and ``U_lab = I`` in the reference
    rows the reference is ``R(theta0)`` exactly, so ``T = F F_ref^-1 = R(dtheta) U_lab`` and the
    relative strain is ``U_lab - I`` and the rotation ``dtheta``, known without strain.py.
    """
    yy, xx = np.mgrid[0:NY, 0:NX].astype(np.float64)
    phase = np.zeros((NY, NX), np.uint8)
    phase[:, 8:16] = 1
    phase[:, 16:] = 2
    ref = np.zeros((NY, NX), bool)
    ref[:4, :] = True  # spans all three columns: per-phase reference pixels exist for each

    exx = 0.01 * np.sin(2 * np.pi * xx / NX) * (yy >= 4)
    eyy = -0.005 * np.cos(2 * np.pi * yy / NY) * (yy >= 4)
    exy = 0.003 * (xx - NX / 2) / NX * (yy >= 4)
    dtheta = 1.5 * np.sin(2 * np.pi * yy / NY) * (yy >= 4)
    U = np.stack([np.stack([1 + exx, exy], -1), np.stack([exy, 1 + eyy], -1)], -2)
    theta0 = np.where(phase == 2, THETA0[2], THETA0[1])
    F = rotation_matrix(dtheta) @ U @ rotation_matrix(theta0)
    # a 60 deg symmetry-equivalent branch on some pixels: the unwrapping must undo it
    F[1::3, 1::2] = F[1::3, 1::2] @ rotation_matrix(60.0)
    F[phase == 0] = np.nan
    vac = phase == 0
    exact = {"exx": exx, "eyy": eyy, "exy": exy, "theta": dtheta}
    exact = {k: np.where(vac, np.nan, v) for k, v in exact.items()}
    return {"phase": phase, "F": F}, exact, ref


def _dataset(pred_phase: np.ndarray, maps: dict[str, np.ndarray], ref: np.ndarray,
             mode: str = "per_phase") -> xr.Dataset:
    dims = ("scan_y", "scan_x")
    sample = np.isfinite(maps["exx"])
    data = {k: (dims, np.where(sample, maps[k], np.nan).astype(np.float32)) for k in maps}
    data["phase"] = (dims, pred_phase.astype(np.int16))
    data["sample"] = (dims, sample)
    data["reference"] = (dims, ref & sample)
    data["residual"] = (dims, np.zeros(pred_phase.shape, np.float32))
    return xr.Dataset(data, attrs={"map_config": MapConfig().to_json(), "reference_mode": mode})


def test_global_reference_shows_the_mismatch_of_a_phase() -> None:
    """One reference lattice (the default): WSe2 4.1 % larger than the WS2 reference region
    must read +4.1 % in exx and eyy, and a prediction that hides it is wrong by that much."""
    truth, exact, ref = _truth()
    mismatch = 3.282 / 3.153
    F = np.where((truth["phase"] == 2)[..., None, None],
                 mismatch * truth["F"] @ rotation_matrix(THETA0[1] - THETA0[2]), truth["F"])
    truth = {**truth, "F": F}
    ref1 = ref & (truth["phase"] == 1)
    ws2e = truth["phase"] == 2
    right = {k: v.copy() for k, v in exact.items()}
    right["exx"][ws2e] = mismatch * (1 + exact["exx"][ws2e]) - 1
    right["eyy"][ws2e] = mismatch * (1 + exact["eyy"][ws2e]) - 1
    right["exy"][ws2e] = mismatch * exact["exy"][ws2e]
    d = evaluate.strain_errors(_dataset(truth["phase"].astype(np.int16), right, ref1, "global"),
                               truth)
    for k in evaluate.COMPONENTS:
        assert d[f"mae_{k}"] < (1e-4 if k == "theta" else 1e-6), k
    assert d["lattice_change_err_WSe2"] < 1e-6
    d = evaluate.strain_errors(_dataset(truth["phase"].astype(np.int16), exact, ref1, "global"),
                               truth)
    assert abs(d["mae_exx_WSe2"] - (mismatch - 1)) < 2e-3
    assert abs(d["lattice_change_err_WSe2"] - (mismatch - 1)) < 1e-3


def test_perfect_prediction_has_zero_error() -> None:
    truth, exact, ref = _truth()
    ds = _dataset(truth["phase"].astype(np.int16), exact, ref)
    d = evaluate.strain_errors(ds, truth)
    assert d["acc_sample"] == 1.0
    assert d["acc_phase"] == 1.0
    assert d["n_eval"] == d["n_both_sample"] == (truth["phase"] > 0).sum()
    for k in evaluate.COMPONENTS:
        # float32 storage of the prediction is the only error source
        tol = 1e-4 if k == "theta" else 1e-7
        assert d[f"mae_{k}"] < tol, k
        assert d[f"max_{k}"] < 10 * tol, k
        assert d[f"mae_{k}_WS2"] < tol and d[f"mae_{k}_WSe2"] < tol


def test_truth_relative_matches_analytic_strain() -> None:
    truth, exact, ref = _truth()
    ds = _dataset(truth["phase"].astype(np.int16), exact, ref)
    rel = evaluate.truth_relative(ds, truth)
    sample = truth["phase"] > 0
    for k in evaluate.COMPONENTS:
        np.testing.assert_allclose(rel[k][sample], exact[k][sample], atol=1e-10)
        assert np.isnan(rel[k][~sample]).all()


def test_single_reference_for_both_phases_would_be_wrong() -> None:
    # guards the per-phase reference: one class for both phases mixes 17 and 23 deg lattices
    truth, exact, ref = _truth()
    one_class = np.where(truth["phase"] > 0, 0, 1).astype(np.int16)
    ds = _dataset(one_class, exact, ref)
    d = evaluate.strain_errors(ds, truth)
    assert d["mae_theta"] > 1.0


def test_permuted_labels_still_perfect() -> None:
    truth, exact, ref = _truth()
    perm = np.array([2, 0, 1], np.int16)[truth["phase"]]  # vacuum->2, WS2->0, WSe2->1
    ds = _dataset(perm, exact, ref)
    assert evaluate.match_labels(perm, truth["phase"]) == {0: 1, 1: 2, 2: 0}
    d = evaluate.strain_errors(ds, truth)
    assert d["acc_sample"] == 1.0
    assert d["acc_phase"] == 1.0
    assert d["mae_exx"] < 1e-7


def test_known_offsets_give_known_mae() -> None:
    truth, exact, ref = _truth()
    offsets = {"exx": 1e-3, "eyy": -2e-3, "exy": 5e-4, "theta": 0.5}
    shifted = {k: exact[k] + offsets[k] for k in exact}
    ds = _dataset(truth["phase"].astype(np.int16), shifted, ref)
    d = evaluate.strain_errors(ds, truth)
    for k, off in offsets.items():
        tol = 1e-4 if k == "theta" else 1e-6
        assert d[f"mae_{k}"] == pytest.approx(abs(off), abs=tol)
        assert d[f"p95_{k}"] == pytest.approx(abs(off), abs=tol)
        assert d[f"mae_{k}_WSe2"] == pytest.approx(abs(off), abs=tol)


def test_misclassified_and_missed_pixels_lower_accuracy() -> None:
    truth, exact, ref = _truth()
    pred = truth["phase"].astype(np.int16)
    pred[10:, 8:10] = 2  # 16 WS2 pixels called WSe2
    maps = {k: v.copy() for k, v in exact.items()}
    maps["exx"][0, 20] = np.nan  # one sample pixel predicted as vacuum
    ds = _dataset(pred, maps, ref)
    d = evaluate.strain_errors(ds, truth)
    n_all, n_sample = NY * NX, int((truth["phase"] > 0).sum())
    assert d["acc_phase"] == pytest.approx(1 - 16 / n_sample)
    assert d["acc_sample"] == pytest.approx(1 - 1 / n_all)
    assert d["n_both_sample"] == n_sample - 1


def test_theta_error_wraps_at_symmetry_period() -> None:
    assert evaluate.wrap_angle(np.array([59.5, -59.5, 30.0, 0.2]), 6) == pytest.approx(
        [-0.5, 0.5, 30.0, 0.2]
    )
    assert evaluate.wrap_angle(np.array([359.0]), 1) == pytest.approx([-1.0])


def test_symmetry_read_from_attrs() -> None:
    ds = xr.Dataset(attrs={"map_config": json.dumps(MapConfig(symmetry=2).to_dict())})
    assert evaluate.symmetry_of(ds) == 2
    assert evaluate.symmetry_of(xr.Dataset()) == MapConfig().symmetry


def test_format_errors_and_summary_print() -> None:
    truth, exact, ref = _truth()
    ds = _dataset(truth["phase"].astype(np.int16), exact, ref)
    text = evaluate.format_errors(evaluate.strain_errors(ds, truth))
    assert "MAE" in text and "theta (deg)" in text and "exx (%)" in text
    summary = evaluate.summarize(ds)
    assert f"scan {NY} x {NX}" in summary and "phase 2" in summary


def test_load_truth_decodes_config(tmp_path) -> None:
    truth, _, _ = _truth()
    path = tmp_path / "x.truth.npz"
    np.savez(path, config=json.dumps({"seed": 3}), **truth)
    loaded = evaluate.load_truth(path)
    assert loaded["config"] == {"seed": 3}
    np.testing.assert_array_equal(loaded["phase"], truth["phase"])


def test_strain_figure_writes_png(tmp_path) -> None:
    # plot.py reuses truth_relative/strain_errors; a smoke test that the figure renders
    from ccstae_hpc import plot

    truth, exact, ref = _truth()
    ds = _dataset(truth["phase"].astype(np.int16), exact, ref)
    for t, name in ((truth, "with_truth.png"), (None, "alone.png")):
        path = plot.strain_figure(ds, t, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.loss_figure([3.0, 2.0, 1.0], tmp_path / "loss.png").stat().st_size > 0
