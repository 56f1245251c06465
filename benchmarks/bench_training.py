"""Training to convergence vs a fixed epoch count: time, steps and the accuracy of the maps.

Simulates a heterostructure scan (default 96x96, 128 px, 2e3 e-/pattern), preprocesses it
once, then trains a copy with the default criterion (``TrainConfig()``: stop once the loss
and the dictionary have converged) and a copy with ``TrainConfig(epochs=6)`` (the old fixed
schedule), maps both the same way and scores them against the simulator's truth.  Writes
``benchmarks/results/training.json`` (``--results DIR``).

    python benchmarks/bench_training.py [--scan 96] [--dose 2000] [--results DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from results_io import save_json

from ccstae_hpc.core.config import SimConfig, TrainConfig
from ccstae_hpc.sim.evaluate import format_errors, load_truth, strain_errors
from ccstae_hpc.sim.simulate import save_simulation
from ccstae_hpc.stages.ingest import ingest
from ccstae_hpc.stages.map import map_store
from ccstae_hpc.stages.prep import preprocess_store
from ccstae_hpc.stages.train import train_store

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=96)
    ap.add_argument("--dose", type=float, default=2000.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    out: dict = {"scan": [args.scan, args.scan], "dose": args.dose}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cfg = SimConfig(scan=(args.scan, args.scan), dose=args.dose, seed=args.seed)
        npy, truth_path = save_simulation(d / "data.npy", cfg)
        truth = load_truth(truth_path)
        base = d / "base.zarr"
        ingest(npy, base)
        preprocess_store(base)
        for name, tc in (("converged", TrainConfig()), ("6 epochs", TrainConfig(epochs=6))):
            s = shutil.copytree(base, d / f"{name.replace(' ', '_')}.zarr")
            t0 = time.perf_counter()
            train_store(s, train_cfg=tc)
            dt = time.perf_counter() - t0
            map_store(s)
            a = dict(zarr.open_group(str(s), mode="r", use_consolidated=False)["model"].attrs)
            e = strain_errors(xr.open_zarr(s, group="strain").load(), truth)
            out[name] = {"train_s": dt, "steps": a["steps_run"],
                         "converged_at_step": a.get("converged_at_step"),
                         "final_loss": float(np.mean(a["loss"][-10:])),
                         "errors": {k: float(v) for k, v in e.items()
                                    if k.startswith(("mae_", "acc_"))}}
            print(f"\n{name}: {dt:.1f} s, {a['steps_run']} steps (converged at step "
                  f"{a.get('converged_at_step')})")
            print(format_errors(e))
    c, f = out["converged"], out["6 epochs"]
    print(f"\ntime ratio converged / 6 epochs: {c['train_s'] / f['train_s']:.2f}")
    for k in ("mae_exx", "mae_eyy", "mae_exy", "mae_theta"):
        print(f"{k} ratio converged / 6 epochs: {c['errors'][k] / f['errors'][k]:.3f}")
    save_json(args.results, "training.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
