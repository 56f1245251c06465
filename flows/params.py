"""Validated flow parameters: typed paths and names, and per-stage config overrides.

Prefect validates every flow call (and every run created through the API) against these
types before the flow body runs, so a bad value fails the run at once with a message naming
the field.  The stage sections are the library's own frozen dataclasses: pydantic checks the
field types and the dataclass's ``__post_init__`` checks the values, so the rules live in one
place (``ccstae_hpc.core.config``, ``ccstae_hpc.stages.prep``, ``ccstae_hpc.stages.ingest``).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ccstae_hpc.core.config import MapConfig, ModelConfig, TrainConfig
from ccstae_hpc.stages.ingest import IngestConfig
from ccstae_hpc.stages.prep import PrepConfig

__all__ = [
    "ClusterName",
    "InputPath",
    "IngestOptions",
    "OptionalPath",
    "PipelineConfig",
    "StorePath",
]

InputPath = Annotated[
    str,
    Field(min_length=1, max_length=4096, pattern=r"\S",
          description="4D-STEM file to ingest (.npy .h5 .emd .mib .xml .dm4 .blo)"),
]
StorePath = Annotated[
    str,
    Field(min_length=1, max_length=4096, pattern=r"\S",
          description="Zarr v3 store of the dataset (created by the ingest stage)"),
]
OptionalPath = Annotated[
    str | None,
    Field(default=None, max_length=4096,
          description="simulator truth (.truth.npz) to compare the result with"),
]
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
    ``TrainConfig``, ``MapConfig``, ``ingest.config`` = ``IngestConfig``), the rest keep
    their defaults.  ``cluster`` holds keyword arguments replacing those of the cluster
    section (e.g. ``{"n_workers": 2}``), and ``workers`` the number of Dask workers to start
    and wait for (batch-queue clusters start none by themselves; 1 when not given).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ingest: IngestOptions = Field(default_factory=IngestOptions)
    prep: PrepConfig = Field(default_factory=PrepConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    map: MapConfig = Field(default_factory=MapConfig)
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
