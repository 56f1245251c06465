"""Prefect tasks: one per stage, each a call of the library function, skipped when done.

Every task computes the key its stage must have (:mod:`flows.state`), returns at once when
the store already holds a complete group with that key, and otherwise calls the library
function and marks the group.  The library functions are looked up on their modules at call
time (``train_stage.train_store``, not a reference bound at import), so tests can count calls.

Retries: ``retries=2`` with short delays, but only for failures that may be transient (lost
workers, I/O hiccups).  Bad input, bad options and stores that must not be replaced raise
``ValueError`` subclasses (``IngestError``, ``PrepError``) or ``FileNotFoundError`` /
``FileExistsError``; retrying those would only repeat the same message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

import ccstae_hpc.stages.ingest as cio
from ccstae_hpc.core.config import AnalyzeConfig, MapConfig, ModelConfig, TrainConfig
from ccstae_hpc.stages import analyze as analyze_stage
from ccstae_hpc.stages import map as map_stage
from ccstae_hpc.stages import prep as cprep
from ccstae_hpc.stages.prep import PrepConfig

from . import report, state
from .dask_cluster import DaskCluster
from .params import IngestOptions

__all__ = ["RETRIES", "RETRY_DELAYS", "analyze_task", "ingest_task", "map_task",
           "preprocess_task", "report_task", "train_task"]

RETRIES = 2
RETRY_DELAYS = [2, 10]  # seconds before the first and the second retry
_PERMANENT = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError,
              NotADirectoryError, IsADirectoryError, PermissionError)


def _transient(task: Any, task_run: Any, st: Any) -> bool:
    """Retry condition: everything but errors that a retry would only repeat."""
    try:
        st.result()
    except _PERMANENT:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return True


# Prefect's own result cache is off: whether a stage is done is decided by the store (its
# markers), which a cache kept outside the store cannot know (a store deleted or rewritten
# by hand would still look done)
_TASK_OPTIONS: dict[str, Any] = {
    "retries": RETRIES,
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_condition_fn": _transient,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


def _same_source(attrs: dict[str, Any], ident: dict[str, Any]) -> bool:
    src = attrs.get("source") or {}
    return all(src.get(k) == ident[k] for k in ("path", "size_bytes", "mtime_ns"))


@task(name="ingest", **_TASK_OPTIONS)
def ingest_task(input_path: str, store_path: str, options: IngestOptions,
                overwrite: bool = False) -> str:
    """Stream the input into ``STORE/raw`` unless the store already holds this input.

    An unfinished ingest (interrupted run) resumes; a complete ingest of another input is
    replaced only with ``overwrite`` (the library refuses otherwise).  Returns the stage key.
    """
    log = get_run_logger()
    cfg = state.ingest_config(input_path, options.identity())
    ident = cfg["input"]
    key = state.stage_key(store_path, "ingest", cfg)
    if state.is_done(store_path, "ingest", key):
        log.info("ingest: %s already holds %s; skipped", store_path, ident["path"])
        return key
    attrs = state.group_attrs(store_path, "ingest")
    if (attrs and attrs.get("complete") and state.MARK not in attrs and not overwrite
            and _same_source(attrs, ident)):
        # ingested outside the flows (ccstae ingest / ccstae run): same file, keep it
        log.info("ingest: %s holds a complete ingest of %s made outside the flows; adopted",
                 store_path, ident["path"])
        state.write_marker(store_path, "ingest", key, {"input": ident, "adopted": True})
        return key
    t0 = time.perf_counter()
    cio.ingest(input_path, store_path, overwrite=overwrite, **options.kwargs())
    state.write_marker(store_path, "ingest", key, {"input": ident})
    log.info("ingest: %s -> %s/raw in %.1f s", ident["path"], store_path,
             time.perf_counter() - t0)
    return key


def _run_stage(log: Any, store_path: str, stage: str, config: dict[str, Any], name: str,
               group: str, run: Callable[[], str]) -> str:
    """The skip-or-run shape of the chunked and training stages.

    Skipped when ``stage``'s marker matches ``config`` and the stage before it; else
    ``run()`` (whose return is appended to the log line) and then the marker, both with the
    consolidated metadata set aside.
    """
    key = state.stage_key(store_path, stage, config)
    if state.is_done(store_path, stage, key):
        log.info("%s: %s/%s is up to date; skipped", name, store_path, group)
        return key
    t0 = time.perf_counter()
    detail = state.run_marked(store_path, stage, key, run)
    log.info("%s: %s/%s written in %.1f s%s", name, store_path, group,
             time.perf_counter() - t0, detail)
    return key


@task(name="preprocess", **_TASK_OPTIONS)
def preprocess_task(store_path: str, config: PrepConfig, cluster: DaskCluster,
                    upstream: str | None = None) -> str:
    """``raw`` -> ``prep`` on the Dask cluster unless done with this config and raw."""
    log = get_run_logger()

    def run() -> str:
        # overwrite: the key differs, so an existing prep group is stale (other config/raw)
        cprep.preprocess_store(store_path, config, client=cluster.client(), overwrite=True,
                               log=lambda s: log.info("preprocess %s", s))
        return ""

    return _run_stage(log, store_path, "prep", config.to_dict(), "preprocess",
                      "prep", run)


def _train_logger(log: Any) -> Callable[[dict], None]:
    def cb(rec: dict) -> None:
        if rec.get("step", 0) % 20 == 0:
            log.info("train: epoch %d/%d step %d/%d loss %.4g (%.0f patterns/s)",
                     rec.get("epoch", 0) + 1, rec.get("epochs", 0), rec.get("step", 0),
                     rec.get("steps", 0), rec["loss"], rec.get("patterns_per_s", float("nan")))
    return cb


@task(name="train", **_TASK_OPTIONS)
def train_task(store_path: str, model_config: ModelConfig, train_config: TrainConfig,
               upstream: str | None = None) -> str:
    """``prep/train`` -> ``model`` unless trained with these configs on this prep group."""
    log = get_run_logger()

    def run() -> str:
        history = state.train_resuming(store_path, model_config, train_config,
                                       _train_logger(log), log.warning)
        final = f"{history[-1]['loss']:.4g}" if history else "n/a"
        return f" ({len(history)} steps, final loss {final})"

    return _run_stage(log, store_path, "train",
                      state.train_config(model_config, train_config),
                      "train", "model", run)


@task(name="map", **_TASK_OPTIONS)
def map_task(store_path: str, config: MapConfig, cluster: DaskCluster,
             upstream: str | None = None) -> str:
    """``model`` + ``prep`` -> ``affine`` and ``strain`` unless done with this model/config."""
    log = get_run_logger()

    def run() -> str:
        # overwrite: the key differs, so existing maps are stale (other model or config)
        map_stage.map_store(store_path, config, client=cluster.client(), overwrite=True)
        return ""

    return _run_stage(log, store_path, "map", config.to_dict(), "map", "strain", run)


@task(name="analyze", **_TASK_OPTIONS)
def analyze_task(store_path: str, config: AnalyzeConfig | None = None,
                 upstream: str | None = None) -> str:
    """``strain`` -> ``analysis`` (derived maps, dislocations, ripple) unless done with this
    config on these maps."""
    log = get_run_logger()
    config = config or AnalyzeConfig()
    # the marker is in the analysis group, like the other stages' (flows.state), keyed on
    # the map stage's identity and the AnalyzeConfig
    key = state.stage_key(store_path, "analyze", config.to_dict())
    if state.is_done(store_path, "analyze", key):
        log.info("analyze: %s/%s is up to date; skipped", store_path, analyze_stage.ANALYSIS)
        return key
    t0 = time.perf_counter()
    # overwrite: the key differs, so an existing analysis is stale (other maps or config)
    ds = state.run_marked(store_path, "analyze", key,
                          lambda: analyze_stage.analyze_store(store_path, config, overwrite=True))
    log.info("analyze: %s/%s written in %.1f s (%d dislocations, ripple %s)", store_path,
             analyze_stage.ANALYSIS, time.perf_counter() - t0, ds.sizes.get("dislocation", 0),
             "found" if bool(ds["ripple_wavelength_px"].notnull()) else "none")
    return key


@task(name="report", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE,
      persist_result=False)
def report_task(store_path: str, truth_path: str | None = None,
                upstream: str | None = None) -> dict[str, Any]:
    """Figures next to the store and the run's artifacts (see :mod:`flows.report`)."""
    log = get_run_logger()
    r = report.write_report(store_path, truth_path)
    log.info("report: strain figure %s, loss figure %s", r["strain_figure"], r["loss_figure"])
    for row in r["phases"]:
        log.info("report: %s", row)
    if "errors" in r:
        e = r["errors"]
        log.info("report: vs truth: sample accuracy %.3f, phase accuracy %.3f, MAE exx %.2e "
                 "eyy %.2e exy %.2e theta %.3f deg", e["acc_sample"], e["acc_phase"],
                 e["mae_exx"], e["mae_eyy"], e["mae_exy"], e["mae_theta"])
    log.info("report: results in %s (xarray.open_zarr(%r, group='strain'))",
             Path(store_path).resolve(), str(Path(store_path).resolve()))
    return r
