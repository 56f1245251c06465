"""Stream a microscope file into the ``raw`` array of a Zarr v3 store, shard by shard.

Layout of the output (one store per dataset, see DESIGN.md)::

    STORE.zarr/            group; attrs: complete, ingest_done_shards, source, provenance,
                           calibration, calibration_unknown, calibration_source, ingest_config
      raw                  (scan_y, scan_x, k_y, k_x); chunks = whole scan rows, shards = several
                           rows (~128 MB), Blosc zstd + bitshuffle; attrs: calibration, complete

Why it looks like this:

* Memory is bounded by ``in_flight`` shards (each read, compressed and written by one worker,
  into a slab buffer the worker reuses), independent of the file size.  Every write covers a
  whole shard whose file does not exist yet (a shard an interrupted run wrote but did not
  record is deleted first), so zarr never reads a shard back (no read-modify-write); zarr's
  local store writes each file to a temporary name and renames it, so a crash or a full
  disk never leaves a half-written shard or ``zarr.json``.
* Chunks are whole scan rows, never single patterns: zarr-python 3 pays a fixed cost per
  chunk that dominates for 32-128 kB patterns.
* Resumable: after a shard is on disk its index is added to ``ingest_done_shards`` (a list of
  ``[start, stop)`` index ranges in the group's ``zarr.json``, rewritten atomically).  A re-run
  with the same input (path, size, mtime, shape, dtype) writes only the missing shards; the
  group gets ``complete: True`` only when all shards are written.  A full disk (ENOSPC)
  stops the run with a message saying so; freeing space and rerunning resumes it.
* Safe: all input checks run before the store is touched (the header against the file
  size, every axis non-empty, the first and last rows readable and finite, the calibration
  plausible, the store's directory writable); a complete, foreign or different store is
  replaced only with ``overwrite=True``, by a new store built beside it and renamed into
  place once complete, so damage or NaN found halfway through the input leaves the old
  store as it was; a path that is not a Zarr store is never deleted.  NaN/inf anywhere in
  the input is refused (the stages need finite intensities).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import math
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ccstae_hpc.core.config import Config, check
from ccstae_hpc.stages.readers import (
    CALIBRATION_KEYS,
    FORMATS,
    NONFINITE_ADVICE,
    IngestError,
    Source,
    calibration_problem,
    first_nonfinite,
    nonfinite_problem,
    open_source,
)
from ccstae_hpc.stages.store import sibling, swap_into_place

__all__ = [
    "ARRAY",
    "DIMENSION_NAMES",
    "IngestConfig",
    "IngestError",
    "OneLineParser",
    "check_store_location",
    "ingest",
    "ingest_main",
    "plan_layout",
]

ARRAY = "raw"
DIMENSION_NAMES = ("scan_y", "scan_x", "k_y", "k_x")
# bump when the meaning of the ingest attrs changes; a resume only continues the same version
_FORMAT_VERSION = 1
_MB = 1_000_000


@dataclass(frozen=True)
class IngestConfig(Config):
    """Layout, compression and concurrency of the ingest.

    ``shard_mb`` is the target uncompressed size of one shard (a whole number of scan rows);
    ``rows_per_shard`` overrides it.  ``in_flight`` shards are read/compressed/written at once,
    but never more than ``max_inflight_mb`` of uncompressed data, which bounds memory.
    ``max_chunk_mb`` caps one inner chunk (a scan row): wider rows are split along scan_x
    (Blosc cannot compress buffers over 2 GB).
    """

    shard_mb: float = 128.0  # target uncompressed MB per shard (whole scan rows)
    rows_per_shard: int | None = None  # scan rows per shard; None: from shard_mb
    cname: str = "zstd"  # Blosc compressor: zstd, lz4, lz4hc, blosclz or zlib
    # zstd level 1 on 1 MiB Blosc blocks: on bitshuffled uint16 counts it compresses ~1.5x
    # faster per core than level 2 on Blosc's automatic (small) blocks, and smaller (12.8x vs
    # 11.2x on the benchmark data): a larger block gives zstd more context than a higher level
    clevel: int = 1
    shuffle: str = "bitshuffle"  # Blosc filter: noshuffle, shuffle or bitshuffle
    blocksize: int = 1 << 20  # bytes; 0 lets Blosc choose
    in_flight: int = 2  # shards read/compressed/written at once
    max_inflight_mb: float = 1024.0  # cap on uncompressed data in flight: bounds memory
    max_chunk_mb: float = 512.0  # cap on one inner chunk; wider rows split along scan_x

    def __post_init__(self) -> None:
        check(self.shard_mb > 0, "shard_mb must be > 0")
        check(
            self.rows_per_shard is None or self.rows_per_shard >= 1,
            "rows_per_shard must be >= 1 or None (derived from shard_mb)",
        )
        check(
            self.cname in ("zstd", "lz4", "lz4hc", "blosclz", "zlib"),
            "cname must be one of zstd, lz4, lz4hc, blosclz, zlib",
        )
        check(0 <= self.clevel <= 9, "clevel must be in 0..9")
        check(self.blocksize >= 0, "blocksize must be >= 0 (0: Blosc's automatic choice)")
        check(
            self.shuffle in ("noshuffle", "shuffle", "bitshuffle"),
            "shuffle must be noshuffle, shuffle or bitshuffle",
        )
        check(self.in_flight >= 1, "in_flight must be >= 1")
        check(self.max_inflight_mb > 0, "max_inflight_mb must be > 0")
        check(self.max_chunk_mb > 0, "max_chunk_mb must be > 0")


@dataclass(frozen=True)
class Layout:
    """Chunk/shard plan of the ``raw`` array."""

    shape: tuple[int, int, int, int]
    chunks: tuple[int, int, int, int]
    shards: tuple[int, int, int, int]
    n_shards: int
    in_flight: int

    @property
    def rows_per_shard(self) -> int:
        return self.shards[0]

    def shard_rows(self, i: int) -> tuple[int, int]:
        y0 = i * self.shards[0]
        return y0, min(y0 + self.shards[0], self.shape[0])


def plan_layout(shape: Sequence[int], itemsize: int, config: IngestConfig) -> Layout:
    """Chunks of whole scan rows, shards of ~``config.shard_mb`` MB.

    Parameters
    ----------
    shape
        ``(scan_y, scan_x, k_y, k_x)``.
    itemsize
        Bytes per detector pixel.
    config
        Ingest settings.
    """
    ny, nx, ky, kx = (int(s) for s in shape)
    pattern = ky * kx * itemsize
    row = nx * pattern
    cx = nx
    if row > config.max_chunk_mb * _MB:
        # split an over-wide row along scan_x into equal parts (shards must be a multiple)
        limit = max(1, int(config.max_chunk_mb * _MB // pattern))
        cx = max(d for d in range(1, min(nx, limit) + 1) if nx % d == 0)
    if config.rows_per_shard is not None:
        rows = config.rows_per_shard
    else:
        rows = max(1, round(config.shard_mb * _MB / row))
    rows = max(1, min(rows, ny))
    shard_bytes = rows * row
    in_flight = max(1, min(config.in_flight, int(config.max_inflight_mb * _MB // shard_bytes)))
    return Layout(
        shape=(ny, nx, ky, kx),
        chunks=(1, cx, ky, kx),
        shards=(rows, nx, ky, kx),
        n_shards=math.ceil(ny / rows),
        in_flight=in_flight,
    )


# --------------------------------------------------------------------------------------------
# calibration


def _check_calibration_option(calibration: dict[str, Any] | None) -> dict[str, float]:
    if not calibration:
        return {}
    unknown = set(calibration) - set(CALIBRATION_KEYS)
    if unknown:
        raise IngestError(
            f"unknown calibration key(s) {sorted(unknown)}. Valid keys: {list(CALIBRATION_KEYS)}"
        )
    out: dict[str, float] = {}
    for k, v in calibration.items():
        if v is None:
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise IngestError(f"calibration {k}={v!r} is not a number. Pass a number") from None
        problem = calibration_problem(k, x)
        if problem is not None:
            raise IngestError(f"{problem}. Check the units and fix the value")
        out[k] = x
    return out


def _plausible(from_file: dict[str, float | None]) -> tuple[dict[str, float | None],
                                                             dict[str, float]]:
    """The file's calibration without implausible values, and those values (recorded in the
    store's reader metadata): a damaged or mis-scaled metadata field is unknown, not used."""
    kept: dict[str, float | None] = {}
    rejected: dict[str, float] = {}
    for k in CALIBRATION_KEYS:
        v = from_file.get(k)
        if v is not None and calibration_problem(k, float(v)) is not None:
            rejected[k] = float(v)
            v = None
        kept[k] = v
    return kept, rejected


