"""py4DSTEM 0.14.18 against the simulator's truth, scored like a ccstae-hpc result.

Simulates a small scan with the project's simulator, runs ``py4dstem_strain.py`` with the
peers environment's python (py4DSTEM needs numpy < 2: ``make bench-peers`` creates
``.venv-peers``), wraps its maps in a Dataset shaped like the ``strain`` group and scores it
with ``ccstae_hpc.sim.evaluate.strain_errors`` (truth re-referenced on the same reference
pixels py4DSTEM used).  Prints the MAE of ``exx, eyy, exy, theta``; the MAE of every reading
of py4DSTEM's raw maps (axes swapped or not, shear sign and factor, rotation sign), which
establishes the conversion; the correlation of every returned map with every truth component;
the error of py4DSTEM's lattice fit alone (its fitted g-vectors as finite strain, referenced
like ccstae); and py4DSTEM's timing.

Exits 1 when a component's correlation with truth is not positive or, on noise-free data, its
MAE exceeds ``--max-strain-mae`` / ``--max-theta-mae`` or another reading of py4DSTEM's maps
(axes swapped, shear sign or factor, rotation sign) fits truth better: it guards the conversion.

The reference lattice is, by default, the median over the truth's largest phase (ccstae's own
default reference region; py4DSTEM finds no phases, so it is handed that mask).  With
``--reference all`` (py4DSTEM's default, every successful fit) a two-phase field gives
py4DSTEM a skewed reference: its element-wise median of the basis vectors' components falls
at different percentiles of each component of the majority phase (0.68 % eyy error on the
default heterostructure, against 0.03 % for the same lattice fit referenced like ccstae).

    python benchmarks/peers/check_py4dstem.py [--single-phase] [--scan 24] [--seed 3]
        [--dose D] [--reference phase|all] [--peers-python .venv-peers/bin/python]
        [--threads N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.core.strain import reference_deformation, relative_strain
from ccstae_hpc.sim.evaluate import (
    COMPONENTS,
    format_errors,
    load_truth,
    strain_errors,
    truth_relative,
    wrap_angle,
)
from ccstae_hpc.sim.simulate import save_simulation

ROOT = Path(__file__).resolve().parents[2]
PEER_SCRIPT = Path(__file__).resolve().with_name("py4dstem_strain.py")
SYMMETRY = 6  # hexagonal TMDs: rotations compare modulo 60 deg, as for ccstae results


def run_peer(python: Path, data: Path, out: Path, threads: int,
             reference_mask: Path | None = None) -> None:
    """Run the py4DSTEM script in its own environment; raise with its stderr on failure."""
    cmd = [str(python), str(PEER_SCRIPT), str(data), str(out), "--threads", str(threads)]
    if reference_mask is not None:
        cmd += ["--reference-mask", str(reference_mask)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    print(res.stdout.strip())


class PeerProcess:
    """The py4DSTEM script started once (``--serve``) in its own environment, for many data
    sets: :meth:`run` as :func:`run_peer`, without the peer's imports each time.  A context
    manager; its stderr goes to a temporary file, quoted when a run fails."""

    def __init__(self, python: Path) -> None:
        self._err = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([str(python), str(PEER_SCRIPT), "--serve"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._err, text=True)

    def run(self, data: Path, out: Path, threads: int,
            reference_mask: Path | None = None) -> None:
        """The peer's maps of ``data`` into ``out``; RuntimeError with its message on
        failure."""
        req = {"data": str(data), "out": str(out), "threads": int(threads),
               "reference_mask": None if reference_mask is None else str(reference_mask)}
        try:
            self._proc.stdin.write(json.dumps(req) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self._err.seek(0)
            raise RuntimeError(f"the py4DSTEM process ended ({self._proc.poll()}):\n"
                               f"{self._err.read()[-4000:]}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise RuntimeError(f"py4DSTEM failed on {data}:\n{answer['error']}")
        print(answer["message"])

    def close(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._err.close()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def peer_dataset(npz: Path, reference: np.ndarray | None = None) -> xr.Dataset:
    """The peer's maps as a ``strain``-group-like Dataset: ``sample`` = successful fit (py4DSTEM
    finds no phases: every fitted pixel is phase 1), ``reference`` = the pixels its reference
    lattice came from (the successful fits, within ``reference`` when one was given)."""
    with np.load(npz) as z:
        maps = {k: z[k] for k in COMPONENTS}
        ok = z["ok"].astype(bool)
        timing = json.loads(str(z["timing"]))
        params = json.loads(str(z["params"]))
    ref = ok if reference is None else ok & reference
    dims = ("scan_y", "scan_x")
    ny, nx = ok.shape
    ds = xr.Dataset(
        {**{k: (dims, v.astype(np.float32)) for k, v in maps.items()},
         "phase": (dims, ok.astype(np.int16)),
         "sample": (dims, ok),
         "reference": (dims, ref),
         "fit_ok": (dims, ok)},
        coords={"scan_y": np.arange(ny), "scan_x": np.arange(nx)},
        attrs={"reference": params["reference"], "reference_mode": "global",
               "map_config": json.dumps({"symmetry": SYMMETRY}),
               "method": f"py4DSTEM {params['py4dstem']}",
               "timing": json.dumps(timing), "params": json.dumps(params)},
    )
    ds["scan_y"].attrs["units"] = "px"
    ds["scan_x"].attrs["units"] = "px"
    return ds


def correlations(ds: xr.Dataset, truth: dict) -> np.ndarray:
    """Pearson correlation of each returned map (rows) with each truth component (columns),
    truth re-referenced on the result's reference pixels, over pixels finite in both."""
    tr = truth_relative(ds, truth, SYMMETRY)
    out = np.full((len(COMPONENTS), len(COMPONENTS)), np.nan)
    for i, a in enumerate(COMPONENTS):
        for j, b in enumerate(COMPONENTS):
            p, t = np.asarray(ds[a].values, np.float64), tr[b]
            sel = np.isfinite(p) & np.isfinite(t)
            if sel.sum() > 2 and p[sel].std() > 0 and t[sel].std() > 0:
                out[i, j] = np.corrcoef(p[sel], t[sel])[0, 1]
    return out


