"""Detector counts that compress like real 4D-STEM data, for the ingest and preprocessing
benchmarks (``bench_ingest.py``, ``bench_ingest_memory.py``, ``bench_prep.py``).

A low-dose simulation (1e3 e-/pattern: 96 % of the pixels zero) compresses ~40-50x with the
store's codec (Blosc zstd level 1 + bitshuffle), so its ingest would write a tenth of the bytes
real data make it write, and would be fast for the wrong reason.  Real count data carry
~1e4-1e5 electrons per pattern and, beside the disks, a diffuse halo (thermal diffuse and
inelastic scattering, support film) and a low floor over the whole detector (dark counts,
scatter in the column), so most pixels hold a few counts and the stored raw array is 3-5x
smaller than the raw bytes.  :func:`detector_counts` turns expected patterns (any scale) into
such counts: each pattern is normalised, mixed with :func:`diffuse_halo` and a flat floor,
scaled to ``dose`` electrons and Poisson-sampled into uint16.  With the defaults the raw array
of either benchmark pattern (``bench_ingest.expected_pattern``, the simulator's noise-free
heterostructure) compresses ~4x.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

DOSE = 1.0e5  # electrons per pattern
HALO = 0.4  # fraction of the electrons in the diffuse halo
FLOOR = 0.2  # fraction spread evenly over the detector
BLOCK = 256  # patterns sampled at a time (bounds the float64 temporaries to ~64 MB)


def diffuse_halo(k: int) -> np.ndarray:
    """A ``(k, k)`` diffuse halo summing to 1: exponential in the distance from the centre
    (decay length ``k / 4``), so the detector edge still gets ~1/6 of the centre's counts."""
    yy, xx = np.mgrid[:k, :k] - (k - 1) / 2
    h = np.exp(-np.hypot(yy, xx) / (k / 4))
    return h / h.sum()


def detector_counts(expected: np.ndarray, rng: np.random.Generator, dose: float = DOSE,
                    halo: float = HALO, floor: float = FLOOR) -> np.ndarray:
    """uint16 Poisson counts of ``expected`` patterns ``(..., k, k)`` as a detector records them.

    Each pattern is scaled to sum to 1, mixed as ``(1 - halo - floor) * pattern + halo *
    diffuse_halo + floor / k**2`` and multiplied by ``dose`` (expected electrons per pattern);
    counts are clipped to the uint16 range.
    """
    k = expected.shape[-1]
    flat = np.reshape(expected, (-1, k, k))
    out = np.empty(flat.shape, dtype=np.uint16)
    back = dose * (halo * diffuse_halo(k) + floor / (k * k))
    for i in range(0, len(flat), BLOCK):
        pat = np.array(flat[i:i + BLOCK], dtype=np.float64)  # a copy: scaled in place
        pat *= dose * (1.0 - halo - floor) / pat.sum(axis=(1, 2), keepdims=True)
        counts = rng.poisson(pat + back)
        np.minimum(counts, np.iinfo(np.uint16).max, out=counts)
        out[i:i + BLOCK] = counts
    return out.reshape(np.shape(expected))


def compression_ratio(store: str | Path) -> float:
    """Raw bytes / stored bytes of the ``raw`` array of a store written by ``ingest``."""
    raw = zarr.open_array(str(store), path="raw", mode="r")
    return raw.nbytes / raw.nbytes_stored()
