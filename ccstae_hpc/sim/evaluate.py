"""Compare a strain result with the simulator's ground truth, and summarise a result.

The truth ``F`` is relative to one lattice for the whole field (the simulators' convention) and
is re-referenced exactly as the result references its own maps: ``strain.reference_deformation``
of the truth over the pixels of ``ds.reference`` (all phases together for the default
``reference_mode='global'``; per predicted phase for ``'per_phase'``), then
``strain.relative_strain(F, F_ref)`` -- the same functions, so the comparison measures the
method and not a difference of conventions, and a phase's mismatch to the reference lattice
counts.

Errors are reported as fractions for ``exx, eyy, exy`` and degrees for ``theta``; rotation
differences are wrapped into ``(-180/symmetry, 180/symmetry]`` because a ``symmetry``-fold
pattern fixes the rotation only modulo ``360/symmetry``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from ccstae_hpc.core.config import MapConfig
from ccstae_hpc.core.strain import reference_deformation, relative_strain, stretch_determinant

__all__ = [
    "COMPONENTS",
    "PHASE_NAMES",
    "format_errors",
    "load_truth",
    "match_labels",
    "strain_errors",
    "summarize",
    "truth_relative",
    "wrap_angle",
]

COMPONENTS = ("exx", "eyy", "exy", "theta")
PHASE_NAMES = {0: "vacuum", 1: "WS2", 2: "WSe2"}


def load_truth(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``OUT.truth.npz`` into a dict; the ``config`` entry is decoded from JSON."""
    with np.load(path, allow_pickle=False) as z:
        truth: dict[str, Any] = {k: z[k] for k in z.files}
    if "config" in truth:
        truth["config"] = json.loads(str(truth["config"]))
    return truth


def symmetry_of(ds: xr.Dataset) -> int:
    """Rotational symmetry used by the run (from ``attrs['map_config']``, else the default)."""
    raw = ds.attrs.get("map_config")
    if raw:
        cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
        if "symmetry" in cfg:
            return int(cfg["symmetry"])
    return MapConfig().symmetry


def wrap_angle(delta_deg: np.ndarray, symmetry: int) -> np.ndarray:
    """Wrap angle differences into ``(-period/2, period/2]`` with ``period = 360/symmetry``."""
    period = 360.0 / max(int(symmetry), 1)
    return period / 2 - np.mod(period / 2 - np.asarray(delta_deg, dtype=np.float64), period)


def match_labels(pred: np.ndarray, truth: np.ndarray) -> dict[int, int]:
    """Map each predicted class (``>= 0``) to the truth label it overlaps most (majority)."""
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    out: dict[int, int] = {}
    for c in np.unique(pred[pred >= 0]):
        labels, counts = np.unique(truth[pred == c], return_counts=True)
        out[int(c)] = int(labels[np.argmax(counts)])
    return out


def _values(ds: xr.Dataset, name: str) -> np.ndarray:
    # .values computes dask-backed variables (a store opened with open_strain)
    return np.asarray(ds[name].values)


def truth_relative(
    ds: xr.Dataset, truth: Mapping[str, Any], symmetry: int | None = None
) -> dict[str, np.ndarray]:
    """Truth ``exx, eyy, exy, theta`` maps re-referenced on the result's reference pixels.

    Pixels that are truth vacuum, or (per-phase mode) whose predicted phase has no reference
    pixel inside the truth sample, are NaN.
    """
    sym = symmetry_of(ds) if symmetry is None else symmetry
    phase = _values(ds, "phase")
    ref = _values(ds, "reference").astype(bool)
    F = np.asarray(truth["F"], dtype=np.float64)
    if F.shape[:2] != phase.shape:
        raise ValueError(f"truth F has scan shape {F.shape[:2]}, result has {phase.shape}")
    valid = np.isfinite(F).all(axis=(-2, -1))
    out = {k: np.full(phase.shape, np.nan) for k in COMPONENTS}
    if ds.attrs.get("reference_mode", "global") == "per_phase":
        sample = _values(ds, "sample").astype(bool)
        groups = [(phase == c) & valid for c in np.unique(phase[sample])]
    else:
        groups = [valid]
    for sel in groups:
        ref_c = sel & ref
        if not ref_c.any():
            continue
        F_ref = reference_deformation(F, ref_c, sym)
        rel = relative_strain(F[sel], F_ref, sym)
        for k in COMPONENTS:
            out[k][sel] = rel[k]
    return out


def _mean(a: np.ndarray) -> float:
    # NaN, not a warning, for an empty selection (e.g. a phase the prediction missed entirely)
    return float(a.mean()) if a.size else float("nan")