def bias(ds: xr.Dataset, truth: dict) -> dict[str, float]:
    """Mean signed error per component (a conversion error shows as a bias or a factor)."""
    tr = truth_relative(ds, truth, SYMMETRY)
    out = {}
    for k in COMPONENTS:
        d = np.asarray(ds[k].values, np.float64) - tr[k]
        if k == "theta":
            d = wrap_angle(d, SYMMETRY)
        out[k] = float(np.nanmean(d))
    return out


# candidate readings of py4DSTEM's (e_xx, e_yy, e_xy, theta) as (component, source, factor):
# its x axis may be rows or columns, its shear tensor or engineering, its rotation either sign
CANDIDATES = {
    "exx": [("e_yy", 1.0), ("e_xx", 1.0)],
    "eyy": [("e_xx", 1.0), ("e_yy", 1.0)],
    "exy": [("e_xy", 1.0), ("e_xy", -1.0), ("e_xy", 0.5), ("e_xy", 2.0)],
    "theta": [("theta", 1.0), ("theta", -1.0)],
}
CHOSEN = {k: v[0] for k, v in CANDIDATES.items()}  # what py4dstem_strain.py returns
RAW = ("e_xx", "e_yy", "e_xy", "theta")


def convention_table(npz: Path, ds: xr.Dataset, truth: dict) -> dict[str, list[tuple]]:
    """MAE against truth of every candidate reading of py4DSTEM's raw maps (theta converted
    from radians): the conversion is the one truth singles out, not a guess."""
    tr = truth_relative(ds, truth, SYMMETRY)
    with np.load(npz) as z:
        raw = dict(zip(RAW, np.asarray(z["py4dstem_strain"], np.float64), strict=True))
        ok = z["ok"].astype(bool)
    out: dict[str, list[tuple]] = {}
    for k, cands in CANDIDATES.items():
        rows = []
        for src, f in cands:
            v = f * raw[src] * (np.rad2deg(1.0) if k == "theta" else 1.0)
            d = v - tr[k]
            if k == "theta":
                d = wrap_angle(d, SYMMETRY)
            sel = ok & np.isfinite(d)
            rows.append((src, f, float(np.mean(np.abs(d[sel])))))
        out[k] = rows
    return out


def exact_errors(npz: Path, ds: xr.Dataset, truth: dict) -> dict[str, float]:
    """MAE of the finite strain of py4DSTEM's own lattice fit, referenced with the project's
    estimator on the same pixels: the lattice measurement alone, without py4DSTEM's
    linearised strain and its element-wise median of g-vector components as the reference."""
    with np.load(npz) as z:
        g1x, g1y, g2x, g2y = np.asarray(z["py4dstem_g1g2"], np.float64)
        ok = z["ok"].astype(bool)
    # reciprocal basis as columns (x, y) = (py4DSTEM qy, qx); G = A^-T G_ref per pattern, so
    # M = G^-T is the real-space deformation up to the constant frame of G_ref
    G = np.stack([np.stack([g1y, g2y], -1), np.stack([g1x, g2x], -1)], -2)
    G[~ok] = np.eye(2)
    M = np.swapaxes(np.linalg.inv(G), -1, -2)
    M[~ok] = np.nan
    ref = np.asarray(ds["reference"].values, bool) & ok
    pred = relative_strain(M[ok], reference_deformation(M, ref, SYMMETRY), SYMMETRY)
    tr = truth_relative(ds, truth, SYMMETRY)
    out = {}
    for k in COMPONENTS:
        d = pred[k] - tr[k][ok]
        if k == "theta":
            d = wrap_angle(d, SYMMETRY)
        out[f"mae_{k}"] = float(np.nanmean(np.abs(d)))
    return out


