"""The store contract: one Zarr v3 store per dataset, one group per stage, the same rules for all.

Layout (``/work/shared/DESIGN.md``); the data's way, each stage crossed once::

    STORE.zarr/
      raw/      ingest: the detector data (scan_y, scan_x, k_y, k_x) and calibration
      prep/     preprocess: re-centred patterns, scale, origins, vacuum, training shards
      model/    train: weights, dictionary, loss curve (checkpoints while training)
      affine/   map: per-pattern affine, dictionary entry, phase, residual, composition
      strain/   map: xarray Dataset exx, eyy, exy, theta, phase, sample, ... on (scan_y, scan_x)
      analysis/ analyze: derived maps, dislocation table, ripple (from strain)

Rules every stage keeps (:func:`check_stage`, :func:`staging`, :func:`commit`):

* **Marker**: a group is complete when its attrs say ``complete: true``; readers refuse
  anything else.
* **Never in place**: a stage writes its group under a staging name (``prep.partial``) and
  renames it into place only once it is complete, so an interrupted or failed stage leaves
  the previous result as it was.
* **Overwrite**: a complete group is replaced only when the caller asks (``--overwrite``);
  replacing it removes the groups after it, which were made from the old one.
* **Resume**: an interrupted stage's staging group is where it resumes (training's
  checkpoints) or is discarded and started over (the others); ingest resumes ``raw`` row by
  row (:mod:`ccstae_hpc.stages.ingest`).
* **Consolidation**: the root's consolidated metadata is refreshed after every commit (when a
  stage wrote one); readers of groups being written bypass it.

Whole stores (``ccstae run``) are built beside the output and renamed into place
(:func:`publish`); a path that exists but is not a Zarr store is never replaced.  Such a
hidden sibling's name holds the host and pid of the process building it, so that one left
behind by a killed run is removed by the next (:func:`remove_stale_siblings`) while a
concurrent run's is left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from ccstae_hpc.stages.lock import store_lock

__all__ = [
    "stage_timings",
    "CODEC",
    "GROUP",
    "STAGE_GROUPS",
    "StageExistsError",
    "check_stage",
    "commit",
    "discard_staging",
    "group_state",
    "is_store",
    "open_root",
    "open_strain",
    "publish",
    "reconsolidate",
    "remove_stale_siblings",
    "sibling",
    "stale_siblings",
    "staging",
    "swap_into_place",
    "with_pixel_coords",
    "write_group",
]

GROUP = "strain"
# the groups of a store in the order the stages write them
STAGE_GROUPS = ("raw", "prep", "model", "affine", "strain", "analysis")
# suffix of a group being written (zarr node names may hold dots)
STAGING_SUFFIX = ".partial"
# compressor of the stages' large arrays (prep patterns and shards, affine): zstd level 1 is
# as fast as writing uncompressed through zarr here, and 4x smaller than lz4 on sparse
# low-dose patterns
CODEC = zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")
# chunk edge of the stored maps: small enough for partial reads of large scans, large enough
# that a 256x256 map is one chunk per variable
_CHUNK = 512


class StageExistsError(FileExistsError):
    """The stage's group is complete and the caller did not ask to replace it."""


