"""Cost of Prefect orchestration: the ``pipeline`` flow (embedded) vs the library called directly.

Both paths do the same work on the same simulated 32 x 32 demo scan (1000 e-/pattern) in
this process: ingest, preprocess and map on a ``LocalCluster`` of the ``local`` section
(started and closed inside the timing), train in-process, then the two figures.  The flow
adds parameter validation, task/flow state round trips to the Prefect API, the store
markers, logging and the artifacts.

A warm-up run on an 8 x 8 scan comes first (untimed).  Prefect's ephemeral server (started
on the first flow call of the process when no ``PREFECT_API_URL`` is configured) is timed
separately with an empty flow: it is paid once per process, not per pipeline.
Target: flow / direct <= 1.3.

    python benchmarks/bench_flow_overhead.py [--scan 32] [--epochs 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# run logs still go to the API (part of the overhead), not to the console
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


def direct(npy: Path, store: Path, cfg: Any) -> float:
    """The library functions in the order the flow calls them; seconds."""
    from ccstae_hpc.stages import ingest as io
    from ccstae_hpc.stages import map as map_stage
    from ccstae_hpc.stages import prep
    from ccstae_hpc.stages import train as train_stage
    from flows.dask_cluster import DaskCluster
    from flows.report import write_report

    t0 = time.perf_counter()
    io.ingest(npy, store)
    # the same lazily started cluster object the flow uses: equal start-up cost on both sides
    with DaskCluster("local", cfg.cluster, cfg.workers) as dc:
        prep.preprocess_store(store, cfg.prep, client=dc.client())
        train_stage.train_store(store, cfg.model, cfg.train, False)
        map_stage.map_store(store, cfg.map, client=dc.client())
    write_report(store, artifacts=False)
    return time.perf_counter() - t0


def embedded(npy: Path, store: Path, cfg: Any) -> float:
    """``run_pipeline_embedded``; seconds."""
    from flows.pipeline import run_pipeline_embedded

    t0 = time.perf_counter()
    run_pipeline_embedded(npy, store, config=cfg)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scan", type=int, default=32)
    p.add_argument("--dose", type=float, default=1000.0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="direct/flow pairs (order alternates)")
    p.add_argument("--workers", type=int, default=None, help="Dask workers (section default)")
    args = p.parse_args()

    from prefect import flow
    from prefect.settings import PREFECT_API_URL

    from ccstae_hpc.core.config import SimConfig, TrainConfig
    from ccstae_hpc.sim.simulate import save_simulation
    from flows.params import PipelineConfig

    cfg = PipelineConfig.model_validate({
        "train": {"epochs": args.epochs},
        "cluster": {"dashboard_address": ":0"},
        "workers": args.workers,
    })
    tmp = Path(tempfile.mkdtemp(prefix="bench_flow_"))
    try:
        npy, _ = save_simulation(tmp / "data.npy", SimConfig(scan=(args.scan, args.scan),
                                                             dose=args.dose))

        @flow(name="bench-noop")
        def noop() -> None:
            return None

        mode = f"server {PREFECT_API_URL.value()}" if PREFECT_API_URL.value() else "ephemeral"
        t0 = time.perf_counter()
        noop()
        t_server = time.perf_counter() - t0

        # warm-up, not timed: first calls in a process pay for torch/matplotlib set-up
        small, _ = save_simulation(tmp / "warm.npy", SimConfig(scan=(8, 8), dose=args.dose))
        direct(small, tmp / "warm.zarr", cfg.model_copy(update={"train": TrainConfig(epochs=1)}))

        t_direct, t_flow = [], []
        for i in range(args.repeats):
            # alternate the order: on a shared machine the load drifts between runs
            runs = [(t_direct, direct, "direct"), (t_flow, embedded, "flow")]
            for times, fn, name in runs[::-1] if i % 2 else runs:
                times.append(fn(npy, tmp / f"{name}{i}.zarr", cfg))
            print(f"pair {i + 1}: direct {t_direct[-1]:.1f} s, flow {t_flow[-1]:.1f} s, "
                  f"ratio {t_flow[-1] / t_direct[-1]:.2f}", flush=True)
        t0 = time.perf_counter()
        embedded(npy, tmp / "flow0.zarr", cfg)
        t_rerun = time.perf_counter() - t0

        d, f = min(t_direct), min(t_flow)
        print(f"\n{args.scan} x {args.scan} scan, {args.dose:g} e-/pattern, "
              f"{args.epochs} epochs, Prefect {mode}")
        print(f"  direct library calls        {d:7.1f} s")
        print(f"  pipeline flow (embedded)    {f:7.1f} s")
        print(f"  ratio flow / direct         {f / d:7.2f}   (target <= 1.3; fastest of each)")
        ratios = sorted(b / a for a, b in zip(t_direct, t_flow, strict=True))
        print(f"  median ratio of the pairs   {ratios[len(ratios) // 2]:7.2f}")
        print(f"  Prefect server start        {t_server:7.1f} s   (once per process)")
        print(f"  ratio incl. server start    {(f + t_server) / d:7.2f}")
        print(f"  rerun, all stages done      {t_rerun:7.1f} s   (skipped; figures + artifacts)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
