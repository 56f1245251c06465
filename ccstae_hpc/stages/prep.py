"""Preprocessing stage: ``raw/`` -> ``prep/`` of a store, chunked over scan rows on Dask.

Modelled on LiberTEM's UDFs: each pass is a pure function of one block of whole scan rows
(:mod:`ccstae_hpc.core.patterns` kernels) that returns small per-pattern results and may write
its block of a large output array (a region write aligned with the row chunks, so blocks
never share a chunk); the client merges the small results.

Passes
------
1. sum pattern -> hot and dead pixels, central disk (centre, radius);
2. per pattern: hot- and dead-pixel repair, central-disk origin, Bragg-ring fraction (vacuum);
3. smooth descan fit of the origins (robust polynomial over the scan);
4. per pattern: repair, integer re-centring on the fitted origin, bin/crop -> ``prep/patterns``
   and its normalising ``scale``; a random subset is returned for the shuffled training shards;
5. mean pattern of the re-centred data -> Bragg-disk mask and lattice fit.

``prep/`` holds ``patterns`` (repaired, re-centred, binned counts in an integer dtype for
counting detectors: lossless and half the bytes of float), ``scale`` (per pattern: ``patterns
* scale`` has mean 1 and is the model input, see :func:`read_patterns`), ``origin``
(measured), ``origin_fit`` (descan model), ``shift`` (shift applied), ``vacuum``,
``ring_fraction``, ``mask``, ``mean`` (sum of all patterns scaled to mean 1), ``train`` and
``train_scale`` (shuffled training shards: counts and scale like ``patterns``, or normalised
float16 for float patterns), ``train_index`` (each training pattern's flat scan index); every
parameter is in its attrs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr
from scipy import ndimage

from ccstae_hpc import __version__
from ccstae_hpc.core.config import Config, check
from ccstae_hpc.core.geometry import Geometry, ring_inner_radius
from ccstae_hpc.core.patterns import (
    central_disk,
    disk_mask,
    find_dead_pixels,
    find_hot_pixels,
    fit_descan,
    fit_lattice,
    measure_origins,
    normalised,
    otsu_threshold,
    pattern_dtype,
    radial_background,
    recentred,
    recorded_pixels,
    repair_hot_pixels,
    ring_mask,
)
from ccstae_hpc.runtime.memory import keep_work_memory
from ccstae_hpc.stages.readers import first_nonfinite
from ccstae_hpc.stages.store import (
    CODEC,
    check_stage,
    commit,
    discard_staging,
    group_state,
    open_root,
    staging,
)

__all__ = ["MIN_DETECTOR", "MIN_PATTERNS", "REINGEST", "PrepConfig", "PrepError", "SampleStats",
           "check_raw_shape", "check_sample", "find_disk", "open_prep", "prep_geometry",
           "preprocess_store", "read_block", "read_patterns", "read_recorded", "recorded_at",
           "sample_rows", "sample_stats"]

PREP = "prep"
# raw bytes per block of whole scan rows when PrepConfig.rows_per_block is 0
ROWS_BLOCK_BYTES = 32e6
# patterns of the pass-1 mean (evenly spaced rows): enough for hot pixels and the disk
SAMPLE_PATTERNS = 4096
# input floors, the same for every stage and for `ccstae run`: a detector below this has no
# room for Bragg disks around the central disk (and is the floor of SimConfig.detector)...
MIN_DETECTOR = 32
# ...and fewer probe positions cannot teach a dictionary
MIN_PATTERNS = 16
# px between the Bragg annulus' inner radius and the detector edge (after the ring margin) for
# the annulus to hold disks: less means the "central disk" is noise, a flood or off the chip
MIN_ANNULUS_PX = 2.0
EDGE_MARGIN_PX = 2.0  # the annulus' outer margin (core.patterns.ring_mask's default)
# a float mean pattern whose negative part outweighs half its positive part is no intensity
NEGATIVE_MASS_LIMIT = 0.5
# a mean pattern whose range is below this fraction of its level is flat: no diffraction
FLAT_CONTRAST = 1e-6
# vacuum and sample are two classes of Bragg-ring fraction only when their means are further
# apart than this many times the sum of their standard deviations (else: no vacuum)
VACUUM_SEPARATION = 3.0
# what to do after fixing the input file, for a store (`ccstae run` passes its own)
REINGEST = "ingest the corrected file again (`ccstae ingest INPUT STORE --overwrite`)"


class PrepError(ValueError):
    """The store cannot be preprocessed; the message says what to do."""


@dataclass(frozen=True)
class PrepConfig(Config):
    """Preprocessing parameters (stored in ``prep`` attrs)."""

    # model input size: larger detectors are binned (integer factor) then cropped
    output_size: int = 128
    descan_order: int = 2  # polynomial order of the smooth descan fit over the scan
    # hot (dead) pixel: this many sigmas and 3x above (below) its 3x3 neighbours
    hot_nsigma: float = 8.0
    # "integer" (default): whole-pixel shifts, lossless, Poisson counts kept, the sub-pixel
    # rest (< 0.5 px, measured in prep/origin_fit) is left to the model's translation;
    # "subpixel": bilinear shift onto the exact origin (float32 patterns; interpolation
    # correlates neighbouring pixels' noise); "none"
    recentre: str = "integer"
    # "none" (default): the refinement fits a constant offset per pattern; "radial": the
    # model input is normalised pattern - prep/background, the radially symmetric diffuse
    # halo of the mean pattern between the Bragg disks (preprocess.radial_background).
    # Stored patterns stay counts; the subtraction happens on reading (read_patterns,
    # training shards), unbiased for sparse counts (no clipping at 0).  Measured worse than
    # "none": on the 32x32 heterostructure at 1e3 e- with a diffuse background of weight 0.5
    # "radial" merged the two phases (exx MAE 0.477 % against 0.188 %; the encoder gave every
    # sample pattern one entry), and the refinement's and the composition test's Poisson
    # weights take the subtracted model for the variance (composition chi-squares of 1e17)
    background: str = "none"
    rows_per_block: int = 0  # 0: about 32 MB of raw data per block
    max_train: int = 8192  # patterns in the shuffled training shards
    shard_size: int = 1024  # patterns per training shard
    seed: int = 0  # shuffle of the training shards

    def __post_init__(self) -> None:
        check(self.output_size >= 32, "output_size must be >= 32")
        check(self.descan_order in (0, 1, 2, 3), "descan_order must be 0..3")
        check(self.recentre in ("integer", "subpixel", "none"),
               "recentre must be 'integer', 'subpixel' or 'none'")
        check(self.background in ("none", "radial"), "background must be 'none' or 'radial'")
        check(self.max_train >= 1 and self.shard_size >= 1, "max_train/shard_size must be >= 1")


def read_block(store: str | Path, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 model input of scan rows ``y0:y1`` of a preprocessed store and its ``scale``
    (the normalised value of one count per pattern)."""
    # arrays opened by path: opening the root would parse the metadata of every group
    # (the model's weights among them) for each block
    def arr(name: str) -> zarr.Array:
        return zarr.open_array(str(store), path=f"{PREP}/{name}", mode="r", zarr_format=3)

    try:
        bg = arr("background")[...]
    except (KeyError, FileNotFoundError, zarr.errors.ArrayNotFoundError):
        bg = None
    scale = arr("scale")[y0:y1]
    return normalised(arr("patterns")[y0:y1], scale, background=bg), scale


