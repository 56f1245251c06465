"""Accuracy on physics the model did not come from: abTEM multislice data, `ccstae run` next
to a centre-of-mass lattice fit and py4DSTEM 0.14.18 on the same patterns.

Data (simulated with abTEM into ``tests/data`` on first use):
``tests/data/ws2_multislice_12x12`` (single-phase WS2 under a smooth strain and rotation
field) and ``tests/data/ws2_wse2_multislice_16x16`` (WS2/WSe2 lateral interface with vacuum),
truth from the atom positions (:mod:`ccstae_hpc.sim.multislice`), noise-free and with Poisson
noise.  Every method is referenced on the same pixels as its truth (the result's reference
region), errors are mean absolute errors over the pixels that are sample in truth and result.
py4DSTEM runs in its own environment (``make bench-peers``; skipped with a message without
it) and gets ccstae's reference pixels as its reference region.
Prints one table and writes ``benchmarks/results/multislice.json``.

Run: ``python benchmarks/bench_multislice.py [--quick]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from results_io import save_json
from train_options import add_epochs, run_epochs

from ccstae_hpc import cli
from ccstae_hpc.core.com import deformation, fit_patterns, reference_lattice
from ccstae_hpc.core.strain import reference_deformation, relative_strain
from ccstae_hpc.sim.evaluate import COMPONENTS, PHASE_NAMES, strain_errors, wrap_angle
from ccstae_hpc.sim.multislice import add_poisson, load_multislice, validation_set

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
RESULTS = Path(__file__).resolve().parent / "results"
SETS = {"single": "ws2_multislice_12x12", "interface": "ws2_wse2_multislice_16x16"}
DOSES = {"single": (None, 1e5), "interface": (None, 1e5)}


def com_errors(data: np.ndarray, truth: dict, ds: xr.Dataset) -> dict[str, float]:
    """Centre-of-mass lattice fit of every pattern, referenced on the result's reference
    pixels, against the truth referenced on the same pixels."""
    ny, nx = data.shape[:2]
    flat = data.reshape(ny * nx, *data.shape[2:]).astype(np.float32)
    lat = reference_lattice(flat.mean(0))
    fit = fit_patterns(flat, lat)
    M = deformation(fit["Gp"], lat.G).reshape(ny, nx, 2, 2)
    F = np.asarray(truth["F"], np.float64)
    both = (truth["phase"] > 0) & np.isfinite(M).all(axis=(-2, -1))
    ref = np.asarray(ds["reference"].values, bool) & both
    if not ref.any():
        ref = both
    pred = relative_strain(M[both], reference_deformation(M, ref))
    tru = relative_strain(F[both], reference_deformation(F, ref))
    out = {}
    for k in COMPONENTS:
        d = pred[k] - tru[k]
        if k == "theta":
            d = wrap_angle(d, 6)
        out[f"mae_{k}"] = float(np.mean(np.abs(d)))
    return out


def peer_module():  # noqa: ANN202 - a module loaded from a file path
    spec = importlib.util.spec_from_file_location(
        "check_py4dstem", ROOT / "benchmarks" / "peers" / "check_py4dstem.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def py4dstem_errors(npy: Path, truth: dict, ds: xr.Dataset, tmp: Path,
                    peer: Any | None = None) -> dict | None:
    """py4DSTEM's Bragg-disk strain pipeline on the same patterns, referenced on ccstae's
    reference pixels, in a process of its own or in ``peer`` (a started
    ``check_py4dstem.PeerProcess``); None without its environment."""
    if not PEERS_PYTHON.exists():
        return None
    chk = peer_module()
    ref = np.asarray(ds["reference"].values, bool) & (np.asarray(truth["phase"]) > 0)
    mask = tmp / f"{npy.stem}.reference.npy"
    np.save(mask, ref)
    out = tmp / f"{npy.stem}.py4dstem.npz"
    try:
        if peer is None:
            chk.run_peer(PEERS_PYTHON, npy, out, threads=2, reference_mask=mask)
        else:
            peer.run(npy, out, threads=2, reference_mask=mask)
    except RuntimeError as e:  # reported, not hidden: the peer found no lattice here
        return {"error": str(e).strip().splitlines()[-1]}
    e = strain_errors(chk.peer_dataset(out, ref), truth)
    # the pixels scored per phase: bench_dose weights the phases' floors by them
    return {**{f"mae_{k}": float(e[f"mae_{k}"]) for k in COMPONENTS},
            **{f"n_{name}": int(e.get(f"n_{name}", 0))
               for p, name in PHASE_NAMES.items() if p > 0}}


def run_case(name: str, dose: float | None, tmp: Path, epochs: int | None = None) -> dict:
    data, truth, _ = load_multislice(validation_set(DATA, SETS[name]))
    if dose is not None:
        data = add_poisson(data, dose, seed=1)
    npy = tmp / f"{name}_{dose}.npy"
    np.save(npy, data)
    out = tmp / f"{name}_{dose}.zarr"
    t = time.perf_counter()
    assert cli.main(["run", str(npy), "--out", str(out), "--engine", "direct", "--quiet",
                     *run_epochs(epochs)]) == 0
    dt = time.perf_counter() - t
    ds = xr.open_zarr(out, group="strain").load()
    err = strain_errors(ds, truth)
    pooling = {p: v["sigma_px"] for p, v in json.loads(ds.attrs["pooling"])["phases"].items()}
    # the single-pattern fits of the same store: the default pools (widths chosen per phase)
    assert cli.main(["map", str(out), "--pool-sigma", "0", "--overwrite", "--quiet"]) == 0
    single = strain_errors(xr.open_zarr(out, group="strain").load(), truth)
    keep = ("mae_", "acc_", "lattice_")
    return {"set": name, "dose": dose, "scan": list(data.shape[:2]), "run_s": dt,
            "ccstae": {k: err[k] for k in err if k.startswith(keep) or k == "n_phases"},
            "pool_sigma_px": pooling,
            "ccstae_unpooled": {k: single[k] for k in single
                                if k.startswith(keep) or k == "n_phases"},
            "com": com_errors(data, truth, ds),
            "py4dstem": py4dstem_errors(npy, truth, ds, tmp)}


def _fmt(v: float, k: str) -> str:
    return f"{v:.3f}" if k == "theta" else f"{100 * v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="noise-free single phase only")
    add_epochs(ap)
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    args = ap.parse_args()
    cases = [("single", None)] if args.quick else [(s, d) for s in SETS for d in DOSES[s]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, dose in cases:
            rows.append(run_case(name, dose, Path(tmp), args.epochs))
    print("MAE against the atom-position truth (strain in %, theta in deg); same patterns, "
          "same reference pixels")
    print(f"{'set':10} {'dose':>8} {'method':15} " + " ".join(f"{k:>7}" for k in COMPONENTS)
          + "  phases  phase acc")
    for r in rows:
        dose = "inf" if r["dose"] is None else f"{r['dose']:.0e}"
        for m in ("ccstae", "ccstae_unpooled", "com", "py4dstem"):
            e = r[m]
            if e is None:
                continue
            if "error" in e:
                print(f"{r['set']:10} {dose:>8} {m:15} failed: {e['error']}")
                continue
            extra = (f"  {int(e['n_phases']):6d}  {100 * e['acc_phase']:8.1f}%"
                     if m.startswith("ccstae") else "")
            if m == "ccstae":
                extra += f"  pooling {r['pool_sigma_px']} px"
            print(f"{r['set']:10} {dose:>8} {m[:15]:15} "
                  + " ".join(f"{_fmt(e[f'mae_{k}'], k):>7}" for k in COMPONENTS) + extra)
    for r in rows:
        b = r["com"]
        ratio = [np.mean([r[m][f"mae_{k}"] / max(b[f"mae_{k}"], 1e-12) for k in COMPONENTS])
                 for m in ("ccstae", "ccstae_unpooled")]
        print(f"{r['set']} dose {r['dose']}: ccstae/com mean MAE ratio {ratio[0]:.2f} "
              f"(unpooled {ratio[1]:.2f}), ccstae run {r['run_s']:.0f} s")
    if not PEERS_PYTHON.exists():
        print(f"py4DSTEM skipped: no {PEERS_PYTHON} (`make bench-peers` creates it)")
    save_json(args.results, "multislice_quick.json" if args.quick else "multislice.json", rows)


if __name__ == "__main__":
    main()