def is_store(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding a Zarr v3 root (``zarr.json``)."""
    p = Path(path)
    return p.is_dir() and (p / "zarr.json").is_file()


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


def write_group(ds: xr.Dataset, path: str | os.PathLike[str], group: str = GROUP) -> None:
    """Write ``ds`` as a new group of the store at ``path`` (consolidated metadata)."""
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not (yet) part of the v3 spec; using it is
        # this project's deliberate convention (module docstring), so the warning is noise
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(
            path,
            group=group,
            mode="w-",
            zarr_format=3,
            consolidated=True,
            encoding=_encoding(ds),
        )


# tags of the hidden siblings: a whole store being built (run), an ingest replacing a store,
# the store being replaced (swap_into_place)
_SIBLING_TAGS = ("tmp", "new", "old")


def _host() -> str:
    # only [A-Za-z0-9_]: the name splits on "-" unambiguously (hostnames may hold "-" and ".")
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "unknown"


def sibling(p: Path, tag: str) -> Path:
    """A hidden, unique path beside ``p`` (same file system: renames there are atomic).

    Named ``.NAME.TAG-HOST-PID-UNIQUE``: the host and pid of its creator tell
    :func:`remove_stale_siblings` whether it was left behind by a process that died.
    """
    # same parent directory, hence the same file system: os.replace/rename is atomic there
    return p.with_name(f".{p.name}.{tag}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    """True unless no process ``pid`` exists on this host (signal 0 only checks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True  # cannot tell: keep whatever it holds
    return True


def stale_siblings(dest: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """``(tag, path)`` of the hidden siblings of ``dest`` (:func:`sibling`, and files named
    after them) whose creating process on this host is dead."""
    dest = Path(dest)
    pat = re.compile(rf"^\.{re.escape(dest.name)}\.(?P<tag>{'|'.join(_SIBLING_TAGS)})-"
                     r"(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}(?:[._].*)?$")
    try:
        names = sorted(os.listdir(dest.parent))
    except OSError:
        return []
    host, stale = _host(), []
    for name in names:
        m = pat.match(name)
        if m and m["host"] == host and not _pid_alive(int(m["pid"])):
            stale.append((m["tag"], dest.parent / name))
    return stale


def remove_stale_siblings(dest: str | os.PathLike[str],
                          log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the hidden siblings of ``dest`` (:func:`sibling`, and files named after them
    such as a flow's figures) left behind by dead processes of this host; return them.

    A sibling of a live process (a concurrent run) or of another host (its pid means
    nothing here) is kept.  When ``dest`` is missing and a dead process's ``old`` sibling
    exists, a swap was interrupted between its two renames: that sibling holds the previous
    store, so nothing is removed (``log`` says how to recover it).
    """
    dest = Path(dest)
    stale = stale_siblings(dest)
    if not os.path.lexists(dest) and any(tag == "old" for tag, _ in stale):
        if log is not None:
            old = [str(p) for tag, p in stale if tag == "old"]
            log(f"{dest} is missing and {', '.join(old)} holds the store it replaced (an "
                "interrupted swap): rename it back to keep it; stale siblings left as they are")
        return []
    removed = []
    for _, path in stale:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # another process cleaned it up first
        except OSError as e:
            if log is not None:
                log(f"could not remove the stale {path} ({e}); remove it by hand")
            continue
        removed.append(path)
        if log is not None:
            log(f"removed {path}, left behind by a run that was killed")
    return removed


def swap_into_place(tmp: Path, dest: Path) -> None:
    """Replace the existing ``dest`` by the complete directory ``tmp``.

    Two renames: a crash between them leaves the old store intact at a hidden sibling and
    the new one complete at ``tmp``; neither is ever partially written.
    """
    old = sibling(dest, "old")
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
    # a flow stage runs with the root's consolidated block set aside (flows.state): then
    # the group's own metadata is read
    return xr.open_zarr(p, group=GROUP, consolidated=_root_consolidated(p))


def _root_consolidated(p: Path) -> bool:
    """True when the root's metadata holds a consolidated block."""
    try:
        meta = json.loads((p / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("consolidated_metadata") is not None


# --------------------------------------------------------------------------- stage contract


def stage_timings(store: str | os.PathLike[str]) -> dict[str, float]:
    """Seconds each stage of a store took, from its groups' ``elapsed_s`` attrs.

    Keys in pipeline order (``prep``, ``model``, ``affine``); a stage that did not record
    its time (or has not run) is left out.
    """
    root = open_root(store)
    out: dict[str, float] = {}
    for name in STAGE_GROUPS:
        if name in root:
            dt = root[name].attrs.get("elapsed_s")
            if isinstance(dt, (int, float)):
                out[name] = float(dt)
    return out


def open_root(store: str | os.PathLike[str], mode: str = "r") -> zarr.Group:
    """The store's root group, read past the consolidated metadata."""
    # never the consolidated block: it is stale while a stage rewrites its group
    return zarr.open_group(str(store), mode=mode, zarr_format=3, use_consolidated=False)


def group_state(store: str | os.PathLike[str], group: str) -> str:
    """``"absent"``, ``"incomplete"`` or ``"complete"`` (the group's ``complete`` marker)."""
    root = open_root(store)
    if group not in root:
        return "absent"
    return "complete" if root[group].attrs.get("complete") else "incomplete"


def staging(group: str) -> str:
    """Name under which a stage writes ``group`` until :func:`commit`."""
    return group + STAGING_SUFFIX


def check_stage(store: str | os.PathLike[str], group: str, overwrite: bool) -> None:
    """Refuse to replace a complete ``group`` unless ``overwrite``; call before any work.

    Raises
    ------
    StageExistsError
        ``group`` is complete and ``overwrite`` is False.
    """
    if not overwrite and group_state(store, group) == "complete":
        after = STAGE_GROUPS[STAGE_GROUPS.index(group) + 1:] if group in STAGE_GROUPS else ()
        also = (f" (and removes {', '.join(after)}, made from it)" if after else "")
        raise StageExistsError(
            f"{store}/{group} is complete; pass --overwrite to replace it{also}, or leave it")


def commit(store: str | os.PathLike[str], *groups: str) -> None:
    """Move the complete staging groups of ``groups`` into place, in one step each.

    An existing group is swapped out (:func:`swap_into_place`), the groups after the first
    one (made from what it replaces) are removed, and the root's consolidated metadata is
    refreshed.  Hidden siblings of the store left by killed runs are removed
    (:func:`remove_stale_siblings`).  The store's lock is held meanwhile
    (:func:`ccstae_hpc.stages.lock.store_lock`): a concurrent run's commit is refused.
    """
    path = Path(store)
    with store_lock(path, log=None):
        _commit_locked(path, groups)


def _commit_locked(path: Path, groups: tuple[str, ...]) -> None:
    remove_stale_siblings(path)
    for group in groups:
        staged = path / staging(group)
        if not open_root(path)[staging(group)].attrs.get("complete"):
            raise RuntimeError(f"{staged} is not complete; it cannot replace {group}")
        dest = path / group
        if dest.exists():
            swap_into_place(staged, dest)
        else:
            os.rename(staged, dest)
    if groups and groups[0] in STAGE_GROUPS:
        for later in STAGE_GROUPS[STAGE_GROUPS.index(groups[0]) + 1:]:
            if later not in groups and (path / later).exists():
                shutil.rmtree(path / later)
    reconsolidate(path)


def discard_staging(store: str | os.PathLike[str], group: str) -> None:
    """Remove an interrupted stage's staging group (nothing else is touched)."""
    shutil.rmtree(Path(store) / staging(group), ignore_errors=True)


def reconsolidate(path: str | os.PathLike[str]) -> None:
    """Refresh the root's consolidated metadata if a stage wrote one."""
    try:
        has = zarr.open_group(str(path), mode="r", zarr_format=3).metadata.consolidated_metadata
    except (KeyError, ValueError, FileNotFoundError):
        return
    if has is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata",
                                    category=UserWarning)
            zarr.consolidate_metadata(str(path), zarr_format=3)