def read_recorded(store: str | Path, y0: int, y1: int) -> np.ndarray | None:
    """Which pixels of scan rows ``y0:y1`` of ``prep/patterns`` hold recorded counts,
    ``(n, Q, Q)`` bool (:func:`ccstae_hpc.core.patterns.recorded_pixels`: not the strip a
    re-centring shift uncovered, not a repaired hot pixel); None for a store written before
    ``prep/shift`` and ``prep/hot_pixels`` existed."""
    try:
        shift, hot, patterns = (zarr.open_array(str(store), path=f"{PREP}/{name}", mode="r",
                                                zarr_format=3)
                                for name in ("shift", "hot_pixels", "patterns"))
    except (KeyError, FileNotFoundError, zarr.errors.ArrayNotFoundError):
        return None
    return recorded_pixels(shift[y0:y1], hot[...], patterns.shape[-1])


def recorded_at(prep: zarr.Group, index: np.ndarray) -> np.ndarray | None:
    """:func:`read_recorded` of the patterns at flat scan indices ``index`` (the training
    sample's ``prep/train_index``)."""
    if "shift" not in prep or "hot_pixels" not in prep:
        return None
    shift = np.asarray(prep["shift"][...]).reshape(-1, 2)[np.asarray(index)]
    return recorded_pixels(shift, prep["hot_pixels"][...], prep["patterns"].shape[-1])


