"""End-to-end demo: simulate a WS2/WSe2 heterostructure, map its strain, compare with truth.

Run ``python -m ccstae_hpc.demo --out demo_out`` (or ``make demo``).  It writes, into ``--out``:

* ``data.npy`` + ``data.truth.npz``   the simulated 4D-STEM scan and its ground truth;
* ``strain.zarr``                     the result store, exactly as ``ccstae run`` writes it;
* ``strain_maps.png``, ``loss.png``   result vs re-referenced truth, and the training loss;
* ``errors.json``                     the numbers printed by :func:`evaluate.format_errors`.

Re-running replaces these files (they belong to the demo).  The analysis goes through
:func:`ccstae_hpc.cli.run_npy`, the function behind ``ccstae run``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ccstae_hpc import cli
from ccstae_hpc.core.config import SimConfig, TrainConfig
from ccstae_hpc.sim.evaluate import format_errors, load_truth, strain_errors
from ccstae_hpc.stages import store

# what each timed store group's stage is called on the command line
STAGE_NAMES = {"prep": "preprocess", "model": "train", "affine": "map", "analysis": "analyze"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ccstae_hpc.demo",
        description="Simulate a WS2/WSe2 scan, map its strain with CC-ST-AE, compare with truth.",
    )
    p.add_argument("--out", default="demo_out", help="output directory (demo_out)")
    p.add_argument("--dose", type=float, default=1000.0, help="electrons per pattern (1000)")
    p.add_argument("--scan", type=int, default=64, help="scan size, square (64)")
    p.add_argument("--seed", type=int, default=0, help="simulation and training seed (0)")
    p.add_argument("--epochs", type=int, default=None,
                   help="(default: 6, more on small scans to make 200 steps)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit code (2 on bad options, like ``ccstae``)."""
    args = _parser().parse_args(argv)
    out = Path(args.out)
    t_start = time.perf_counter()
    try:
        sim_cfg = SimConfig(scan=(args.scan, args.scan), dose=args.dose, seed=args.seed)
        train_kw = {"seed": args.seed} | ({} if args.epochs is None else {"epochs": args.epochs})
        train_cfg = TrainConfig(**train_kw)
    except ValueError as e:
        print(f"error: {e}. Fix the option and run again.", file=sys.stderr)
        return cli.EXIT_USAGE

    # imported after option checks: the simulator may pull in heavy dependencies
    from ccstae_hpc.plot import loss_figure, strain_figure
    from ccstae_hpc.sim.simulate import save_simulation
    from ccstae_hpc.stages.train import MODEL

    out.mkdir(parents=True, exist_ok=True)
    print(
        f"simulating a {args.scan} x {args.scan} scan, {sim_cfg.detector} x {sim_cfg.detector} "
        f"detector, {args.dose:g} e-/pattern ..."
    )
    t = time.perf_counter()
    npy_path, truth_path = save_simulation(out / "data.npy", sim_cfg)
    t_sim = time.perf_counter() - t

    store_path = out / "strain.zarr"
    t = time.perf_counter()
    try:
        cli.run_npy(npy_path, store_path, overwrite=True, train_cfg=train_cfg)
    except cli.CliError as e:
        print(e.line(), file=sys.stderr)
        return cli.EXIT_USAGE
    t_run = time.perf_counter() - t

    # evaluate what was written, not the in-memory result: the store is what users get
    ds = store.open_strain(store_path).load()
    truth = load_truth(truth_path)
    errors = strain_errors(ds, truth)
    (out / "errors.json").write_text(json.dumps(errors, indent=1, sort_keys=True))
    fig = strain_figure(ds, truth, out / "strain_maps.png")
    # the loss curve and the stages' times as the run recorded them in the store
    losses = [float(v) for v in store.open_root(store_path)[MODEL].attrs.get("loss", [])]
    loss_png = loss_figure(losses, out / "loss.png") if losses else None
    stages = store.stage_timings(store_path)
    n = args.scan * args.scan
    print("\nerrors against ground truth (strain re-referenced like the pipeline):")
    print(format_errors(errors))
    print("\ntiming:")
    print(f"  simulate            {t_sim:7.1f} s")
    for k, v in stages.items():
        print(f"  {STAGE_NAMES.get(k, k):19s} {v:7.1f} s")
    print(f"  ccstae run (total)  {t_run:7.1f} s  ({n / t_run:.0f} patterns/s end to end)")
    print(f"  demo total          {time.perf_counter() - t_start:7.1f} s")
    print("\nfiles:")
    print(f"  data      {npy_path}\n  truth     {truth_path}")
    print(f"  results   {store_path}  (xarray.open_zarr('{store_path}', group='strain'))")
    print(f"  figure    {fig}")
    if loss_png is not None:
        print(f"  loss      {loss_png}")
    print(f"  errors    {out / 'errors.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
