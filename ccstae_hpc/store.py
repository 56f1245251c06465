"""The result store: one Zarr v3 store per dataset, the strain maps in its ``strain`` group.

Layout (see ``/work/shared/DESIGN.md``; only ``strain/`` is written so far)::

    STORE.zarr/
      strain/   xarray Dataset: exx, eyy, exy, theta, phase, sample, residual, reference
                dims (scan_y, scan_x); coordinates in scan pixels (attrs units "px")

Convention: **consolidated metadata is written and read**, always.  ``write_strain`` writes
with ``consolidated=True`` and ``open_strain`` opens with ``consolidated=True``; so does
``xarray.open_zarr(STORE, group="strain")``, which finds the consolidated metadata and opens
without warnings.  One convention avoids the slow path (listing every array) on network file
systems and the silent staleness of a consolidated block that some writers update and others
do not.

Safety: a store is never modified in place.  ``write_strain`` writes a complete new store into a
temporary sibling directory and renames it into place at the end, so a new store appears
atomically or not at all; an existing store is replaced only after the new one was fully
written, and only when the caller asked for it (``overwrite=True``).  A path that exists but is
not a Zarr store, or a store holding other stages' data (e.g. ``raw`` from ``ccstae ingest``),
is never deleted.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

__all__ = [
    "GROUP",
    "StoreExistsError",
    "NotAStoreError",
    "check_output",
    "is_store",
    "open_strain",
    "with_pixel_coords",
    "write_strain",
]

GROUP = "strain"
# chunk edge of the stored maps: small enough for partial reads of large scans, large enough
# that a 256x256 map is one chunk per variable
_CHUNK = 512


class StoreExistsError(FileExistsError):
    """The output store exists and the caller did not ask to replace it."""


class NotAStoreError(FileExistsError):
    """The output path exists but is not a Zarr store; it is never replaced."""


def is_store(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding a Zarr v3 root (``zarr.json``)."""
    p = Path(path)
    return p.is_dir() and (p / "zarr.json").is_file()


def check_output(store_path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Raise if ``write_strain(..., store_path, overwrite)`` would refuse to write.

    Cheap, touches nothing: call it before any computation so that a doomed run fails fast.

    Raises
    ------
    StoreExistsError
        ``store_path`` is an existing store and ``overwrite`` is False, or it holds groups or
        arrays other than ``strain`` (e.g. an ingested ``raw``), which are never deleted.
    NotAStoreError
        ``store_path`` exists but is not a Zarr store (never replaced, whatever ``overwrite``).
    """
    p = Path(store_path)
    if not os.path.lexists(p):
        return
    if not is_store(p):
        raise NotAStoreError(
            f"output {p} exists and is not a Zarr store; choose another --out "
            "(it is never replaced, even with --overwrite)"
        )
    if not overwrite:
        raise StoreExistsError(
            f"output store {p} exists; pass --overwrite to replace it or choose another --out"
        )
    # replacing the store replaces all of it: refuse when other stages' data live there (an
    # ingested raw/ array can take hours to recreate)
    other = sorted(c.name for c in p.iterdir() if c.name != GROUP and (c / "zarr.json").is_file())
    if other:
        raise StoreExistsError(
            f"output store {p} holds other data ({', '.join(other)}) that --overwrite would "
            "delete; choose another --out"
        )


def with_pixel_coords(ds: xr.Dataset) -> xr.Dataset:
    """Add ``scan_y`` / ``scan_x`` pixel-index coordinates (units "px") where missing."""
    coords = {}
    for dim in ("scan_y", "scan_x"):
        if dim in ds.dims and dim not in ds.coords:
            coords[dim] = (dim, np.arange(ds.sizes[dim], dtype=np.int64), {"units": "px"})
    ds = ds.assign_coords(coords) if coords else ds
    for dim in ("scan_y", "scan_x"):
        if dim in ds.coords and "units" not in ds[dim].attrs:
            ds[dim].attrs["units"] = "px"
    return ds


def _encoding(ds: xr.Dataset) -> dict[str, dict[str, tuple[int, ...]]]:
    # in-memory variables get bounded chunks; dask-backed ones keep their own chunking
    enc: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, var in ds.variables.items():
        if var.chunks is None and var.ndim > 0 and "chunks" not in var.encoding:
            enc[str(name)] = {"chunks": tuple(min(n, _CHUNK) for n in var.shape)}
    return enc


def _write_group(ds: xr.Dataset, path: Path) -> None:
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not (yet) part of the v3 spec; using it is
        # this project's deliberate convention (module docstring), so the warning is noise
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(
            path,
            group=GROUP,
            mode="w-",
            zarr_format=3,
            consolidated=True,
            encoding=_encoding(ds),
        )


def _sibling(p: Path, tag: str) -> Path:
    # same parent directory, hence the same file system: os.replace/rename is atomic there
    return p.with_name(f".{p.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def swap_into_place(tmp: Path, dest: Path) -> None:
    """Replace the existing ``dest`` by the complete directory ``tmp``.

    Two renames: a crash between them leaves the old store intact at a hidden sibling and
    the new one complete at ``tmp``; neither is ever partially written.
    """
    old = _sibling(dest, "old")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def publish(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move the complete store ``tmp`` to ``dest``; an existing ``dest`` is replaced only with
    ``overwrite`` (else ``tmp`` is removed and ``FileExistsError`` raised)."""
    if os.path.lexists(dest):
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{dest} exists; pass --overwrite to replace it")
        swap_into_place(tmp, dest)
    else:
        os.rename(tmp, dest)


def write_strain(
    ds: xr.Dataset, store_path: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """Write the strain dataset as group ``strain`` of a new Zarr v3 store, atomically.

    Parameters
    ----------
    ds : a strain Dataset (dims ``scan_y, scan_x``), as assembled by the map stage.
    store_path : the store directory, conventionally ``NAME.zarr``; parents are created.
    overwrite : replace an existing store (only after the new one is complete).

    Returns
    -------
    The store path.

    Raises
    ------
    StoreExistsError, NotAStoreError
        See :func:`check_output`; nothing is written in either case.
    """
    dest = Path(store_path)
    check_output(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds = with_pixel_coords(ds)

    tmp = _sibling(dest, "tmp")
    try:
        _write_group(ds, tmp)
    except BaseException:
        # includes KeyboardInterrupt: never leave half-written siblings behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if not os.path.lexists(dest):
        try:
            # rename, not replace: fails (rather than merging) if a store appeared meanwhile
            os.rename(tmp, dest)
            return dest
        except OSError:
            if not os.path.lexists(dest):
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            # another writer created dest while we computed: fall through to the checks

    try:
        check_output(dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_into_place(tmp, dest)
    return dest


def open_strain(store_path: str | os.PathLike[str]) -> xr.Dataset:
    """Open the ``strain`` group of a store lazily (consolidated metadata, dask-backed).

    Raises
    ------
    FileNotFoundError
        No store or no ``strain`` group at ``store_path``.
    """
    p = Path(store_path)
    if not is_store(p):
        raise FileNotFoundError(f"no Zarr store at {p}; run `ccstae run INPUT --out {p}` first")
    if not (p / GROUP / "zarr.json").is_file():
        raise FileNotFoundError(f"store {p} has no '{GROUP}' group; the strain stage has not run")
    return xr.open_zarr(p, group=GROUP, consolidated=True)
