"""Preprocessing throughput at 128x128 on this machine (target >= 2,000 patterns/s).

Simulates a dataset (default 128x128 scan = 16,384 patterns at 1,000 e-/pattern), ingests
it into a store, then times `preprocess_store` alone (threads in this process, the
default of `ccstae preprocess`) and prints patterns/s and the ratio to the target.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.sim.simulate import save_simulation
from ccstae_hpc.stages.ingest import ingest
from ccstae_hpc.stages.prep import preprocess_store

TARGET = 2000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scan", type=int, default=128)
    ap.add_argument("--dose", type=float, default=1000.0)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench_prep_"))
    try:
        npy, _ = save_simulation(d / "data.npy", SimConfig(scan=(args.scan, args.scan),
                                                           dose=args.dose))
        ingest(npy, d / "s.zarr")
        n = args.scan * args.scan
        t = time.perf_counter()
        preprocess_store(d / "s.zarr")
        dt = time.perf_counter() - t
        rate = n / dt
        print(f"preprocess: {n} patterns (128x128, {args.dose:g} e-) in {dt:.1f} s = "
              f"{rate:.0f} patterns/s ({rate / TARGET:.2f}x target {TARGET:g})")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
