"""Peak memory of the pipeline stages at two input sizes: memory must not grow with the file.

For each size (``--small`` and ``--large`` GB, default 1 and 8) a uint16 ``.npy`` of 128x128
patterns is made as in ``bench_ingest.py`` (counts as a detector records them, which the store
compresses ~4x like real data: ``realistic_data.detector_counts``; the achieved ratio is
printed); then every stage of :data:`STAGES` runs in a fresh subprocess, in order, on the
same work directory, and reports its own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``, the
kernel's high-water mark, so no sampling can miss a spike).  Printed per stage: both peaks,
their ratio large/small (target <= 1.2) and whether both stay under 3 GB.

A later stage is appended by writing a function
``stage(work: Path) -> None`` that reads what the earlier stages left in ``work`` (the input
is ``work/input.npy``, the store ``work/store.zarr``) and adding it to ``STAGES``.

Usage: ``python benchmarks/bench_ingest_memory.py [--small 1] [--large 8] [--dir /work/tmp]``
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

TARGET_RATIO = 1.2
LIMIT_MB = 3000.0


def stage_ingest(work: Path) -> None:
    """``ingest(work/input.npy, work/store.zarr)`` with the default IngestConfig."""
    from ccstae_hpc.stages.ingest import ingest

    g = ingest(work / "input.npy", work / "store.zarr")
    if not g.attrs["complete"]:
        raise RuntimeError("ingest did not complete")


def stage_preprocess(work: Path) -> None:
    """``preprocess_store(work/store.zarr)`` with the default PrepConfig (threads)."""
    from ccstae_hpc.stages.prep import preprocess_store

    g = preprocess_store(work / "store.zarr")
    if not g.attrs["complete"]:
        raise RuntimeError("preprocessing did not complete")


# name -> function run in its own subprocess; insertion order is execution order
STAGES: dict[str, Callable[[Path], None]] = {
    "ingest": stage_ingest,
    "preprocess": stage_preprocess,
}


def _child(stage: str, work: Path) -> int:
    """Run one stage in this (fresh) process and print its peak RSS as JSON."""
    t0 = time.perf_counter()
    STAGES[stage](work)
    dt = time.perf_counter() - t0
    print(json.dumps({"stage": stage, "peak_rss_mb": peak_rss_mb(), "seconds": dt}))
    return 0


def peak_rss_mb() -> float:
    """Peak RSS of this process in MB.

    ``VmHWM`` of the process's own address space, not ``ru_maxrss``: Linux carries the
    parent's high-water mark into ``ru_maxrss`` of a child started with vfork+exec (as
    ``subprocess`` does), so a parent that once held the 8 GB input would show up here.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux


def run_stage(stage: str, work: Path) -> dict[str, float]:
    """Run ``stage`` in a subprocess; returns its JSON report."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", stage, "--work", str(work)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_mb() -> float:
    """Peak RSS of a subprocess that only imports the stages' libraries (the fixed cost)."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r});"
        "import ccstae_hpc.stages.ingest, zarr, numpy, dask.array, h5py;"
        "from bench_ingest_memory import peak_rss_mb; print(peak_rss_mb())"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    return float(out.stdout.strip())


def measure(gb: float, parent: Path) -> dict[str, dict[str, float]]:
    """Make a ``gb`` GB input, run every stage on it, remove it; returns reports per stage."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ingest import make_dataset
    from realistic_data import compression_ratio

    work = Path(tempfile.mkdtemp(prefix="bench_mem_", dir=parent))
    try:
        t0 = time.perf_counter()
        shape = make_dataset(work / "input.npy", gb)
        size = (work / "input.npy").stat().st_size
        print(f"[{gb:g} GB] input {shape} uint16, {size / 1e9:.2f} GB, made in "
              f"{time.perf_counter() - t0:.0f} s")
        reports = {}
        for stage in STAGES:
            r = run_stage(stage, work)
            r["input_gb"] = size / 1e9
            reports[stage] = r
            print(f"[{gb:g} GB] {stage}: peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"{r['seconds']:.1f} s ({size / 1e6 / r['seconds']:.0f} MB/s)")
            if stage == "ingest":
                r["compression_ratio"] = compression_ratio(work / "store.zarr")
                print(f"[{gb:g} GB] compression ratio of the stored raw array: "
                      f"{r['compression_ratio']:.2f}")
        return reports
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=float, default=1.0, help="small input, GB (default 1)")
    ap.add_argument("--large", type=float, default=8.0, help="large input, GB (default 8)")
    ap.add_argument("--dir", default="/work/tmp", help="parent of the work dirs (not tmpfs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.child, Path(args.work))

    parent = Path(args.dir)
    parent.mkdir(parents=True, exist_ok=True)
    need = 2.2 * args.large * 1e9  # input + a compressed store, generously
    if shutil.disk_usage(parent).free < need:
        print(f"not enough free disk in {parent} for a {args.large:g} GB run")
        return 1
    base = baseline_mb()
    print(f"baseline (imports only): {base:.0f} MB")
    small = measure(args.small, parent)
    large = measure(args.large, parent)
    ok = True
    for stage in STAGES:
        a, b = small[stage]["peak_rss_mb"], large[stage]["peak_rss_mb"]
        ratio = b / a
        under = max(a, b) < LIMIT_MB
        ok &= ratio <= TARGET_RATIO and under
        print(f"{stage}: peak RSS {a:.0f} MB at {small[stage]['input_gb']:.2f} GB, "
              f"{b:.0f} MB at {large[stage]['input_gb']:.2f} GB; ratio large/small "
              f"{ratio:.2f} (target <= {TARGET_RATIO}); both < {LIMIT_MB / 1e3:.0f} GB: "
              f"{'yes' if under else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
