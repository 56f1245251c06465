"""Preprocessing throughput at 128x128 on this machine (target >= 2,000 patterns/s).

Simulates a dataset (default 128x128 scan = 16,384 patterns) as a detector records it: the
simulator's noise-free heterostructure patterns turned into counts by
``realistic_data.detector_counts`` (default 1e5 e-/pattern with a diffuse halo and a floor,
so the store compresses the raw array ~4x like real data; a sparse 1e3 e- simulation
compresses ~40x and would make the reads unrealistically cheap), ingests it into a store,
then times `preprocess_store` alone (threads in this process, the default of `ccstae
preprocess`) and prints patterns/s, the ratio to the target and the compression ratio of the
stored raw array.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from realistic_data import DOSE, compression_ratio, detector_counts

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.sim.simulate import simulate_rows
from ccstae_hpc.stages.ingest import ingest
from ccstae_hpc.stages.prep import preprocess_store

TARGET = 2000.0


def make_counts(path: Path, scan: int, dose: float, seed: int = 0) -> Path:
    """Write a ``scan`` x ``scan`` uint16 .npy of detector counts of the simulator's
    noise-free patterns (:func:`realistic_data.detector_counts`), a few rows at a time."""
    cfg = SimConfig(scan=(scan, scan), seed=seed)  # dose None: expected intensities
    rng = np.random.default_rng(seed)
    q = cfg.detector
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(scan, scan, q, q))
    step = max(1, 1024 // scan)
    for y0 in range(0, scan, step):
        y1 = min(scan, y0 + step)
        mm[y0:y1] = detector_counts(simulate_rows(cfg, y0, y1)[0], rng, dose)
    mm.flush()
    del mm
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scan", type=int, default=128)
    ap.add_argument("--dose", type=float, default=DOSE, help=f"e-/pattern ({DOSE:g})")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench_prep_"))
    try:
        npy = make_counts(d / "data.npy", args.scan, args.dose)
        ingest(npy, d / "s.zarr")
        n = args.scan * args.scan
        t = time.perf_counter()
        preprocess_store(d / "s.zarr")
        dt = time.perf_counter() - t
        rate = n / dt
        print(f"preprocess: {n} patterns (128x128, {args.dose:g} e-) in {dt:.1f} s = "
              f"{rate:.0f} patterns/s ({rate / TARGET:.2f}x target {TARGET:g})")
        print(f"compression ratio of the stored raw array: {compression_ratio(d / 's.zarr'):.2f}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
