"""Validated flow parameters: typed paths and names, and per-stage config overrides.

Prefect validates every flow call (and every run created through the API) against these
types before the flow body runs, so a bad value fails the run at once with a message naming
the field.  The stage sections are the library's own frozen dataclasses: pydantic checks the
field types and the dataclass's ``__post_init__`` checks the values, so the rules live in one
place (``ccstae_hpc.core.config``, ``ccstae_hpc.stages.prep``, ``ccstae_hpc.stages.ingest``).

Paths are checked against the file system at the same moment, before any stage: the input
must exist, a store path must be a Zarr store, an empty directory or new (never a file or a
directory of other files, which the stages would write into), and a ``truth_path`` that does
not exist only skips the optional comparison, with a warning.  Registering deployments
(:func:`deferred_file_checks`, ``flows.serve``) checks the syntax only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ccstae_hpc.core.config import AnalyzeConfig, MapConfig, ModelConfig, TrainConfig
from ccstae_hpc.stages.ingest import IngestConfig
from ccstae_hpc.stages.prep import PrepConfig

__all__ = [
    "ClusterName",
    "InputPath",
    "IngestOptions",
    "OptionalPath",
    "PipelineConfig",
    "StorePath",
    "TruthPath",
    "deferred_file_checks",
]

log = logging.getLogger(__name__)

# True while deployments are registered (flows.serve): their files may appear only by the
# time a run starts, so the checks against the file system wait for the run
_DEFER_FILE_CHECKS: ContextVar[bool] = ContextVar("ccstae_defer_file_checks", default=False)


@contextlib.contextmanager
def deferred_file_checks() -> Iterator[None]:
    """Validate parameters without looking at the file system (syntax only), e.g. when a
    deployment's defaults are registered long before its first run."""
    token = _DEFER_FILE_CHECKS.set(True)
    try:
        yield
    finally:
        _DEFER_FILE_CHECKS.reset(token)


def _where(p: Path) -> str:
    return "" if p.is_absolute() else f" (relative to {Path.cwd()}, where the flow runs)"


def _existing_input(value: str) -> str:
    """The input file must exist before any stage starts."""
    p = Path(value).expanduser()
    if not _DEFER_FILE_CHECKS.get() and not p.exists():
        raise ValueError(f"input_path {value} does not exist{_where(p)}; give the path of "
                         "the 4D-STEM file to ingest")
    return value


def _writable_store(value: str) -> str:
    """A store path may name a Zarr store, an empty directory or nothing yet: never a file or
    a directory of other files, which the stages would write into (and an overwrite replace)."""
    p = Path(value).expanduser()
    if _DEFER_FILE_CHECKS.get() or not p.exists():
        return value
    if not p.is_dir():
        raise ValueError(f"store_path {value} is a file, not a Zarr store; choose a new path "
                         "such as data.zarr")
    if not (p / "zarr.json").is_file() and any(p.iterdir()):
        raise ValueError(f"store_path {value} is a directory that is not a Zarr store; the "
                         "flows never write into it: choose a new path such as data.zarr")
    return value


def _optional_truth(value: str | None) -> str | None:
    """An optional comparison that cannot run is skipped with a warning (None), not left to
    fail the run at its last stage after all the work."""
    if value is None or _DEFER_FILE_CHECKS.get():
        return value
    p = Path(value).expanduser()
    if p.is_file():
        return value
    msg = (f"truth_path {value} does not exist{_where(p)}: the comparison with the truth is "
           "skipped (give the .truth.npz of this input, or none)")
    try:
        from prefect import get_run_logger

        get_run_logger().warning(msg)
    except Exception:  # noqa: BLE001 - no run context (validation before the run): plain log
        log.warning(msg)
    return None


