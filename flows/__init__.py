"""Prefect orchestration of the ccstae-hpc stages (no numerics here: see ``ccstae_hpc``).

Flows ``ingest``, ``preprocess``, ``train``, ``map_strain``, ``analyze`` and ``pipeline``
(all five in order) live in :mod:`flows.pipeline`, with ``run_pipeline_embedded``
(``pipeline`` without a separate server); ``ccstae serve`` serves them as deployments
(``flows/schedules.yaml``).

``flows.pipeline`` stays the module (the flow is ``flows.pipeline.pipeline``); the names
below are loaded on first use, so that ``import flows`` does not import Prefect.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["FLOWS", "PipelineConfig", "run_pipeline_embedded"]

_LAZY = {"FLOWS": "flows.pipeline", "run_pipeline_embedded": "flows.pipeline",
         "PipelineConfig": "flows.params"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flows' has no attribute {name!r}")
