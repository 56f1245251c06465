"""What the data-parallel tests share (tests/test_ddp.py on a LocalCluster, tests/test_slurm.py
on SLURM jobs): the training set, the 1-rank reference config and the comparisons.

A 16 x 16 scan (64 px detector) preprocessed into 4 training shards of 64 patterns; one
epoch of batch 32 is 8 steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr

from ccstae_hpc.core.config import SimConfig, TrainConfig
from ccstae_hpc.stages import train as train_stage

TC = TrainConfig(epochs=1, batch_size=32)
# 1 rank and 2 ranks sum the same batch in a different order.  Adam normalises each
# gradient element (and the top-1 code is an argmax), so last-bit differences grow: one
# process run with 1 and with 2 torch threads differs by up to 4e-3 (relative L2, in the
# zero-initialised last layer) and 1.2e-4 in the loss after these 8 steps.  The tolerance
# sits just above that float-noise floor.
TOL, LOSS_RTOL = 1e-2, 1e-3


def make_prepped(d: Path) -> Path:
    """Simulate, ingest and preprocess the shared training set into ``d/s.zarr``."""
    from ccstae_hpc.sim.simulate import save_simulation
    from ccstae_hpc.stages.ingest import ingest
    from ccstae_hpc.stages.prep import PrepConfig, preprocess_store

    save_simulation(d / "s.npy", SimConfig(scan=(16, 16), detector=64, dose=1000, seed=0))
    ingest(d / "s.npy", d / "s.zarr")
    preprocess_store(d / "s.zarr", PrepConfig(max_train=256, shard_size=64))
    return d / "s.zarr"


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def weights(store: Path) -> dict[str, np.ndarray]:
    model, _, _ = train_stage.load_model(store)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def model_attrs(store: Path) -> dict:
    return dict(zarr.open_group(str(store), mode="r", use_consolidated=False)["model"].attrs)


def assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tol: float) -> None:
    """Every tensor equal to ``tol`` in relative L2 norm."""
    assert a.keys() == b.keys()
    rel = {k: float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(a[k]), 1e-12)) for k in a}
    assert max(rel.values()) <= tol, sorted(rel.items(), key=lambda kv: -kv[1])[:3]