def read_patterns(store: str | Path, y0: int, y1: int) -> np.ndarray:
    """Float32 model input of scan rows ``y0:y1`` of a preprocessed store."""
    return read_block(store, y0, y1)[0]


# -- the stage --------------------------------------------------------------------------

def _blocks(ny: int, rows: int) -> list[tuple[int, int]]:
    return [(y, min(y + rows, ny)) for y in range(0, ny, rows)]


def _map(fn: Callable, items: list, client: Any | None) -> list:
    """Run ``fn`` over ``items`` on a distributed client, else on a local thread pool."""
    if client is not None:
        return client.gather(client.map(fn, items, pure=False))
    import dask

    return list(dask.compute(*[dask.delayed(fn)(it) for it in items], scheduler="threads"))


def open_prep(store: str | Path) -> zarr.Group:
    """Open a store's ``prep`` group; error if preprocessing did not complete."""
    try:
        g = zarr.open_group(str(store), mode="r", zarr_format=3)[PREP]
    except (KeyError, FileNotFoundError) as e:
        raise PrepError(f"{store} has no prep group (it is not preprocessed). Run `ccstae "
                        f"preprocess {store}` first") from e
    if not g.attrs.get("complete"):
        raise PrepError(f"{store}/prep is incomplete. Rerun `ccstae preprocess {store}`")
    return g


# -- input checks (before any write) ------------------------------------------------------

def check_raw_shape(shape: tuple[int, ...]) -> None:
    """Refuse raw data the stages cannot use: not 4D, too few probe positions, tiny detector.

    Raises
    ------
    PrepError
        With the problem and what to do.
    """
    if len(shape) != 4:
        raise PrepError(f"raw has shape {tuple(shape)}; expected 4D (scan_y, scan_x, k_y, k_x). "
                        f"Ingest a 4D-STEM dataset")
    ny, nx, qy, qx = (int(v) for v in shape)
    if ny * nx < MIN_PATTERNS:
        raise PrepError(
            f"the scan is {ny} x {nx} ({ny * nx} probe position{'s' * (ny * nx != 1)}); at "
            f"least {MIN_PATTERNS} are needed to learn a dictionary. Use a larger scan")
    if min(qy, qx) < MIN_DETECTOR:
        raise PrepError(
            f"the detector is {qy} x {qx} px; at least {MIN_DETECTOR} x {MIN_DETECTOR} px are "
            "needed to hold the Bragg disks. Use the unbinned patterns")


class SampleStats(NamedTuple):
    """Pass-1 statistics of evenly spaced scan rows (:func:`sample_stats`)."""

    total: np.ndarray  # (k_y, k_x) float64 sum of the sampled patterns
    n: int  # patterns summed
    vmin: float  # smallest sampled value
    vmax: float  # largest sampled value
    nonfinite: tuple[int, int] | None = None  # scan position of the first NaN/inf pattern

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.n, 1)


