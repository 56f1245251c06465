"""All stages in order, into a new store built beside the output and renamed into place.

The data's way: a microscope file -> ``raw`` (:mod:`~ccstae_hpc.stages.ingest`) -> ``prep``
(:mod:`~ccstae_hpc.stages.prep`) -> ``model`` (:mod:`~ccstae_hpc.stages.train`) ->
``affine`` and ``strain`` (:mod:`~ccstae_hpc.stages.map`) -> ``analysis``
(:mod:`~ccstae_hpc.stages.analyze`), each stage crossed once.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ccstae_hpc.core.config import AnalyzeConfig, MapConfig, ModelConfig, TrainConfig
from ccstae_hpc.stages.analyze import analyze_store
from ccstae_hpc.stages.ingest import ingest
from ccstae_hpc.stages.lock import store_lock
from ccstae_hpc.stages.map import map_store
from ccstae_hpc.stages.prep import PrepConfig, preprocess_store
from ccstae_hpc.stages.store import publish, remove_stale_siblings, sibling
from ccstae_hpc.stages.train import train_store

__all__ = ["run_store"]


def run_store(
    inp: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    prep_cfg: PrepConfig | None = None,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    map_cfg: MapConfig | None = None,
    analyze_cfg: AnalyzeConfig | None = None,
    client: Any | None = None,
    progress: bool | Callable[[dict], None] = True,
    log: Callable[[str], None] = print,
) -> Path:
    """All stages into a new store, built beside ``out`` and renamed into place at the end.

    An existing ``out`` is replaced only with ``overwrite`` and only once the new store is
    complete: a failure at any stage leaves ``out`` as it was.  Hidden siblings of ``out``
    left by runs that were killed are removed first (a concurrent run's are kept).

    Raises
    ------
    StoreLockedError
        Another run writes ``out`` (:func:`~ccstae_hpc.stages.lock.store_lock`).
    """
    out = Path(out)
    # held until the new store is in place: a concurrent run into `out` is refused
    with store_lock(out, log=log):
        return _run_locked(inp, out, overwrite, prep_cfg, model_cfg, train_cfg, map_cfg,
                           analyze_cfg, client, progress, log)


def _run_locked(inp: str | Path, out: Path, overwrite: bool, prep_cfg: PrepConfig | None,
                model_cfg: ModelConfig | None, train_cfg: TrainConfig | None,
                map_cfg: MapConfig | None, analyze_cfg: AnalyzeConfig | None,
                client: Any | None, progress: bool | Callable[[dict], None],
                log: Callable[[str], None]) -> Path:
    remove_stale_siblings(out, log)
    tmp = sibling(out, "tmp")
    t0 = time.perf_counter()
    try:
        ingest(inp, tmp)
        log(f"ingest: {time.perf_counter() - t0:.1f} s")
        preprocess_store(tmp, prep_cfg, client=client, log=lambda s: log(f"  prep {s}"))
        log(f"preprocess: {time.perf_counter() - t0:.1f} s")
        train_store(tmp, model_cfg, train_cfg, progress)
        log(f"train: {time.perf_counter() - t0:.1f} s")
        map_store(tmp, map_cfg, client=client)
        log(f"map: {time.perf_counter() - t0:.1f} s")
        analyze_store(tmp, analyze_cfg)
        log(f"analyze: {time.perf_counter() - t0:.1f} s")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out, overwrite)
    return out
