"""Prefect flows: ``ingest``, ``preprocess``, ``train``, ``map_strain``, ``analyze`` and
``pipeline``.

Each flow validates its parameters (:mod:`flows.params`) before anything runs, and calls the
stage tasks of :mod:`flows.tasks`, which wrap the library functions.  All flows work on one
Zarr store per dataset and can be rerun at will: a stage whose group is complete with the
same input, config and upstream stage is skipped, so a rerun after a failure continues at the
first unfinished stage.

``run_pipeline_embedded`` runs ``pipeline`` in this process without a Prefect server of its
own (Prefect's ephemeral mode) unless ``PREFECT_API_URL`` points at one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from ccstae_hpc.core.config import AnalyzeConfig

from .dask_cluster import DaskCluster
from .params import ClusterName, InputPath, OptionalPath, PipelineConfig, StorePath
from .tasks import analyze_task, ingest_task, map_task, preprocess_task, report_task, train_task

__all__ = ["FLOWS", "analyze", "ingest", "map_strain", "pipeline", "preprocess",
           "run_pipeline_embedded", "train"]


def _analyze_config(cfg: PipelineConfig) -> AnalyzeConfig:
    return cfg.analyze


def _cluster(name: str, cfg: PipelineConfig) -> DaskCluster:
    dc = DaskCluster(name, cfg.cluster, cfg.workers)
    dc.check()  # an unknown section fails the run before any stage
    return dc


def _check_paths(input_path: str, store_path: str) -> None:
    if Path(input_path).expanduser().resolve() == Path(store_path).expanduser().resolve():
        raise ValueError(f"store_path {store_path} is the input file; choose another store")


@flow(name="ingest", description="Stream a 4D-STEM file into STORE/raw (resumable).",
      validate_parameters=True)
def ingest(input_path: InputPath, store_path: StorePath, config: PipelineConfig | None = None,
           overwrite: bool = False) -> str:
    """Ingest ``input_path`` into ``store_path`` (skipped when the store holds this input).

    ``overwrite`` allows replacing a store that holds another input (a complete ingest of the
    same input is kept).  Returns the store path.
    """
    cfg = config or PipelineConfig()
    _check_paths(input_path, store_path)
    ingest_task(input_path, store_path, cfg.ingest, overwrite)
    return str(Path(store_path).resolve())


@flow(name="preprocess", description="STORE/raw -> STORE/prep on a Dask cluster.",
      validate_parameters=True)
def preprocess(store_path: StorePath, cluster: ClusterName = "local",
               config: PipelineConfig | None = None) -> str:
    """Preprocess an ingested store with ``config.prep`` on the named Dask cluster."""
    cfg = config or PipelineConfig()
    with _cluster(cluster, cfg) as dc:
        preprocess_task(store_path, cfg.prep, dc)
    return str(Path(store_path).resolve())


@flow(name="train", description="Train CC-ST-AE on STORE/prep/train -> STORE/model.",
      validate_parameters=True)
def train(store_path: StorePath, config: PipelineConfig | None = None) -> str:
    """Train with ``config.model`` / ``config.train`` on a preprocessed store."""
    cfg = config or PipelineConfig()
    train_task(store_path, cfg.model, cfg.train)
    return str(Path(store_path).resolve())


@flow(name="map_strain",
      description="Blockwise inference and strain assembly -> STORE/affine, STORE/strain; "
                  "figures and artifacts.",
      validate_parameters=True)
def map_strain(store_path: StorePath, cluster: ClusterName = "local",
               config: PipelineConfig | None = None, truth_path: OptionalPath = None) -> str:
    """Map strain with ``config.map`` on the named Dask cluster, then report."""
    cfg = config or PipelineConfig()
    with _cluster(cluster, cfg) as dc:
        key = map_task(store_path, cfg.map, dc)
    report_task(store_path, truth_path, upstream=key)
    return str(Path(store_path).resolve())


@flow(name="analyze",
      description="Derived maps, dislocations and ripple: STORE/strain -> STORE/analysis.",
      validate_parameters=True)
def analyze(store_path: StorePath, config: PipelineConfig | None = None) -> str:
    """Analyze the strain maps of a mapped store (skipped when done on these maps)."""
    cfg = config or PipelineConfig()
    analyze_task(store_path, _analyze_config(cfg))
    return str(Path(store_path).resolve())


@flow(name="pipeline",
      description="ingest -> preprocess -> train -> map_strain -> analyze on one store; "
                  "finished stages are skipped.",
      validate_parameters=True)
def pipeline(input_path: InputPath, store_path: StorePath, cluster: ClusterName = "local",
             config: PipelineConfig | None = None, overwrite: bool = False,
             truth_path: OptionalPath = None) -> str:
    """All five stages in order, then the figures and artifacts.

    Parameters
    ----------
    input_path : microscope file to ingest.
    store_path : Zarr store of the dataset (created, or continued when it exists).
    cluster : Dask cluster section or scheduler address for preprocess and map.
    config : per-stage overrides, e.g. ``{"train": {"epochs": 2}}`` (see PipelineConfig).
    overwrite : replace a store that holds another input.
    truth_path : simulator truth (``.truth.npz``) for an error table and a truth row.

    Returns
    -------
    The resolved store path.
    """
    cfg = config or PipelineConfig()
    _check_paths(input_path, store_path)
    log = get_run_logger()
    with _cluster(cluster, cfg) as dc:
        key = ingest_task(input_path, store_path, cfg.ingest, overwrite)
        key = preprocess_task(store_path, cfg.prep, dc, upstream=key)
        key = train_task(store_path, cfg.model, cfg.train, upstream=key)
        key = map_task(store_path, cfg.map, dc, upstream=key)
        if not dc.started:
            log.info("every chunked stage was up to date: no Dask cluster was started")
    analyze_task(store_path, _analyze_config(cfg), upstream=key)
    # the report shows the maps: it follows the map stage, whatever the analysis holds
    report_task(store_path, truth_path, upstream=key)
    return str(Path(store_path).resolve())


FLOWS = {"ingest": ingest, "preprocess": preprocess, "train": train, "map_strain": map_strain,
         "analyze": analyze, "pipeline": pipeline}

# a fresh Prefect database takes ~25 s to migrate on a small machine; Prefect's default wait
# for the ephemeral server is shorter than that
_EPHEMERAL_TIMEOUT_S = 120


def run_pipeline_embedded(
    input_path: str | os.PathLike[str],
    store_path: str | os.PathLike[str],
    *,
    cluster: str = "local",
    config: PipelineConfig | dict[str, Any] | None = None,
    overwrite: bool = False,
    truth_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Run the ``pipeline`` flow in this process, without a separate Prefect server.

    With no ``PREFECT_API_URL`` configured, Prefect starts a temporary local server for
    the run (ephemeral mode; its database is in ``PREFECT_HOME``); with one, the run is
    recorded there.  The chunked stages run on a ``LocalCluster`` by default.

    Returns
    -------
    The resolved store path.

    Raises
    ------
    prefect.exceptions.ParameterTypeError
        Invalid parameters (nothing was run).
    Exception
        The error of the stage that failed (after its retries).
    """
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as TIMEOUT
    from prefect.settings import temporary_settings

    updates = {}
    if (TIMEOUT.value() or 0) < _EPHEMERAL_TIMEOUT_S:
        updates[TIMEOUT] = _EPHEMERAL_TIMEOUT_S
    with temporary_settings(updates=updates):
        out = pipeline(
            input_path=str(input_path),
            store_path=str(store_path),
            cluster=cluster,
            config=config,
            overwrite=overwrite,
            truth_path=None if truth_path is None else str(truth_path),
        )
    return Path(out)
