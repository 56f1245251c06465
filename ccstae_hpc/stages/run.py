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
from ccstae_hpc.stages.resume import (
    continue_build,
    ingest_config,
    ingest_options,
    is_done,
    run_marked,
    stage_key,
    train_config,
    train_resuming,
)
from ccstae_hpc.stages.store import publish

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
    complete: a failure at any stage leaves ``out`` as it was.

    A run killed outright (SIGKILL, walltime) before it published leaves its build store
    behind; this run continues it when it holds a complete ingest of this very input
    (:func:`~ccstae_hpc.stages.resume.continue_build`), keeping each stage already done
    with the key these configs give (:mod:`~ccstae_hpc.stages.resume`) and redoing the
    first stage whose config differs and everything after it.  Every other hidden sibling
    of ``out`` left by runs that were killed is removed (a concurrent run's are kept).

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
    # every config explicit: the stage keys describe what the stages ran with
    prep_cfg, map_cfg = prep_cfg or PrepConfig(), map_cfg or MapConfig()
    model_cfg, train_cfg = model_cfg or ModelConfig(), train_cfg or TrainConfig()
    analyze_cfg = analyze_cfg or AnalyzeConfig()
    options = ingest_options()  # a plain ingest(inp, tmp)
    tmp = continue_build(out, inp, options, log)
    t0 = time.perf_counter()

    def prep() -> None:
        # overwrite: the stage is not done, so a prep group there is stale (other config)
        preprocess_store(tmp, prep_cfg, client=client, overwrite=True,
                         log=lambda s: log(f"  prep {s}"))

    # (name in the log, stage, config, the library call); in order, each keyed on the last
    stages: list[tuple[str, str, Callable[[], Any], Callable[[], Any]]] = [
        ("ingest", "ingest", lambda: ingest_config(inp, options), lambda: ingest(inp, tmp)),
        ("preprocess", "prep", prep_cfg.to_dict, prep),
        ("train", "train", lambda: train_config(model_cfg, train_cfg),
         lambda: train_resuming(tmp, model_cfg, train_cfg, progress, log)),
        ("map", "map", map_cfg.to_dict,
         lambda: map_store(tmp, map_cfg, client=client, overwrite=True)),
        ("analyze", "analyze", analyze_cfg.to_dict,
         lambda: analyze_store(tmp, analyze_cfg, overwrite=True)),
    ]
    try:
        for name, stage, config, call in stages:
            cfg = config()
            key = stage_key(tmp, stage, cfg)
            if is_done(tmp, stage, key):
                log(f"{name}: done by an earlier run, kept")
                continue
            extra = {"input": cfg["input"]} if stage == "ingest" else None
            run_marked(tmp, stage, key, call, extra)
            log(f"{name}: {time.perf_counter() - t0:.1f} s")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out, overwrite)
    return out
