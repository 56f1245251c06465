"""Preprocessing stage: ``raw/`` -> ``prep/`` of a store, chunked over scan rows on Dask.

Modelled on LiberTEM's UDFs: each pass is a pure function of one block of whole scan rows
(:mod:`ccstae_hpc.preprocess` kernels) that returns small per-pattern results and may write
its block of a large output array (a region write aligned with the row chunks, so blocks
never share a chunk); the client merges the small results.

Passes
------
1. sum pattern -> hot pixels, central disk (centre, radius);
2. per pattern: hot-pixel repair, central-disk origin, Bragg-ring fraction (vacuum);
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
float16 for float patterns); every parameter is in its attrs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from scipy import ndimage

from . import __version__
from .config import _check, _Config
from .preprocess import (
    central_disk,
    disk_mask,
    find_hot_pixels,
    radial_background,
    repair_hot_pixels,
    ring_mask,
)

__all__ = ["PrepConfig", "PrepError", "fit_descan", "fit_lattice", "normalised", "open_prep",
           "pattern_dtype", "preprocess_store", "read_patterns"]

PREP = "prep"
# zstd level 1: as fast as writing uncompressed through zarr here, and 4x smaller than lz4
# on sparse low-dose patterns
_CODEC = zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")


class PrepError(ValueError):
    """The store cannot be preprocessed; the message says what to do."""


@dataclass(frozen=True)
class PrepConfig(_Config):
    """Preprocessing parameters (stored in ``prep`` attrs)."""

    # model input size: larger detectors are binned (integer factor) then cropped
    output_size: int = 128
    descan_order: int = 2  # polynomial order of the smooth descan fit over the scan
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
    # training shards), unbiased for sparse counts (no clipping at 0)
    background: str = "none"
    rows_per_block: int = 0  # 0: about 32 MB of raw data per block
    max_train: int = 8192  # patterns in the shuffled training shards
    shard_size: int = 1024  # patterns per training shard
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.output_size >= 32, "output_size must be >= 32")
        _check(self.descan_order in (0, 1, 2, 3), "descan_order must be 0..3")
        _check(self.recentre in ("integer", "subpixel", "none"),
               "recentre must be 'integer', 'subpixel' or 'none'")
        _check(self.background in ("none", "radial"), "background must be 'none' or 'radial'")
        _check(self.max_train >= 1 and self.shard_size >= 1, "max_train/shard_size must be >= 1")


# -- pure block kernels --------------------------------------------------------------------

def _origins(block: np.ndarray, hot: np.ndarray, center: np.ndarray, radius: float,
             r_in: float) -> tuple[np.ndarray, np.ndarray]:
    """Central-disk origin (row, col) and Bragg-ring intensity fraction per pattern.

    ``block`` is repaired in place (it is a fresh read).  Only a crop around the mean centre
    becomes float: the origin and the inside of the ring need nothing else, and the total
    comes from an integer sum, so this pass reads the data once and converts 1/10 of it.
    """
    b, nx, Q0, Q1 = block.shape
    x = repair_hot_pixels(block.reshape(b * nx, Q0, Q1), hot, copy=False)
    tot = x.sum((1, 2), dtype=np.float64).clip(min=1e-12)
    # half-width: the centroid window of disk_centroids, and the ring radius plus 8 px of
    # descan drift
    H = int(math.ceil(max(radius + 14.0, r_in + 9.0)))
    r0, c0 = (max(int(round(float(v))) - H, 0) for v in center)
    crop = x[:, r0:r0 + 2 * H + 1, c0:c0 + 2 * H + 1].astype(np.float32)
    yy = np.arange(crop.shape[1], dtype=np.float32)[None, :, None]
    xx = np.arange(crop.shape[2], dtype=np.float32)[None, None, :]

    def dist2(c: np.ndarray) -> np.ndarray:
        return (yy - c[:, :1, None]) ** 2 + (xx - c[:, 1:, None]) ** 2

    # centre of mass within radius + 6 px, re-centred once (follows drift of several px);
    # numpy, not torch: torch's OpenMP threads spin between calls and starve the other
    # block-worker threads
    cen = np.tile(np.asarray(center, np.float32) - [r0, c0], (len(x), 1))
    for _ in range(2):
        w = crop * (dist2(cen) <= (radius + 6.0) ** 2)
        sw = w.sum((1, 2)).clip(min=1e-12)
        cen = np.stack([w.sum(2) @ yy[0, :, 0], w.sum(1) @ xx[0, 0]], 1) / sw[:, None]
    # ring fraction about the measured origin: the share outside r_in (total - inside)
    inside = (crop * (dist2(cen) <= r_in**2)).sum((1, 2), dtype=np.float64)
    frac = 1.0 - inside / tot
    return (cen + [r0, c0]).reshape(b, nx, 2), frac.reshape(b, nx)


def _bin_crop(x: np.ndarray, size: int, dtype: np.dtype | None = None) -> np.ndarray:
    """Sum ``f x f`` bins, ``f`` the largest integer factor keeping >= ``size`` px, then
    centre-crop to ``size``.  Sums (not means) keep counts integer; ``dtype`` holds them."""
    Q0, Q1 = x.shape[-2:]
    f = max(1, min(Q0, Q1) // size)
    if f > 1:
        q0, q1 = Q0 // f, Q1 // f
        x = x[..., : q0 * f, : q1 * f].reshape(*x.shape[:-2], q0, f, q1, f).sum(
            (-3, -1), dtype=dtype)
    q0, q1 = x.shape[-2:]
    a, c = (q0 - size) // 2, (q1 - size) // 2
    return x[..., a:a + size, c:c + size]


def pattern_dtype(raw_dtype: np.dtype, binned: bool, floats: bool = False) -> np.dtype:
    """Dtype of ``prep/patterns``: the raw counts' own dtype (uint32 for sums of bins of
    8/16-bit counts), float32 for float data, or when ``floats`` (sub-pixel re-centring,
    background subtraction)."""
    dt = np.dtype(raw_dtype)
    if floats:
        return np.dtype(np.float32)
    if np.issubdtype(dt, np.unsignedinteger) and dt.itemsize <= 4:
        return np.dtype(np.uint32) if binned and dt.itemsize < 4 else dt
    if np.issubdtype(dt, np.signedinteger) and dt.itemsize <= 4:
        return np.dtype(np.int32) if binned and dt.itemsize < 4 else dt
    return np.dtype(np.float32)


def _recentred(block: np.ndarray, hot: np.ndarray, shift: np.ndarray, size: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Repair, shift each pattern by ``shift`` (rows, cols), bin/crop.

    Integer shifts copy pixels; a float ``shift`` is applied as its whole-pixel part, then a
    bilinear interpolation by the fractional rest.

    Returns the patterns in :func:`pattern_dtype` (counts stay counts: lossless, and half
    the bytes of float32) and the per-pattern scale ``1 / mean`` that normalises them.
    ``block`` (a fresh read) is repaired in place.
    """
    b, nx, Q0, Q1 = block.shape
    f = max(1, min(Q0, Q1) // size)
    subpixel = np.issubdtype(shift.dtype, np.floating)
    dt = pattern_dtype(block.dtype, f > 1, subpixel)
    x = repair_hot_pixels(block.reshape(b * nx, Q0, Q1), hot, copy=False)
    s = shift.reshape(-1, 2)
    if subpixel:
        whole = np.floor(s)
        rest, s = (s - whole).astype(np.float32), whole.astype(np.int64)
    if np.any(s):
        # into a new array, casting while copying: one pass over the data.  Grouped by shift:
        # one vectorised slice copy per distinct shift (a handful per block); only the
        # strips the shift uncovers are zeroed
        out = np.empty(x.shape, dt if f == 1 else x.dtype)
        keys = s[:, 0] * 4096 + s[:, 1]
        for key in np.unique(keys):
            sel = np.nonzero(keys == key)[0]
            dy, dx = (int(v) for v in s[sel[0]])
            sel = slice(sel[0], sel[-1] + 1) if sel[-1] - sel[0] + 1 == len(sel) else sel
            src_y = slice(max(dy, 0), Q0 + min(dy, 0))
            dst_y = slice(max(-dy, 0), Q0 + min(-dy, 0))
            src_x = slice(max(dx, 0), Q1 + min(dx, 0))
            dst_x = slice(max(-dx, 0), Q1 + min(-dx, 0))
            out[sel, dst_y, dst_x] = x[sel, src_y, src_x]
            for ys in (slice(0, max(-dy, 0)), slice(Q0 + min(-dy, 0), Q0)):
                out[sel, ys] = 0
            for xs in (slice(0, max(-dx, 0)), slice(Q1 + min(-dx, 0), Q1)):
                out[sel, dst_y, xs] = 0
        x = out
    if subpixel:
        x = _bilinear(x if x.dtype == dt else x.astype(dt), rest)
    x = _bin_crop(x, size, dt)
    if x.dtype != dt:
        x = x.astype(dt)
    tot = x.sum((-1, -2), dtype=np.float64)
    scale = np.divide(size * size, tot, out=np.zeros_like(tot), where=tot > 0)
    return x.reshape(b, nx, size, size), scale.astype(np.float32).reshape(b, nx)


def _bilinear(x: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """``out[p] = x[p + rest]`` per pattern, ``0 <= rest < 1`` (rows, cols); the last row and
    column, which would need pixels beyond the detector, are zero."""
    fy, fx = rest[:, 0, None, None], rest[:, 1, None, None]
    out = np.zeros_like(x)
    out[:, :-1, :-1] = ((1 - fy) * (1 - fx) * x[:, :-1, :-1] + (1 - fy) * fx * x[:, :-1, 1:]
                        + fy * (1 - fx) * x[:, 1:, :-1] + fy * fx * x[:, 1:, 1:])
    return out


def normalised(patterns: np.ndarray, scale: np.ndarray, dtype: type = np.float32,
               background: np.ndarray | None = None) -> np.ndarray:
    """Model input from ``prep/patterns``, ``prep/scale`` (each pattern at mean 1) and
    ``prep/background`` (subtracted)."""
    out = np.asarray(patterns).astype(dtype)
    out *= np.asarray(scale, dtype)[..., None, None]
    if background is not None and np.any(background):
        out -= np.asarray(background, dtype)
    return out


def read_patterns(store: str | Path, y0: int, y1: int) -> np.ndarray:
    """Float32 model input of scan rows ``y0:y1`` of a preprocessed store."""
    g = zarr.open_group(str(store), mode="r", zarr_format=3)[PREP]
    bg = g["background"][...] if "background" in g else None
    return normalised(g["patterns"][y0:y1], g["scale"][y0:y1], background=bg)


def fit_descan(origin: np.ndarray, order: int = 2, weight: np.ndarray | None = None,
               iters: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Robust polynomial fit of the origin over the scan.

    Parameters
    ----------
    origin : (ny, nx, 2) measured origins (row, col).
    order : total polynomial degree in the scan coordinates.
    weight : (ny, nx) optional weights (0 excludes).

    Returns
    -------
    fitted : (ny, nx, 2) smooth origins; coef : (n_terms, 2) coefficients on scan
    coordinates normalised to [-1, 1].
    """
    ny, nx, _ = origin.shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    terms = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    X = np.stack([yy.ravel() ** i * xx.ravel() ** j for i, j in terms], 1)
    y = origin.reshape(-1, 2)
    w = np.ones(len(y)) if weight is None else weight.ravel().astype(np.float64)
    w = w * np.isfinite(y).all(1)
    y = np.nan_to_num(y)
    for _ in range(iters):
        sw = np.sqrt(w)[:, None]
        coef = np.linalg.lstsq(X * sw, y * sw, rcond=None)[0]
        r = np.linalg.norm(y - X @ coef, axis=1)
        s = 1.4826 * np.median(r[w > 0]) + 1e-6
        # Tukey-style reweighting: a few bad origins (e.g. a hot spot) cannot bend the fit
        w = w * (r < 4 * s) if np.any(w * (r < 4 * s)) else w
    return (X @ coef).reshape(ny, nx, 2), coef


def fit_lattice(mean_pattern: np.ndarray, center: Sequence[float], r_in: float
                ) -> dict[str, Any]:
    """Detect Bragg disks on a mean pattern and fit two reciprocal basis vectors.

    Peaks of the top-hat above 5% of the brightest; basis = the shortest peak vector and the
    shortest one not parallel to it; refined by least squares on every peak that indexes to
    within 0.2 of an integer.  Returns pixel units, ``(x, y)`` = ``(col, row)``.
    """
    p = ndimage.gaussian_filter(np.asarray(mean_pattern, np.float64), 1.0)
    th = p - ndimage.grey_opening(p, size=(13, 13))
    yy, xx = np.indices(p.shape)
    r = np.hypot(yy - center[0], xx - center[1])
    lm = (th == ndimage.maximum_filter(th, size=7)) & (th > 0.05 * th[r > r_in].max()) & (r > r_in)
    pk = np.argwhere(lm).astype(np.float64)
    if len(pk) < 4:
        return {"found": False, "n_peaks": int(len(pk))}
    # sub-pixel: centre of mass of the top-hat in a 5x5 window
    refined = []
    for yp, xp in pk.astype(int):
        win = th[max(yp - 2, 0):yp + 3, max(xp - 2, 0):xp + 3].clip(min=0)
        wy, wx = np.indices(win.shape)
        s = win.sum()
        refined.append([max(yp - 2, 0) + (win * wy).sum() / s,
                        max(xp - 2, 0) + (win * wx).sum() / s])
    v = np.asarray(refined)[:, ::-1] - np.asarray(center)[::-1]  # (x, y) relative to origin
    order = np.argsort(np.linalg.norm(v, axis=1))
    a = v[order[0]]
    def cross(p: np.ndarray, q: np.ndarray) -> float:
        return float(p[0] * q[1] - p[1] * q[0])

    b = next((v[i] for i in order[1:] if abs(cross(a, v[i])) > 0.3 * np.dot(a, a)), None)
    if b is None:
        return {"found": False, "n_peaks": int(len(pk))}
    G = np.stack([a, b], 1)
    hk = np.linalg.solve(G, v.T).T
    good = np.all(np.abs(hk - np.round(hk)) < 0.2, axis=1)
    H = np.round(hk[good])
    G = np.linalg.lstsq(H, v[good], rcond=None)[0].T
    resid = v[good] - H @ G.T
    return {
        "found": True,
        "n_peaks": int(len(pk)),
        "n_indexed": int(good.sum()),
        "basis_px": G.T.tolist(),  # rows: g1, g2 as (x, y) px
        "lengths_px": np.linalg.norm(G, axis=0).tolist(),
        "angle_deg": float(np.degrees(np.arccos(
            np.dot(G[:, 0], G[:, 1]) / np.prod(np.linalg.norm(G, axis=0))))),
        "rms_px": float(np.sqrt((resid ** 2).sum(1).mean())),
    }


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
        raise PrepError(f"{store} has no prep group; run `ccstae preprocess {store}` first") from e
    if not g.attrs.get("complete"):
        raise PrepError(f"{store}/prep is incomplete; rerun `ccstae preprocess {store}`")
    return g


def preprocess_store(
    store: str | Path,
    config: PrepConfig | None = None,
    client: Any | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> zarr.Group:
    """Preprocess ``STORE/raw`` into ``STORE/prep`` (see the module docstring).

    Parameters
    ----------
    store : path of a store written by ``ccstae ingest`` (``raw`` complete).
    config : parameters; defaults to ``PrepConfig()``.
    client : a ``distributed.Client`` to run the blocks on (threads when None).
    overwrite : replace an existing complete ``prep`` group.
    """
    cfg = config or PrepConfig()
    say = log or (lambda s: None)
    root = zarr.open_group(str(store), mode="r+", zarr_format=3)
    if "raw" not in root or not root["raw"].attrs.get("complete", root.attrs.get("complete")):
        raise PrepError(f"{store} has no complete raw array; run `ccstae ingest INPUT {store}`")
    raw = root["raw"]
    if raw.ndim != 4:
        raise PrepError(f"raw has shape {raw.shape}; expected (scan_y, scan_x, k_y, k_x)")
    if PREP in root and root[PREP].attrs.get("complete") and not overwrite:
        if root[PREP].attrs.get("config") == cfg.to_dict() and \
                root[PREP].attrs.get("raw_identity") == _raw_identity(root):
            say("prep is complete and up to date; nothing to do")
            return root[PREP]
        raise PrepError(f"{store}/prep exists with other settings; pass --overwrite to redo it")
    ny, nx, Q0, Q1 = raw.shape
    rows = cfg.rows_per_block or max(1, int(32e6 // (nx * Q0 * Q1 * raw.dtype.itemsize)))
    blocks = _blocks(ny, rows)
    raw_path = str(store)
    t0 = time.perf_counter()

    def read(y0: int, y1: int) -> np.ndarray:
        return zarr.open_array(raw_path, path="raw", mode="r")[y0:y1]

    # pass 1: mean pattern of evenly spaced scan rows (<= ~4096 patterns): hot pixels and
    # the central disk need no full pass over the data
    step = max(1, ny // max(1, 4096 // nx))
    sample_rows = [(y, y + 1) for y in range(0, ny, step)]
    sums = _map(lambda b: read(*b).sum((0, 1), dtype=np.float64), sample_rows, client)
    mean_raw = np.sum(sums, 0) / (len(sample_rows) * nx)
    counts = np.issubdtype(raw.dtype, np.integer)
    hot = find_hot_pixels(mean_raw, cfg.hot_nsigma, len(sample_rows) * nx if counts else None)
    mean_rep = mean_raw.copy()
    mean_rep[hot] = ndimage.median_filter(mean_raw, 3)[hot]
    cy, cx, radius = central_disk(mean_rep)
    r_in = 2 * radius + 2
    say(f"pass 1 ({time.perf_counter() - t0:.1f} s): mean pattern, {int(hot.sum())} hot "
        f"pixels, central disk r={radius:.2f} px")

    # pass 2: origins and ring fraction
    center = np.array([cy, cx])
    res = _map(lambda b: _origins(read(*b), hot, center, radius, r_in), blocks, client)
    origin = np.concatenate([r[0] for r in res])
    frac = np.concatenate([r[1] for r in res])
    vacuum = _vacuum(frac)
    origin_fit, coef = fit_descan(origin, cfg.descan_order)
    say(f"pass 2 ({time.perf_counter() - t0:.1f} s): origins; descan range "
        f"{np.ptp(origin_fit[..., 0]):.2f} x "
        f"{np.ptp(origin_fit[..., 1]):.2f} px; {int(vacuum.sum())} vacuum patterns")

    # pass 3: re-centred, normalised patterns + training subset
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
    if PREP in root:
        del root[PREP]
    g = root.create_group(PREP)
    g.attrs.update({"complete": False})
    pdt = pattern_dtype(raw.dtype, f > 1, cfg.recentre == "subpixel")
    g.create_array(
        "patterns", shape=(ny, nx, size, size), dtype=pdt,
        chunks=(1, nx, size, size), shards=(rows, nx, size, size),
        dimension_names=("scan_y", "scan_x", "k_y", "k_x"),
        compressors=_CODEC,
    )
    rng = np.random.default_rng(cfg.seed)
    n_train = min(cfg.max_train, ny * nx)
    picks = np.sort(rng.choice(ny * nx, n_train, replace=False))
    slot = rng.permutation(n_train)  # picks[i] goes to prep/train[slot[i]]: shuffled shards
    # counts stay counts in the shards too (with their scale); float patterns are stored
    # normalised in float16 (scale 1)
    tdt = pdt if np.issubdtype(pdt, np.integer) else np.dtype(np.float16)
    store_path = str(store)

    def write(b: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y0, y1 = b
        x, sc = _recentred(read(y0, y1), hot, shift[y0:y1], size)
        out = zarr.open_array(store_path, path=f"{PREP}/patterns", mode="r+")
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
    say(f"pass 3 ({time.perf_counter() - t0:.1f} s): patterns written")
    total = np.sum([r[1] for r in res], 0)
    mean = (total * (size * size / max(total.sum(), 1e-12))).astype(np.float32)
    scale = np.concatenate([r[2] for r in res])
    # shuffled shards, one at a time through one reused buffer: the client never holds a
    # second copy of the training subset (first-touch of fresh memory is slow on VMs)
    parts = [r[0] for r in res]
    src = np.argsort(slot)  # train index j holds pick src[j]
    # float16 shards are normalised already
    train_scale = (scale.ravel()[picks[src]] if tdt != np.float16
                   else np.ones(n_train, np.float32))
    starts = np.cumsum([0] + [len(p) for p in parts])
    S = min(cfg.shard_size, n_train)
    t = g.create_array("train", shape=(n_train, size, size), dtype=tdt, chunks=(S, size, size),
                       compressors=_CODEC).with_config({"write_empty_chunks": True})
    buf = np.empty((S, size, size), tdt)
    for j0 in range(0, n_train, S):
        js = src[j0:j0 + S]
        part = np.searchsorted(starts, js, side="right") - 1
        for k in np.unique(part):
            at = np.nonzero(part == k)[0]
            buf[at] = parts[k][js[at] - starts[k]]
        t[j0:j0 + len(js)] = buf[:len(js)]
    del res, parts
    g.create_array("train_scale", data=train_scale, dimension_names=("pattern",))
    t.attrs["source_index"] = "random subset of prep/patterns, shuffled; seed in prep attrs"

    # pass 4: masks and lattice on the re-centred mean
    c_new = np.array([(size - 1) / 2, (size - 1) / 2]) + (
        (origin_fit - shift) - target).reshape(-1, 2).mean(0) / f
    ring = ring_mask((size, size), tuple(c_new), r_in / f)
    mask = disk_mask(mean, ring)
    lattice = fit_lattice(mean, c_new, r_in / f)
    background = (radial_background(mean, tuple(c_new), r_in / f, mask > 0)
                  if cfg.background == "radial" else np.zeros_like(mean))
    for name, arr, dims in (
        ("origin", origin.astype(np.float32), ("scan_y", "scan_x", "yx")),
        ("origin_fit", origin_fit.astype(np.float32), ("scan_y", "scan_x", "yx")),
        ("shift", shift.astype(np.float32 if cfg.recentre == "subpixel" else np.int16),
         ("scan_y", "scan_x", "yx")),
        ("vacuum", vacuum, ("scan_y", "scan_x")),
        ("ring_fraction", frac.astype(np.float32), ("scan_y", "scan_x")),
        ("scale", scale, ("scan_y", "scan_x")),
        ("mean", mean, ("k_y", "k_x")),
        ("mask", mask.astype(np.float32), ("k_y", "k_x")),
        ("hot_pixels", hot, ("k_y_raw", "k_x_raw")),
        ("background", background, ("k_y", "k_x")),
    ):
        g.create_array(name, data=arr, dimension_names=dims)
    g.attrs.update({
        "config": cfg.to_dict(),
        "raw_identity": _raw_identity(root),
        "center_raw": [float(cy), float(cx)],
        "center": [float(v) for v in c_new],
        "disk_radius": float(radius / f),
        "bin_factor": int(f),
        "descan_coef": coef.tolist(),
        "descan_order": cfg.descan_order,
        "lattice": json.loads(json.dumps(lattice)),
        "n_hot_pixels": int(hot.sum()),
        "n_train": int(n_train),
        "elapsed_s": time.perf_counter() - t0,
        "ccstae_hpc_version": __version__,
        "complete": True,
    })
    say(f"pass 3-4: {ny * nx} patterns in {time.perf_counter() - t0:.1f} s "
        f"({ny * nx / (time.perf_counter() - t0):.0f} patterns/s)")
    return g


def _raw_identity(root: zarr.Group) -> dict[str, Any]:
    a = root["raw"]
    return {"shape": list(a.shape), "dtype": str(a.dtype),
            "ingest": json.loads(json.dumps(root.attrs.get("provenance", {}), default=str))}


def _vacuum(frac: np.ndarray) -> np.ndarray:
    """Vacuum = low Bragg-ring fraction, split at the widest gap of a 2-class Otsu threshold.

    When the fractions are unimodal (no vacuum in the scan) nothing is flagged.
    """
    v = frac.ravel()
    lo, hi = np.percentile(v, [1, 99])
    if hi - lo < 1e-6 or not math.isfinite(hi):
        return np.zeros(frac.shape, bool)
    hist, edges = np.histogram(v, bins=128, range=(lo, hi))
    p = hist / hist.sum()
    mids = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(p)
    m = np.cumsum(p * mids)
    with np.errstate(invalid="ignore", divide="ignore"):
        between = (m[-1] * w0 - m) ** 2 / (w0 * (1 - w0))
    k = int(np.nanargmax(between))
    thr = mids[k]
    a, b = v[v <= thr], v[v > thr]
    # bimodal only if the two modes are far apart compared with their spreads
    if len(a) == 0 or len(b) == 0 or (b.mean() - a.mean()) < 3 * (a.std() + b.std()):
        return np.zeros(frac.shape, bool)
    return frac <= thr