def merge_calibration(
    from_file: dict[str, float | None], option: dict[str, float]
) -> tuple[dict[str, float | None], list[str], dict[str, str]]:
    """Combine file metadata with user values; a >1% contradiction is an error.

    Returns
    -------
    calibration, unknown_keys, source_per_key
        ``source_per_key`` is ``"file"`` or ``"option"`` for every known value.
    """
    calib: dict[str, float | None] = {}
    source: dict[str, str] = {}
    for k in CALIBRATION_KEYS:
        f, o = from_file.get(k), option.get(k)
        if f is not None and o is not None:
            rel = _rel_diff(f, o)
            if rel > 0.01:
                raise IngestError(
                    f"calibration {k}: the file's metadata says {f:.6g} but the option gives "
                    f"{o:.6g} ({rel:.1%} apart). Drop the option to use the file's value, or "
                    "fix it"
                )
        if f is not None:
            calib[k], source[k] = float(f), "file"
        elif o is not None:
            calib[k], source[k] = float(o), "option"
        else:
            calib[k] = None
    unknown = [k for k in CALIBRATION_KEYS if calib[k] is None]
    return calib, unknown, source


def _resume_calibration(
    store: Path,
    attrs: Any,
    calib: dict[str, float | None],
    calib_source: dict[str, str],
) -> dict[str, Any]:
    """Calibration attrs of a resumed ingest: this run's values merged with the first run's.

    The input file is the same (its identity was checked), so file values agree; values the
    first run took from options are kept when this run does not repeat them, and an option
    contradicting one of them by more than 1% is an error naming both.
    """
    stored = attrs.get("calibration") or {}
    stored_src = attrs.get("calibration_source") or {}
    out = dict(calib)
    src = dict(calib_source)
    for k in CALIBRATION_KEYS:
        old = stored.get(k)
        if old is None or stored_src.get(k) != "option":
            continue
        new = out.get(k)
        if new is None:
            out[k], src[k] = float(old), "option"
        elif _rel_diff(float(old), new) > 0.01:
            raise IngestError(
                f"calibration {k}: the unfinished store {store} was started with {old:.6g} "
                f"but this run gives {new:.6g} ({_rel_diff(float(old), new):.1%} apart). Pass "
                f"the same value (or drop the option to keep {old:.6g}), or pass --overwrite "
                "to start again"
            )
    unknown = [k for k in CALIBRATION_KEYS if out.get(k) is None]
    return _jsonable(
        {"calibration": out, "calibration_unknown": unknown, "calibration_source": src}
    )