InputPath = Annotated[
    str,
    Field(min_length=1, max_length=4096, pattern=r"\S",
          description="4D-STEM file to ingest (.npy .h5 .emd .mib .xml .dm4 .blo); must exist"),
    AfterValidator(_existing_input),
]
StorePath = Annotated[
    str,
    Field(min_length=1, max_length=4096, pattern=r"\S",
          description="Zarr v3 store of the dataset (created by the ingest stage); never an "
                      "existing file or a directory that is not a store"),
    AfterValidator(_writable_store),
]
TruthPath = Annotated[
    str | None,
    Field(default=None, max_length=4096,
          description="simulator truth (.truth.npz) to compare the result with; a file that "
                      "does not exist skips the comparison with a warning"),
    AfterValidator(_optional_truth),
]
# the name the flows use for truth_path
OptionalPath = TruthPath
ClusterName = Annotated[
    str,
    Field(min_length=1, max_length=1024, pattern=r"^\S+$",
          description="section of cluster/clusters.yaml (local, slurm-cpu, SITE:SECTION, "
                      "FILE.yaml:SECTION) or the address of a running Dask scheduler"),
]


class IngestOptions(BaseModel):
    """Keyword arguments of :func:`ccstae_hpc.stages.ingest` besides the paths."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str | None = Field(default=None, description="force the input format")
    dataset: str | None = Field(default=None, description="HDF5 dataset path")
    scan_shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = Field(
        default=None, description="(scan_y, scan_x) for flat stacks of patterns")
    calibration: dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        default=None, description="calibration values the file lacks")
    config: IngestConfig = Field(default_factory=IngestConfig)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``ingest``."""
        return {"format": self.format, "dataset": self.dataset, "scan_shape": self.scan_shape,
                "calibration": self.calibration, "config": self.config}

    def identity(self) -> dict[str, Any]:
        """JSON-ready description (part of the ingest stage's cache key)."""
        d = self.model_dump(mode="json")
        d["config"] = self.config.to_dict()
        return d


# section -> dataclass whose fields the section may override
_SECTIONS: dict[str, type] = {
    "prep": PrepConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "map": MapConfig,
    "analyze": AnalyzeConfig,
}


def _check_keys(where: str, cls: type, value: Any) -> Any:
    """Reject unknown fields (pydantic ignores them on stdlib dataclasses: a typo would
    otherwise silently run with the default)."""
    if not isinstance(value, dict):
        return value
    value = dict(value)
    if value.get("__config__", cls.__name__) != cls.__name__:
        raise ValueError(f"{where} is a {value['__config__']}, expected {cls.__name__}")
    value.pop("__config__", None)  # as written by Config.to_dict(): accepted back
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown {where} field(s) {unknown}; valid fields are {sorted(known)}")
    return value


class PipelineConfig(BaseModel):
    """Per-stage configuration overrides; every section is optional.

    Pass a dict such as ``{"train": {"epochs": 2}, "prep": {"max_train": 256}}``: each
    section overrides fields of the stage's dataclass (``PrepConfig``, ``ModelConfig``,
    ``TrainConfig``, ``MapConfig``, ``AnalyzeConfig``, ``ingest.config`` = ``IngestConfig``),
    the rest keep their defaults.  ``cluster`` holds keyword arguments replacing those of the
    cluster section (e.g. ``{"n_workers": 2}``), and ``workers`` the number of Dask workers
    to start and wait for (batch-queue clusters start none by themselves; 1 when not given).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ingest: IngestOptions = Field(default_factory=IngestOptions)
    prep: PrepConfig = Field(default_factory=PrepConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    map: MapConfig = Field(default_factory=MapConfig)
    analyze: AnalyzeConfig = Field(default_factory=AnalyzeConfig)
    cluster: dict[str, Any] = Field(default_factory=dict,
                                    description="overrides of the cluster section")
    workers: Annotated[int, Field(ge=1, le=100_000)] | None = Field(
        default=None, description="Dask workers to scale to and wait for")

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, dc in _SECTIONS.items():
            if name in data:
                data[name] = _check_keys(name, dc, data[name])
        ing = data.get("ingest")
        if isinstance(ing, dict) and "config" in ing:
            data["ingest"] = {**ing, "config": _check_keys("ingest.config", IngestConfig,
                                                           ing["config"])}
        return data
