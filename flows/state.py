"""Stage identities and completion markers kept in the store itself.

A stage is *done* when its group is complete (the library's own ``complete`` attribute) and
carries a marker (attribute ``ccstae_flow``) whose key equals the key this run expects:

* ingest: hash of the input's identity (resolved path, size, mtime) and the ingest options;
* prep / train / map: hash of the upstream group's identity and the stage's config.

A group's *identity* is its marker key when it has one, else a hash of all its attributes
(a stage run outside the flows, e.g. ``ccstae preprocess``: its attributes hold its config
and timings, so any redo changes the identity).  Keys therefore chain: a new input or config
invalidates that stage and everything after it, and nothing else.

The markers live in the groups they describe, so deleting or rewriting a group (e.g.
``preprocess_store(overwrite=True)`` recreates ``prep``) removes its marker with it, which a
cache outside the store (Prefect's result storage) could not notice.

Every read here bypasses the consolidated metadata block at the store root, and the stages
run inside :func:`unconsolidated`: zarr serves a child's metadata from that block when it
exists, and it goes stale as soon as a group is rewritten after ``map_store`` consolidated
it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zarr

__all__ = [
    "MARK",
    "STAGE_GROUP",
    "digest",
    "expected_key",
    "file_identity",
    "group_attrs",
    "identity",
    "is_done",
    "unconsolidated",
    "write_marker",
]

MARK = "ccstae_flow"
# stage -> the group holding its completion marker ("" = the root, written by ingest).  The
# map stage marks `affine` (plain zarr, complete once the strain group is written after it)
# rather than `strain`, whose metadata xarray consolidates.
STAGE_GROUP = {"ingest": "", "prep": "prep", "train": "model", "map": "affine"}
UPSTREAM = {"prep": "ingest", "train": "prep", "map": "train"}


def digest(*parts: Any) -> str:
    """Stable hex digest of JSON-able parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Resolved path, size and modification time of an input file.

    Raises
    ------
    FileNotFoundError
        No such file.
    """
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return {"path": str(p), "size_bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _open(store: str | os.PathLike[str], mode: str = "r") -> zarr.Group | None:
    p = Path(store)
    if not (p / "zarr.json").is_file():
        return None
    try:
        return zarr.open_group(str(p), mode=mode, zarr_format=3, use_consolidated=False)
    except (FileNotFoundError, ValueError, KeyError):
        return None


def group_attrs(store: str | os.PathLike[str], stage: str) -> dict[str, Any] | None:
    """Attributes of a stage's group read from its own metadata, None if it does not exist."""
    root = _open(store)
    if root is None:
        return None
    name = STAGE_GROUP[stage]
    if not name:
        return dict(root.attrs)
    if not (Path(store) / name / "zarr.json").is_file():
        return None
    return dict(zarr.open_group(str(Path(store) / name), mode="r", zarr_format=3,
                                use_consolidated=False).attrs)


def identity(store: str | os.PathLike[str], stage: str) -> str | None:
    """Identity of the group a finished stage wrote; None if it is missing or incomplete."""
    attrs = group_attrs(store, stage)
    if attrs is None or not attrs.get("complete"):
        return None
    mark = attrs.get(MARK)
    if isinstance(mark, dict) and isinstance(mark.get("key"), str):
        return mark["key"]
    return digest("foreign", stage, attrs)


def expected_key(stage: str, upstream: str | None, config: Any) -> str:
    """Key a stage's marker must hold for the stage to count as done."""
    return digest(stage, upstream, config)


def is_done(store: str | os.PathLike[str], stage: str, key: str) -> bool:
    """True when the stage's group is complete and marked with ``key`` (map: and ``strain``
    exists)."""
    attrs = group_attrs(store, stage)
    if attrs is None or not attrs.get("complete"):
        return False
    mark = attrs.get(MARK)
    if not (isinstance(mark, dict) and mark.get("key") == key):
        return False
    return stage != "map" or (Path(store) / "strain" / "zarr.json").is_file()


def write_marker(store: str | os.PathLike[str], stage: str, key: str,
                 extra: dict[str, Any] | None = None) -> None:
    """Record that ``stage`` finished with ``key`` (call only after the library returned).

    A root with consolidated metadata gets it rewritten: zarr drops the block when it
    rewrites the root's ``zarr.json``, and child attributes change under it.
    """
    had = _has_consolidated(store)
    name = STAGE_GROUP[stage]
    path = str(Path(store) / name) if name else str(store)
    g = zarr.open_group(path, mode="r+", zarr_format=3, use_consolidated=False)
    g.attrs[MARK] = {"key": key, "stage": stage,
                     "finished": dt.datetime.now(dt.timezone.utc).isoformat(), **(extra or {})}
    if had:
        _consolidate(store)


def _has_consolidated(store: str | os.PathLike[str]) -> bool:
    try:
        meta = json.loads((Path(store) / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("consolidated_metadata") is not None


def _consolidate(store: str | os.PathLike[str]) -> None:
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not in the v3 spec; the store convention
        # (ccstae_hpc.stages.store) uses it deliberately
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(Path(store)))


@contextmanager
def unconsolidated(store: str | os.PathLike[str]) -> Iterator[None]:
    """Run a stage with the root's consolidated metadata block removed, then rewrite it.

    Library code opens groups with zarr's default (use the block when present); a stage that
    deletes and recreates a group under a block reads a stale or missing node.  Without a
    block every read goes to the nodes' own metadata.  The block is rewritten afterwards
    (also after a failure: the store's readers expect one) if there was one or the stage
    wrote one.
    """
    had = _has_consolidated(store)
    if had:
        # rewriting the root's metadata through a non-consolidated handle drops the block
        zarr.open_group(str(store), mode="r+", zarr_format=3,
                        use_consolidated=False).update_attributes({})
    ok = False
    try:
        yield
        ok = True
    finally:
        if had or _has_consolidated(store):
            try:
                _consolidate(store)
            except Exception:
                if ok:  # after a failure, the stage's own error is the one to report
                    raise