def _rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b))


# --------------------------------------------------------------------------------------------
# store state


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def _identity(src: Source) -> dict[str, Any]:
    st = src.path.stat()
    return {
        "path": str(src.path.resolve()),
        "size_bytes": int(st.st_size),
        "mtime_ns": int(st.st_mtime_ns),
        "mtime": _dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc).isoformat(),
        "shape": list(src.shape),
        "dtype": src.dtype.str,
        "reader": src.metadata.get("reader"),
        "format": src.metadata.get("format"),
        "dataset": src.metadata.get("dataset"),
    }


_IDENTITY_KEYS = ("path", "size_bytes", "mtime_ns", "shape", "dtype", "dataset")


def _same_input(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in _IDENTITY_KEYS if a.get(k) != b.get(k)]


def _store_state(path: Path) -> tuple[str, Any]:
    """Classify ``path``: new | ours | foreign_zarr | not_zarr; with the open group if zarr."""
    if not path.exists():
        return "new", None
    if path.is_dir() and not any(path.iterdir()):
        return "new", None
    if not (path.is_dir() and (path / "zarr.json").is_file()):
        return "not_zarr", None
    try:
        g = zarr.open_group(path, mode="r", zarr_format=3)
    except Exception:  # noqa: BLE001 - an unreadable zarr.json is foreign to us
        return "foreign_zarr", None
    ing = g.attrs.get("ingest")
    if isinstance(ing, dict) and ing.get("format_version") == _FORMAT_VERSION and ARRAY in g:
        return "ours", g
    return "foreign_zarr", g


