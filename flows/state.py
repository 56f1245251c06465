"""Stage identities and completion markers kept in the store itself.

The machinery lives in :mod:`ccstae_hpc.stages.resume`, which the direct engine
(``ccstae run --engine direct``) uses too, so that both engines key, mark and skip stages
alike; this module names it for the flows (:mod:`flows.tasks`).  In short: a stage is *done*
when its group is complete and carries a marker (attribute ``ccstae_flow``) whose key equals
the key this run expects; keys chain from the input's identity through each stage's config,
so a new input or config invalidates that stage and everything after it, and nothing else.
"""

from __future__ import annotations

from ccstae_hpc.stages.resume import (
    MARK,
    STAGE_GROUP,
    UPSTREAM,
    digest,
    expected_key,
    file_identity,
    group_attrs,
    identity,
    ingest_config,
    is_done,
    run_marked,
    stage_key,
    train_config,
    train_resuming,
    unconsolidated,
    write_marker,
)

__all__ = [
    "MARK",
    "STAGE_GROUP",
    "UPSTREAM",
    "digest",
    "expected_key",
    "file_identity",
    "group_attrs",
    "identity",
    "ingest_config",
    "is_done",
    "run_marked",
    "stage_key",
    "train_config",
    "train_resuming",
    "unconsolidated",
    "write_marker",
]
