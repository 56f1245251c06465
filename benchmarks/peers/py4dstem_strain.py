"""py4DSTEM 0.14.18 Bragg-disk strain mapping of a (scan_y, scan_x, k_y, k_x) .npy array, as a
user of py4DSTEM would run it, with the result converted to ccstae-hpc's conventions.

Run with the peers environment's python (py4DSTEM 0.14.18 needs numpy < 2), never with the
project's: this script imports neither ``ccstae_hpc`` nor numpy-2-only code.

    python py4dstem_strain.py DATA.npy OUT.npz [--reference-mask MASK.npy] [--threads N]
    python py4dstem_strain.py --serve    # many data sets, one JSON request per stdin line

Pipeline (py4DSTEM API throughout): DataCube -> hot-pixel filter -> synthetic probe whose radius
and edge width are measured on the data -> ``find_Bragg_disks`` (CPU) -> origin measured from
the central beam and fitted by a plane -> Bragg vector map -> basis vectors chosen
automatically from its maxima -> ``fit_basis_vectors`` -> ``get_strain`` against the median
lattice of the reference pixels (``--reference-mask``, else every successful fit).
Every parameter is derived from the data (see ``derive_parameters``); none is tuned to one set.

Output ``OUT.npz``: float32 ``exx, eyy, exy, theta`` (scan_y, scan_x; NaN where the fit failed)
in the project's conventions (``x`` = scan columns, ``y`` = scan rows, real-space strain,
tensor shear, ``theta`` in degrees turning +x toward +y), ``ok`` (bool, successful fits),
``timing`` (JSON: wall seconds per stage, ``per_pattern_ms`` for the whole pipeline, and CPU
time), ``params`` (JSON: the derived parameters and the chosen basis) and, unconverted,
py4DSTEM's own maps ``py4dstem_strain`` (e_xx, e_yy, e_xy, theta), fitted basis vectors
``py4dstem_g1g2`` (g1x, g1y, g2x, g2y in its (qx, qy) pixels) and reference ``py4dstem_gref``.

Conversion from py4DSTEM (established against the simulator's truth with
``check_py4dstem.py``, which scores every alternative reading): py4DSTEM's ``qx`` is the first
detector axis, rows = ``y``, so its ``e_xx`` is our ``eyy`` and its ``e_yy`` our ``exx``; its
``e_xy`` is the tensor shear with our sign; its ``theta`` is in radians and, with the axes
swapped, has our sign.  py4DSTEM's strain is the linearised ``1 - beta`` of the
reciprocal-lattice transform ``beta`` (``g = beta g_ref``), kept as py4DSTEM computes it: at
the 4 % WS2/WSe2 mismatch it differs from the finite strain by ~0.16 %, at 1 % by ~0.01 %.
Its reference, the element-wise median of the basis vectors' components, depends on the basis
and on how the reference pixels' lattices are distributed: see ``check_py4dstem.py``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

# one BLAS/OpenMP thread per process, set before numpy loads: py4DSTEM's CPU disk detection is a
# serial loop (numpy's FFT is single-threaded), so --threads parallelises over processes instead
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # choose_basis_vectors and get_strain always draw figures

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import py4DSTEM  # noqa: E402
from emdfile import PointListArray  # noqa: E402
from profile_edges import edge_width, outer_edge, radial_profile  # noqa: E402
from py4DSTEM.braggvectors import BraggVectors, Probe, find_Bragg_disks  # noqa: E402
from py4DSTEM.preprocess.utils import get_maxima_2D  # noqa: E402
from py4DSTEM.process.calibration import get_probe_size  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

# py4DSTEM's defaults for the correlation (the values its tutorials use)
SIGMA_CC = 2.0
# multicorr: on the abTEM multislice sets it places a first-order disk up to ~0.5 px from the
# disk's centroid ("poly" agrees to 0.01 px, so noise-free it does 5x better), but at 1e5
# e-/pattern "poly" doubles the MAE: py4DSTEM's default is kept
SUBPIXEL = "multicorr"
UPSAMPLE = 16
# py4DSTEM's default minimum peak intensity relative to the pattern's strongest (the central
# beam), used only as an upper bound: the threshold is derived from the data in
# ``derive_parameters``.  In abTEM multislice patterns of a monolayer ~99 % of the electrons
# stay in the central disk and a first-order disk's correlation peak is ~7e-4 of the central
# one, so the default alone rejects every Bragg disk; in the project's simulator (2-3.5e-2)
# the derived value exceeds it and the default applies (and there the absolute threshold,
# ~2e-2 of the central peak, is the one that binds)
MIN_RELATIVE_INTENSITY = 0.005
# the relative threshold as a fraction of the weakest first-order correlation peak of the
# aligned mean (relative to its central peak).  A single pattern's first-order peaks scatter
# about the mean's: in the multislice sets the weakest of a sample pattern is down to 0.6 times
# the mean's weakest at 1e5 e-/pattern, 0.35 times where the probe straddles two phases or the
# sample's edge.  A quarter keeps them all; the noise is the absolute threshold's business
# (``DETECTION_SIGMA``), and 0.1-0.5 change the multislice MAE by ~10 %
RELATIVE_FRACTION = 0.25
# first-order peaks: the strong maxima within 1.5 g_min of the central beam, the shortest
# lattice vectors whatever the strain or the cell's shape (the basis comes from them); the next
# shell of a hexagonal lattice lies at sqrt(3) g_min
FIRST_ORDER_SHELL = 1.5
# false-alarm level for a correlation maximum, in robust standard deviations of the
# correlation background: ~1e-4 spurious peaks per 128 x 128 pattern for Gaussian noise
DETECTION_SIGMA = 5.0


def _aligned_mean(dc: Any, max_patterns: int = 256) -> np.ndarray:
    """Mean of up to ``max_patterns`` patterns spread over the scan, each aligned to the first
    by py4DSTEM's integer-pixel cross-correlation: the descan shift no longer blurs the central
    disk, so its radius and edge can be measured."""
    ny, nx = dc.Rshape
    step = max(1, int(np.ceil(np.sqrt(ny * nx / max_patterns))))
    roi = np.zeros((ny, nx), dtype=bool)
    roi[step // 2::step, step // 2::step] = True
    probe = dc.get_vacuum_probe(ROI=roi, align=True, returncalc=True)
    return np.asarray(probe.probe, dtype=np.float64)


def derive_parameters(dc: Any) -> tuple[dict[str, Any], np.ndarray]:
    """Every detection parameter from the data; returns ``(params, kernel)``.

    * hot pixels (``filter_hot_pixels``): a pixel of the mean pattern exceeding the brightest of
      its 20 neighbours by 10 % of the mean's maximum (a disk spans many pixels, so its
      brightest pixel has neighbours of nearly its intensity; the simulator's hot pixels
      exceed theirs by 60-75 % of the maximum);
    * aligned mean: up to 256 patterns spread over the scan, aligned by py4DSTEM's
      ``get_vacuum_probe`` (64 left the lattice spacing to noise at 200 e-/pattern);
    * disk radius: ``get_probe_size`` on the aligned mean (the plateau of area-vs-threshold),
      or the radial profile's outermost steep drop where that lies further out
      (``profile_edges.outer_edge``): under the original paper's background, a Lorentzian of 1.3 px
      half-width on the beam, ``get_probe_size`` measures the Lorentzian's core (2.0-2.1 px for
      a 4.5 px disk at weight 0.7, 3.4 px at 0.25), and the too-small kernel pulls every
      first-order disk ~3 px toward the beam (exx MAE 2.2 % at 1e5 e-/pattern, 0.10 % with
      the edge's radius); at 100 e-/pattern noise shrinks it too (2.4 px, exx MAE 2.7 %,
      1.3 % with the edge's).  Where ``get_probe_size`` works the edge lies within 0.06 px
      of it (the abTEM sets, the 96x96 scan of ``bench_peers``: unchanged);
      edge width: 88 %-12 % rim of the same disk's radial profile (``profile_edges.edge_width``);
      py4DSTEM's radial background subtraction (``find_Bragg_disks(radial_bksb=True)``)
      was measured too: with the edge's radius it leaves the MAE under that background equal
      or up to 6 % worse and doubles the detection's time, so it is not used;
    * kernel: py4DSTEM's ``sigmoid`` kernel on a synthetic probe of that radius and width, with
      the subtracted annulus from 1 to 2 radii (covers the disk's rim, stays clear of the next
      disk whenever disks do not overlap);
    * shortest reciprocal-lattice vector ``g_min``: the nearest correlation maximum to the
      central beam in the aligned mean, among maxima of at least 10 % of the strongest
      non-central one (weaker ones are the diffuse halo's ripples or high orders);
    * relative detection threshold (of the disks, and of the Bragg vector map's maxima):
      ``RELATIVE_FRACTION`` of the weakest first-order peak (within ``FIRST_ORDER_SHELL g_min``)
      relative to the central peak, at most py4DSTEM's default ``MIN_RELATIVE_INTENSITY``: a
      thin specimen's disks can be 1e-3 of the central beam, a thick one's tens of %;
    * minimum peak spacing ``g_min / 2`` (two peaks closer than half the shortest lattice
      vector cannot both be disks, whatever the strain or rotation); edge boundary: one radius
      (a disk closer to the edge is clipped and its centre biased);
    * absolute detection threshold: ``DETECTION_SIGMA`` robust standard deviations of the
      smoothed correlation of single patterns (its background between the disks);
    * indexing tolerance ``0.35 g_min``: below ``g_min / 2`` it cannot assign a peak to the
      wrong lattice point, and it admits outer disks moved by several % strain or degrees.
    """
    Q = dc.Qshape
    mean = dc.get_dp_mean(returncalc=True).data.astype(np.float64)
    params: dict[str, Any] = {"hot_pixel_threshold": float(0.1 * mean.max())}
    _, hot = dc.filter_hot_pixels(params["hot_pixel_threshold"], return_mask=True)
    params["hot_pixels"] = int(np.sum(hot))

    am = _aligned_mean(dc)
    radius, qx0, qy0 = get_probe_size(am)
    profile = radial_profile(am, (qx0, qy0))
    params["probe_size_radius"] = float(radius)
    radius = max(radius, outer_edge(profile))
    width = edge_width(profile, radius)
    params.update(radius=float(radius), edge_width=width)
    probe = Probe.generate_synthetic_probe(radius=radius, width=width, Qshape=Q)
    kernel = probe.get_kernel(mode="sigmoid", origin=(Q[0] / 2, Q[1] / 2),
                              radii=(radius, 2 * radius))

    # correlation maxima of the aligned mean: the lattice without noise
    kernel_ft = np.conj(np.fft.fft2(kernel))
    cc = np.maximum(np.real(np.fft.ifft2(np.fft.fft2(am) * kernel_ft)), 0)
    peaks = get_maxima_2D(cc, subpixel="poly", sigma=SIGMA_CC, minSpacing=2 * radius,
                          edgeBoundary=int(np.ceil(radius)), maxNumPeaks=200)
    d = np.hypot(peaks["x"] - qx0, peaks["y"] - qy0)
    centre = int(np.argmin(d))
    others = np.delete(np.arange(len(peaks)), centre)
    strong = others[peaks["intensity"][others] >= 0.1 * peaks["intensity"][others].max()]
    g_min = float(d[strong].min())
    params.update(g_min=g_min, min_peak_spacing=0.5 * g_min,
                  edge_boundary=int(np.ceil(radius)), max_peak_spacing=0.35 * g_min)
    first = strong[d[strong] <= FIRST_ORDER_SHELL * g_min]
    first_rel = float(peaks["intensity"][first].min() / peaks["intensity"][centre])
    params.update(first_order_relative_intensity=first_rel,
                  min_relative_intensity=min(MIN_RELATIVE_INTENSITY,
                                             RELATIVE_FRACTION * first_rel))

    # correlation background of single patterns (unclipped, smoothed like the detection)
    ny, nx = dc.Rshape
    rng = np.random.default_rng(0)
    sigmas = []
    for i in rng.choice(ny * nx, size=min(16, ny * nx), replace=False):
        c = np.real(np.fft.ifft2(np.fft.fft2(dc.data[i // nx, i % nx]) * kernel_ft))
        c = gaussian_filter(c, SIGMA_CC)
        sigmas.append(1.4826 * np.median(np.abs(c - np.median(c))))
    params["min_absolute_intensity"] = float(DETECTION_SIGMA * np.median(sigmas))
    # every lattice point that fits on the detector: a 2D cell with shortest vector g_min has
    # area >= g_min^2 sin(60 deg)
    params["max_num_peaks"] = int(np.ceil(Q[0] * Q[1] / (g_min**2 * np.sqrt(3) / 2))) + 1
    return params, kernel


_FORKED: dict[str, Any] = {}  # the DataCube and kernel, inherited by forked workers


def detect(dc: Any, kernel: np.ndarray, p: dict[str, Any], threads: int) -> Any:
    """``find_Bragg_disks`` on the CPU.  With ``threads > 1`` the scan rows are split over
    forked processes, each running the same py4DSTEM call on its positions (what a user does
    without a Dask/ipyparallel cluster and an HDF5 copy of the data); the peaks are identical."""
    kw = dict(corrPower=1, sigma_cc=SIGMA_CC, subpixel=SUBPIXEL, upsample_factor=UPSAMPLE,
              minAbsoluteIntensity=p["min_absolute_intensity"],
              minRelativeIntensity=p["min_relative_intensity"],
              minPeakSpacing=p["min_peak_spacing"], edgeBoundary=p["edge_boundary"],
              maxNumPeaks=p["max_num_peaks"])
    if threads <= 1:
        return dc.find_Bragg_disks(kernel, **kw)
    ny, nx = dc.Rshape
    blocks = [b for b in np.array_split(np.arange(ny), threads) if b.size]
    _FORKED.update(dc=dc, kernel=kernel, kw=kw)
    try:
        with mp.get_context("fork").Pool(len(blocks)) as pool:
            parts = pool.map(_detect_rows, blocks)
    finally:
        _FORKED.clear()
    pla = PointListArray(dtype=[("qx", np.float64), ("qy", np.float64),
                                ("intensity", np.float64)], shape=(ny, nx))
    for rows, found in zip(blocks, parts, strict=True):
        for i, peaks in enumerate(found):
            pla[int(rows[i // nx]), i % nx].add_data_by_field(
                (peaks["qx"], peaks["qy"], peaks["intensity"]))
    bv = BraggVectors(dc.Rshape, dc.Qshape)
    bv.set_raw_vectors(pla)
    dc.attach(bv)  # shares the DataCube's calibration, as find_Bragg_disks does
    return bv


def _detect_rows(rows: np.ndarray) -> list[np.ndarray]:
    """Peaks of the patterns in scan ``rows`` (row-major), in a forked worker."""
    dc, kernel, kw = _FORKED["dc"], _FORKED["kernel"], _FORKED["kw"]
    ry, rx = np.meshgrid(rows, np.arange(dc.Rshape[1]), indexing="ij")
    found = find_Bragg_disks((dc, ry.ravel(), rx.ravel()), kernel, **kw)
    return [q.data for q in found]


def choose_basis(strain: Any, p: dict[str, Any]) -> tuple[int, int, int]:
    """Origin, g1, g2 indices among the Bragg vector map's maxima (the same maxima call
    ``choose_basis_vectors`` makes): g1 the shortest vector, g2 the shortest one not parallel
    to g1.  py4DSTEM's own guess takes g2 near-perpendicular to g1, which on a hexagonal lattice
    is a second-order vector: a non-primitive basis that mis-indexes half the disks.

    Ties among symmetry-equivalent vectors (lengths within 5 %) are broken by direction, g1
    nearest to the detector's +x (columns) and g2 at the smallest angle from g1 turning toward
    +y, so that the basis does not hop between runs: py4DSTEM's reference, an element-wise
    median of the basis vectors' components, depends on which basis it is given."""
    g = get_maxima_2D(strain.bvm.data, **_bvm_maxima_kw(p))
    o = strain.origin
    x, y = g["y"] - o[1], g["x"] - o[0]  # py4DSTEM's qx is the row axis
    d = np.hypot(x, y)
    i0 = int(np.argmin(d))
    d[i0] = np.inf
    near = np.flatnonzero(d <= 1.05 * d.min())
    i1 = int(near[np.argmin(np.abs(np.arctan2(y[near], x[near])))])
    # angle from g1 in (-180, 180] deg; not parallel: at least 30 deg (a reduced basis has 60-120)
    ang = np.arctan2(x[i1] * y - y[i1] * x, x[i1] * x + y[i1] * y)
    d2 = np.where(np.abs(np.sin(ang)) > 0.5, d, np.inf)
    d2[i1] = np.inf
    near = np.flatnonzero(d2 <= 1.05 * d2.min())
    i2 = int(near[np.argmin(np.mod(ang[near], 2 * np.pi))])
    return i0, i1, i2


def _bvm_maxima_kw(p: dict[str, Any]) -> dict[str, Any]:
    # the Bragg vector map piles every pattern's disks up; strain and rotation spread an outer
    # disk's pile over a few pixels while the centred beam's stays sharp.  Smoothed on the disk's
    # scale, a pile compares with the central one as a disk's correlation peak compares with
    # the central beam's, so the detection's relative threshold applies to the map as well
    return dict(subpixel="poly", upsample_factor=UPSAMPLE, sigma=0.5 * p["radius"],
                minRelativeIntensity=p["min_relative_intensity"], minSpacing=p["min_peak_spacing"],
                edgeBoundary=1, maxNumPeaks=p["max_num_peaks"])


def _fail(msg: str) -> NoReturn:
    """One line on stderr and exit code 2, like the project's command line."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run(data_path: Path, ref_path: Path | None, threads: int) -> dict[str, Any]:
    """The whole pipeline; returns the arrays and JSON strings of the output npz."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    data = np.load(data_path)
    if data.ndim != 4:
        _fail(f"{data_path} is {data.ndim}D, expected (scan_y, scan_x, k_y, k_x)")
    # float32: the hot-pixel filter writes medians and the correlation works in floats
    dc = py4DSTEM.DataCube(data=np.ascontiguousarray(data, dtype=np.float32))
    ny, nx = dc.Rshape
    ref = None
    if ref_path is not None:
        ref = np.load(ref_path).astype(bool)
        if ref.shape != (ny, nx):
            _fail(f"reference mask {ref.shape} does not match the scan {(ny, nx)}")
    t1 = time.perf_counter()

    params, kernel = derive_parameters(dc)
    t2 = time.perf_counter()
    bv = detect(dc, kernel, params, threads)
    t3 = time.perf_counter()

    # origin: the brightest peak of each pattern (the central beam), fitted by a plane
    bv.measure_origin()
    bv.fit_origin(fitfunction="plane", plot=False)
    strain = py4DSTEM.StrainMap(braggvectors=bv)
    i0, i1, i2 = choose_basis(strain, params)
    strain.choose_basis_vectors(index_origin=i0, index_g1=i1, index_g2=i2,
                                **_bvm_maxima_kw(params))
    strain.fit_basis_vectors(max_peak_spacing=params["max_peak_spacing"])
    ok = np.asarray(strain.mask, dtype=bool)
    gvects = None if ref is None else (ref & ok)
    if gvects is not None and not gvects.any():
        _fail("no successful fit inside the reference mask")
    strain.get_strain(gvects=gvects)
    plt.close("all")
    t4 = time.perf_counter()

    # py4DSTEM: slices (e_xx, e_yy, e_xy, theta) with x = qx = rows; see the module docstring
    e_rr, e_cc, e_rc, rot = (np.asarray(strain.data[i], dtype=np.float64) for i in range(4))
    out = {"exx": e_cc, "eyy": e_rr, "exy": e_rc, "theta": np.rad2deg(rot)}
    out = {k: np.where(ok, v, np.nan).astype(np.float32) for k, v in out.items()}
    n, cpu = ny * nx, _cpu_seconds() - c0
    # wall time per stage; CPU time (this process and its detection workers) does not depend
    # on what else runs on the machine
    timing = {"load_s": t1 - t0, "prepare_s": t2 - t1, "detect_s": t3 - t2,
              "fit_strain_s": t4 - t3, "total_s": t4 - t0, "n_patterns": n,
              "per_pattern_ms": 1e3 * (t4 - t0) / n, "cpu_s": cpu,
              "cpu_per_pattern_ms": 1e3 * cpu / n, "threads": threads}
    params.update(g0=list(map(float, strain.g0)), g1=list(map(float, strain.g1)),
                  g2=list(map(float, strain.g2)), n_ok=int(ok.sum()),
                  reference="mask" if ref is not None else "all successful fits",
                  py4dstem=py4DSTEM.__version__)
    # py4DSTEM's own maps and lattice fit, unconverted: the conversion can be audited
    g1g2 = np.stack([strain.g1g2_map.get_slice(k).data for k in ("g1x", "g1y", "g2x", "g2y")])
    g_ref = np.array(strain.get_reference_g1g2(ok if gvects is None else gvects))
    out.update(ok=ok, timing=np.array(json.dumps(timing)), params=np.array(json.dumps(params)),
               py4dstem_strain=np.asarray(strain.data[:4], dtype=np.float64),
               py4dstem_g1g2=g1g2.astype(np.float64), py4dstem_gref=g_ref)
    return out


def run_to_file(data: Path, out_path: Path, ref_path: Path | None, threads: int) -> str:
    """:func:`run` on ``data``, its maps saved to ``out_path``; a one-line summary."""
    out = run(data, ref_path, max(1, threads))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path, **out)
    t = json.loads(str(out["timing"]))
    return (f"py4DSTEM {py4DSTEM.__version__}: {int(out['ok'].sum())}/{out['ok'].size} fits, "
            f"{t['total_s']:.1f} s, {t['per_pattern_ms']:.1f} ms/pattern -> {out_path}")


def serve() -> int:
    """Run requests from stdin, one JSON object per line (``data``, ``out``,
    ``reference_mask`` or null, ``threads``), until it closes; answer each with one JSON
    line on stdout (``ok``, and ``message`` or ``error``).  A benchmark with many data sets
    starts the peer once instead of paying its imports (~3 s) for each."""
    reply = sys.stdout
    sys.stdout = sys.stderr  # anything the pipeline prints stays out of the answers
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            mask = req.get("reference_mask")
            msg = run_to_file(Path(req["data"]), Path(req["out"]),
                              Path(mask) if mask else None, int(req.get("threads", 1)))
            answer = {"ok": True, "message": msg}
        except Exception as e:  # noqa: BLE001 - reported to the caller, who raises it
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply.write(json.dumps(answer) + "\n")
        reply.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, nargs="?", help="(scan_y, scan_x, k_y, k_x) .npy array")
    ap.add_argument("out", type=Path, nargs="?", help="output .npz")
    ap.add_argument("--reference-mask", type=Path, default=None,
                    help="(scan_y, scan_x) bool .npy: the reference lattice is the median over "
                         "its successful fits (default: every successful fit)")
    ap.add_argument("--threads", type=int, default=1,
                    help="processes for disk detection (default 1: py4DSTEM's serial loop)")
    ap.add_argument("--serve", action="store_true",
                    help="run the requests of stdin, one JSON line each (see serve())")
    args = ap.parse_args(argv)
    # py4DSTEM warns that the real/reciprocal rotation is uncalibrated: detector and scan axes
    # are parallel by the project's convention
    warnings.filterwarnings("ignore", message=".*rotation not calibrated.*")
    if args.serve:
        return serve()
    if args.data is None or args.out is None:
        ap.error("DATA and OUT are required without --serve")
    print(run_to_file(args.data, args.out, args.reference_mask, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