def sample_rows(ny: int, nx: int) -> list[tuple[int, int]]:
    """The evenly spaced scan rows (``(y, y + 1)``) of the pass-1 sample: ~SAMPLE_PATTERNS."""
    step = max(1, ny // max(1, SAMPLE_PATTERNS // nx))
    return [(y, y + 1) for y in range(0, ny, step)]


def _row_stats(block: np.ndarray) -> tuple[np.ndarray, float, float, int | None]:
    # min/max as Python floats: they go through Dask and into messages
    bad = first_nonfinite(block)
    return (block.sum((0, 1), dtype=np.float64), float(block.min()), float(block.max()),
            None if bad is None else bad[1])


def sample_stats(read: Callable[[int, int], np.ndarray], ny: int, nx: int,
                 client: Any | None = None) -> SampleStats:
    """Sum, minimum and maximum of the sampled rows, ``read(y0, y1)`` giving raw rows."""
    rows = sample_rows(ny, nx)
    res = _map(lambda b: _row_stats(read(*b)), rows, client)
    bad = next(((y0, r[3]) for (y0, _), r in zip(rows, res, strict=True) if r[3] is not None),
               None)
    return SampleStats(np.sum([r[0] for r in res], 0), len(rows) * nx,
                       min(r[1] for r in res), max(r[2] for r in res), bad)


def check_sample(stats: SampleStats, dtype: np.dtype, redo: str = REINGEST) -> None:
    """Refuse sampled raw data that hold no diffraction: NaN/inf, negative counts, all zero,
    one constant value (saturated or blank), or a flat mean pattern.

    ``redo`` ends each message: what to do once the input file is fixed.

    Raises
    ------
    PrepError
        With the problem and what to do.
    """
    dtype = np.dtype(dtype)
    m = stats.mean
    if stats.nonfinite is not None or not (
            np.isfinite(m).all() and math.isfinite(stats.vmin) and math.isfinite(stats.vmax)):
        at = ("" if stats.nonfinite is None else
              " (first at scan position y={}, x={})".format(*stats.nonfinite))
        raise PrepError(f"the data hold NaN or infinite values{at}; the stages need finite "
                        f"intensities. Replace them (e.g. with 0 for dead pixels), then {redo}")
    if np.issubdtype(dtype, np.integer) and stats.vmin < 0:
        raise PrepError(
            f"the data hold negative counts (down to {stats.vmin:g}) as {dtype}; detector "
            "counts are >= 0, and negative ones usually mean unsigned counts saved as signed "
            f"(e.g. uint16 as int16). Convert them (e.g. data.view(np.uint16)), then {redo}")
    if stats.vmin == stats.vmax:
        v = stats.vmin
        what = ("all zero: the detector recorded nothing (beam blanked, or the wrong dataset)"
                if v == 0 else
                f"saturated: every pixel is {v:g}, the largest {dtype} value"
                if np.issubdtype(dtype, np.integer) and v == np.iinfo(dtype).max else
                f"constant: every pixel is {v:g}, no diffraction")
        raise PrepError(f"the sampled patterns are {what}. Check the acquisition, then "
                        f"{redo}")
    pos, neg = float(m[m > 0].sum()), float(-m[m < 0].sum())
    if pos <= 0 or neg > NEGATIVE_MASS_LIMIT * pos:
        raise PrepError(
            f"the mean pattern is mostly negative (positive sum {pos:.3g}, negative sum "
            f"{neg:.3g}): these are not diffraction intensities. Check the sign and offset of "
            f"the data, then {redo}")
    if np.ptp(m) <= FLAT_CONTRAST * float(np.abs(m).max()):
        raise PrepError(f"the mean pattern is flat (every pixel {float(m.flat[0]):.4g}): no "
                        f"diffraction. Check the acquisition, then {redo}")


def find_disk(stats: SampleStats, dtype: np.dtype, hot_nsigma: float) -> _Disk:
    """Hot and dead pixels and the central disk of the sampled mean pattern, checked for
    room.

    Raises
    ------
    PrepError
        No central disk, or one too large or too close to the edge for Bragg disks around it
        (pure noise, a flood-lit or saturated detector, a beam off the detector).
    """
    mean_raw = stats.mean
    counts = np.issubdtype(np.dtype(dtype), np.integer)
    n = stats.n if counts else None

    def repaired(mask: np.ndarray) -> np.ndarray:
        return (repair_hot_pixels(mean_raw, mask).astype(np.float64) if mask.any()
                else mean_raw)

    # each kind is looked for with the other repaired: next to a disk's edge, a dead bright
    # neighbour turns the 3x3 median dark and a dim pixel would look hot (seen in tests)
    dead = find_dead_pixels(repaired(find_hot_pixels(mean_raw, hot_nsigma, n)), hot_nsigma, n)
    hot = find_hot_pixels(repaired(dead), hot_nsigma, n) & ~dead
    n_dead = int(dead.sum())
    hot |= dead  # both are repaired from their neighbours and never fitted
    mean_rep = mean_raw.copy()
    mean_rep[hot] = ndimage.median_filter(mean_raw, 3)[hot]
    try:
        cy, cx, radius = central_disk(mean_rep)
    except ValueError:
        raise PrepError("no central disk found in the mean pattern: the data hold no "
                        "diffraction. Check that this is the right dataset") from None
    r_in = ring_inner_radius(radius)
    Q0, Q1 = mean_raw.shape
    room = min(cy, cx, Q0 - 1 - cy, Q1 - 1 - cx) - EDGE_MARGIN_PX - r_in
    if not room >= MIN_ANNULUS_PX:
        raise PrepError(
            f"no central disk with room for Bragg disks around it: the brightest region of the "
            f"mean pattern (radius {radius:.1f} px at row {cy:.1f}, col {cx:.1f} of the "
            f"{Q0} x {Q1} px detector) is too large or too close to the edge. The data look "
            "like noise or a flooded detector, or the beam is off centre: check the dataset "
            "and the detector alignment")
    return _Disk(hot, cy, cx, radius, r_in, n_dead)


def prep_geometry(prep: zarr.Group) -> Geometry:
    """The detector geometry recorded by preprocessing (centre, disk radius, annulus)."""
    return Geometry.from_disk(tuple(prep.attrs["center"]), float(prep.attrs["disk_radius"]),
                              prep["patterns"].shape[-1])


def preprocess_store(
    store: str | Path,
    config: PrepConfig | None = None,
    client: Any | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> zarr.Group:
    """Preprocess ``STORE/raw`` into ``STORE/prep`` (see the module docstring).

    The group is written as ``prep.partial`` and replaces ``prep`` only once complete
    (:mod:`ccstae_hpc.stages.store`); a complete ``prep`` with the same settings and raw
    data is kept as it is.

    Parameters
    ----------
    store : path of a store written by ``ccstae ingest`` (``raw`` complete).
    config : parameters; defaults to ``PrepConfig()``.
    client : a ``distributed.Client`` to run the blocks on (threads when None).
    overwrite : replace an existing complete ``prep`` group made with other settings.
    """
    cfg = config or PrepConfig()
    say = log or (lambda s: None)
    root = open_root(store, "r+")
    if "raw" not in root or not root["raw"].attrs.get("complete", root.attrs.get("complete")):
        raise PrepError(f"{store} has no complete raw array (it is not ingested). Run `ccstae "
                        f"ingest INPUT {store}`")
    raw = root["raw"]
    check_raw_shape(raw.shape)
    if group_state(store, PREP) == "complete" and \
            root[PREP].attrs.get("config") == cfg.to_dict() and \
            root[PREP].attrs.get("raw_identity") == _raw_identity(root):
        say("prep is complete and up to date; nothing to do")
        return root[PREP]
    check_stage(store, PREP, overwrite)
    ny, nx, Q0, Q1 = raw.shape
    rows = cfg.rows_per_block or max(
        1, int(ROWS_BLOCK_BYTES // (nx * Q0 * Q1 * raw.dtype.itemsize)))
    blocks = _blocks(ny, rows)
    raw_path = str(store)
    t0 = time.perf_counter()

    def read(y0: int, y1: int) -> np.ndarray:
        keep_work_memory()  # in Dask workers too (see ccstae_hpc.runtime.memory)
        return zarr.open_array(raw_path, path="raw", mode="r")[y0:y1]

    # the input checks: pass 1 and 2 only read, so a refusal leaves the store as it was
    disk = _pass_disk(read, raw, cfg, client)
    say(f"pass 1 ({time.perf_counter() - t0:.1f} s): mean pattern, "
        f"{int(disk.hot.sum()) - disk.n_dead} hot and {disk.n_dead} dead pixels, central disk "
        f"r={disk.radius:.2f} px")
    orig = _pass_origins(read, blocks, disk, cfg, client)
    _check_origins(orig, REINGEST)
    say(f"pass 2 ({time.perf_counter() - t0:.1f} s): origins; descan range "
        f"{np.ptp(orig.fit[..., 0]):.2f} x "
        f"{np.ptp(orig.fit[..., 1]):.2f} px; {int(orig.vacuum.sum())} vacuum patterns")
    discard_staging(store, PREP)
    g = root.create_group(staging(PREP))
    g.attrs.update({"complete": False})
    out = _pass_patterns(read, blocks, rows, raw, disk, orig, cfg, client, g, str(store))
    say(f"pass 3 ({time.perf_counter() - t0:.1f} s): patterns written")
    try:
        _pass_lattice(g, disk, orig, out, cfg)
    except PrepError:
        discard_staging(store, PREP)  # the store is left as it was before this run
        raise
    g.attrs.update({
        "config": cfg.to_dict(),
        "raw_identity": _raw_identity(root),
        "center_raw": [float(disk.cy), float(disk.cx)],
        "descan_coef": orig.coef.tolist(),
        "descan_order": cfg.descan_order,
        "n_hot_pixels": int(disk.hot.sum()) - disk.n_dead,
        "n_dead_pixels": disk.n_dead,
        "n_train": int(out.n_train),
        "elapsed_s": time.perf_counter() - t0,
        "ccstae_hpc_version": __version__,
        "complete": True,
    })
    commit(store, PREP)
    say(f"pass 3-4: {ny * nx} patterns in {time.perf_counter() - t0:.1f} s "
        f"({ny * nx / (time.perf_counter() - t0):.0f} patterns/s)")
    return open_root(store)[PREP]


class _Disk(NamedTuple):
    hot: np.ndarray  # (Q0, Q1) bool: hot or dead pixels, repaired from their neighbours
    cy: float
    cx: float
    radius: float  # central disk radius, raw px
    r_in: float  # inner radius of the Bragg annulus, raw px
    n_dead: int = 0  # of them dead (far darker than their neighbours)


class _Origins(NamedTuple):
    origin: np.ndarray  # (ny, nx, 2) measured central-disk origin
    frac: np.ndarray  # (ny, nx) Bragg-ring fraction
    vacuum: np.ndarray  # (ny, nx) bool
    fit: np.ndarray  # (ny, nx, 2) smooth descan model
    coef: np.ndarray
    shift: np.ndarray  # (ny, nx, 2) shift applied (whole or sub-pixel)
    target: np.ndarray  # (2,) detector centre the patterns are moved to
    size: int  # output detector side
    f: int  # bin factor


class _Patterns(NamedTuple):
    mean: np.ndarray  # (size, size) mean pattern at mean 1
    scale: np.ndarray  # (ny, nx)
    n_train: int


def _pass_disk(read: Callable, raw: zarr.Array, cfg: PrepConfig, client: Any | None) -> _Disk:
    """Pass 1: mean pattern of evenly spaced scan rows -> hot pixels and the central disk."""
    # <= ~SAMPLE_PATTERNS patterns: hot pixels and the central disk need no full pass
    stats = sample_stats(read, *raw.shape[:2], client=client)
    check_sample(stats, raw.dtype, REINGEST)
    return find_disk(stats, raw.dtype, cfg.hot_nsigma)


def _check_origins(orig: _Origins, redo: str) -> None:
    """NaN/inf in rows pass 1 did not sample show up as non-finite origins or fractions."""
    bad = ~(np.isfinite(orig.origin).all(-1) & np.isfinite(orig.frac))
    if bad.any():
        y, x = (int(v) for v in np.argwhere(bad)[0])
        raise PrepError(
            f"the data hold NaN or infinite values (first at scan position y={y}, x={x}); the "
            f"stages need finite intensities. Replace them (e.g. with 0 for dead pixels), then "
            f"{redo}")


def _pass_origins(read: Callable, blocks: list[tuple[int, int]], disk: _Disk, cfg: PrepConfig,
                  client: Any | None) -> _Origins:
    """Pass 2: per-pattern origin and ring fraction, vacuum, descan fit, the shifts to apply."""
    center = np.array([disk.cy, disk.cx])
    res = _map(lambda b: measure_origins(read(*b), disk.hot, center, disk.radius, disk.r_in),
               blocks, client)
    origin = np.concatenate([r[0] for r in res])
    frac = np.concatenate([r[1] for r in res])
    vacuum = _vacuum(frac)
    origin_fit, coef = fit_descan(origin, cfg.descan_order)
    Q0, Q1 = disk.hot.shape
    # smaller detectors pass through unbinned (never upsampled)
    size = min(cfg.output_size, Q0, Q1)
    f = max(1, min(Q0, Q1) // size)
    target = np.array([(Q0 - 1) / 2, (Q1 - 1) / 2])
    if cfg.recentre == "integer":
        shift = np.rint(origin_fit - target).astype(np.int64)
    elif cfg.recentre == "subpixel":
        shift = (origin_fit - target).astype(np.float64)
    else:
        shift = np.zeros_like(origin_fit, dtype=np.int64)
    return _Origins(origin, frac, vacuum, origin_fit, coef, shift, target, size, f)


def _pass_patterns(read: Callable, blocks: list[tuple[int, int]], rows: int, raw: zarr.Array,
                   disk: _Disk, orig: _Origins, cfg: PrepConfig, client: Any | None, g: zarr.Group,
                   store_path: str) -> _Patterns:
    """Pass 3: re-centred, binned patterns into ``g/patterns``; the shuffled training shards."""
    ny, nx = raw.shape[:2]
    size = orig.size
    pdt = pattern_dtype(raw.dtype, orig.f > 1, cfg.recentre == "subpixel")
    g.create_array(
        "patterns", shape=(ny, nx, size, size), dtype=pdt,
        chunks=(1, nx, size, size), shards=(rows, nx, size, size),
        dimension_names=("scan_y", "scan_x", "k_y", "k_x"),
        compressors=CODEC,
    )
    rng = np.random.default_rng(cfg.seed)
    n_train = min(cfg.max_train, ny * nx)
    picks = np.sort(rng.choice(ny * nx, n_train, replace=False))
    slot = rng.permutation(n_train)  # picks[i] goes to prep/train[slot[i]]: shuffled shards
    # counts stay counts in the shards too (with their scale); float patterns are stored
    # normalised in float16 (scale 1)
    tdt = pdt if np.issubdtype(pdt, np.integer) else np.dtype(np.float16)
    path = f"{g.path}/patterns"

    def write(b: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y0, y1 = b
        x, sc = recentred(read(y0, y1), disk.hot, orig.shift[y0:y1], size)
        out = zarr.open_array(store_path, path=path, mode="r+")
        # zarr otherwise compares every chunk with the fill value before writing it (~40%
        # of the write time): patterns are never empty
        out.with_config({"write_empty_chunks": True})[y0:y1] = x
        flat, sflat = x.reshape(-1, size * size), sc.ravel()
        sel = picks[(picks >= y0 * nx) & (picks < y1 * nx)] - y0 * nx
        # the training subset is the one thing gathered in the client
        sub = x.reshape(-1, size, size)[sel]
        if tdt == np.float16:
            sub = normalised(sub, sflat[sel]).astype(np.float16)
        # sum pattern (exact for counts) and total: the mean pattern at mean 1 is their ratio
        acc = flat.sum(0, dtype=np.float64)
        return sub, acc.reshape(size, size), sc

    res = _map(write, blocks, client)
    total = np.sum([r[1] for r in res], 0)
    mean = (total * (size * size / max(total.sum(), 1e-12))).astype(np.float32)
    scale = np.concatenate([r[2] for r in res])
    parts = [r[0] for r in res]
    del res
    _write_shards(g, parts, picks, slot, scale, tdt, size, cfg.shard_size)
    return _Patterns(mean, scale, n_train)


def _write_shards(g: zarr.Group, parts: list[np.ndarray], picks: np.ndarray, slot: np.ndarray,
                  scale: np.ndarray, tdt: np.dtype, size: int, shard_size: int) -> None:
    """``g/train`` and ``g/train_scale``: the training subset in shuffled shards.

    One shard at a time through one reused buffer: the client never holds a second copy of
    the training subset (first-touch of fresh memory is slow on VMs).
    """
    n_train = len(picks)
    src = np.argsort(slot)  # train index j holds pick src[j]
    train_index = picks[src]
    # float16 shards are normalised already
    train_scale = (scale.ravel()[train_index] if tdt != np.float16
                   else np.ones(n_train, np.float32))
    starts = np.cumsum([0] + [len(p) for p in parts])
    S = min(shard_size, n_train)
    t = g.create_array("train", shape=(n_train, size, size), dtype=tdt, chunks=(S, size, size),
                       compressors=CODEC).with_config({"write_empty_chunks": True})
    buf = np.empty((S, size, size), tdt)
    for j0 in range(0, n_train, S):
        js = src[j0:j0 + S]
        part = np.searchsorted(starts, js, side="right") - 1
        for k in np.unique(part):
            at = np.nonzero(part == k)[0]
            buf[at] = parts[k][js[at] - starts[k]]
        t[j0:j0 + len(js)] = buf[:len(js)]
    g.create_array("train_scale", data=train_scale, dimension_names=("pattern",))
    # where each training pattern sits in the scan: mapping looks up what preprocessing
    # measured of it (the vacuum flags that decide which dictionary entries are vacuum)
    g.create_array("train_index", data=train_index.astype(np.int64), dimension_names=("pattern",))
    t.attrs["source_index"] = ("random subset of prep/patterns, shuffled; seed in prep attrs; "
                               "flat scan index of each in train_index")


def _pass_lattice(g: zarr.Group, disk: _Disk, orig: _Origins, out: _Patterns,
                  cfg: PrepConfig) -> None:
    """Pass 4: disk mask, lattice and background on the re-centred mean; the small arrays."""
    size, f = orig.size, orig.f
    c_new = np.array([(size - 1) / 2, (size - 1) / 2]) + (
        (orig.fit - orig.shift) - orig.target).reshape(-1, 2).mean(0) / f
    ring = ring_mask((size, size), tuple(c_new), disk.r_in / f)
    mask = disk_mask(out.mean, ring)
    lattice = fit_lattice(out.mean, c_new, disk.r_in / f)
    if not lattice.get("found"):
        # nothing to register patterns onto, and no lattice to measure strain against
        raise PrepError(
            f"found no Bragg disks in the mean pattern ({lattice.get('n_peaks', 0)} peak(s) "
            "outside the central disk, at least 4 in two directions are needed): the scan "
            "holds only vacuum, or the disks are too faint. Check that the scan covers the "
            "sample")
    background = (radial_background(out.mean, tuple(c_new), disk.r_in / f, mask > 0)
                  if cfg.background == "radial" else np.zeros_like(out.mean))
    for name, arr, dims in (
        ("origin", orig.origin.astype(np.float32), ("scan_y", "scan_x", "yx")),
        ("origin_fit", orig.fit.astype(np.float32), ("scan_y", "scan_x", "yx")),
        ("shift", orig.shift.astype(np.float32 if cfg.recentre == "subpixel" else np.int16),
         ("scan_y", "scan_x", "yx")),
        ("vacuum", orig.vacuum, ("scan_y", "scan_x")),
        ("ring_fraction", orig.frac.astype(np.float32), ("scan_y", "scan_x")),
        ("scale", out.scale, ("scan_y", "scan_x")),
        ("mean", out.mean, ("k_y", "k_x")),
        ("mask", mask.astype(np.float32), ("k_y", "k_x")),
        ("hot_pixels", disk.hot, ("k_y_raw", "k_x_raw")),
        ("background", background, ("k_y", "k_x")),
    ):
        g.create_array(name, data=arr, dimension_names=dims)
    g.attrs.update({
        "center": [float(v) for v in c_new],
        "disk_radius": float(disk.radius / f),
        "bin_factor": int(f),
        "lattice": json.loads(json.dumps(lattice)),
    })


def _raw_identity(root: zarr.Group) -> dict[str, Any]:
    a = root["raw"]
    return {"shape": list(a.shape), "dtype": str(a.dtype),
            "ingest": json.loads(json.dumps(root.attrs.get("provenance", {}), default=str))}


def _vacuum(frac: np.ndarray) -> np.ndarray:
    """Vacuum = low Bragg-ring fraction, below its 2-class Otsu threshold
    (:func:`~ccstae_hpc.core.patterns.otsu_threshold`) when the two classes are far apart
    for their spreads (VACUUM_SEPARATION).

    When the fractions are unimodal (no vacuum in the scan) nothing is flagged.
    """
    v = frac.ravel()
    thr = otsu_threshold(v)
    if thr is None:
        return np.zeros(frac.shape, bool)
    a, b = v[v <= thr], v[v > thr]
    if len(a) == 0 or len(b) == 0 or \
            (b.mean() - a.mean()) < VACUUM_SEPARATION * (a.std() + b.std()):
        return np.zeros(frac.shape, bool)
    return frac <= thr
