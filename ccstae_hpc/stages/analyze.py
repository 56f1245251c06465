"""Analyze stage: the store's ``strain`` group -> its ``analysis`` group.

``xr.open_zarr(STORE, group="analysis")`` holds (the contract users and their scripts read):

* derived maps on ``(scan_y, scan_x)``: ``dilatation``, ``lattice_change``, ``max_shear``,
  ``e1``, ``e2``, ``principal_direction``, ``dtheta_dx``, ``dtheta_dy``,
  ``lattice_curvature``, and the dislocation maps ``closure_failure`` (``|b|`` of the test
  circuit centred on each pixel) and ``closure_significance`` (its chi over the noise);
* a table along ``dislocation``: ``y``, ``x`` (scan px), ``burgers_x``, ``burgers_y``
  (Angstrom in the scan frame when the scan step is calibrated, else scan steps),
  ``burgers_h``, ``burgers_k`` (reference lattice units, rounded; NaN when the lattice or the
  scan step is not known) and ``confidence``;
* the ripple: ``ripple_wavelength_px``, ``ripple_direction_deg`` (wave vector, from +x
  toward +y, in [0, 180)), ``ripple_amplitude_deg`` (corrected for the map stage's Gaussian
  pooling; NaN with the reason in the attrs when there is no significant ripple).

The numerics are :mod:`ccstae_hpc.core.analysis`; :func:`analysis_dataset` builds the
Dataset from an in-memory ``strain`` Dataset, :func:`analyze_store` reads and writes the
store with the stage contract of :mod:`ccstae_hpc.stages.store` (staging group, commit,
refusal to replace a complete group without ``overwrite``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ccstae_hpc import __version__
from ccstae_hpc.core import analysis as an
from ccstae_hpc.core.config import AnalyzeConfig
from ccstae_hpc.core.strain import POOL_TRUNCATE
from ccstae_hpc.stages.store import (
    check_stage,
    commit,
    discard_staging,
    open_root,
    open_strain,
    staging,
    with_pixel_coords,
    write_group,
)

__all__ = ["ANALYSIS", "CIRCUIT_CONVENTION", "analysis_dataset", "analyze_store",
           "summarize_analysis"]

ANALYSIS = "analysis"
CIRCUIT_CONVENTION = (
    "b = closed integral of (T - I) dl, T = R(theta) (I + eps) the deformation relative to "
    "the reference lattice, around a rectangular circuit through pixel centres run "
    "counter-clockwise in the (x, y) frame (turning +x toward +y; clockwise on a display with "
    "y down), trapezoid rule along each edge; to first order in the distortion the FS/RH "
    "Burgers vector for the line direction xi = x cross y (into a y-down display)"
)
DIMS = ("scan_y", "scan_x")
# cores listed one by one in the summary; more are counted only
SUMMARY_MAX_CORES = 5


def analyze_store(store_path: str | os.PathLike[str], cfg: AnalyzeConfig | None = None,
                  overwrite: bool = False) -> xr.Dataset:
    """Write the ``analysis`` group of the store from its ``strain`` group; return it.

    Raises
    ------
    FileNotFoundError
        No store or no ``strain`` group (run the map stage first).
    StageExistsError
        ``analysis`` is complete and ``overwrite`` is False.
    """
    t0 = time.perf_counter()
    cfg = cfg or AnalyzeConfig()
    store = Path(store_path)
    strain = open_strain(store)
    check_stage(store, ANALYSIS, overwrite)
    root = open_root(store)
    calibration = dict(root["raw"].attrs.get("calibration", {}) or {}) if "raw" in root else {}
    ds = analysis_dataset(strain.load(), cfg, calibration)
    # the stage's time, as the other stages record theirs (store.stage_timings)
    ds = ds.assign_attrs(complete=True, elapsed_s=time.perf_counter() - t0)
    discard_staging(store, ANALYSIS)
    write_group(with_pixel_coords(ds), store, staging(ANALYSIS))
    commit(store, ANALYSIS)
    return ds


def summarize_analysis(ds: xr.Dataset, max_cores: int = SUMMARY_MAX_CORES) -> str:
    """A few lines for people: the dislocations found (each listed when there are at most
    ``max_cores``) and the ripple, or why there is none."""
    n = int(ds.sizes.get("dislocation", 0))
    unit = ds.attrs.get("burgers_unit", "scan step")
    unit = "A" if unit == "Angstrom" else unit
    lines = [f"dislocations: {n} found" + (":" if 0 < n <= max_cores else "")]
    if 0 < n <= max_cores:
        for i in range(n):
            h, k = (float(ds[c].values[i]) for c in ("burgers_h", "burgers_k"))
            bx, by = (float(ds[c].values[i]) for c in ("burgers_x", "burgers_y"))
            hk = f"(h, k) = ({h:+.0f}, {k:+.0f}), " if np.isfinite([h, k]).all() else ""
            lines.append(f"  core at y = {float(ds['y'].values[i]):.1f}, "
                         f"x = {float(ds['x'].values[i]):.1f} px: b {hk}"
                         f"(bx, by) = ({bx:+.2f}, {by:+.2f}) {unit}, "
                         f"confidence {float(ds['confidence'].values[i]):.1f}")
    lam = float(ds["ripple_wavelength_px"])
    if np.isfinite(lam):
        lines.append(f"ripple: wavelength {lam:.1f} px, direction "
                     f"{float(ds['ripple_direction_deg']):.1f} deg (wave vector from +x toward "
                     f"+y), amplitude {float(ds['ripple_amplitude_deg']):.2f} deg")
    else:
        reason = ds["ripple_wavelength_px"].attrs.get("reason", "")
        lines.append("ripple: none" + (f" ({reason})" if reason else ""))
    return "\n".join(lines)


def analysis_dataset(strain: xr.Dataset, cfg: AnalyzeConfig | None = None,
                     calibration: dict[str, Any] | None = None) -> xr.Dataset:
    """The ``analysis`` Dataset of an in-memory ``strain`` Dataset (no I/O).

    ``calibration`` is the raw group's (``scan_step_nm`` is used); the reference lattice comes
    from the strain attrs (``reference_lattice.real_basis_A``, present when the detector was
    calibrated).
    """
    cfg = cfg or AnalyzeConfig()
    f64 = {k: np.asarray(strain[k].values, np.float64) for k in ("exx", "eyy", "exy", "theta")}
    ny, nx = f64["exx"].shape
    phase = np.asarray(strain["phase"].values).astype(np.int64)
    sample = np.isfinite(np.stack(list(f64.values()))).all(0) & (phase > 0)
    label = np.where(sample, phase, 0)

    step_nm = (calibration or {}).get("scan_step_nm")
    step_A = 10.0 * float(step_nm) if step_nm else cfg.scan_step_A
    step_source = ("raw calibration" if step_nm else
                   "AnalyzeConfig.scan_step_A" if step_A else "unknown")
    lattice = _json_attr(strain, "reference_lattice")
    basis_A = np.asarray(lattice["real_basis_A"], np.float64) if lattice.get(
        "real_basis_A") else None
    pool_sigma = _pool_sigma(strain)
    loop = cfg.loop_px or an.auto_loop_px(pool_sigma)

    maps = an.derived_maps(**f64)
    T = an.deformation_from_strain(**f64)
    found = an.find_dislocations(T, label, loop, cfg.false_alarms)
    b_px = found.burgers
    if basis_A is not None and step_A:
        hk, keep = an.index_burgers(b_px, basis_A / step_A)
        lattice_note = ("reference lattice real_basis_A of the strain attrs (rows a1, a2), "
                        f"scan step {step_A:.6g} A ({step_source})")
    else:
        hk, keep = np.full((len(b_px), 2), np.nan), np.ones(len(b_px), bool)
        lattice_note = ("unknown: needs the reference lattice in Angstrom (a calibrated "
                        "detector) and the scan step (raw calibration or "
                        "AnalyzeConfig.scan_step_A)")
    scale, b_unit = (step_A, "Angstrom") if step_A else (1.0, "scan step")

    # the ripple is read from theta without the known cores' own rotation fields (1/r,
    # long-ranged), and away from the cores
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    theta = f64["theta"].copy()
    near = np.zeros((ny, nx), bool)
    for i in np.flatnonzero(keep):
        theta -= an.dislocation_rotation(found.y[i], found.x[i], b_px[i], yy, xx)
        near |= np.hypot(yy - found.y[i], xx - found.x[i]) <= loop
    fit_px = sample & ~near
    ripple = an.fit_ripple(theta, fit_px, math.ceil(POOL_TRUNCATE * pool_sigma) + 1,
                           cfg.false_alarms)
    # Gaussian pooling of width s scales a sinusoid by exp(-2 pi^2 s^2 / wavelength^2):
    # undo it with the fitted pixels' mean factor (each phase has its own width)
    sigma_of = np.zeros(int(phase.max(initial=0)) + 1)
    for p, sig in _pool_sigmas(strain).items():
        if 0 <= p < len(sigma_of):
            sigma_of[p] = sig
    attenuation = float(np.mean(np.exp(-2 * np.pi**2 * sigma_of[phase[fit_px]] ** 2
                                       / ripple.wavelength_px**2))) if ripple.found else 1.0
    ripple = ripple._replace(amplitude_deg=ripple.amplitude_deg / attenuation)

    f32 = np.float32
    closure = np.hypot(found.closure[..., 0], found.closure[..., 1]) * scale
    map_attrs = {
        "dilatation": ("1", "area change relative to the reference, det U - 1"),
        "lattice_change": ("1", "mean lattice parameter relative to the reference, "
                                "sqrt(det U) - 1"),
        "max_shear": ("1", "maximum tensor shear strain (e1 - e2) / 2"),
        "e1": ("1", "larger principal strain"),
        "e2": ("1", "smaller principal strain"),
        "principal_direction": ("deg", "direction of the e1 axis from +x toward +y, "
                                       "in (-90, 90]"),
        "dtheta_dx": ("deg / scan step", "lattice rotation gradient along x"),
        "dtheta_dy": ("deg / scan step", "lattice rotation gradient along y"),
        "lattice_curvature": ("deg / scan step", "magnitude of the rotation gradient"),
    }
    data: dict[str, Any] = {
        k: (DIMS, maps[k].astype(f32), {"units": u, "long_name": n})
        for k, (u, n) in map_attrs.items()}
    data["closure_failure"] = (DIMS, closure.astype(f32), {
        "units": b_unit, "long_name": f"|closure failure| of the {loop} x {loop} px circuit "
                                      "centred on the pixel, smooth incompatibility removed"})
    data["closure_significance"] = (DIMS, found.significance.astype(f32), {
        "units": "1", "long_name": "closure failure over its robust noise (chi, 2 components)",
        "detection_level": str(_num(found.threshold))})
    rows = np.flatnonzero(keep)
    table = {
        "y": (found.y[rows], "scan px", "core row"),
        "x": (found.x[rows], "scan px", "core column"),
        "burgers_x": (b_px[rows, 0] * scale, b_unit, "Burgers vector, x component"),
        "burgers_y": (b_px[rows, 1] * scale, b_unit, "Burgers vector, y component"),
        "burgers_h": (hk[rows, 0], "1", "Burgers vector along a1 of the reference lattice "
                                         "(rounded; NaN when the lattice is unknown)"),
        "burgers_k": (hk[rows, 1], "1", "Burgers vector along a2 of the reference lattice "
                                         "(rounded; NaN when the lattice is unknown)"),
        "confidence": (found.confidence[rows], "1",
                       "chi of the Burgers vector over its standard error (from the "
                       "robust noise of equal circuits clear of the cores)"),
    }
    for k, (v, u, n) in table.items():
        data[k] = xr.Variable(("dislocation",), np.asarray(v, np.float64),
                              {"units": u, "long_name": n},
                              encoding={"chunks": (max(1, len(rows)),)})
    ripple_attrs = {"reason": ripple.reason} if not ripple.found else {}
    data["ripple_wavelength_px"] = ((), ripple.wavelength_px,
                                    {"units": "scan px", **ripple_attrs})
    data["ripple_direction_deg"] = ((), ripple.direction_deg, {
        "units": "deg", "long_name": "wave vector direction from +x toward +y, in [0, 180)",
        **ripple_attrs})
    data["ripple_amplitude_deg"] = ((), ripple.amplitude_deg, {
        "units": "deg", "long_name": "amplitude of the rotation modulation",
        "pooling_attenuation": attenuation, **ripple_attrs})

    attrs: dict[str, Any] = {
        "conventions": ("maps on (scan_y, scan_x), x = scan columns, y = scan rows; strain "
                        "relative to the one reference lattice of the strain group; theta in "
                        "degrees, positive turning +x toward +y"),
        "circuit_convention": CIRCUIT_CONVENTION,
        "burgers_unit": b_unit,
        "scan_step_A": step_A or "unknown",
        "scan_step_source": step_source,
        "burgers_lattice": lattice_note,
        "loop_px": int(loop),
        "pool_sigma_px": pool_sigma,
        "closure_noise_px": json.dumps([_num(v) for v in found.noise]),
        "detection": ("significant circuits: chi-square over the robust (MAD) noise of all "
                      f"{loop} x {loop} circuits above the level passed by "
                      f"{cfg.false_alarms} of them by chance; smooth incompatibility "
                      "(local quadratic of the closure density) removed first; with a "
                      "known lattice, cores whose Burgers vector rounds to no lattice vector "
                      "are dropped (counted in sub_lattice_closures)"),
        "sub_lattice_closures": int((~keep).sum()),
        "ripple": json.dumps({"found": ripple.found, "significance": _num(ripple.significance),
                              "detection_level": _num(ripple.threshold),
                              "reason": ripple.reason}),
        "analyze_config": cfg.to_json(),
        "strain_map_config": strain.attrs.get("map_config", ""),
        "strain_reference": strain.attrs.get("reference", ""),
        "ccstae_hpc_version": __version__,
    }
    ds = xr.Dataset(data, coords={"scan_y": np.arange(ny), "scan_x": np.arange(nx)},
                    attrs=attrs)
    ds["scan_y"].attrs["units"] = "px"
    ds["scan_x"].attrs["units"] = "px"
    return ds


def _json_attr(ds: xr.Dataset, name: str) -> dict:
    try:
        v = json.loads(ds.attrs.get(name, "{}"))
    except (TypeError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}


def _pool_sigmas(strain: xr.Dataset) -> dict[int, float]:
    """Gaussian pooling width (scan px) the map stage applied to each phase."""
    phases = _json_attr(strain, "pooling").get("phases", {})
    return {int(p): float(v.get("sigma_px", 0.0)) for p, v in phases.items()
            if isinstance(v, dict)}


def _pool_sigma(strain: xr.Dataset) -> float:
    """Widest Gaussian pooling (scan px) the map stage applied to any phase (0 if none)."""
    return max(_pool_sigmas(strain).values(), default=0.0)


def _num(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
