"""Stage keys and completion markers kept in the store itself, shared by both engines.

A stage is *done* when its group is complete (the library's own ``complete`` attribute) and
carries a marker (attribute ``ccstae_flow``) whose key equals the key this run expects:

* ingest: hash of the input's identity (resolved path, size, mtime) and the ingest options;
* prep / train / map / analyze: hash of the upstream group's identity and the stage's config.

A group's *identity* is its marker key when it has one, else a hash of all its attributes
(a stage run outside both engines, e.g. ``ccstae preprocess``: its attributes hold its config
and timings, so any redo changes the identity).  Keys therefore chain: a new input or config
invalidates that stage and everything after it, and nothing else.

The markers live in the groups they describe, so deleting or rewriting a group (e.g.
``preprocess_store(overwrite=True)`` recreates ``prep``) removes its marker with it, which a
cache outside the store (Prefect's result storage) could not notice.

Both engines of ``ccstae run`` use these keys: the Prefect flows (``flows.tasks``, through
``flows.state``) and the direct engine (:func:`ccstae_hpc.stages.run.run_store`).  A run
killed before it published leaves its hidden build store behind; the next run of the same
input continues it (:func:`resumable_build`, :func:`continue_build`) and skips each stage
whose marker holds the key the current configs give.

Every read here bypasses the consolidated metadata block at the store root, and the stages
run inside :func:`unconsolidated`: zarr serves a child's metadata from that block when it
exists, and it goes stale as soon as a group is rewritten after ``map_store`` consolidated
it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import zarr

from ccstae_hpc.core.config import ModelConfig, TrainConfig
from ccstae_hpc.stages.ingest import IngestConfig
from ccstae_hpc.stages.store import remove_stale_siblings, sibling, stale_siblings

__all__ = [
    "MARK",
    "STAGE_GROUP",
    "UPSTREAM",
    "continue_build",
    "digest",
    "expected_key",
    "file_identity",
    "group_attrs",
    "identity",
    "ingest_config",
    "ingest_options",
    "is_done",
    "resumable_build",
    "run_marked",
    "stage_key",
    "train_config",
    "train_resuming",
    "unconsolidated",
    "write_marker",
]

T = TypeVar("T")

MARK = "ccstae_flow"
# stage -> the group holding its completion marker ("" = the root, written by ingest).  The
# map stage marks `affine` (plain zarr, complete once the strain group is written after it)
# rather than `strain`, whose metadata xarray consolidates.
STAGE_GROUP = {"ingest": "", "prep": "prep", "train": "model", "map": "affine",
               "analyze": "analysis"}
UPSTREAM = {"prep": "ingest", "train": "prep", "map": "train", "analyze": "map"}
# the last part of a build store's name (store.sibling): figures named after it
# (NAME.tmp-...png, _figures) are not build stores
_BUILD_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


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


def ingest_options(config: IngestConfig | None = None, *, format: str | None = None,
                   dataset: str | None = None, scan_shape: tuple[int, int] | None = None,
                   calibration: dict[str, float] | None = None) -> dict[str, Any]:
    """JSON-ready description of :func:`~ccstae_hpc.stages.ingest.ingest`'s options (part of
    the ingest key); the defaults describe a plain ``ingest(input, store)``.

    The same dict as ``flows.params.IngestOptions.identity()`` for the same options, so
    that either engine continues the other's build store.
    """
    return {"format": format, "dataset": dataset,
            "scan_shape": None if scan_shape is None else [int(n) for n in scan_shape],
            "calibration": None if calibration is None else dict(calibration),
            "config": (config or IngestConfig()).to_dict()}


def ingest_config(input_path: str | os.PathLike[str], options: dict[str, Any]) -> dict[str, Any]:
    """What the ingest key is made of: the input's :func:`file_identity` and ``options``
    (:func:`ingest_options`).

    Raises
    ------
    FileNotFoundError
        No such input file.
    """
    return {"input": file_identity(input_path), "options": options}


def train_config(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    """What the train key is made of besides the ``prep`` identity: both configs."""
    return {"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}


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


def stage_key(store: str | os.PathLike[str], stage: str, config: Any) -> str:
    """The key ``stage`` must hold in ``store`` with ``config``: chained to the identity of
    the stage before it (:data:`UPSTREAM`; ingest has none), so call it once that one ran."""
    up = UPSTREAM.get(stage)
    return expected_key(stage, None if up is None else identity(store, up), config)


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


def run_marked(store: str | os.PathLike[str], stage: str, key: str, run: Callable[[], T],
               extra: dict[str, Any] | None = None) -> T:
    """``run()`` (the stage's library call) and then its marker, both with the consolidated
    metadata set aside (:func:`unconsolidated`); returns what ``run`` returned.

    A failure in ``run`` writes no marker: the stage is redone by the next run.
    """
    with unconsolidated(store):
        result = run()
        write_marker(store, stage, key, extra)
    return result


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


def train_resuming(store: str | os.PathLike[str], model_cfg: ModelConfig,
                   train_cfg: TrainConfig, progress: bool | Callable[[dict], None],
                   log: Callable[[str], None]) -> list[dict]:
    """``train_store`` with these configs; an interrupted run of the same settings resumes
    from its checkpoint in ``model.partial``.

    A checkpoint that cannot be resumed (other settings or training data: the stage key
    changed) makes ``train_store`` raise ``TrainError``; training then starts over (``log``
    says why), which is what the new key asks for.  A diverged training
    (``NonFiniteTrainingError``) is not retried: a restart would only repeat it.
    """
    # looked up at call time, not bound at import: tests count calls by replacing it
    from ccstae_hpc.stages import train as train_stage

    try:
        return train_stage.train_store(store, model_cfg, train_cfg, progress, overwrite=True)
    except ValueError as e:
        restartable = "restart" in inspect.signature(train_stage.train_store).parameters
        if type(e) is not train_stage.TrainError or not restartable:
            raise
        log(f"train: {e}; starting over")
        return train_stage.train_store(store, model_cfg, train_cfg, progress, restart=True,
                                       overwrite=True)


def resumable_build(out: str | os.PathLike[str], input_path: str | os.PathLike[str],
                    options: dict[str, Any] | None = None) -> Path | None:
    """The hidden build store a killed ``ccstae run`` into ``out`` left behind, if a run can
    continue it: made by a dead process of this host, and holding a complete ingest of this
    very input with these ingest ``options`` (:func:`ingest_options`; the defaults when
    None).  Its finished stages are then skipped by their keys; anything else in it is
    redone.  The newest such store, or None."""
    try:
        cfg = ingest_config(input_path, ingest_options() if options is None else options)
    except OSError:
        return None
    key = expected_key("ingest", None, cfg)
    # the build store itself, not the files named after it (figures: NAME.tmp-...png, _figures)
    builds = [p for tag, p in stale_siblings(out)
              if tag == "tmp" and _BUILD_SUFFIX.search(p.name) and p.is_dir()
              and not p.is_symlink() and is_done(p, "ingest", key)]
    return max(builds, key=lambda p: p.stat().st_mtime_ns, default=None)


def continue_build(out: str | os.PathLike[str], input_path: str | os.PathLike[str],
                   options: dict[str, Any] | None = None,
                   log: Callable[[str], None] | None = None) -> Path:
    """Where this process builds the store for ``out``: a new hidden sibling
    (:func:`~ccstae_hpc.stages.store.sibling`), holding the killed run's build store when
    there is one to continue (:func:`resumable_build`, renamed to this process's name so
    that it is not taken for stale again).  Every other stale sibling of ``out`` is removed
    (:func:`~ccstae_hpc.stages.store.remove_stale_siblings`).  Call with ``out``'s lock held.
    """
    out = Path(out)
    tmp = sibling(out, "tmp")
    prev = resumable_build(out, input_path, options)
    if prev is not None:
        os.rename(prev, tmp)
        if log is not None:
            log(f"continuing the run that was killed ({prev.name}): its finished stages "
                "are kept")
    # anything else such runs left behind (other builds, figures) goes
    remove_stale_siblings(out, log)
    return tmp
