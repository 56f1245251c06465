"""Accuracy against dose, through the path users take: `ccstae run`, its single-pattern fits,
the centre-of-mass baseline and py4DSTEM, next to the Cramer-Rao floor of one pattern.

Data:

* the project's simulator (:mod:`ccstae_hpc.sim.simulate`, seed 3): the WS2/WSe2
  heterostructure (core, shell, vacuum) and a single phase (``heterostructure=False``, WS2
  only), noise-free and at 1e4, 3e3, 1e3, 500, 300 and 100 e-/pattern; and the heterostructure at
  1e3 e- with the original paper's diffuse background, weights 0, 0.25, 0.5 and 0.7, and at
  the paper's own condition, weight 0.7 at 1e5 e-; 32x32 scan, 128 px detector;
* the abTEM multislice sets of ``tests/data`` (:mod:`ccstae_hpc.sim.multislice`, as in
  ``bench_multislice.py``): single phase 12x12 noise-free and at 1e6, 1e5, 1e4, 1e3, 100
  e-/pattern; WS2/WSe2 interface 16x16 noise-free and at 1e6, 1e5, 1e4.  98.6 % of their
  electrons are in the central disk, so 1e3 and 100 e- leave a few counts per Bragg disk:
  a method that fails there is reported as failed.

Methods, all on the same ``.npy`` and the same store, in this order: ``ccstae`` (`ccstae run
--engine direct`, default options: pooling chosen from the data, the widths recorded);
``ccstae_unpooled`` (`ccstae map STORE --pool-sigma 0 --overwrite`: the single-pattern fits
of the same model); ``com`` (`ccstae map STORE --method com --overwrite`: the library's
centre-of-mass lattice-fit baseline, same strain contract); ``py4dstem`` (py4DSTEM 0.14.18
in its own environment, ``make bench-peers``, via ``bench_multislice.py``; skipped with one
message without it).  The two peers find no phases, so both are referenced on ccstae's
reference pixels (one phase's), not on every sample pixel of a heterostructure.  Every
result is scored with :func:`ccstae_hpc.sim.evaluate.strain_errors`: mean absolute errors
over the pixels that are sample in truth and result and have a value (fits a method drops
as diverged have none: the ``eval`` column gives the pixels scored out of those that are
sample in both), the truth re-referenced on the result's reference pixels.

Floor: the Cramer-Rao bound of one pattern at the dose, as an MAE
(:mod:`ccstae_hpc.sim.crb`): for the project's simulator the mean of the floors of the scan's
own patterns (``scan_floor``: 64 per phase, each at its true strain, rotation and origin, with
the case's background), per phase, weighted by the pixels each method's MAE counts of that
phase (the MAE of a mix of patterns is the same mix of their MAEs), its strains put against
the lattice of the result's reference pixels as the truth is (``reference_scale``: on the
heterostructure WSe2's, 4.1 % above WS2's), and in the scan's frame the maps report
(``crb.in_frame``; before 2026-12-05 13:00 UTC in the lattice's own frame, turned 17 deg
from it: 1-2 % off).  Until 2026-12-05 it
was ``cramer_rao`` of one relaxed pattern per phase at the undrifted origin, which sits up to
8 % off the scan's mean by where its disk edges fall on the pixels (seed 3: eyy 6 % low), in
each phase's own units.  For abTEM the same mean over
up to 32 noise-free patterns per phase of ``pattern_floor`` (each about its central disk
measured on it, on the pixels beyond the Bragg annulus' inner radius); until 2026-12-05 the
pattern at the scan centre (on the interface set a WSe2 pattern, whose floor is 10-20 %
below WS2's).  Noise-free cases
have no floor.  The floor bounds unbiased single-pattern fits (``ccstae_unpooled``, ``com``,
``py4dstem``); pooling averages
neighbouring patterns, so ``ccstae`` may go below it (ratio < 1), and so may a fit that the
data barely move from its start (a few counts per Bragg disk): it is biased toward the
reference, and the field's own spread then bounds its error.

Prints one table (MAE: strain in %, theta in deg; each MAE over the floor; phases found and
phase accuracy for ccstae; wall time) and writes ``dose.json`` (one row per case and method),
``dose.png`` (MAE against dose, one row of panels per data set) and ``background.png`` (MAE
against the background weight) into ``benchmarks/results`` (or ``--results``).  ``--quick``:
the heterostructure 16x16 at 1e3 e-, the abTEM single phase at 1e5 e-, no
background sweep (``dose_quick.*``).

Run: ``python benchmarks/bench_dose.py [--quick] [--scan 32] [--results DIR]``.  On a quiet
2-core machine a case takes ~35 s at 32x32 (`ccstae run` 15-18 s, the unpooled map 9-12 s
with the whole-detector disk model, com 0.5 s, py4DSTEM 6 s) and ~20 s for an abTEM set,
~13 min for the 27 cases (``--scan 24``:
~19 s a case, ~7.5 min; each `ccstae run` trains for at least 150 steps whatever the scan);
other jobs on the cores can make a `ccstae run` several times slower.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from bench_multislice import DATA, PEERS_PYTHON, SETS, peer_module, py4dstem_errors
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from results_io import save_json
from train_options import add_epochs, run_epochs

from ccstae_hpc import cli
from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.core.geometry import estimate_geometry, ring_inner_radius
from ccstae_hpc.core.mapping import rereference
from ccstae_hpc.sim.crb import pattern_floor, scan_floor
from ccstae_hpc.sim.evaluate import COMPONENTS, PHASE_NAMES, strain_errors
from ccstae_hpc.sim.multislice import add_poisson, load_multislice, validation_set
from ccstae_hpc.sim.simulate import save_simulation, truth_rows

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 3  # the project's simulator, as in README's figures
SCAN = 32  # own-simulator scan side
QUICK_SCAN = 16
POISSON_SEED = 1  # Poisson noise of the abTEM sets, as bench_multislice.py
# The single-pattern fits of the heterostructure at the doses where their target (1.3x the
# floor) is decided are scored on this many draws of the shot noise of the same scan (a
# `ccstae run --pool-sigma 0` each after the case's own): one 32x32 scan's MAE moves by
# 5-15 % from draw to draw (measured at 1e3 e-: 1.21-1.41x the floor over the components
# on the case's scan, 1.21-1.25x on 3 others, whichever draw trained the model)
REALISATIONS = 3
REALISED_DOSES = (1e3, 500.0)
# data sets: own simulator (heterostructure flag) and abTEM (bench_multislice.SETS key)
SIM_SETS = {"sim_heterostructure": True, "sim_single_phase": False}
ABTEM_SETS = {"abtem_single": "single", "abtem_interface": "interface"}
SIM_DOSES: tuple[float | None, ...] = (None, 1e4, 3e3, 1e3, 500.0, 300.0, 100.0)
ABTEM_DOSES: dict[str, tuple[float | None, ...]] = {
    "abtem_single": (None, 1e6, 1e5, 1e4, 1e3, 100.0),
    "abtem_interface": (None, 1e6, 1e5, 1e4),
}
BACKGROUND_SET = "sim_heterostructure"
BACKGROUNDS = (0.0, 0.25, 0.5, 0.7)  # the original paper's diffuse-background weights
BACKGROUND_DOSE = 1e3
# the original paper's own benchmark condition: its strongest background at its dose (1e5
# counts per probe), where the 1e3 e- sweep's weight 0.7 loses the phase split
PAPER_DOSE = 1e5
PAPER_BACKGROUND = 0.7
METHODS = ("ccstae", "ccstae_unpooled", "com", "py4dstem")
SAMPLE_PHASES = (1, 2)  # the simulator's phases (WS2, WSe2), each with its own floor
CRB_NAME = {"exx": "exx", "eyy": "eyy", "exy": "exy", "theta": "theta_deg"}  # crb's names
STRAINS = ("exx", "eyy", "exy")
# the own simulator's floors per electron, (scan, seed, background, heterostructure) -> phase
_SCAN_FLOORS: dict[tuple, dict[int, dict[str, float]]] = {}
# abTEM: patterns per phase whose floors are averaged (0.2 s each), their choice's seed, and
# the floors per electron, set -> phase -> component
ABTEM_FLOOR_PATTERNS = 32
FLOOR_SEED = 0
_ABTEM_FLOORS: dict[str, dict[int, dict[str, float]]] = {}
SCALE = {"exx": 100.0, "eyy": 100.0, "exy": 100.0, "theta": 1.0}  # to %, deg
UNIT = {"exx": "%", "eyy": "%", "exy": "%", "theta": "deg"}
NOISE_FREE_X = 10.0  # the noise-free point sits this factor beyond the largest dose
MAX_ERROR_CHARS = 160
COLOURS = {"ccstae": "#1b9e77", "ccstae_unpooled": "#7570b3", "com": "#d95f02",
           "py4dstem": "#e7298a"}
MARKERS = {"ccstae": "o", "ccstae_unpooled": "s", "com": "^", "py4dstem": "D"}
FLOOR_STYLE = {"color": "k", "ls": "--", "lw": 1.2, "marker": "_", "ms": 12,
               "label": "Cramer-Rao floor (1 pattern)"}


@dataclass(frozen=True)
class Case:
    """One data set at one dose (and background weight for the own simulator)."""

    data: str  # a key of SIM_SETS or ABTEM_SETS
    dose: float | None  # e-/pattern, None: noise-free
    background: float = 0.0

    @property
    def slug(self) -> str:
        """File-name stem of this case."""
        dose = "inf" if self.dose is None else f"{self.dose:.0e}"
        return f"{self.data}_{dose}_bg{self.background:g}"


def dose_label(dose: float | None) -> str:
    """``noise-free`` or the dose as ``1e+03``."""
    return "noise-free" if dose is None else f"{dose:.0e}"


def cases_for(quick: bool) -> list[Case]:
    """The cases of a default or ``--quick`` run, each once (the background sweep's weight 0
    is the heterostructure's dose-sweep case at the same dose)."""
    if quick:
        # one own-simulator and one abTEM case (the noise-free path runs in
        # bench_multislice --quick)
        return [Case("sim_heterostructure", 1e3), Case("abtem_single", 1e5)]
    out = [Case(s, d) for s in SIM_SETS for d in SIM_DOSES]
    out += [Case(BACKGROUND_SET, BACKGROUND_DOSE, w) for w in BACKGROUNDS
            if Case(BACKGROUND_SET, BACKGROUND_DOSE, w) not in out]
    out.append(Case(BACKGROUND_SET, PAPER_DOSE, PAPER_BACKGROUND))
    out += [Case(s, d) for s in ABTEM_SETS for d in ABTEM_DOSES[s]]
    return out


def nan_floor() -> dict[str, float]:
    """No floor (noise-free data)."""
    return {k: math.nan for k in COMPONENTS}


def sim_floor(cfg: SimConfig, truth: dict, dose: float | None) -> dict[str, Any]:
    """Cramer-Rao MAE floor of the own simulator's scan: each phase's mean over its own
    patterns (:func:`scan_floor`) under ``by_phase`` (``case_rows`` weights them by the
    pixels scored), and their mean over every sample pixel of the truth."""
    if dose is None:
        return nan_floor()
    key = (cfg.scan, cfg.seed, cfg.background_weight, cfg.heterostructure)
    if key not in _SCAN_FLOORS:  # one electron's floor; the doses of a set share it
        _SCAN_FLOORS[key] = scan_floor(cfg, truth, 1.0)
    per_e = {p: {k: f[f"mae_{CRB_NAME[k]}"] for k in COMPONENTS}
             for p, f in _SCAN_FLOORS[key].items()}
    return {**at_dose(per_e, truth, dose), "against": "WS2"}


def at_dose(per_e: dict[int, dict[str, float]], truth: dict, dose: float) -> dict[str, Any]:
    """A set's floors per electron (phase -> component) at ``dose`` (the information is
    proportional to the dose): each phase's under ``by_phase``, and their mean over every
    sample pixel of the truth."""
    by_phase = {PHASE_NAMES[p]: {k: float(v) / math.sqrt(dose) for k, v in f.items()}
                for p, f in per_e.items()}
    phase = np.asarray(truth["phase"])
    plain = weighted_floor({"by_phase": by_phase},
                           {f"n_{PHASE_NAMES[p]}": int((phase == p).sum()) for p in per_e})
    return {**plain, "by_phase": by_phase}


def weighted_floor(floor: dict[str, Any], result: dict[str, Any]) -> dict[str, float]:
    """The floor of the patterns a result's MAE counts: each phase's floor weighted by its
    scored pixels (``n_WS2``, ``n_WSe2``); the plain floor without them.  A WS2-based floor
    (``against``) is put against the result's reference lattice (``ref_scale``)."""
    counts = {name: result.get(f"n_{name}", 0.0) for name in floor.get("by_phase", {})}
    total = sum(counts.values())
    if not total:
        out = {k: floor[k] for k in COMPONENTS}
    else:
        out = {k: sum(n * floor["by_phase"][name][k] for name, n in counts.items()) / total
               for k in COMPONENTS}
    if floor.get("against") == "WS2":  # into the units of the result's reference lattice
        scale = result.get("ref_scale", 1.0)
        out = {k: v / scale if k in STRAINS else v for k, v in out.items()}
    return out


def abtem_floor(data: np.ndarray, truth: dict, dose: float | None, name: str
                ) -> dict[str, Any]:
    """Cramer-Rao MAE floor of an abTEM set: each phase's mean over up to
    :data:`ABTEM_FLOOR_PATTERNS` of its noise-free patterns (a seeded choice), as
    :func:`sim_floor`.

    Each pattern's floor is ``pattern_floor`` about its central disk, measured on it as the
    preprocessing does (:func:`estimate_geometry`), on the pixels beyond
    :func:`ring_inner_radius` of its radius.  On the interface set the floors of one phase's
    patterns differ by up to 20 % (WS2's are above WSe2's); on the single phase by 1 %.

    Parameters
    ----------
    data : noise-free patterns ``(ny, nx, Q, Q)``.
    truth : the set's truth (``phase``).
    dose : electrons per pattern; None gives NaN.
    name : the set's name (its floors per electron are computed once).
    """
    if dose is None:
        return nan_floor()
    if name not in _ABTEM_FLOORS:
        rng = np.random.default_rng(FLOOR_SEED)
        phase = np.asarray(truth["phase"])
        per_e = {}
        for p in (int(v) for v in np.unique(phase[phase > 0])):
            where = np.argwhere(phase == p)
            pick = where[rng.choice(len(where), min(ABTEM_FLOOR_PATTERNS, len(where)),
                                    replace=False)]
            floors = []
            for y, x in pick:
                pattern = np.asarray(data[y, x], np.float64)
                geom = estimate_geometry(pattern)
                Q = pattern.shape[0]
                yy, xx = np.mgrid[:Q, :Q]
                bragg = (np.hypot(yy - geom.center[0], xx - geom.center[1])
                         > ring_inner_radius(geom.radius))
                f = pattern_floor(pattern, geom.center, 1.0, bragg)
                floors.append([f[f"mae_{CRB_NAME[k]}"] for k in COMPONENTS])
            per_e[p] = dict(zip(COMPONENTS, np.mean(floors, 0), strict=True))
        _ABTEM_FLOORS[name] = per_e
    return at_dose(_ABTEM_FLOORS[name], truth, dose)


def sim_config(case: Case, scan: int, noise_seed: int = 0) -> SimConfig:
    """The own simulator's configuration of a case (``noise_seed``: another draw of its
    shot noise)."""
    return SimConfig(scan=(scan, scan), dose=case.dose, seed=SEED,
                     background_weight=case.background, heterostructure=SIM_SETS[case.data],
                     noise_seed=noise_seed)


def make_case(case: Case, scan: int, tmp: Path) -> tuple[Path, dict, dict[str, Any]]:
    """Write the case's patterns as ``.npy``; return its path, the truth and the floor."""
    if case.data in SIM_SETS:
        cfg = sim_config(case, scan)
        npy, _ = save_simulation(tmp / f"{case.slug}.npy", cfg)
        truth = truth_rows(cfg)
        return npy, truth, sim_floor(cfg, truth, case.dose)
    data, truth, _ = load_multislice(validation_set(DATA, SETS[ABTEM_SETS[case.data]]))
    floor = abtem_floor(data, truth, case.dose, case.data)
    if case.dose is not None:
        data = add_poisson(data, case.dose, seed=POISSON_SEED)
    npy = tmp / f"{case.slug}.npy"
    np.save(npy, data)
    return npy, truth, floor


def short(msg: str) -> str:
    """The last non-empty line of a failure message, shortened."""
    lines = [s.strip() for s in msg.strip().splitlines() if s.strip()]
    return (lines[-1] if lines else "failed")[:MAX_ERROR_CHARS]


def run_cli(argv: Sequence[str]) -> str | None:
    """Run one ``ccstae`` command in this process, its output captured.

    Returns None on success, else why it failed (an exception or a non-zero exit code is
    this method's failure at this dose, never the benchmark's).
    """
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            code = cli.main(list(argv))
    except Exception as e:  # reported in the table
        return short(f"{type(e).__name__}: {e}")
    return None if code == 0 else f"exit {code}: {short(log.getvalue())}"


def score(ds: xr.Dataset, truth: dict) -> dict[str, Any]:
    """MAE per component, phases found, phase and sample accuracy (``error`` when no pixel
    is sample in both the result and the truth)."""
    e = strain_errors(ds, truth)
    out = {f"mae_{k}": float(e[f"mae_{k}"]) for k in COMPONENTS}
    out.update(n_phases=int(e["n_phases"]), acc_phase=float(e["acc_phase"]),
               acc_sample=float(e["acc_sample"]), n_eval=int(e["n_eval"]),
               n_both_sample=int(e["n_both_sample"]),
               **{f"n_{PHASE_NAMES[p]}": int(e.get(f"n_{PHASE_NAMES[p]}", 0))
                  for p in SAMPLE_PHASES})
    out["ref_scale"] = reference_scale(ds, truth)
    if out["n_eval"] == 0:
        out["error"] = "no pixel is sample in both result and truth"
    return out


def reference_scale(ds: xr.Dataset, truth: dict) -> float:
    """Lattice parameter of the reference a result's strains are against, over WS2's: the
    truth's ``sqrt det F`` (``F`` against WS2's lattice) on the result's reference pixels,
    median; 1 without any.  Strain against a lattice ``s`` times WS2's is the WS2-based strain
    over ``s``, so the own simulator's floors (WS2-based) are divided by it."""
    ref = np.asarray(ds["reference"].values, bool)
    F = np.asarray(truth["F"], np.float64)
    ok = ref & np.isfinite(F).all(axis=(-2, -1))
    if not ok.any():
        return 1.0
    return float(np.sqrt(np.median(np.abs(np.linalg.det(F[ok])))))


def read_strain(store: Path, truth: dict) -> tuple[xr.Dataset, dict[str, Any]]:
    """The store's ``strain`` group and its scores, with the forward model its fits used
    (``forward_model``: "disks" or "dictionary"; None for a map without one)."""
    ds = xr.open_zarr(store, group="strain").load()
    sc = score(ds, truth)
    sc["forward_model"] = (json.loads(ds.attrs["forward_model"]).get("chosen")
                           if "forward_model" in ds.attrs else None)
    return ds, sc


def run_methods(npy: Path, truth: dict, tmp: Path, epochs: int | None = None,
                peer: Any | None = None) -> dict[str, dict[str, Any]]:
    """Every method on one case, in the order ccstae, unpooled, com, py4DSTEM; ``epochs``
    fixes `ccstae run`'s training length (default: until converged); ``peer``: the started
    py4DSTEM process (``check_py4dstem.PeerProcess``; None: one process for this case).

    Returns
    -------
    method -> ``mae_<k>`` ..., ``time_s``, and ``error`` on failure; ``pool_sigma_px`` for
    ccstae; py4DSTEM's entry is None without its environment.
    """
    store = tmp / f"{npy.stem}.zarr"
    out: dict[str, dict[str, Any]] = {}
    ds = None
    t = time.perf_counter()
    err = run_cli(["run", str(npy), "--out", str(store), "--engine", "direct", "--quiet",
                   *run_epochs(epochs)])
    res: dict[str, Any] = {"time_s": time.perf_counter() - t}
    if err is None:
        try:
            ds, sc = read_strain(store, truth)
            res.update(sc)
            res["pool_sigma_px"] = {p: v["sigma_px"] for p, v in
                                    json.loads(ds.attrs["pooling"])["phases"].items()}
        except Exception as e:  # reported in the table
            res["error"] = short(f"{type(e).__name__}: {e}")
    else:
        res["error"] = err
    out["ccstae"] = res
    if ds is None:  # ccstae failed: the peers are referenced on the truth's largest phase
        phase = np.asarray(truth["phase"])
        largest = np.bincount(phase[phase > 0].ravel()).argmax()
        ds = xr.Dataset({"reference": (("scan_y", "scan_x"), phase == largest)})
    for method, extra in (("ccstae_unpooled", ["--pool-sigma", "0"]),
                          ("com", ["--method", "com"])):
        t = time.perf_counter()
        err = run_cli(["map", str(store), *extra, "--overwrite", "--quiet"])
        res = {"time_s": time.perf_counter() - t}
        if err is None:
            try:
                got, sc = read_strain(store, truth)
                if method == "com":
                    # the CoM fits find no phases: their own reference is the median lattice
                    # of every sample pixel, both phases of a heterostructure at once (interface
                    # set noise-free: exx MAE 0.79 % against 0.32 % on ccstae's pixels).  Like
                    # py4DSTEM they are referenced on ccstae's reference pixels
                    sc = score(rereference(got, ds["reference"].values), truth)
                res.update(sc)
            except Exception as e:  # reported in the table
                res["error"] = short(f"{type(e).__name__}: {e}")
        else:
            res["error"] = err
        out[method] = res
    t = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            found = py4dstem_errors(npy, truth, ds, tmp, peer)
    except Exception as e:  # reported in the table
        found = {"error": short(f"{type(e).__name__}: {e}")}
    if found is not None:
        # py4DSTEM's strains are referenced on the same pixels as ccstae's
        found = {**found, "time_s": time.perf_counter() - t,
                 "ref_scale": reference_scale(ds, truth)}
        if "error" not in found and not all(np.isfinite(found[f"mae_{k}"])
                                            for k in COMPONENTS):
            found["error"] = "no pixel evaluated"
    out["py4dstem"] = found
    return out


def realised(case: Case) -> bool:
    """Whether the case's single-pattern fits are scored on :data:`REALISATIONS` noise
    draws."""
    return case.data == "sim_heterostructure" and case.background == 0 \
        and case.dose in REALISED_DOSES


def with_realisations(case: Case, scan: int, truth: dict, tmp: Path, first: dict[str, Any],
                      epochs: int | None = None) -> dict[str, Any]:
    """The single-pattern fits' scores ``first`` (of the case's scan) with the MAE made the
    mean over :data:`REALISATIONS` draws of the shot noise of the same scan, each through
    `ccstae run --pool-sigma 0`; every draw's MAE under ``mae_<k>_each``."""
    if "error" in first:
        return first
    each = [first]
    for r in range(1, REALISATIONS):
        npy, _ = save_simulation(tmp / f"{case.slug}_noise{r}.npy", sim_config(case, scan, r))
        store = tmp / f"{npy.stem}.zarr"
        err = run_cli(["run", str(npy), "--out", str(store), "--engine", "direct", "--quiet",
                       "--pool-sigma", "0", *run_epochs(epochs)])
        if err is not None:
            return {**first, "error": f"noise draw {r}: {err}"}
        each.append(read_strain(store, truth)[1])
    out = dict(first, realisations=len(each))
    for k in COMPONENTS:
        out[f"mae_{k}_each"] = [float(e[f"mae_{k}"]) for e in each]
        out[f"mae_{k}"] = float(np.mean(out[f"mae_{k}_each"]))
    return out


def case_rows(case: Case, scan: list[int], floor: dict[str, Any],
              results: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """One JSON row per method of a case (MAE, ratio to the floor, the floor itself)."""
    rows = []
    for m in METHODS:
        r = results.get(m)
        if r is None:
            continue
        row: dict[str, Any] = {"data": case.data, "dose": case.dose,
                               "background_weight": case.background, "scan": scan,
                               "method": m, "error": r.get("error")}
        fl = weighted_floor(floor, r)
        for k in COMPONENTS:
            v = r.get(f"mae_{k}", math.nan) if row["error"] is None else math.nan
            row[f"mae_{k}"] = v
            row[f"crb_{k}"] = fl[k]
            row[f"ratio_{k}"] = v / fl[k] if np.isfinite(fl[k]) else math.nan
        if "realisations" in r and row["error"] is None:
            row["realisations"] = r["realisations"]
            for k in COMPONENTS:
                row[f"ratio_{k}_each"] = [v / fl[k] for v in r[f"mae_{k}_each"]]
        for k in ("n_phases", "acc_phase", "acc_sample", "n_eval", "n_both_sample",
                  *(f"n_{PHASE_NAMES[p]}" for p in SAMPLE_PHASES), "pool_sigma_px",
                  "ref_scale", "forward_model"):
            if k in r and row["error"] is None:
                row[k] = r[k]
        row["time_s"] = r.get("time_s", math.nan)
        rows.append(row)
    return rows


def fmt(v: float, k: str) -> str:
    """A cell: strain in %, theta in deg, NaN as ``-``."""
    if not np.isfinite(v):
        return "-"
    return f"{v:.3f}" if k == "theta" else f"{SCALE[k] * v:.3f}"


def fmt_ratio(v: float) -> str:
    """A ratio-to-floor cell."""
    return "-" if not np.isfinite(v) else f"{v:.2f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    """One table: a floor line per case, then each method."""
    print("MAE against the truth re-referenced on each result's reference pixels "
          "(strain in %, theta in deg); /CRB = MAE over the Cramer-Rao floor of one pattern")
    head = (f"{'data':19} {'dose':>10} {'bg':>4} {'method':15} "
            + " ".join(f"{k:>7}" for k in COMPONENTS) + " "
            + " ".join(f"{k[:5] + '/CRB':>10}" for k in COMPONENTS)
            + f" {'phases (acc.)':>14} {'eval':>9} {'time':>6}")
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        key = (r["data"], r["dose"], r["background_weight"])
        lead = f"{r['data']:19} {dose_label(r['dose']):>10} {r['background_weight']:>4g} "
        if key != last:
            last = key
            floor = " ".join(f"{fmt(r[f'crb_{k}'], k):>7}" for k in COMPONENTS)
            print(lead + f"{'CRB floor':15} " + floor)
        if r["error"] is not None:
            print(lead + f"{r['method']:15} failed: {r['error']}  ({r['time_s']:.0f} s)")
            continue
        phases = ""
        if r["method"].startswith("ccstae") and "n_phases" in r:
            phases = f"{r['n_phases']} ({100 * r['acc_phase']:.1f} %)"
        px = f"{r['n_eval']}/{r['n_both_sample']}" if "n_eval" in r else ""
        line = (lead + f"{r['method']:15} "
                + " ".join(f"{fmt(r[f'mae_{k}'], k):>7}" for k in COMPONENTS) + " "
                + " ".join(f"{fmt_ratio(r[f'ratio_{k}']):>10}" for k in COMPONENTS)
                + f" {phases:>14} {px:>9} {r['time_s']:5.0f}s")
        if r["method"] == "ccstae" and "pool_sigma_px" in r:
            line += "  pooling " + "/".join(f"{v:g}" for v in r["pool_sigma_px"].values()) + " px"
        if "realisations" in r:
            line += (f"  mean of {r['realisations']} noise draws, /CRB "
                     + " ".join(f"{min(r[f'ratio_{k}_each']):.2f}-"
                                f"{max(r[f'ratio_{k}_each']):.2f}" for k in COMPONENTS))
        print(line)


def floor_line(rows: list[dict[str, Any]], x: str, k: str) -> list[tuple[float, float]]:
    """``(x, floor)`` points of component ``k``: per ``x`` the median of the methods'
    floors (each weights the phases by the pixels it scored; they differ by a few %)."""
    by_x: dict[float, list[float]] = {}
    for r in rows:
        if r[x] is not None and np.isfinite(r[f"crb_{k}"]):
            by_x.setdefault(r[x], []).append(r[f"crb_{k}"])
    return [(v, float(np.median(f))) for v, f in sorted(by_x.items())]


def dose_panel(ax: Axes, rows: list[dict[str, Any]], k: str) -> None:
    """MAE of component ``k`` against dose for one data set: a line per method, the floor
    dashed, noise-free as a separate point at the right, failures as crosses at the top."""
    doses = sorted({r["dose"] for r in rows if r["dose"] is not None})
    x_free = NOISE_FREE_X * max(doses) if doses else 1.0
    for m in METHODS:
        mr = [r for r in rows if r["method"] == m]
        if not mr:
            continue
        noisy = sorted((r for r in mr if r["dose"] is not None), key=lambda r: r["dose"])
        x = np.array([r["dose"] for r in noisy], float)
        y = np.array([SCALE[k] * r[f"mae_{k}"] for r in noisy], float)
        ax.plot(x, y, "-", marker=MARKERS[m], color=COLOURS[m], label=m, ms=4)
        for r in mr:
            v = SCALE[k] * r[f"mae_{k}"]
            xv = x_free if r["dose"] is None else r["dose"]
            if r["dose"] is None and np.isfinite(v):
                ax.plot([xv], [v], MARKERS[m], color=COLOURS[m], ms=7, mfc="none")
            if not np.isfinite(v):  # failed: a cross at the top edge
                ax.plot([xv], [0.97], "x", color=COLOURS[m], ms=7,
                        transform=ax.get_xaxis_transform(), clip_on=False)
    floor = floor_line(rows, "dose", k)
    if floor:
        ax.plot([d for d, _ in floor], [SCALE[k] * v for _, v in floor], **FLOOR_STYLE)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [*doses, x_free]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{d:.0e}" for d in doses] + ["noise-\nfree"], fontsize=7)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(min(ticks) / 2, x_free * 2)
    ax.axvline(np.sqrt(x_free * max(doses)) if doses else x_free, color="0.8", lw=0.8)
    ax.set_xlabel("dose (e-/pattern)")
    ax.set_ylabel(f"MAE {k} ({UNIT[k]})")
    ax.grid(True, which="major", alpha=0.3)


def dose_figure(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """``path``: one row of panels (exx, eyy, exy, theta) per data set."""
    sets = [s for s in (*SIM_SETS, *ABTEM_SETS)
            if any(r["data"] == s and r["background_weight"] == 0 for r in rows)]
    if not sets:
        return None
    fig = Figure(figsize=(16, 3.4 * len(sets) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(len(sets), len(COMPONENTS)))
    for i, s in enumerate(sets):
        sr = [r for r in rows if r["data"] == s and r["background_weight"] == 0]
        for j, k in enumerate(COMPONENTS):
            dose_panel(axes[i, j], sr, k)
            axes[i, j].set_title(f"{s} ({sr[0]['scan'][0]}x{sr[0]['scan'][1]}): {k}",
                                 fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("MAE against dose (open markers at the right: noise-free; crosses at the "
                 "top: failed)")
    fig.savefig(path, dpi=100)
    return path


def background_figure(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """``path``: MAE against the diffuse-background weight at :data:`BACKGROUND_DOSE`."""
    br = [r for r in rows if r["data"] == BACKGROUND_SET and r["dose"] == BACKGROUND_DOSE]
    if len({r["background_weight"] for r in br}) < 2:
        return None
    fig = Figure(figsize=(16, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(COMPONENTS))
    for ax, k in zip(axes, COMPONENTS, strict=True):
        for m in METHODS:
            mr = sorted((r for r in br if r["method"] == m),
                        key=lambda r: r["background_weight"])
            if mr:
                ax.plot([r["background_weight"] for r in mr],
                        [SCALE[k] * r[f"mae_{k}"] for r in mr], "-", marker=MARKERS[m],
                        color=COLOURS[m], label=m, ms=4)
        fl = floor_line(br, "background_weight", k)
        ax.plot([w for w, _ in fl], [SCALE[k] * v for _, v in fl], **FLOOR_STYLE)
        ax.set_yscale("log")
        ax.set_xlabel("diffuse background weight")
        ax.set_ylabel(f"MAE {k} ({UNIT[k]})")
        ax.set_title(f"{BACKGROUND_SET}, {BACKGROUND_DOSE:.0e} e-: {k}", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=100)
    return path


def jsonable(v: Any) -> Any:
    """NaN as null, recursively (strict JSON)."""
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, float | np.floating):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="heterostructure 16x16 noise-free and 1e3, abTEM single at 1e5")
    ap.add_argument("--scan", type=int, default=None,
                    help=f"own-simulator scan side ({SCAN}; {QUICK_SCAN} with --quick)")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="where the JSON and the PNGs go")
    add_epochs(ap)
    args = ap.parse_args()
    scan = args.scan or (QUICK_SCAN if args.quick else SCAN)
    cases = cases_for(args.quick)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        # py4DSTEM started once for every case: its imports (~3 s) are not its work; its
        # whole-script time is bench_peers' measure
        peer = (stack.enter_context(peer_module().PeerProcess(PEERS_PYTHON))
                if PEERS_PYTHON.exists() else None)
        for i, case in enumerate(cases, 1):
            t = time.perf_counter()
            npy, truth, floor = make_case(case, scan, Path(tmp))
            shape = list(np.load(npy, mmap_mode="r").shape[:2])
            res = run_methods(npy, truth, Path(tmp), args.epochs, peer)
            if realised(case) and res.get("ccstae_unpooled") is not None:
                res["ccstae_unpooled"] = with_realisations(
                    case, scan, truth, Path(tmp), res["ccstae_unpooled"], args.epochs)
            rows += case_rows(case, shape, floor, res)
            failed = [m for m, r in res.items() if r is not None and "error" in r]
            print(f"[{i}/{len(cases)}] {case.data} {dose_label(case.dose)} "
                  f"bg {case.background:g}: {time.perf_counter() - t:.0f} s"
                  + (f", failed: {', '.join(failed)}" if failed else ""), flush=True)
            for f in Path(tmp).glob(f"{case.slug}*"):  # keep the scratch space small
                if f.is_dir():
                    shutil.rmtree(f)
                else:
                    f.unlink()
    total = time.perf_counter() - t0
    print()
    print_table(rows)
    if not PEERS_PYTHON.exists():
        print(f"py4DSTEM skipped: no {PEERS_PYTHON} (`make bench-peers` creates it)")
    print(f"total run time {total:.0f} s ({len(cases)} cases)")
    stem = "dose_quick" if args.quick else "dose"
    save_json(args.results, f"{stem}.json", jsonable(rows))
    written = [dose_figure(rows, args.results / f"{stem}.png")]
    if not args.quick:
        written.append(background_figure(rows, args.results / "background.png"))
    print("wrote", ", ".join(str(p) for p in [args.results / f"{stem}.json", *written] if p))


if __name__ == "__main__":
    main()
