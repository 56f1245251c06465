"""Ingest throughput against a plain ``np.save`` of the same array to the same disk.

Creates a uint16 ``.npy`` of 128x128 patterns (default 4 GB, ``--gb`` to scale): Poisson
counts of a pattern with Bragg disks as a detector records them
(``realistic_data.detector_counts``: 1e5 e-/pattern with a diffuse halo and a floor, so the
store compresses them ~4x like real data, not ~40x like a sparse low-dose simulation).  Then
times, each starting after a ``sync`` and each including a final ``sync`` so that the data
really reached the disk:

* ``np.save(out.npy, np.load(in.npy, mmap_mode="r"))``: the disk's copy speed;
* ``ingest(in.npy, store.zarr)``: read + compress + write shards.

Both read the input from the same (warm) page cache; ``--cold`` drops the page cache before
each (root only; it slows everyone else's I/O on a shared machine, hence opt-in).

Prints both throughputs (uncompressed MB/s), the ratio ingest/np.save (target >= 0.25) and
the compression ratio.  The work directory lives under /work (not tmpfs) and is removed.

Usage: ``python benchmarks/bench_ingest.py [--gb 4] [--dir /work/tmp] [--cold]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from realistic_data import detector_counts

K = 128  # detector pixels
SCAN_X = 128


def expected_pattern(k: int = K) -> np.ndarray:
    """Relative intensities of a pattern: central disk, two hexagonal rings of Bragg disks, a
    diffuse tail (scaled to counts by :func:`realistic_data.detector_counts`)."""
    yy, xx = np.mgrid[:k, :k] - (k - 1) / 2
    r = np.hypot(yy, xx)
    lam = 0.5 * np.exp(-r / (k / 4))
    lam += 100.0 * (r < k / 16)
    for n in range(2):
        for j in range(6):
            a = np.pi / 3 * j + np.pi / 6 * n
            g = (k / 4) * (1 + n * 0.73)
            cy, cx = g * np.sin(a), g * np.cos(a)
            lam += (10.0 / (1 + n)) * (np.hypot(yy - cy, xx - cx) < k / 22)
    return lam


def make_dataset(
    path: Path, gb: float, seed: int = 0, k: int = K, nx: int = SCAN_X
) -> tuple[int, int, int, int]:
    """Write a ~``gb`` GB uint16 .npy of shape (ny, nx, k, k), a slab at a time.

    Poisson sampling runs at ~35 MB/s per core, too slow for 8 GB; rows are therefore drawn
    from a bank of 4096 independent count patterns (:func:`realistic_data.detector_counts`
    of :func:`expected_pattern`) in random order, each row shifted by a random offset, so no
    two neighbouring patterns repeat (compression stays honest).
    """
    rng = np.random.default_rng(seed)
    lam = expected_pattern(k)
    bank = detector_counts(np.broadcast_to(lam, (4096, k, k)), rng)
    ny = max(2, round(gb * 1e9 / (nx * k * k * 2)))
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(ny, nx, k, k))
    step = max(1, (256 * 2**20) // (nx * k * k * 2))
    for y0 in range(0, ny, step):
        y1 = min(ny, y0 + step)
        idx = rng.integers(0, bank.shape[0], size=(y1 - y0, nx))
        slab = bank[idx]
        for i in range(y1 - y0):
            dy, dx = rng.integers(-3, 4, size=2)
            slab[i] = np.roll(slab[i], (int(dy), int(dx)), axis=(1, 2))
        mm[y0:y1] = slab
        mm.flush()
    del mm
    return (ny, nx, k, k)


COLD = False  # set by --cold


def drop_caches() -> bool:
    """Sync, then drop the page cache if ``--cold`` (root only); True when it was dropped."""
    os.sync()
    if not COLD:
        return False
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def time_np_save(src: Path, dst: Path) -> float:
    """Seconds for ``np.save`` of the memory-mapped input, including the final sync."""
    cold = drop_caches()
    t0 = time.perf_counter()
    np.save(dst, np.load(src, mmap_mode="r"))
    os.sync()
    dt = time.perf_counter() - t0
    print(f"np.save: {dt:.2f} s ({'cold' if cold else 'warm'} cache)")
    return dt


def time_ingest(src: Path, store: Path, **kw: Any) -> tuple[float, int]:
    """Seconds for ``ingest`` (including the final sync) and the stored bytes."""
    from ccstae_hpc.stages.ingest import ingest

    cold = drop_caches()
    t0 = time.perf_counter()
    g = ingest(src, store, **kw)
    os.sync()
    dt = time.perf_counter() - t0
    stored = g["raw"].nbytes_stored()
    print(f"ingest:  {dt:.2f} s ({'cold' if cold else 'warm'} cache)")
    # spot check: the last row made it, bit for bit
    ref = np.load(src, mmap_mode="r")
    if not np.array_equal(g["raw"][-1], ref[-1]):
        raise RuntimeError("ingested data differ from the input")
    return dt, stored


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=4.0, help="input size in GB (default 4)")
    ap.add_argument("--dir", default="/work/tmp", help="parent of the work dir (not tmpfs)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each timing")
    args = ap.parse_args(argv)
    global COLD
    COLD = args.cold
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_ingest_", dir=args.dir))
    try:
        src = work / "input.npy"
        t0 = time.perf_counter()
        shape = make_dataset(src, args.gb)
        nbytes = int(np.prod(shape)) * 2
        print(f"input {shape} uint16, {nbytes / 1e9:.2f} GB, made in "
              f"{time.perf_counter() - t0:.0f} s")
        free = shutil.disk_usage(work).free
        if free < 1.5 * nbytes:
            print(f"not enough free disk in {work} for the copy ({free / 1e9:.1f} GB)")
            return 1
        t_save = time_np_save(src, work / "copy.npy")
        (work / "copy.npy").unlink()
        t_ing, stored = time_ingest(src, work / "store.zarr")
        mb_save = nbytes / 1e6 / t_save
        mb_ing = nbytes / 1e6 / t_ing
        print(f"np.save throughput: {mb_save:.0f} MB/s")
        print(f"ingest throughput:  {mb_ing:.0f} MB/s")
        print(f"compression ratio:  {nbytes / stored:.2f}")
        ratio = mb_ing / mb_save
        print(f"ratio ingest/np.save: {ratio:.2f} (target >= 0.25)")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
