"""Training and inference throughput of CC-ST-AE at 128x128 on this machine.

Prints patterns/s for training (default TrainConfig, 2 epochs over a 64x64 scan) and for
inference (encoder + per-pattern refinement, default MapConfig), each as a ratio to the
issue's target (30 and 300 patterns/s) and to the original implementation measured on the
same kind of machine (0.05 and 0.16 patterns/s, see shared/REFERENCE.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ccstae_hpc.config import MapConfig, ModelConfig, SimConfig, TrainConfig
from ccstae_hpc.infer import encode, refine
from ccstae_hpc.pipeline import prepare
from ccstae_hpc.preprocess import disk_mask
from ccstae_hpc.simulate import simulate
from ccstae_hpc.train import estimate_geometry, train_model

ORIGINAL_TRAIN, ORIGINAL_INFER = 0.05, 0.16  # patterns/s, Auto4DSTEM 0.2.8 on 2 CPU cores
TARGET_TRAIN, TARGET_INFER = 30.0, 300.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scan", type=int, default=64)
    ap.add_argument("--dose", type=float, default=1000.0)
    args = ap.parse_args()
    data, _ = simulate(SimConfig(scan=(args.scan, args.scan), dose=args.dose))
    x, info = prepare(data)
    geom = estimate_geometry(info["mean"])
    tcfg = TrainConfig(epochs=2)
    t = time.perf_counter()
    model, hist = train_model(x, geom, ModelConfig(), tcfg)
    t_train = time.perf_counter() - t
    n_train = len(hist) * tcfg.batch_size
    train_rate = n_train / t_train

    mcfg = MapConfig()
    xt = torch.from_numpy(x)
    t = time.perf_counter()
    classes, theta = encode(model, xt, mcfg.batch_size)
    dic = model.dictionary().detach().numpy()
    masks = np.stack([disk_mask(d, geom.ring) for d in dic])
    for i in range(0, len(x), mcfg.batch_size):
        sl = slice(i, i + mcfg.batch_size)
        refine(xt[sl], classes[sl], theta[sl], dic, masks, geom.ring, mcfg.refine_iters)
    t_inf = time.perf_counter() - t
    infer_rate = len(x) / t_inf
    print(f"torch threads: {torch.get_num_threads()}, patterns: {len(x)} at 128x128, "
          f"dose {args.dose:g}")
    print(f"training:  {train_rate:8.1f} patterns/s  ({train_rate / TARGET_TRAIN:.2f}x target "
          f"{TARGET_TRAIN:g}, {train_rate / ORIGINAL_TRAIN:.0f}x original {ORIGINAL_TRAIN})")
    print(f"inference: {infer_rate:8.1f} patterns/s  ({infer_rate / TARGET_INFER:.2f}x target "
          f"{TARGET_INFER:g}, {infer_rate / ORIGINAL_INFER:.0f}x original {ORIGINAL_INFER})")


if __name__ == "__main__":
    main()