def _ranges(done: Iterable[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in sorted(set(done)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _from_ranges(r: Any) -> set[int]:
    s: set[int] = set()
    for a, b in r or []:
        s.update(range(int(a), int(b)))
    return s


def _layout_dict(layout: Layout) -> dict[str, Any]:
    return {"chunks": list(layout.chunks), "shards": list(layout.shards),
            "n_shards": layout.n_shards}


def _is_enospc(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


# --------------------------------------------------------------------------------------------
# writing


def _write_shard(arr: zarr.Array, src: Source, index: int, y0: int, y1: int) -> int:
    """Read scan rows ``[y0, y1)`` and write them as one whole shard; returns bytes read.

    Module-level so that tests can wrap it to simulate interruptions.
    """
    try:
        buf = _slab_buffer(src, y1 - y0) if src.supports_out else None
        slab = src.read_rows(y0, y1, out=buf)
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged input
        # the advice is added by ingest(), which knows whether the store was kept
        raise _ReadError(
            f"could not read scan rows {y0}..{y1 - 1} of {src.path} ({type(e).__name__}: {e}); "
            "the file is corrupt or truncated there"
        ) from e
    bad = first_nonfinite(slab)
    if bad is not None:
        raise _NonFiniteError(nonfinite_problem(src.path, y0 + bad[0], bad[1]))
    arr[y0:y1] = slab
    return slab.nbytes


# one slab buffer per worker thread, reused for every shard it writes: a fresh ~128 MB array
# per shard costs ~30k page faults (kernel zeroing) each time.  The buffer goes away with the
# pool's thread at the end of the run, so memory is bounded by in_flight slabs as before.
_tls = threading.local()


def _slab_buffer(src: Source, rows: int) -> np.ndarray:
    shape = (rows, *src.shape[1:])
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.dtype != src.dtype or buf.shape[1:] != shape[1:] or len(buf) < rows:
        _tls.buf = None  # free the old one before allocating
        buf = _tls.buf = np.empty(shape, dtype=src.dtype)
    return buf[:rows]


class _ReadError(IngestError):
    """The input could not be read in the middle of an ingest."""

    advice = "Re-copy or re-export the file"


class _NonFiniteError(_ReadError):
    """The input holds NaN or infinity past the rows the probe read."""

    advice = NONFINITE_ADVICE


def _shard_file(store: Path, arr: zarr.Array, index: int) -> Path:
    # shards span whole rows, so shard ``index`` is the only one at that scan_y position
    key = arr.metadata.encode_chunk_key((index, 0, 0, 0))
    return store / ARRAY / key


def _versions() -> dict[str, str]:
    import ccstae_hpc

    out = {"ccstae_hpc": getattr(ccstae_hpc, "__version__", "unknown"),
           "zarr": zarr.__version__, "numpy": np.__version__}
    for mod in ("numcodecs", "h5py", "rsciio", "dask"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - versions are informational
            pass
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _create_store(
    path: Path, src: Source, layout: Layout, config: IngestConfig, attrs: dict[str, Any]
) -> zarr.Group:
    try:
        g = zarr.open_group(path, mode="w-", zarr_format=3)
        g.create_array(
            ARRAY,
            shape=layout.shape,
            dtype=src.dtype,
            chunks=layout.chunks,
            shards=layout.shards,
            compressors=BloscCodec(cname=config.cname, clevel=config.clevel,
                                   shuffle=config.shuffle, blocksize=config.blocksize),
            fill_value=0,
            dimension_names=DIMENSION_NAMES,
            attributes=_jsonable(
                {k: attrs[k] for k in ("calibration", "calibration_unknown",
                                       "calibration_source")} | {"complete": False}
            ),
        )
        # written last: a crash before this leaves a store that _store_state calls foreign
        g.attrs.update(_jsonable(attrs))
    except BaseException:
        # a half-made store of ours holds no data yet; removing it keeps the next run from
        # refusing it as foreign (e.g. after ENOSPC while writing the metadata)
        shutil.rmtree(path, ignore_errors=True)
        raise
    return g


def ingest(
    input_path: str | os.PathLike[str],
    store_path: str | os.PathLike[str],
    *,
    format: str | None = None,
    dataset: str | None = None,
    overwrite: bool = False,
    calibration: dict[str, Any] | None = None,
    config: IngestConfig | None = None,
    progress: bool = False,
    scan_shape: tuple[int, int] | None = None,
) -> zarr.Group:
    """Stream ``input_path`` into ``store_path``/raw (Zarr v3), resuming an interrupted run.

    Parameters
    ----------
    input_path
        Microscope file: ``.npy``, HDF5 (``.h5/.hdf5/.emd``, incl. EMD 1.0 and py4DSTEM),
        Merlin ``.mib``, EMPAD ``.xml``, Gatan ``.dm3/.dm4``, NanoMegas ``.blo``.
    store_path
        Output Zarr v3 store (a directory).
    format
        Force the input format; detected from content/extension if None.
    dataset
        HDF5 dataset path; needed only when the file holds several 4D datasets.
    overwrite
        Replace an existing store (complete, foreign or from another input).
    calibration
        Values for the keys of :data:`~ccstae_hpc.stages.readers.CALIBRATION_KEYS` that the file
        lacks; a value contradicting the file by more than 1% is an error.
    config
        Layout/compression/concurrency; defaults to :class:`IngestConfig()`.
    progress
        Show a progress bar on stderr.
    scan_shape
        ``(scan_y, scan_x)`` for files holding a flat stack of patterns.

    Returns
    -------
    zarr.Group
        The root group of the store; the data are in ``group["raw"]``.

    Raises
    ------
    IngestError
        Bad input, bad options, a store that must not be replaced, or a full disk (the store
        then stays resumable).
    """
    config = config if config is not None else IngestConfig()
    if not isinstance(config, IngestConfig):
        raise IngestError(
            f"config must be an IngestConfig, not {type(config).__name__}. Pass "
            "IngestConfig(...) (or IngestConfig.from_dict(d) for a dict)"
        )
    option = _check_calibration_option(calibration)
    store = Path(store_path).expanduser()
    src = open_source(input_path, format=format, dataset=dataset, scan_shape=scan_shape)
    with src:
        if store.resolve() == src.path.resolve() or store.resolve() in src.path.resolve().parents:
            raise IngestError(
                f"the store {store} would contain or replace the input file. Choose another "
                "store path"
            )
        src.probe()
        from_file, rejected = _plausible(src.metadata["calibration"])
        if rejected:
            src.metadata["calibration_rejected"] = rejected
        calib, unknown, calib_source = merge_calibration(from_file, option)
        layout = plan_layout(src.shape, src.dtype.itemsize, config)
        ident = _identity(src)
        try:
            group, done, created, target = _open_or_create(
                store, src, layout, config, ident, overwrite, calib, unknown, calib_source
            )
        except OSError as e:
            raise _store_error(store, e, None) from e
        replacing = target != store
        try:
            _run(group, target, src, layout, done, progress, shown=store,
                 resumable=not replacing)
        except _ReadError as e:
            if not created:
                raise IngestError(
                    f"{e}. {e.advice}; then ingest it again with --overwrite (the unfinished "
                    f"store {store} is kept)"
                ) from e
            # the input is damaged in the middle (the probe read its first and last rows): as
            # for any bad input, leave no store behind.  It could not be resumed anyway: a
            # repaired file has another mtime and so another identity
            shutil.rmtree(target, ignore_errors=True)
            kept = (f"{store} is unchanged" if replacing
                    else f"the partial store {store} was removed")
            raise IngestError(f"{e}. {e.advice}; then ingest it again ({kept})") from e
        except BaseException:
            if replacing:  # the replacement is not resumable: the old store stays as it was
                shutil.rmtree(target, ignore_errors=True)
            raise
    if replacing:
        try:
            swap_into_place(target, store)
        except OSError as e:
            shutil.rmtree(target, ignore_errors=True)
            raise _store_error(store, e, None) from e
        group = zarr.open_group(store, mode="r+", zarr_format=3)
    return group


def check_store_location(path: str | os.PathLike[str]) -> None:
    """Refuse a store path that cannot be written, before any work.

    ``path`` itself when it exists, else its nearest existing parent, must be a writable
    directory: a parent that is a file (an output "inside" the input file), a read-only
    directory or file system would otherwise fail only once the data are being written.

    Raises
    ------
    IngestError
        The location is not a writable directory.
    """
    p = Path(path).expanduser().absolute()
    where = p if p.exists() else p.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise IngestError(
            f"cannot create {p}: {where} is a file, not a directory. Choose a path in a "
            "directory"
        )
    if not os.access(where, os.W_OK | os.X_OK):
        raise IngestError(
            f"cannot write in {where} (permission denied or a read-only file system). Choose a "
            "writable location for the store"
        )


def _store_error(store: Path, e: BaseException, progress: str | None,
                 resumable: bool = True) -> IngestError:
    """An IngestError for an OS failure while writing ``store``; says whether it resumes."""
    where = f" after {progress}" if progress else ""
    resume = (
        "rerun the same command: the ingest resumes at the first missing shard"
        if progress is not None and resumable
        else "rerun the same command"
    )
    if not resumable:
        where += f" (the replacement was discarded; {store} is unchanged)"
    if _is_enospc(e):
        return IngestError(
            f"no space left on the device of {store}{where}. Free space (or move the store "
            f"directory elsewhere) and {resume}"
        )
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    name = getattr(e, "filename", None) or store
    if Path(str(name)).name.startswith("."):
        name = store  # a hidden sibling being built: the user knows the store's name
    return IngestError(
        f"cannot write the store {store}{where} ({type(e).__name__}: {reason}: {name}). Check "
        f"that the location is writable (or choose another store path) and {resume}"
    )


def _open_or_create(
    store: Path,
    src: Source,
    layout: Layout,
    config: IngestConfig,
    ident: dict[str, Any],
    overwrite: bool,
    calib: dict[str, float | None],
    unknown: list[str],
    calib_source: dict[str, str],
) -> tuple[zarr.Group, set[int], bool, Path]:
    """Open the unfinished store to resume, or create a new one.

    Returns ``(group, done, created, target)``: ``target`` is where the shards go, ``store``
    itself or, when an existing store is replaced, a hidden sibling that replaces it only
    once complete (a bad input found halfway through leaves the old store as it was).
    """
    state, g = _store_state(store)
    if state == "not_zarr":
        raise IngestError(
            f"{store} exists and is not a Zarr store; it is never deleted, even with "
            "--overwrite. Choose another store path or remove it yourself"
        )
    if state == "ours" and not overwrite:
        ing = g.attrs["ingest"]
        diff = _same_input(ing.get("source", {}), ident)
        if g.attrs.get("complete"):
            what = "this input" if not diff else f"another input ({ing['source'].get('path')})"
            raise IngestError(
                f"{store} already holds a complete ingest of {what}. Pass --overwrite to "
                "replace it, or choose another store path"
            )
        if diff:
            raise IngestError(
                f"{store} holds an unfinished ingest of a different input (differs in "
                f"{', '.join(diff)}: was {ing['source'].get('path')}). Pass --overwrite to "
                "start again from this input, or choose another store path"
            )
        if ing.get("layout") != _layout_dict(layout):
            raise IngestError(
                f"{store} was started with another chunk/shard layout ({ing.get('layout')}, "
                f"now {_layout_dict(layout)}). Resume with the same IngestConfig, or pass "
                "--overwrite to start again"
            )
        # checked before anything is written: a refused resume leaves the store as it was
        cal = _resume_calibration(store, g.attrs, calib, calib_source)
        check_store_location(store)
        g = zarr.open_group(store, mode="r+", zarr_format=3)
        prov = dict(g.attrs.get("provenance", {}))
        prov["resumed_at"] = [*prov.get("resumed_at", []), _now()]
        if cal != {k: g.attrs.get(k) for k in cal}:
            g[ARRAY].attrs.update(cal)
        g.attrs.update(_jsonable({"provenance": prov, **cal}))
        return g, _from_ranges(g.attrs.get("ingest_done_shards")), False, store
    if state == "foreign_zarr" and not overwrite:
        raise IngestError(
            f"{store} is a Zarr store that was not written by ccstae ingest. Pass --overwrite "
            "to replace it, or choose another store path"
        )
    target = store
    if state in ("ours", "foreign_zarr"):
        check_store_location(store.parent)
        target = sibling(store, "new")
    else:
        check_store_location(store)
        if store.exists():
            store.rmdir()  # an empty directory: recreated by zarr
    prov = {
        "source_path": ident["path"],
        "source_size_bytes": ident["size_bytes"],
        "source_mtime": ident["mtime"],
        "reader": ident["reader"],
        "started_at": _now(),
        "host": socket.gethostname(),
        "versions": _versions(),
    }
    reader_meta = {k: v for k, v in src.metadata.items() if k != "calibration"}
    attrs = {
        "complete": False,
        "ingest": {"format_version": _FORMAT_VERSION, "source": ident,
                   "layout": _layout_dict(layout)},
        "ingest_done_shards": [],
        "ingest_config": config.to_dict(),
        "source": ident,
        "provenance": prov,
        "reader_metadata": reader_meta,
        "calibration": calib,
        "calibration_unknown": unknown,
        "calibration_source": calib_source,
    }
    # an OSError here (full disk, no permission) becomes an IngestError in ingest()
    return _create_store(target, src, layout, config, attrs), set(), True, target


def _run(
    group: zarr.Group, store: Path, src: Source, layout: Layout, done: set[int], progress: bool,
    shown: Path | None = None, resumable: bool = True,
) -> None:
    """Write every shard not in ``done``, recording each one as soon as it is on disk.

    ``store`` is the directory written; ``shown`` the store's name in messages (the final
    store when ``store`` is a hidden sibling that will replace it, then not ``resumable``).
    """
    # runtime config, not stored: skip zarr's per-chunk "all fill value?" test (a NaN-aware
    # array_equal costing ~15% of the CPU time); real detector rows are never all zero, and
    # an all-zero row written anyway reads back the same
    arr = group[ARRAY].with_config({"write_empty_chunks": True})
    todo = [i for i in range(layout.n_shards) if i not in done]
    row_bytes = int(np.prod(layout.shape[1:])) * src.dtype.itemsize
    bar = None
    if progress:
        from tqdm import tqdm

        rows_done = layout.shape[0] - sum(
            layout.shard_rows(i)[1] - layout.shard_rows(i)[0] for i in todo
        )
        bar = tqdm(total=layout.shape[0] * row_bytes, initial=rows_done * row_bytes,
                   unit="B", unit_scale=True, desc=f"ingest {src.path.name}", file=sys.stderr)
    failure: BaseException | None = None
    try:
        for i in todo:
            # a shard written by an interrupted run but not yet recorded: remove it so that
            # zarr does not read it back and merge (every write must cover a whole new shard)
            _shard_file(store, arr, i).unlink(missing_ok=True)
        pool = ThreadPoolExecutor(max_workers=layout.in_flight, thread_name_prefix="ingest")
        try:
            pending: dict[Future[int], int] = {}
            it = iter(todo)
            while True:
                # bounded submission: at most in_flight slabs in memory at once; after a
                # failure nothing new is started, running shards finish and are recorded
                while failure is None and len(pending) < layout.in_flight:
                    i = next(it, None)
                    if i is None:
                        break
                    y0, y1 = layout.shard_rows(i)
                    pending[pool.submit(_write_shard, arr, src, i, y0, y1)] = i
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = pending.pop(fut)
                    try:
                        nbytes = fut.result()
                    except Exception as e:  # noqa: BLE001 - re-raised below, after draining
                        failure = failure or e
                        continue
                    done.add(i)
                    try:
                        # atomic rewrite of the group's zarr.json: the resume point
                        group.attrs["ingest_done_shards"] = _ranges(done)
                    except Exception as e:  # noqa: BLE001 - e.g. ENOSPC: shard i is redone
                        done.discard(i)
                        failure = failure or e
                    if bar is not None:
                        bar.update(nbytes)
        finally:
            # Ctrl-C: drop queued work, let running shards finish (they are redone on resume)
            pool.shutdown(wait=True, cancel_futures=True)
        if failure is None:
            group[ARRAY].attrs["complete"] = True
            prov = dict(group.attrs.get("provenance", {}))
            prov["finished_at"] = _now()
            # the group flag last: it promises that raw/ is complete
            group.attrs.update({"complete": True, "provenance": prov})
    except OSError as e:
        failure = failure or e
    finally:
        if bar is not None:
            bar.close()
    if failure is None:
        return
    state = f"{len(done)} of {layout.n_shards} shards"
    if isinstance(failure, _ReadError):
        raise failure  # ingest() adds the advice
    if isinstance(failure, IngestError):
        raise IngestError(f"{failure} ({state} are written)") from failure
    if isinstance(failure, OSError) or _is_enospc(failure):
        raise _store_error(shown or store, failure, state, resumable) from failure
    raise failure


# --------------------------------------------------------------------------------------------
# command line


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error:`` line (not usage + error), exit
    code 2; used by every ``ccstae`` command."""

    def error(self, message: str) -> NoReturn:
        print(" ".join(f"error: {message}. See `{self.prog} --help`.".split()), file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="ccstae ingest",
        description="Stream a 4D-STEM file into a Zarr v3 store (array 'raw'). Resumes an "
        "interrupted run when given the same input and store.",
    )
    p.add_argument("input", metavar="INPUT", help="input file (.npy .h5 .emd .mib .xml .dm4 .blo)")
    p.add_argument("store", metavar="STORE.zarr", help="output Zarr v3 store")
    p.add_argument("--format", metavar="{" + ",".join(sorted(FORMATS)) + "}",
                   help="input format (default: detect from content and extension)")
    p.add_argument("--dataset", metavar="NAME", help="HDF5 dataset path inside the file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--scan-shape", nargs=2, type=int, metavar=("NY", "NX"),
                   help="scan shape for files holding a flat stack of patterns")
    p.add_argument("--scan-step", type=float, metavar="NM", help="scan step in nm")
    p.add_argument("--pixel-size", type=float, metavar="INV_A",
                   help="detector pixel size in 1/Angstrom")
    p.add_argument("--energy", type=float, metavar="KEV", help="beam energy in keV")
    p.add_argument("--convergence", type=float, metavar="MRAD",
                   help="convergence semi-angle in mrad")
    p.add_argument("--shard-mb", type=float, default=IngestConfig.shard_mb,
                   help="target uncompressed MB per shard (default %(default)s)")
    p.add_argument("--clevel", type=int, default=IngestConfig.clevel,
                   help="zstd compression level (default %(default)s)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    # handled by `ccstae` itself (taken out before this parser sees it); listed for --help
    p.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    return p


def ingest_main(argv: list[str], verbose: bool = False) -> int:
    """Entry point of ``ccstae ingest``; returns 0 on success, 2 on bad input.

    Parameters
    ----------
    argv
        Arguments after ``ingest``.
    verbose
        Print the traceback of a refused input before its one-line error.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage/help already
        return int(e.code) if isinstance(e.code, int) else 2
    calib = {
        "scan_step_nm": args.scan_step,
        "detector_pixel_size_inv_A": args.pixel_size,
        "beam_energy_keV": args.energy,
        "convergence_semiangle_mrad": args.convergence,
    }
    try:
        config = IngestConfig(shard_mb=args.shard_mb, clevel=args.clevel)
    except ValueError as e:
        print(" ".join(f"error: {e}. Fix the option".split()), file=sys.stderr)
        return 2
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    t0 = time.perf_counter()
    try:
        g = ingest(
            args.input,
            args.store,
            format=args.format,
            dataset=args.dataset,
            overwrite=args.overwrite,
            calibration={k: v for k, v in calib.items() if v is not None},
            config=config,
            progress=progress,
            scan_shape=tuple(args.scan_shape) if args.scan_shape else None,
        )
    except IngestError as e:
        if verbose:
            import traceback

            traceback.print_exception(e)
        print(" ".join(f"error: {e}".split()), file=sys.stderr)  # one line, whatever e holds
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    dt = time.perf_counter() - t0
    raw = g[ARRAY]
    nbytes = raw.nbytes
    stored = raw.nbytes_stored()
    unknown = g.attrs.get("calibration_unknown") or []
    print(
        f"ingested {args.input} -> {args.store}/{ARRAY}: shape {raw.shape} {raw.dtype}, "
        f"{nbytes / 1e9:.2f} GB in {dt:.1f} s ({nbytes / 1e6 / max(dt, 1e-9):.0f} MB/s), "
        f"compression {nbytes / max(stored, 1):.2f}x"
    )
    if unknown:
        flags = {"scan_step_nm": "--scan-step", "detector_pixel_size_inv_A": "--pixel-size",
                 "beam_energy_keV": "--energy", "convergence_semiangle_mrad": "--convergence"}
        print(
            "calibration unknown: " + ", ".join(unknown)
            + " (pass " + " ".join(flags[k] for k in unknown) + " to record them)"
        )
    return 0
