"""ccstae-hpc next to the tools users already run, on the same patterns, in one run.

Simulates a heterostructure scan (default 96x96, 128 px detector, 2e3 e-/pattern), then runs
as a user would, each timed by wall clock around the whole command:

* ``ccstae run DATA --out STORE`` (ingest, preprocessing, training, mapping; Prefect embedded);
* ``ccstae map STORE --workers 2 --overwrite`` on the trained store (mapping alone, the cost
  that dominates at terabyte scale; the stage's own patterns/s excludes process start-up);
* ``ccstae map STORE --overwrite``: the same with the default, threads in this process;
* ``ccstae map COPY --method com --workers 2``: the centre-of-mass baseline of the library;
* py4DSTEM 0.14.18's Bragg-disk strain pipeline (``benchmarks/peers/py4dstem_strain.py``, 2
  processes) in its own environment (``make bench-peers`` creates ``.venv-peers``; without
  it the peer is skipped with a message).

Prints accuracy against the simulator's truth (each result referenced on its own reference
pixels; py4DSTEM, which finds no phases, gets the truth's largest phase as its reference
region) and the speed ratios ccstae / py4DSTEM measured in this run, and writes
``benchmarks/results/peers.json`` (``--results DIR``).

    python benchmarks/bench_peers.py [--scan 96] [--dose 2000] [--results DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
from results_io import save_json
from train_options import add_epochs, run_epochs

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.sim.evaluate import format_errors, load_truth, strain_errors
from ccstae_hpc.sim.simulate import save_simulation

ROOT = Path(__file__).resolve().parents[1]
PEER_DIR = ROOT / "benchmarks" / "peers"
WORKERS = 2  # the machine's cores; py4DSTEM gets as many processes


def _check_module():  # noqa: ANN202 - a module loaded from a file path
    """benchmarks/peers/check_py4dstem.py (its Dataset wrapper for py4DSTEM's maps)."""
    spec = importlib.util.spec_from_file_location("check_py4dstem",
                                                  PEER_DIR / "check_py4dstem.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return dt


def _errors(ds: xr.Dataset, truth: dict) -> dict[str, float]:
    return {k: float(v) for k, v in strain_errors(ds, truth).items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=96)
    ap.add_argument("--dose", type=float, default=2000.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--peers-python", type=Path, default=ROOT / ".venv-peers" / "bin" / "python")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    add_epochs(ap)
    args = ap.parse_args(argv)
    ccstae = [sys.executable, "-m", "ccstae_hpc.cli"]
    n = args.scan * args.scan
    out: dict = {"scan": [args.scan, args.scan], "dose": args.dose, "patterns": n,
                 "workers": WORKERS, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cfg = SimConfig(scan=(args.scan, args.scan), dose=args.dose, seed=args.seed)
        npy, truth_path = save_simulation(d / "data.npy", cfg)
        truth = load_truth(truth_path)
        store = d / "run.zarr"

        t_run = _timed([*ccstae, "run", str(npy), "--out", str(store), "--quiet",
                        *run_epochs(args.epochs)])
        run_ds = xr.open_zarr(store, group="strain").load()
        t_map = _timed([*ccstae, "map", str(store), "--workers", str(WORKERS), "--overwrite",
                        "--quiet"])
        map_ds = xr.open_zarr(store, group="strain").load()
        # the default command: threads in this process, no worker processes to start
        t_thr = _timed([*ccstae, "map", str(store), "--overwrite", "--quiet"])
        thr_ds = xr.open_zarr(store, group="strain").load()
        com_store = d / "com.zarr"
        shutil.copytree(store, com_store)
        t_com = _timed([*ccstae, "map", str(com_store), "--method", "com", "--workers",
                        str(WORKERS), "--overwrite", "--quiet"])
        com_ds = xr.open_zarr(com_store, group="strain").load()
        out["ccstae_run"] = {"wall_s": t_run, "patterns_per_s": n / t_run,
                             "errors": _errors(run_ds, truth)}
        out["ccstae_map"] = {"wall_s": t_map, "patterns_per_s": n / t_map,
                             "stage_patterns_per_s": float(map_ds.attrs["map_patterns_per_s"]),
                             "errors": _errors(map_ds, truth)}
        out["ccstae_map_threads"] = {
            "wall_s": t_thr, "patterns_per_s": n / t_thr,
            "stage_patterns_per_s": float(thr_ds.attrs["map_patterns_per_s"]),
            "errors": _errors(thr_ds, truth)}
        out["com_map"] = {"wall_s": t_com, "patterns_per_s": n / t_com,
                          "stage_patterns_per_s": float(com_ds.attrs["map_patterns_per_s"]),
                          "errors": _errors(com_ds, truth)}

        if args.peers_python.exists():
            chk = _check_module()
            phase = np.asarray(truth["phase"])
            largest = np.bincount(phase[phase > 0].ravel()).argmax()
            mask = d / "reference.npy"
            np.save(mask, phase == largest)
            t_peer = _timed([str(args.peers_python), str(PEER_DIR / "py4dstem_strain.py"),
                             str(npy), str(d / "peer.npz"), "--threads", str(WORKERS),
                             "--reference-mask", str(mask)])
            peer_ds = chk.peer_dataset(d / "peer.npz", phase == largest)
            timing = json.loads(peer_ds.attrs["timing"])
            out["py4dstem"] = {"wall_s": t_peer, "patterns_per_s": n / t_peer,
                               "timing": timing, "errors": _errors(peer_ds, truth)}
            pipe_s = t_peer - float(timing.get("load_s", 0.0))
            out["py4dstem"]["pipeline_patterns_per_s"] = n / pipe_s
            out["ratios"] = {
                "map_vs_py4dstem": out["ccstae_map"]["patterns_per_s"] / (n / pipe_s),
                "map_threads_vs_py4dstem":
                    out["ccstae_map_threads"]["patterns_per_s"] / (n / pipe_s),
                "run_vs_py4dstem_end_to_end": t_peer / t_run,
                "com_vs_py4dstem": out["com_map"]["patterns_per_s"] / (n / pipe_s),
            }
        else:
            print(f"py4DSTEM skipped: no {args.peers_python} (run `make bench-peers` to create "
                  "its environment)")

    print(f"{args.scan}x{args.scan} scan, {args.dose:g} e-/pattern, {WORKERS} workers")
    for name in ("ccstae_run", "ccstae_map", "ccstae_map_threads", "com_map", "py4dstem"):
        if name in out:
            r = out[name]
            print(f"\n{name}: {r['wall_s']:.1f} s wall, {r['patterns_per_s']:.0f} patterns/s")
            print(format_errors(r["errors"]))
    for k, v in out.get("ratios", {}).items():
        print(f"{k}: {v:.2f}x")
    save_json(args.results, "peers.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
