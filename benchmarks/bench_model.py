"""Training and inference throughput of CC-ST-AE at 128x128 on this machine.

Prints patterns/s for training (default TrainConfig, 2 epochs over a 64x64 scan) and for
inference (encoder + per-pattern refinement, default MapConfig), each as a ratio to the
issue's target (30 and 300 patterns/s) and to the original implementation measured on the
same kind of machine (0.05 and 0.16 patterns/s, see shared/REFERENCE.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ccstae_hpc.core.config import MapConfig, SimConfig, TrainConfig
from ccstae_hpc.sim.simulate import save_simulation
from ccstae_hpc.stages.ingest import ingest
from ccstae_hpc.stages.map import map_store
from ccstae_hpc.stages.prep import preprocess_store
from ccstae_hpc.stages.train import train_store

ORIGINAL_TRAIN, ORIGINAL_INFER = 0.05, 0.16  # patterns/s, Auto4DSTEM 0.2.8 on 2 CPU cores
TARGET_TRAIN, TARGET_INFER = 30.0, 300.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scan", type=int, default=64)
    ap.add_argument("--dose", type=float, default=1000.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        npy, _ = save_simulation(Path(tmp) / "s.npy", SimConfig(scan=(args.scan, args.scan),
                                                                dose=args.dose))
        store = Path(tmp) / "s.zarr"
        ingest(npy, store)
        preprocess_store(store)
        tcfg = TrainConfig(epochs=2)
        t = time.perf_counter()
        hist = train_store(store, train_cfg=tcfg)
        t_train = time.perf_counter() - t
        train_rate = len(hist) * tcfg.batch_size / t_train
        # the store path users take: encoder, refinement, phases and strain assembly
        t = time.perf_counter()
        map_store(store, MapConfig())
        t_inf = time.perf_counter() - t
    n = args.scan * args.scan
    infer_rate = n / t_inf
    print(f"torch threads: {torch.get_num_threads()}, patterns: {n} at 128x128, "
          f"dose {args.dose:g}")
    print(f"training:  {train_rate:8.1f} patterns/s  ({train_rate / TARGET_TRAIN:.2f}x target "
          f"{TARGET_TRAIN:g}, {train_rate / ORIGINAL_TRAIN:.0f}x original {ORIGINAL_TRAIN})")
    print(f"mapping:   {infer_rate:8.1f} patterns/s  ({infer_rate / TARGET_INFER:.2f}x target "
          f"{TARGET_INFER:g}, {infer_rate / ORIGINAL_INFER:.0f}x original {ORIGINAL_INFER})")


if __name__ == "__main__":
    main()
