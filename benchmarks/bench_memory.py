"""Peak resident memory (RSS) of each pipeline stage at two scan sizes, run as a user runs it.

For each ``--scans`` size N (default 48 and 96; 128 px detector, 1e3 e-/pattern) ``ccstae
simulate`` writes an N x N scan once (not measured); then ``ccstae ingest``, ``ccstae
preprocess``, ``ccstae train`` and ``ccstae map`` run one after the other on one store, each as
its own subprocess of the CLI with the CLI's defaults (``--quiet`` where it exists, ingest's
``--no-progress``).  Measured per stage and size:

* peak RSS: ``ru_maxrss`` of ``os.wait4`` on the stage's process, the kernel's high-water mark
  of its resident memory (no sampling can miss a spike).  Linux reports there the larger of
  the process's own peak and the peak of the largest descendant it waited for (a maximum over
  processes, not their sum), and a quirk: the peak RSS this driver had when it started the
  process (vfork+exec).  The driver stays small (no data in it); its own peak (``VmHWM``) is
  recorded as ``driver_rss_mib``, and a stage's figure at or under it would not be the
  stage's.
* tree RSS: the sum of RSS over the stage's process and all its descendants, sampled every
  ``--interval`` s with psutil: the total when a stage runs several processes (shared pages
  then count once per process; a spike shorter than the interval can be missed).  ``procs``
  is the largest number of processes seen (a short-lived helper a library starts can show
  up there).  With the CLI defaults (``--workers 0``) no stage
  starts a child process: ingest reads with threads, preprocess and map run their blocks on
  threads in the one process and train runs a single rank, so peak RSS is the whole stage's
  memory and tree RSS agrees with it up to sampling.  ``--workers N`` passes ``--workers N``
  to preprocess and map (a local Dask cluster of N worker processes); then tree RSS is the
  figure that counts and peak RSS is the largest single process.
* wall time of the subprocess, and the raw array's bytes (uint16: N x N x Q x Q x 2 with
  Q = ``--detector``).

RSS includes file pages a process mapped and touched (reclaimable page cache) and the fixed
cost of the imports (hundreds of MiB once torch is loaded), so the RSS/data ratio is large at
small sizes; the ratio of peak RSS large/small next to the ratio of the data sizes, and the
growth of RSS per byte of data (dRSS/ddata) between the two, tell whether a stage's memory is
bounded (~0) or holds the data (~1 or more).  Prints a table, writes
``benchmarks/results/memory.json`` (a list of row dicts; ``--results DIR``).  The work
directory is a temporary directory, removed.

    python benchmarks/bench_memory.py [--scans 48 96] [--detector 128] [--dose 1000]
        [--workers 0] [--epochs N] [--results DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from results_io import save_json

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
STAGES = ("ingest", "preprocess", "train", "map")


def stage_argv(stage: str, data: Path, store: Path, workers: int,
               epochs: int | None) -> list[str]:
    """The ``ccstae`` arguments of ``stage`` as a user types them (defaults, ``--quiet``)."""
    if stage == "ingest":
        return ["ingest", str(data), str(store), "--no-progress"]
    if stage == "preprocess":
        return ["preprocess", str(store), *(["--workers", str(workers)] if workers else [])]
    if stage == "train":
        return ["train", str(store), "--quiet", *(["--epochs", str(epochs)] if epochs else [])]
    return ["map", str(store), "--quiet", *(["--workers", str(workers)] if workers else [])]


def driver_rss_mib() -> float:
    """Peak RSS of this process's own memory (``VmHWM``), the part a child started now inherits
    into its ``ru_maxrss``; ``ru_maxrss`` would also hold whatever this process inherited."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MIB  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # KiB on Linux