def strain_errors(ds: xr.Dataset, truth: Mapping[str, Any]) -> dict[str, float]:
    """Errors of a result ``ds`` against the simulator ``truth``.

    Parameters
    ----------
    ds : result dataset (``phase``, ``sample``, ``reference``, ``exx``, ``eyy``, ``exy``,
        ``theta``) as written by ``ccstae run``.
    truth : the simulator's truth (``phase``, ``F``), e.g. from :func:`load_truth`.

    Returns
    -------
    Flat dict: ``acc_sample`` (sample vs vacuum over all pixels), ``acc_phase`` (WS2 vs WSe2
    over truth-sample pixels after majority label matching); per component ``mae_<k>``,
    ``p95_<k>``, ``max_<k>`` over pixels that are sample in both truth and prediction, the same
    per truth phase as ``mae_<k>_WS2`` etc.; pixel counts ``n_eval``, ``n_both_sample`` (pixels
    in ``n_both_sample`` but not ``n_eval`` lack a reference or a value), ``n_<phase>``.
    """
    sym = symmetry_of(ds)
    phase = _values(ds, "phase")
    sample = _values(ds, "sample").astype(bool)
    tphase = np.asarray(truth["phase"])
    if tphase.shape != phase.shape:
        raise ValueError(f"truth has scan shape {tphase.shape}, result has {phase.shape}")
    tsample = tphase > 0

    mapping = match_labels(phase, tphase)
    mapped = np.full(phase.shape, -1, dtype=np.int64)
    for c, t in mapping.items():
        mapped[phase == c] = t

    out: dict[str, float] = {
        "acc_sample": float(np.mean(sample == tsample)),
        "acc_phase": _mean((mapped == tphase)[tsample]),
    }

    ref_truth = truth_relative(ds, truth, sym)
    both = sample & tsample
    pred = {k: _values(ds, k).astype(np.float64) for k in COMPONENTS}
    ok = both.copy()
    for k in COMPONENTS:
        ok &= np.isfinite(pred[k]) & np.isfinite(ref_truth[k])
    out["n_both_sample"] = float(both.sum())
    out["n_eval"] = float(ok.sum())

    err = {k: pred[k] - ref_truth[k] for k in COMPONENTS}
    err["theta"] = wrap_angle(err["theta"], sym)
    for k in COMPONENTS:
        a = np.abs(err[k][ok])
        out[f"mae_{k}"] = _mean(a)
        out[f"p95_{k}"] = float(np.percentile(a, 95)) if a.size else float("nan")
        out[f"max_{k}"] = float(a.max()) if a.size else float("nan")
    out["n_phases"] = float(len(np.unique(phase[sample & (phase > 0)])))
    lc = {w: np.sqrt(stretch_determinant(d)) - 1
          for w, d in (("pred", pred), ("truth", ref_truth))}
    for p, name in PHASE_NAMES.items():
        if p == 0:
            continue
        sel = ok & (tphase == p)
        out[f"n_{name}"] = float(sel.sum())
        for k in COMPONENTS:
            out[f"mae_{k}_{name}"] = _mean(np.abs(err[k][sel]))
        # the phase's lattice parameter against the reference: a mismatch must show
        out[f"lattice_change_err_{name}"] = (
            float(abs(np.median(lc["pred"][sel]) - np.median(lc["truth"][sel])))
            if sel.any() else float("nan"))
    return out


def _scale(k: str) -> tuple[float, str]:
    # strain is stored as fractions and shown in percent; rotation is already in degrees
    return (1.0, "deg") if k == "theta" else (100.0, "%")


def _cell(v: float, width: int) -> str:
    # fixed decimals for the expected sizes, exponent form so a failed run keeps the columns
    return f"{v:{width}.4f}" if abs(v) < 1e4 or not np.isfinite(v) else f"{v:{width}.3g}"


def format_errors(d: Mapping[str, float]) -> str:
    """Human-readable table of :func:`strain_errors` output (strain in %, rotation in deg)."""
    lines = [
        f"sample vs vacuum accuracy  {100 * d['acc_sample']:6.2f} %",
        f"WS2 vs WSe2 accuracy       {100 * d['acc_phase']:6.2f} %",
        f"pixels evaluated           {int(d['n_eval'])} of {int(d['n_both_sample'])} "
        "(sample in both truth and result)",
        f"{'':12s}{'MAE':>10s}{'p95':>10s}{'max':>10s}"
        + "".join(f"{'MAE ' + n:>11s}" for p, n in PHASE_NAMES.items() if p > 0),
    ]
    for k in COMPONENTS:
        s, unit = _scale(k)
        row = f"{k + ' (' + unit + ')':12s}"
        row += "".join(_cell(s * d[f"{m}_{k}"], 10) for m in ("mae", "p95", "max"))
        row += "".join(
            _cell(s * d.get(f"mae_{k}_{n}", float("nan")), 11)
            for p, n in PHASE_NAMES.items()
            if p > 0
        )
        lines.append(row)
    return "\n".join(lines)


def summarize(ds: xr.Dataset) -> str:
    """Short text summary of a result: scan size, phases, median strain per phase (against the
    one reference lattice, so a phase's mismatch shows in its medians)."""
    phase = _values(ds, "phase")
    sample = _values(ds, "sample").astype(bool)
    ref = _values(ds, "reference").astype(bool)
    ny, nx = phase.shape
    lines = [
        f"scan {ny} x {nx}: {int(sample.sum())} sample pixels "
        f"({100 * sample.mean():.1f} %), {int(ref.sum())} reference pixels"
    ]
    maps = {k: _values(ds, k).astype(np.float64) for k in COMPONENTS}
    lc = _values(ds, "lattice_change") if "lattice_change" in ds else None
    for c in np.unique(phase[phase >= 0]):
        sel = (phase == c) & sample
        if not sel.any():
            lines.append(f"phase {int(c)}: {int((phase == c).sum())} pixels, vacuum")
            continue
        med = {
            k: np.nanmedian(maps[k][sel]) if np.isfinite(maps[k][sel]).any() else np.nan
            for k in COMPONENTS
        }
        lines.append(
            f"phase {int(c)}: {int(sel.sum())} sample pixels, median "
            f"exx {100 * med['exx']:+.3f} %, eyy {100 * med['eyy']:+.3f} %, "
            f"exy {100 * med['exy']:+.3f} %, theta {med['theta']:+.3f} deg"
            + (f", lattice parameter {100 * float(np.nanmedian(lc[sel])):+.3f} %"
               if lc is not None else "")
        )
    lines.append(f"reference: {ds.attrs.get('reference', 'unknown')}")
    return "\n".join(lines)
