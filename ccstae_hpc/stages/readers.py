"""Readers: one function per input format, each returning a lazy 4D :class:`Source`.

A :class:`Source` wraps a lazy array shaped ``(scan_y, scan_x, k_y, k_x)`` (a
:class:`numpy.memmap` or a :class:`dask.array.Array`), its dtype and a metadata dict with the
calibration found in the file.  Ingest never touches ``Source.data`` as a whole: it calls
:meth:`Source.read_rows` for one slab of scan rows at a time, so memory stays bounded whatever
the file size.

Formats
-------
``npy``
    NumPy ``.npy``; the header is parsed and checked against the file size, ``data`` is a
    read-only ``numpy.memmap``, and slabs are read with ``preadv`` into a caller's buffer
    (see ``_NpyRows``).
``hdf5``
    ``.h5/.hdf5/.emd`` through h5py: a named dataset, EMD 1.0 data groups (NCEM
    ``emd_group_type=1`` and emdfile/py4DSTEM ``emd_group_type='array'``) with their ``dim``
    calibration vectors, or the only 4D dataset in the file.
``mib``, ``empad``, ``dm``, ``blo``
    Quantum Detectors Merlin, EMPAD (``.xml`` + ``.raw``), Gatan DigitalMicrograph and
    NanoMegas blockfile, all through ``rsciio.<plugin>.file_reader(path, lazy=True)``.

Every reader raises :class:`IngestError` with a message of the form
``"<what is wrong>. <what to do>"`` for input the user can fix.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CALIBRATION_KEYS",
    "CALIBRATION_RANGES",
    "FORMATS",
    "MAX_DETECTOR_PX",
    "NONFINITE_ADVICE",
    "IngestError",
    "NpyHeader",
    "Source",
    "calibration_problem",
    "detect_format",
    "first_nonfinite",
    "nonfinite_error",
    "nonfinite_problem",
    "open_source",
    "read_npy_header",
]

CALIBRATION_KEYS = (
    "scan_step_nm",
    "detector_pixel_size_inv_A",
    "beam_energy_keV",
    "convergence_semiangle_mrad",
)

# plausible range and unit of each calibration value: a value outside is a typo or a unit
# mix-up (eV for keV, m for nm) that would silently scale every lattice parameter
CALIBRATION_RANGES: dict[str, tuple[float, float, str]] = {
    "scan_step_nm": (1e-3, 1e5, "nm"),
    "detector_pixel_size_inv_A": (1e-5, 1.0, "1/Angstrom"),
    "beam_energy_keV": (1.0, 3000.0, "keV"),
    "convergence_semiangle_mrad": (0.01, 500.0, "mrad"),
}


def calibration_problem(key: str, value: float) -> str | None:
    """Why ``value`` is not a plausible ``key`` (see :data:`CALIBRATION_RANGES`), or None."""
    lo, hi, unit = CALIBRATION_RANGES[key]
    if not (math.isfinite(value) and value > 0):
        return f"calibration {key}={value:g} must be a positive number"
    if not lo <= value <= hi:
        return (f"calibration {key}={value:g} {unit} is outside the plausible range "
                f"{lo:g}..{hi:g} {unit}")
    return None


# canonical format name -> file extensions (lower case, without dot)
FORMATS: dict[str, tuple[str, ...]] = {
    "npy": ("npy",),
    "hdf5": ("h5", "hdf5", "hdf", "emd", "nxs"),
    "mib": ("mib",),
    "empad": ("xml",),
    "dm": ("dm4", "dm3"),
    "blo": ("blo",),
}
_ALIASES = {
    "h5": "hdf5",
    "hdf": "hdf5",
    "emd": "hdf5",
    "py4dstem": "hdf5",
    "merlin": "mib",
    "quantumdetector": "mib",
    "dm4": "dm",
    "dm3": "dm",
    "gatan": "dm",
    "digitalmicrograph": "dm",
    "blockfile": "blo",
    "nanomegas": "blo",
}
# largest detector axis accepted (px): real 4D-STEM detectors are <= 4k; a larger value is
# a damaged header, and the first read would allocate a whole scan row of it
MAX_DETECTOR_PX = 16384
# rosettasciio plugin module per format
_RSCIIO_PLUGIN = {
    "mib": "quantumdetector",
    "empad": "empad",
    "dm": "digitalmicrograph",
    "blo": "blockfile",
}


class IngestError(ValueError):
    """User-fixable problem with the input, the options or the output store.

    The message says what is wrong and what to do about it.
    """


@dataclass
class Source:
    """A lazily readable 4D-STEM dataset.

    Attributes
    ----------
    data
        Lazy array shaped ``(scan_y, scan_x, k_y, k_x)`` (``numpy.memmap`` or dask array).
    shape, dtype
        Shape and (native byte order) dtype of what :meth:`read_rows` returns.
    metadata
        ``{"reader": str, "format": str, "calibration": {key: float | None}, ...}``.
    path
        The input file.
    """

    data: Any
    shape: tuple[int, int, int, int]
    dtype: np.dtype
    metadata: dict[str, Any]
    path: Path
    _read: Callable[[int, int], np.ndarray] | None = field(default=None, repr=False)
    _close: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def supports_out(self) -> bool:
        """True when :meth:`read_rows` fills a caller's ``out`` buffer instead of allocating."""
        return bool(getattr(self._read, "supports_out", False))

    def read_rows(self, y0: int, y1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Read scan rows ``[y0, y1)`` into a C-contiguous native-endian array.

        ``out`` (shape ``(y1 - y0, scan_x, k_y, k_x)``, dtype :attr:`dtype`, C-contiguous) is
        filled in place by readers that can (npy); others ignore it and return a new array.
        Reusing one buffer per worker saves the page faults of a fresh 100 MB slab per shard.
        """
        if self._read is not None:
            if out is not None and self.supports_out:
                res = self._read(y0, y1, out)
            else:
                res = self._read(y0, y1)
        else:
            res = _materialise(self.data[y0:y1])
        res = np.ascontiguousarray(res)
        if res.dtype != self.dtype:
            res = res.astype(self.dtype)
        return res

    def probe(self) -> None:
        """Read the first and last scan rows' first/last pattern to catch truncation early.

        Raises
        ------
        IngestError
            When the data cannot be read (truncated or corrupt file) or hold NaN/infinity.
        """
        ny = self.shape[0]
        try:
            for y in sorted({0, ny - 1}):
                # whole rows: readers only slice along scan_y
                bad = first_nonfinite(self.read_rows(y, y + 1))
                if bad is not None:
                    raise nonfinite_error(self.path, y, bad[1])
        except IngestError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
            raise IngestError(
                f"could not read the data of {self.path} ({type(e).__name__}: {e}); the file is "
                "probably truncated or corrupt. Check that the acquisition/copy finished and "
                "that the file size matches the original"
            ) from e

    def close(self) -> None:
        """Release file handles."""
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _materialise(a: Any) -> np.ndarray:
    # dask arrays are computed in the calling thread: ingest already runs a bounded pool of
    # shard workers, and nested dask thread pools would oversubscribe the two cores
    if hasattr(a, "compute"):
        return np.asarray(a.compute(scheduler="synchronous"))
    return np.asarray(a)


def first_nonfinite(slab: np.ndarray) -> tuple[int, int] | None:
    """``(row, col)`` of the first pattern of a ``(rows, scan_x, k_y, k_x)`` slab holding NaN or
    infinity, or None (always None for integers).

    Per-pattern float64 sums first: no temporary as large as the slab, and a sum is finite
    exactly when every value is (float32 values cannot overflow a float64 sum); only a
    non-finite sum (possible for huge float64 values) is confirmed pixel by pixel.
    """
    if slab.dtype.kind != "f" or slab.size == 0:
        return None
    sums = slab.sum(axis=(-2, -1), dtype=np.float64)
    for y, x in np.argwhere(~np.isfinite(sums)):
        if not np.isfinite(slab[y, x]).all():
            return int(y), int(x)
    return None


NONFINITE_ADVICE = "Replace them (e.g. with 0 for dead pixels) and save the file again"


def nonfinite_problem(path: Path, y: int, x: int) -> str:
    """The problem part of the message for NaN/inf at scan position ``(y, x)`` of ``path``."""
    return (f"{path} holds NaN or infinite values (first at scan position y={y}, x={x}); the "
            "stages need finite intensities")


def nonfinite_error(path: Path, y: int, x: int) -> IngestError:
    """The error for NaN/inf at scan position ``(y, x)`` of ``path``."""
    return IngestError(f"{nonfinite_problem(path, y, x)}. {NONFINITE_ADVICE}")


# --------------------------------------------------------------------------------------------
# format detection


def _normalise_format(fmt: str) -> str:
    f = fmt.lower().lstrip(".")
    f = _ALIASES.get(f, f)
    if f not in FORMATS:
        raise IngestError(
            f"unknown format {fmt!r}. Use one of {sorted(FORMATS)} (or leave --format out to "
            "detect it from the file)"
        )
    return f


def detect_format(path: str | os.PathLike[str]) -> str:
    """Return the canonical format name of ``path`` from its content, else its extension.

    Raises
    ------
    IngestError
        When neither content nor extension identifies a supported format.
    """
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(512)
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if head.startswith(b"IMGBLO"):
        return "blo"
    if head.startswith(b"MQ1,"):
        return "mib"
    if len(head) >= 4 and int.from_bytes(head[:4], "big") in (3, 4) and p.suffix.lower() in (
        ".dm3",
        ".dm4",
    ):
        return "dm"
    ext = p.suffix.lower().lstrip(".")
    for name, exts in FORMATS.items():
        if ext in exts and name not in ("npy", "hdf5", "blo", "mib"):
            # npy/hdf5/blo/mib have magic bytes: a wrong magic means a wrong or corrupt file
            return name
    if ext in ("npy", "h5", "hdf5", "hdf", "emd", "nxs", "blo", "mib"):
        raise IngestError(
            f"{p} has the extension .{ext} but does not start like one (the file is corrupt, "
            "truncated to nothing, or misnamed). Check the file, or pass --format if it is "
            "misnamed"
        )
    supported = sorted({e for exts in FORMATS.values() for e in exts})
    raise IngestError(
        f"cannot tell the format of {p} (extension {p.suffix or 'none'}). Supported extensions: "
        f"{', '.join('.' + e for e in supported)}; pass --format {{{','.join(sorted(FORMATS))}}} "
        "to choose one"
    )


def open_source(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    dataset: str | None = None,
    scan_shape: tuple[int, int] | None = None,
) -> Source:
    """Open ``path`` as a lazy 4D :class:`Source`.

    Parameters
    ----------
    path
        Input file (for EMPAD the ``.xml`` file next to the ``.raw``).
    format
        Force a format (``npy, hdf5, mib, empad, dm, blo`` or an alias); detected if None.
    dataset
        HDF5 only: path of the dataset inside the file.
    scan_shape
        ``(scan_y, scan_x)`` for files that hold a flat stack of patterns.

    Raises
    ------
    IngestError
        Missing, unreadable or non-4D input.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise IngestError(f"input file {p} does not exist. Check the path")
    if p.is_dir():
        raise IngestError(f"input {p} is a directory, not a file. Give the path of the data file")
    if not p.is_file():
        raise IngestError(
            f"input {p} is not a regular file (a device, pipe or socket). Give the path of the "
            "data file"
        )
    if p.stat().st_size == 0:
        raise IngestError(f"input file {p} is empty. Check that the acquisition/copy finished")
    try:
        # opened once here, so that a permission problem is one clear line whatever the format
        with open(p, "rb"):
            pass
    except PermissionError:
        raise _unreadable(p) from None
    except OSError as e:
        raise IngestError(
            f"cannot open {p} ({type(e).__name__}: {e.strerror or e}). Check the file and its "
            "file system"
        ) from None
    if scan_shape is not None:
        scan_shape = _check_scan_shape(scan_shape)
    fmt = _normalise_format(format) if format is not None else detect_format(p)
    if dataset is not None and fmt != "hdf5":
        raise IngestError(
            f"--dataset only applies to HDF5 input, but {p.name} is read as {fmt}. Drop --dataset"
        )
    if fmt == "npy":
        src = _open_npy(p, scan_shape)
    elif fmt == "hdf5":
        src = _open_hdf5(p, dataset, scan_shape)
    else:
        src = _open_rsciio(p, fmt, scan_shape)
    if src.dtype.kind not in "uif" or src.dtype.itemsize > 8:
        src.close()
        raise IngestError(
            f"{p} holds {src.dtype} data; only integer and real floating point patterns are "
            "supported. Convert the data to a numeric dtype"
        )
    return src


def _check_scan_shape(scan_shape: Any) -> tuple[int, int]:
    try:
        ny, nx = (int(v) for v in scan_shape)
    except (TypeError, ValueError):
        raise IngestError(
            f"scan shape {scan_shape!r} is not two integers. Pass it as --scan-shape NY NX"
        ) from None
    if ny < 1 or nx < 1:
        raise IngestError(f"scan shape {scan_shape!r} must be positive. Pass --scan-shape NY NX")
    return ny, nx


def _as_4d_shape(
    shape: tuple[int, ...], scan_shape: tuple[int, int] | None, path: Path, what: str
) -> tuple[int, int, int, int]:
    """Validate/derive the 4D shape of an array that is 4D or a flat 3D stack of patterns.

    Every axis must be non-empty and the detector of a plausible size: a zero or huge
    axis is a damaged header, and would otherwise be blamed on truncation later (or make
    the first read allocate the declared size).
    """
    shape4 = _derive_4d_shape(shape, scan_shape, path, what)
    if min(shape4) < 1:
        empty = [n for n, s in zip(("scan_y", "scan_x", "k_y", "k_x"), shape4, strict=True)
                 if s < 1]
        raise IngestError(
            f"{what} in {path} has shape {shape4}: its {', '.join(empty)} axis is empty, so it "
            "holds no patterns. Check that this is the right file (a corrupt header can "
            "declare a zero length)"
        )
    if max(shape4[2:]) > MAX_DETECTOR_PX:
        raise IngestError(
            f"{what} in {path} has a {shape4[2]} x {shape4[3]} px detector, more than "
            f"{MAX_DETECTOR_PX} px per axis: the header is probably corrupt or the axes are in "
            "another order. Check the file (4D-STEM data are (scan_y, scan_x, k_y, k_x))"
        )
    return shape4


def _derive_4d_shape(
    shape: tuple[int, ...], scan_shape: tuple[int, int] | None, path: Path, what: str
) -> tuple[int, int, int, int]:
    """The 4D shape of an array that is 4D or a flat 3D stack of patterns."""
    if len(shape) == 4:
        if scan_shape is not None and tuple(shape[:2]) != scan_shape:
            raise IngestError(
                f"{what} in {path} has scan shape {tuple(shape[:2])} but --scan-shape "
                f"{scan_shape} was given. Drop --scan-shape or fix it"
            )
        return tuple(int(s) for s in shape)  # type: ignore[return-value]
    if len(shape) == 3:
        n = shape[0]
        if scan_shape is None:
            raise IngestError(
                f"{what} in {path} is a flat stack of {n} patterns of {shape[1]}x{shape[2]} and "
                "the file does not say the scan shape. Pass --scan-shape NY NX "
                "(scan_shape=(ny, nx)) with NY*NX == number of patterns"
            )
        if scan_shape[0] * scan_shape[1] != n:
            raise IngestError(
                f"--scan-shape {scan_shape[0]} {scan_shape[1]} gives "
                f"{scan_shape[0] * scan_shape[1]} patterns but {what} in {path} holds {n}. "
                "Fix --scan-shape"
            )
        return (scan_shape[0], scan_shape[1], int(shape[1]), int(shape[2]))
    raise IngestError(
        f"{what} in {path} has shape {tuple(shape)} ({len(shape)}D); 4D-STEM input must be "
        "4D (scan_y, scan_x, k_y, k_x) or a 3D stack of patterns with --scan-shape. Check that "
        "this is the right file/dataset"
    )


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=") if dtype.byteorder not in ("=", "|") else dtype


def _empty_calibration() -> dict[str, float | None]:
    return dict.fromkeys(CALIBRATION_KEYS)


# --------------------------------------------------------------------------------------------
# npy


class _NpyRows:
    """Read row slabs of a C-ordered .npy with ``os.preadv`` into a given or fresh buffer.

    Why not slice the memmap: pages of a long-lived mapping stay resident and count towards
    the process RSS, so streaming a 500 GB file through one mapping makes RSS grow with the
    file (up to the page cache size).  ``preadv`` keeps RSS at one slab per worker.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.fd = os.open(path, os.O_RDONLY)
        self.offset = offset
        self.dtype = dtype
        self.frame_shape = shape[1:]
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        # a caller's buffer is in native byte order: only usable when the file is too
        self.supports_out = dtype == _native(dtype)

    def __call__(self, y0: int, y1: int, out: np.ndarray | None = None) -> np.ndarray:
        shape = (y1 - y0, *self.frame_shape)
        if (out is None or out.shape != shape or out.dtype != self.dtype
                or not out.flags.c_contiguous):
            out = np.empty(shape, dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        pos, done, n = self.offset + y0 * self.row_bytes, 0, len(view)
        while done < n:
            got = os.preadv(self.fd, [view[done:]], pos + done)
            if got == 0:
                raise IngestError(
                    f"unexpected end of file at byte {pos + done}; the .npy file is truncated. "
                    "Re-copy or re-export it"
                )
            done += got
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header declares, checked against the file (:func:`read_npy_header`)."""

    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    offset: int  # byte offset of the data


def read_npy_header(path: str | os.PathLike[str]) -> NpyHeader:
    """Parse and check the header of a ``.npy`` file without reading its data.

    The declared shape must be non-negative and the file must hold exactly the bytes it
    declares: fewer is a truncated file, more a corrupt header (a bit flip in the shape
    would otherwise silently give another array).

    Raises
    ------
    IngestError
        Not a ``.npy`` file, a corrupt header, or a size that disagrees with the header.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unknown .npy format version {version}")
            offset = f.tell()
    except PermissionError:
        raise _unreadable(p) from None
    except Exception as e:  # noqa: BLE001 - a damaged header raises ValueError, SyntaxError,
        # tokenize.TokenError, MemoryError...: all mean the same to the user
        raise IngestError(
            f"{p} is not a readable .npy file ({type(e).__name__}: {_short(e)}). Check that it "
            "was written with numpy.save"
        ) from None
    if not isinstance(shape, tuple) or not all(isinstance(n, int) for n in shape):
        raise IngestError(
            f"{p} has a corrupt .npy header (shape {shape!r}). Re-copy or re-export the file"
        )
    if any(n < 0 for n in shape):
        raise IngestError(
            f"{p} has a corrupt .npy header: it declares the negative shape {shape}. Re-copy "
            "or re-export the file"
        )
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
        raise IngestError(
            f"{p} holds {dtype} records/objects, not a numeric array. Save the patterns as a "
            "plain numeric array"
        )
    # Python integers: an int64 product of a corrupt shape can overflow to a small number
    expected = offset + math.prod(shape) * dtype.itemsize
    size = p.stat().st_size
    if size < expected:
        raise IngestError(
            f"{p} is truncated: its header promises {expected} bytes for shape {shape} "
            f"{dtype} but the file has {size}. Re-copy or re-export the file"
        )
    if size > expected:
        raise IngestError(
            f"{p} holds {size - expected} bytes more than its header declares for shape "
            f"{shape} {dtype} ({expected} bytes): the header is corrupt or the file was "
            "appended to. Re-copy or re-export the file"
        )
    return NpyHeader(tuple(shape), bool(fortran), dtype, offset)


def _short(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's text, cut to ``limit`` characters."""
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unreadable(p: Path) -> IngestError:
    return IngestError(
        f"cannot read {p}: permission denied. Check the file's permissions (e.g. chmod u+r) "
        "or copy it somewhere readable"
    )


def _open_npy(p: Path, scan_shape: tuple[int, int] | None) -> Source:
    h = read_npy_header(p)
    shape, fortran, dtype, offset = h.shape, h.fortran, h.dtype, h.offset
    shape4 = _as_4d_shape(tuple(shape), scan_shape, p, "the array")
    mm = np.memmap(p, dtype=dtype, mode="r", offset=offset, shape=tuple(shape),
                   order="F" if fortran else "C")
    data = mm.reshape(shape4) if len(shape) == 3 and not fortran else mm
    meta: dict[str, Any] = {"reader": "npy", "format": "npy", "calibration": _empty_calibration()}
    native = _native(dtype)
    if fortran:
        # rare: a Fortran-ordered file is read through a per-slab mapping (a copy per slab)
        def read(y0: int, y1: int) -> np.ndarray:
            m = np.memmap(p, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F")
            m4 = m.reshape(shape4, order="F") if len(shape) == 3 else m
            out = np.array(m4[y0:y1], order="C", dtype=native)
            del m, m4
            return out

        return Source(data, shape4, native, meta, p, read, None)
    rows = _NpyRows(p, offset, shape4, dtype)
    return Source(data, shape4, native, meta, p, rows, rows.close)


# --------------------------------------------------------------------------------------------
# HDF5 / EMD / py4DSTEM


def _attr_str(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray) and v.size == 1:
        return _attr_str(v.reshape(-1)[0])
    return str(v)


def _is_emd_data_group(grp: Any) -> bool:
    t = grp.attrs.get("emd_group_type")
    if t is None:
        return False
    s = _attr_str(t).strip().lower()
    return s in ("1", "array")


def _hdf5_datasets(f: Any) -> list[tuple[str, tuple[int, ...], bool]]:
    """All numeric datasets of ndim >= 3: (name, shape, in an EMD data group)."""
    import h5py

    found: list[tuple[str, tuple[int, ...], bool]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.ndim >= 3:
            emd = name.rsplit("/", 1)[-1] == "data" and _is_emd_data_group(obj.parent)
            found.append(("/" + name, tuple(obj.shape), emd))

    f.visititems(visit)
    return found


def _choose_dataset(
    found: list[tuple[str, tuple[int, ...], bool]], p: Path
) -> str:
    four = [d for d in found if len(d[1]) == 4]
    if len(four) == 1:
        return four[0][0]
    if not four and len(found) == 1:
        # a single 3D stack of patterns: taken, and --scan-shape is asked for if missing
        return found[0][0]
    if not four:
        listing = ", ".join(f"{n} {s}" for n, s, _ in found) or "none"
        raise IngestError(
            f"{p} has no 4D dataset (datasets with 3 or more dimensions: {listing}). Pass "
            "--dataset NAME (and --scan-shape NY NX for a 3D stack of patterns)"
        )
    # several 4D datasets: an EMD data group (the py4DSTEM datacube) wins when it is unique
    emd = [d for d in four if d[2]]
    cubes = [d for d in emd if "datacube" in d[0].lower()]
    for pick in (cubes, emd):
        if len(pick) == 1:
            return pick[0][0]
    listing = ", ".join(f"{n} {s}" for n, s, _ in four)
    raise IngestError(
        f"{p} holds several 4D datasets: {listing}. Pass --dataset NAME to choose one"
    )


# unit spellings seen in EMD/py4DSTEM/hyperspy files -> factor to nanometres
_LENGTH_NM = {
    "nm": 1.0,
    "nanometer": 1.0,
    "nanometre": 1.0,
    "a": 0.1,
    "å": 0.1,
    "angstrom": 0.1,
    "ang": 0.1,
    "pm": 1e-3,
    "um": 1e3,
    "µm": 1e3,
    "μm": 1e3,
    "micron": 1e3,
    "mm": 1e6,
    "m": 1e9,
}


def _clean_units(units: Any) -> str:
    u = _attr_str(units) if units is not None else ""
    # py4DSTEM 0.x wrote "[n_m]" and "[1/A]"; drop brackets, underscores and spaces
    return re.sub(r"[\[\]_\s]", "", u).lower()


def length_to_nm(value: float, units: Any) -> float | None:
    """Convert a length to nm; None when the units are not a known length."""
    f = _LENGTH_NM.get(_clean_units(units))
    return None if f is None else float(value) * f


def reciprocal_to_inv_A(value: float, units: Any) -> float | None:
    """Convert a reciprocal length (1/nm, A^-1, ...) to 1/Angstrom; None if not one."""
    u = _clean_units(units)
    base = None
    if u.startswith("1/"):
        base = u[2:]
    elif u.endswith("^-1"):
        base = u[:-3]
    elif u.endswith("-1"):
        base = u[:-2]
    f = _LENGTH_NM.get(base) if base else None
    if f is None:
        return None
    return float(value) / f * 0.1


def electron_wavelength_A(energy_keV: float) -> float:
    """Relativistic electron wavelength in Angstrom."""
    e = energy_keV * 1e3
    return 12.2642584 / math.sqrt(e * (1.0 + 0.978475e-6 * e))


def _detector_inv_A(value: float, units: Any, energy_keV: float | None) -> float | None:
    q = reciprocal_to_inv_A(value, units)
    if q is not None:
        return q
    if _clean_units(units) == "mrad" and energy_keV:
        # small-angle scattering: |q| = theta / lambda (no 2 pi, as py4DSTEM)
        return float(value) * 1e-3 / electron_wavelength_A(energy_keV)
    return None


def _positive(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def _emd_dims(grp: Any, ndim: int) -> list[dict[str, Any]]:
    """Read EMD dim vectors: NCEM numbers them dim1..dimN, emdfile dim0..dimN-1."""
    first = 0 if "dim0" in grp else 1
    dims = []
    for i in range(ndim):
        d = grp.get(f"dim{i + first}")
        if d is None or d.ndim != 1 or d.dtype.kind not in "uif":
            dims.append({"name": "", "units": "", "step": None})
            continue
        v = d[: min(d.shape[0], 2)]
        step = float(v[1] - v[0]) if v.shape[0] >= 2 else None
        units = d.attrs.get("units", d.attrs.get("unit", ""))
        dims.append({"name": _attr_str(d.attrs.get("name", "")), "units": _attr_str(units),
                     "step": step})
    return dims


def _find_attr(f: Any, names: tuple[str, ...]) -> Any:
    """Search attrs and scalar datasets of every group for the first of ``names``."""
    import h5py

    hit: list[Any] = []

    def look(obj: Any) -> None:
        for n in names:
            if n in obj.attrs:
                hit.append(obj.attrs[n])
                return
            if isinstance(obj, h5py.Group) and n in obj and isinstance(obj[n], h5py.Dataset):
                ds = obj[n]
                if ds.size == 1:
                    hit.append(ds[()])
                    return

    look(f)
    if not hit:
        f.visititems(lambda _n, o: None if hit else look(o))
    return hit[0] if hit else None


def _hdf5_calibration(f: Any, dset: Any, emd: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    calib = _empty_calibration()
    extra: dict[str, Any] = {}
    # beam energy: NCEM 'microscope' group attrs, py4DSTEM calibration, common names
    ev = _find_attr(f, ("beam_energy_keV", "beam_energy", "energy_keV", "accelerating_voltage_kV",
                        "high_tension_kV", "voltage_kV"))
    energy = _positive(ev)
    if energy is None:
        v = _positive(_find_attr(f, ("voltage", "high_tension", "accelerating_voltage")))
        # stored in volts when large, else kV
        energy = None if v is None else (v / 1e3 if v > 1e3 else v)
    calib["beam_energy_keV"] = energy
    calib["convergence_semiangle_mrad"] = _positive(
        _find_attr(f, ("convergence_semiangle_mrad", "convergence_angle", "probe_semiangle",
                       "convergence_semiangle"))
    )
    if emd:
        dims = _emd_dims(dset.parent, dset.ndim)
        extra["emd_dims"] = dims
        if dset.ndim == 4:
            sx = dims[1]
            if sx["step"] is not None:
                calib["scan_step_nm"] = _positive(length_to_nm(abs(sx["step"]), sx["units"]))
            kx = dims[3]
            if kx["step"] is not None:
                calib["detector_pixel_size_inv_A"] = _positive(
                    _detector_inv_A(abs(kx["step"]), kx["units"], energy)
                )
    # py4DSTEM calibration metadata (R = real space, Q = diffraction space)
    if calib["scan_step_nm"] is None:
        r = _positive(_find_attr(f, ("R_pixel_size",)))
        if r is not None:
            calib["scan_step_nm"] = _positive(length_to_nm(r, _find_attr(f, ("R_pixel_units",))))
    if calib["detector_pixel_size_inv_A"] is None:
        q = _positive(_find_attr(f, ("Q_pixel_size",)))
        if q is not None:
            calib["detector_pixel_size_inv_A"] = _positive(
                _detector_inv_A(q, _find_attr(f, ("Q_pixel_units",)), energy)
            )
    return calib, extra


def _open_hdf5(p: Path, dataset: str | None, scan_shape: tuple[int, int] | None) -> Source:
    import dask.array as da
    import h5py

    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise IngestError(
            f"{p} is not a readable HDF5 file ({e}); it is truncated, corrupt or not HDF5. "
            "Re-copy the file or pass the right --format"
        ) from None
    try:
        found = _hdf5_datasets(f)
        if dataset is None:
            name = _choose_dataset(found, p)
        else:
            name = "/" + dataset.strip("/")
            obj = f.get(name)
            if not isinstance(obj, h5py.Dataset):
                four = ", ".join(f"{n} {s}" for n, s, _ in found if len(s) == 4) or "none"
                what = "is a group, not a dataset" if obj is not None else "does not exist"
                raise IngestError(
                    f"dataset {name!r} {what} in {p}. 4D datasets in the file: {four}. Pass one "
                    "of them with --dataset"
                )
        dset = f[name]
        if dset.dtype.kind not in "uif":
            raise IngestError(
                f"dataset {name} in {p} holds {dset.dtype}, not numbers. Choose another --dataset"
            )
        emd = name.rsplit("/", 1)[-1] == "data" and _is_emd_data_group(dset.parent)
        shape4 = _as_4d_shape(tuple(dset.shape), scan_shape, p, f"dataset {name}")
        calib, extra = _hdf5_calibration(f, dset, emd)
    except Exception:
        f.close()
        raise
    version = f.attrs.get("version_major")
    reader = "hdf5"
    if emd:
        reader = "py4dstem" if "python_class" in dset.parent.attrs or "datacube" in name else "emd"
    elif version is not None and _attr_str(version) == "1":
        reader = "emd"
    native = _native(dset.dtype)
    nx = shape4[1]
    lock = threading.Lock()  # h5py serialises anyway; the lock keeps the file handle simple

    def read(y0: int, y1: int) -> np.ndarray:
        with lock:
            if dset.ndim == 4:
                out = dset[y0:y1]
            else:
                out = dset[y0 * nx : y1 * nx].reshape((y1 - y0, *shape4[1:]))
        return out.astype(native, copy=False)

    if dset.ndim == 4:
        data = da.from_array(dset, chunks=(1, *shape4[1:]), lock=lock)
    else:
        data = da.from_array(dset, chunks=(nx, *shape4[2:]), lock=lock).reshape(shape4)
    meta = {"reader": reader, "format": "hdf5", "dataset": name, "calibration": calib, **extra}
    return Source(data, shape4, native, meta, p, read, f.close)


# --------------------------------------------------------------------------------------------
# rosettasciio formats


def _get(d: Any, dotted: str) -> Any:
    cur = d
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _mapped(sig: dict[str, Any], target: str) -> Any:
    """Value of a hyperspy metadata key, directly or through the reader's ``mapping``.

    rosettasciio leaves its original->metadata ``mapping`` to be applied by hyperspy; we do
    it for the few keys we need.
    """
    v = _get(sig.get("metadata", {}), target)
    if v is not None:
        return v
    for src_key, spec in (sig.get("mapping") or {}).items():
        dst, fn = (spec if isinstance(spec, tuple) else (spec, None))[:2]
        if dst != target:
            continue
        raw = _get(sig.get("original_metadata", {}), src_key)
        if raw is None:
            continue
        try:
            return fn(raw) if fn is not None else raw
        except Exception:  # noqa: BLE001 - metadata is best effort
            return None
    return None


def _rsciio_calibration(sig: dict[str, Any], axes: list[dict[str, Any]]) -> dict[str, Any]:
    calib = _empty_calibration()
    energy = _positive(_mapped(sig, "Acquisition_instrument.TEM.beam_energy"))
    calib["beam_energy_keV"] = energy
    calib["convergence_semiangle_mrad"] = _positive(
        _mapped(sig, "Acquisition_instrument.TEM.convergence_angle")
    )
    nav = [a for a in axes if a.get("navigate")]
    sig_axes = [a for a in axes if not a.get("navigate")]
    if nav:
        a = nav[-1]  # fast scan axis
        calib["scan_step_nm"] = _positive(length_to_nm(abs(a.get("scale", 0)), a.get("units")))
    if sig_axes:
        a = sig_axes[-1]
        calib["detector_pixel_size_inv_A"] = _positive(
            _detector_inv_A(abs(a.get("scale", 0)), a.get("units"), energy)
        )
    return calib


def import_rsciio(fmt: str) -> Any:
    """Import the rosettasciio plugin module of ``fmt``.

    rosettasciio 0.15's blockfile plugin imports scikit-image at module level, but only its
    *writer* uses it (intensity rescaling); reading a .blo needs numpy alone.  scikit-image is
    a large dependency we do not otherwise need, so when it is missing the import runs against
    a placeholder module that is removed again right after, instead of re-implementing the
    blockfile parser here.
    """
    plugin = _RSCIIO_PLUGIN[fmt]
    name = f"rsciio.{plugin}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != "skimage" or fmt != "blo":
            raise IngestError(
                f"the rosettasciio {plugin} reader cannot be imported ({e}). Install the "
                f"missing package ({e.name}) to read {fmt} files"
            ) from None
    stub = types.ModuleType("skimage")
    sys.modules["skimage"] = stub
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get("skimage") is stub:
            del sys.modules["skimage"]


def _check_mib_complete(sig: dict[str, Any], p: Path, n_frames: int) -> None:
    """A truncated .mib is read by rosettasciio as its complete scan lines only; refuse it."""
    om = sig.get("original_metadata") or {}
    prop = om.get("mib_properties") or {}
    try:
        frame = int(prop["head_size"]) + int(np.prod(prop["merlin_size"])) * np.dtype(
            prop["dtype"]
        ).itemsize
        size = int(prop["file_size"])
    except (KeyError, TypeError, ValueError):
        return
    announced = None
    try:
        announced = int((om.get("hdr_file") or {})["Frames in Acquisition (Number)"])
    except (KeyError, TypeError, ValueError):
        pass
    have = size // frame
    if size % frame or (announced and have < announced):
        expect = f"the .hdr announces {announced} frames, " if announced else ""
        raise IngestError(
            f"{p} is truncated: {expect}the file holds {size / frame:.2f} frames of {frame} "
            f"bytes (scan read as {n_frames}). Re-copy the file, or pass --scan-shape NY NX "
            "with the complete rows to ingest what is there"
        )


def _open_rsciio(p: Path, fmt: str, scan_shape: tuple[int, int] | None) -> Source:
    plugin = _RSCIIO_PLUGIN[fmt]
    mod = import_rsciio(fmt)
    kwargs: dict[str, Any] = {}
    hdr_missing = False
    if fmt == "mib":
        if scan_shape is not None:
            # rosettasciio takes the navigation shape in hyperspy (x, y) order
            kwargs["navigation_shape"] = (scan_shape[1], scan_shape[0])
        hdr_missing = not p.with_suffix(".hdr").exists()
    try:
        signals = mod.file_reader(str(p), lazy=True, **kwargs)
    except IngestError:
        raise
    except Exception as e:  # noqa: BLE001 - rosettasciio raises many types for bad files
        raise IngestError(
            f"rosettasciio could not read {p} as {fmt} ({type(e).__name__}: {e}). Check that "
            "the file is complete and of that format (pass --format to override detection)"
        ) from None
    cands = [s for s in signals if getattr(s.get("data"), "ndim", 0) >= 3]
    if not cands:
        shapes = [tuple(getattr(s.get("data"), "shape", ())) for s in signals]
        raise IngestError(
            f"{p} holds no 3D/4D data (found shapes {shapes}). Check that this is a 4D-STEM "
            "acquisition"
        )
    cands.sort(key=lambda s: -s["data"].ndim)
    if len(cands) > 1 and cands[0]["data"].ndim == cands[1]["data"].ndim:
        shapes = [tuple(s["data"].shape) for s in cands]
        raise IngestError(
            f"{p} holds several datasets {shapes}; choosing between them is not supported. "
            "Export the 4D dataset on its own"
        )
    sig = cands[0]
    data = sig["data"]
    axes = sorted(sig.get("axes", []), key=lambda a: a.get("index_in_array", 0))
    if len(axes) == data.ndim:
        nav = [i for i, a in enumerate(axes) if a.get("navigate")]
        sig_ax = [i for i, a in enumerate(axes) if not a.get("navigate")]
        order = nav + sig_ax
        if order != list(range(data.ndim)) and len(sig_ax) == 2:
            # some files store signal axes first; ingest wants (scan..., k_y, k_x)
            data = data.transpose(order)
            axes = [axes[i] for i in order]
    if data.ndim > 4:
        raise IngestError(
            f"{p} holds {data.ndim}D data {tuple(data.shape)}; only 4D-STEM (2 scan + 2 "
            "detector axes) is supported. Export a single 4D dataset"
        )
    shape = tuple(int(s) for s in data.shape)
    if (
        fmt == "mib"
        and scan_shape is None
        and hdr_missing
        and data.ndim == 4
        and 1 in shape[:2]
        and shape[0] * shape[1] > 1
    ):
        # without the .hdr, rosettasciio guesses the scan from frame timestamps; a 1-wide
        # result means the guess failed (a true line scan needs --scan-shape too)
        raise IngestError(
            f"{p} has no .hdr file and the scan shape could not be inferred (got {shape[:2]}). "
            "Pass --scan-shape NY NX, or put the .hdr file next to the .mib"
        )
    shape4 = _as_4d_shape(shape, scan_shape, p, "the data")
    if fmt == "mib" and scan_shape is None:
        _check_mib_complete(sig, p, shape4[0] * shape4[1])
    if data.ndim == 3:
        import dask.array as da

        if isinstance(data, da.Array):
            data = data.rechunk({0: shape4[1] * max(1, data.chunks[0][0] // shape4[1])})
        data = data.reshape(shape4)
    calib = _rsciio_calibration(sig, axes)
    native = _native(np.dtype(data.dtype))
    meta = {"reader": f"rsciio.{plugin}", "format": fmt, "calibration": calib,
            "axes": [{k: a.get(k) for k in ("name", "units", "scale", "navigate")} for a in axes]}
    return Source(data, shape4, native, meta, p, None, None)