def _tree_rss(pid: int) -> tuple[int, int]:
    """Sum of RSS (bytes) over process ``pid`` and its descendants, and their count."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    total = 0
    n = 0
    for p in procs:
        try:
            total += p.memory_info().rss
            n += 1
        except psutil.Error:  # exited between listing and reading
            pass
    return total, n


def measure(cmd: list[str], log: Path, interval: float) -> dict[str, float]:
    """Run ``cmd`` (output to ``log``) and measure it.

    Returns
    -------
    dict with ``peak_rss_mib`` (``ru_maxrss`` of ``wait4``), ``tree_rss_mib`` (sampled sum
    over the process tree), ``procs`` (most processes seen) and ``wall_s`` (to within one
    sampling ``interval``).
    """
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        tree, nproc = 0, 0
        try:
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                rss, n = _tree_rss(proc.pid)
                tree, nproc = max(tree, rss), max(nproc, n)
                time.sleep(interval)
        except BaseException:  # e.g. Ctrl-C: do not leave the stage running
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                           f"{log.read_text()[-3000:]}")
    return {"peak_rss_mib": ru.ru_maxrss * 1024 / MIB,  # KiB on Linux
            "tree_rss_mib": tree / MIB, "procs": nproc, "wall_s": wall}


def run_size(n: int, args: argparse.Namespace, work: Path) -> list[dict]:
    """Simulate an ``n`` x ``n`` scan in ``work``, run every stage on it; one row per stage."""
    ccstae = [sys.executable, "-m", "ccstae_hpc.cli"]
    data, store = work / f"scan{n}.npy", work / f"scan{n}.zarr"
    subprocess.run([*ccstae, "simulate", str(data), "--scan", str(n), str(n), "--detector",
                    str(args.detector), "--dose", f"{args.dose:g}", "--seed", "0"],
                   check=True, capture_output=True, cwd=ROOT)
    raw = n * n * args.detector**2 * 2  # uint16 counts (checked below against the file)
    if (size := data.stat().st_size) < raw or size > raw + 4096:
        raise RuntimeError(f"{data} has {size} bytes; expected a uint16 array of {raw}")
    data_mib = raw / MIB
    rows = []
    for stage in STAGES:
        argv = stage_argv(stage, data, store, args.workers, args.epochs)
        r = measure([*ccstae, *argv], work / f"{stage}{n}.log", args.interval)
        row = {"stage": stage, "scan": [n, n], "detector": args.detector, "dose": args.dose,
               "workers": args.workers, "raw_bytes": raw, "raw_mib": data_mib, **r,
               "rss_per_data": r["peak_rss_mib"] / data_mib,
               "command": ["ccstae", *(a.replace(f"{work}/", "") for a in argv)]}
        rows.append(row)
        print(f"[{n}x{n}] {stage}: peak RSS {r['peak_rss_mib']:.0f} MiB, tree "
              f"{r['tree_rss_mib']:.0f} MiB ({r['procs']} proc), {r['wall_s']:.1f} s",
              flush=True)
    data.unlink()  # the large input is not needed once ingested
    return rows


def print_table(rows: list[dict]) -> None:
    """Per stage and size, then per stage the growth from the smallest to the largest size."""
    print(f"\n{'stage':<11}{'scan':>8}{'raw MiB':>9}{'peak RSS MiB':>14}{'tree RSS MiB':>14}"
          f"{'procs':>7}{'RSS/data':>10}{'wall s':>8}")
    for r in rows:
        scan = f"{r['scan'][0]}x{r['scan'][1]}"
        print(f"{r['stage']:<11}{scan:>8}{r['raw_mib']:>9.1f}{r['peak_rss_mib']:>14.0f}"
              f"{r['tree_rss_mib']:>14.0f}{r['procs']:>7}{r['rss_per_data']:>10.2f}"
              f"{r['wall_s']:>8.1f}")
    sizes = sorted({r["scan"][0] for r in rows})
    if len(sizes) < 2:
        return
    lo, hi = sizes[0], sizes[-1]
    print(f"\ngrowth {lo}x{lo} -> {hi}x{hi} (dRSS/ddata: MiB of peak RSS per MiB of data; "
          "~0 bounded, ~1 holds the data)")
    print(f"{'stage':<11}{'peak RSS large/small':>22}{'data large/small':>18}{'dRSS/ddata':>12}")
    for stage in STAGES:
        a, b = (next(r for r in rows if r["stage"] == stage and r["scan"][0] == s)
                for s in (lo, hi))
        d_data = b["raw_mib"] - a["raw_mib"]
        print(f"{stage:<11}{b['peak_rss_mib'] / a['peak_rss_mib']:>22.2f}"
              f"{b['raw_mib'] / a['raw_mib']:>18.2f}"
              f"{(b['peak_rss_mib'] - a['peak_rss_mib']) / d_data:>12.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, nargs="+", default=[48, 96], metavar="N",
                    help="scan sizes N (N x N), default 48 96")
    ap.add_argument("--detector", type=int, default=128)
    ap.add_argument("--dose", type=float, default=1000.0)
    ap.add_argument("--workers", type=int, default=0,
                    help="--workers of preprocess and map (0, the default: threads in-process)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="--epochs of train (default: the stage's own)")
    ap.add_argument("--interval", type=float, default=0.1, help="tree RSS sampling period, s")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for n in sorted(set(args.scans)):
            rows += run_size(n, args, Path(tmp))
    driver = driver_rss_mib()
    for r in rows:
        r["driver_rss_mib"] = driver
    print_table(rows)
    save_json(args.results, "memory.json", rows)
    top = max(rows, key=lambda r: r["peak_rss_mib"])
    print(f"\nlargest peak RSS: {top['peak_rss_mib']:.0f} MiB ({top['stage']}, "
          f"{top['scan'][0]}x{top['scan'][1]} scan, {top['raw_mib']:.0f} MiB raw data); "
          f"this driver's own peak RSS {driver:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