def _fmt(k: str, v: float) -> str:
    return f"{v:.4f} deg" if k == "theta" else f"{100 * v:.4f} %"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--single-phase", action="store_true",
                    help="WS2 only, no vacuum (default: the WS2/WSe2 heterostructure)")
    ap.add_argument("--scan", type=int, default=24)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--dose", type=float, default=None, help="e-/pattern (default noise-free)")
    ap.add_argument("--reference", choices=("phase", "all"), default="phase",
                    help="py4DSTEM's reference pixels: 'phase' = the truth's largest phase "
                         "(ccstae's default reference region; py4DSTEM finds no phases), "
                         "'all' = every successful fit (py4DSTEM's default)")
    ap.add_argument("--peers-python", type=Path, default=Path(".venv-peers/bin/python"),
                    help="python of the py4DSTEM environment (relative to the repo root)")
    ap.add_argument("--threads", type=int, default=1, help="passed to py4dstem_strain.py")
    ap.add_argument("--keep", type=Path, default=None, help="keep data and output here")
    ap.add_argument("--max-strain-mae", type=float, default=0.0025,
                    help="fail above this MAE (fraction) for exx, eyy, exy")
    ap.add_argument("--max-theta-mae", type=float, default=0.25, help="fail above (deg)")
    args = ap.parse_args(argv)

    python = args.peers_python if args.peers_python.is_absolute() else ROOT / args.peers_python
    if not python.exists():
        print(f"error: {python} not found. Run `make bench-peers` or pass --peers-python",
              file=sys.stderr)
        return 2
    cfg = SimConfig(scan=(args.scan, args.scan), seed=args.seed, dose=args.dose,
                    heterostructure=not args.single_phase, vacuum=not args.single_phase)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        npy, truth_path = save_simulation(work / "sim.npy", cfg)
        truth = load_truth(truth_path)
        ref = None
        if args.reference == "phase":
            phases, counts = np.unique(truth["phase"][truth["phase"] > 0], return_counts=True)
            ref = truth["phase"] == phases[np.argmax(counts)]
            np.save(work / "reference.npy", ref)
        out = work / "py4dstem.npz"
        run_peer(python, npy, out, args.threads, None if ref is None else work / "reference.npy")
        ds = peer_dataset(out, ref)
        conv = convention_table(out, ds, truth)
        exact = exact_errors(out, ds, truth)

    err = strain_errors(ds, truth)
    corr = correlations(ds, truth)
    b = bias(ds, truth)
    timing = json.loads(ds.attrs["timing"])
    kind = "single-phase WS2" if args.single_phase else "WS2/WSe2 heterostructure"
    dose = "noise-free" if args.dose is None else f"{args.dose:g} e-/pattern"
    where = ("the largest truth phase" if args.reference == "phase" else "all successful fits")
    print(f"\npy4DSTEM vs truth: {kind}, {args.scan}x{args.scan} scan, {dose}, seed {args.seed};"
          f" reference lattice: median over {where} ({int(ds.reference.sum())} px)")
    print(format_errors(err))
    if not args.single_phase:
        print("(py4DSTEM assigns no phases: every fitted pixel is phase 1, so the WS2 vs WSe2 "
              "accuracy above is only the majority share; the per-phase columns use the truth)")
    print("bias (mean signed error): " + ", ".join(f"{k} {_fmt(k, b[k])}" for k in COMPONENTS))
    print("correlation, returned map (rows) x truth (columns):")
    print(" " * 8 + "".join(f"{k:>8}" for k in COMPONENTS))
    for i, k in enumerate(COMPONENTS):
        print(f"{k:8}" + "".join(f"{c:8.3f}" for c in corr[i]))
    print("conventions: MAE of each reading of py4DSTEM's maps (its x = qx = rows; * = returned)")
    for k, rows in conv.items():
        print(f"  {k:6}" + "".join(
            f"  {'*' if (src, f) == CHOSEN[k] else ' '}{f:+g} {src}: {_fmt(k, m)}"
            for src, f, m in rows))
    print("py4DSTEM's lattice fit as finite strain, referenced like ccstae (measurement alone): "
          + ", ".join(f"{k} {_fmt(k, exact[f'mae_{k}'])}" for k in COMPONENTS))
    print("timing: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in timing.items()))

    # the tolerances and the best-reading test hold on noise-free data, where they establish the
    # conversion; with noise a shrunken reading (e.g. half the shear) can win on MAE alone
    failed = []
    for i, k in enumerate(COMPONENTS):
        if not corr[i, i] > 0:
            failed.append(f"{k} correlation with truth {corr[i, i]:.3f} is not positive")
        if args.dose is not None:
            continue
        tol = args.max_theta_mae if k == "theta" else args.max_strain_mae
        if not err[f"mae_{k}"] <= tol:
            failed.append(f"{k} MAE {_fmt(k, err[f'mae_{k}'])} > {_fmt(k, tol)}")
        best = min(conv[k], key=lambda r: r[2])
        if (best[0], best[1]) != CHOSEN[k]:
            failed.append(f"{k}: {best[1]:+g} {best[0]} fits truth better than the conversion")
    passed = ("every component positively correlated with its truth"
              + ("" if args.dose is not None else
                 ", within tolerance, and the conversion is the best reading"))
    print("FAILED: " + "; ".join(failed) if failed else "OK: " + passed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
