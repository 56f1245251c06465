"""Map stage: ``prep/patterns`` + ``model/`` -> ``affine/`` and ``strain/`` of a store.

:func:`map_store` calibrates the dictionary's phases once (:func:`phase_inputs`), then maps
blocks of whole scan rows as tasks (:func:`map_rows`, on Dask workers or local threads), each
reading its own block and writing its rows of ``affine/`` (region writes aligned with the row
chunks), and finally assembles the ``strain`` Dataset on one reference lattice
(:func:`ccstae_hpc.core.mapping.assemble_strain`).  The model travels once to each worker
(:func:`map_payload`, scattered with ``broadcast=True``) and is rebuilt once per worker process;
so do the forward-model choice's candidates, whose blocks are map tasks too
(:func:`choose_forward_model`).
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ccstae_hpc.core import com
from ccstae_hpc.core.com import ComLattice
from ccstae_hpc.core.config import MapConfig, ModelConfig
from ccstae_hpc.core.disks import DiskModel, extend_model, fit_entries, measure_profile
from ccstae_hpc.core.geometry import Geometry, ring_inner_radius
from ccstae_hpc.core.mapping import MapInputs, assemble_strain, map_block, neighbour_scatter
from ccstae_hpc.core.model import CCSTAE
from ccstae_hpc.core.patterns import fit_lattice
from ccstae_hpc.core.phases import (
    VACUUM_RULES,
    DictionaryInfo,
    analyse_dictionary,
    calibrate,
    entry_relations,
    single_phase_map,
)
from ccstae_hpc.core.refine import DiskEntries, encode, refine_checked
from ccstae_hpc.core.training import train_input
from ccstae_hpc.runtime.memory import keep_work_memory
from ccstae_hpc.runtime.threads import set_torch_threads
from ccstae_hpc.stages.prep import (
    open_prep,
    prep_geometry,
    read_block,
    read_recorded,
    recorded_at,
)
from ccstae_hpc.stages.store import (
    CODEC,
    GROUP,
    check_stage,
    commit,
    discard_staging,
    open_root,
    staging,
    with_pixel_coords,
    write_group,
)
from ccstae_hpc.stages.train import load_model

__all__ = ["CALIBRATION_SAMPLE", "map_store", "phase_inputs", "choose_forward_model",
           "whole_detector_disks",
           "map_payload", "Payloads", "map_rows", "fit_rows", "timed_fit_rows", "cached_models",
           "MAP_CACHE_MODELS", "com_reference", "com_payload", "com_rows",
           "vacuum_record"]

# training-set patterns used to group the dictionary into phases and calibrate their frames
CALIBRATION_SAMPLE = 1024
# patterns of each entry averaged into its registered mean (whole_detector_disks), registered
# with the learned entries: at 1e3 e- on the 32x32 heterostructure 256 of them, registered
# so, gave single-pattern fits as precise as all (~460) registered with the disk model, in
# a tenth of the time
REGISTERED_PATTERNS = 256
# patterns averaged into an entry's registered mean (whole_detector_disks) have every linear
# coefficient of their fit within this of their entry's median (a strain of 10 %: far beyond
# any real field, well inside a fit thrown off by noise or a misclassification)
REGISTERED_MAX_DEVIATION = 0.1
# patterns (whole central scan rows, at least CHOICE_MIN_ROWS) fitted with each forward model
# when it is chosen from the data: ~250 neighbouring pairs give each scatter to ~8 %, and the
# models' scatters differed by 1.4x and more where measured
CHOICE_PATTERNS = 512
CHOICE_MIN_ROWS = 2
AFFINE = "affine"


def map_store(store: str | Path, map_cfg: MapConfig | None = None, client: Any | None = None,
              rows_per_block: int = 8, *, threads: int = 1, workers: int | None = None,
              progress: bool = False, overwrite: bool = False) -> Path:
    """Blockwise inference into ``affine/``, then the ``strain`` group of the store.

    Each block of ``rows_per_block`` scan rows is one task that reads its patterns, maps
    them and writes its rows of ``affine/`` (a region write): no patterns reach the caller.
    The model goes once to each worker.  Every task runs with ``threads`` torch threads, so
    the results are the same on any number of workers and in this process.  Both groups are
    written under staging names and replace earlier ones only once complete
    (:mod:`ccstae_hpc.stages.store`).

    Parameters
    ----------
    client : a ``distributed.Client`` to map on, or a ``concurrent.futures.Future`` of one
        (still starting: the dictionary analysis and phase calibration run meanwhile); None
        maps in this process on ``workers`` threads (default: the CPUs available).
    threads : torch threads per task.
    progress : a tqdm bar over the blocks.
    overwrite : replace complete ``affine`` and ``strain`` groups (refused otherwise).
    """
    map_cfg = map_cfg or MapConfig()
    store = Path(store)
    for group in (AFFINE, GROUP):
        check_stage(store, group, overwrite)
    prep = open_prep(store)
    geom = prep_geometry(prep)
    ny, nx = prep["patterns"].shape[:2]
    root = open_root(store)
    if map_cfg.method == "com":
        lattice = com_reference(prep)
        phases, K = single_phase_map(), 2
        task, payload = com_rows, com_payload(str(store.resolve()), lattice, (ny, nx),
                                              rows_per_block)
        attrs = {"method": "centre-of-mass lattice fit (ccstae_hpc.core.com); phases by "
                           "lattice parameter (core.com.lattice_phases)"}
        base = _with_calibration(dict(prep.attrs["lattice"]), root, prep)
        reused, reused_s = {}, 0.0
    else:
        model, mcfg, tcfg = load_model(store)
        # calibration on the tasks' torch threads when workers start meanwhile: torch's
        # spinning threads slowed it 15x (2.3 -> 35 s) on a core shared with another
        # process; mapping in this process, nothing else runs yet and it gets every core
        before = torch.get_num_threads()
        set_torch_threads(threads if client is not None else max(threads, _cpus(workers)))
        payloads = Payloads(str(store.resolve()), model, geom, map_cfg, (ny, nx),
                            rows_per_block, threads)
        try:
            inputs = phase_inputs(prep, model, geom, map_cfg, rows_per_block, threads,
                                  client=client, workers=workers, payloads=payloads)
        finally:
            set_torch_threads(before)
        phases, K = inputs.phases, len(inputs.info.patterns)
        # the chosen candidate's payload, as the forward-model choice sent it: its model is
        # built once per worker, not again for the map
        task, payload = map_rows, payloads(inputs)
        attrs = {"model_config": mcfg.to_json(), "train_config": tcfg.to_json(),
                 "final_loss": float(np.mean(root["model"].attrs["loss"][-10:])),
                 "entry_relations": json.dumps(entry_relations(inputs.info, inputs.phases))}
        attrs["forward_model"] = json.dumps(inputs.forward_model)
        attrs["vacuum_entries"] = json.dumps(vacuum_record(inputs.info))
        base = _base_lattice(root, prep, geom, inputs)
        # blocks the forward-model choice has fitted with the chosen model already, with the
        # same inputs and torch threads as a task would (identical numbers): written, not
        # refitted; their fitting time (spent while choosing) counts in the map's
        reused = inputs.block_fits
        reused_s = inputs.forward_model.get("block_fits_s", 0.0)
    aff = _create_affine(store, (ny, nx), rows_per_block, K)
    for y0, out in reused.items():
        _write_rows(payload, y0, min(y0 + rows_per_block, ny), out)
    t0 = time.perf_counter()
    n_workers = _map_blocks(task, payload, client, workers, progress, skip=set(reused))
    dt = time.perf_counter() - t0 + reused_s
    aff.attrs.update({"map_config": map_cfg.to_dict(), "elapsed_s": dt,
                      "patterns_per_s": ny * nx / dt, "workers": n_workers,
                      "threads_per_task": threads, "rows_per_block": rows_per_block,
                      "complete": True})
    affine = {k: aff[k][...] for k in ("theta", "entry", "phase", "residual", "cov")}
    if map_cfg.method == "com":
        # phases need every fit: split by lattice parameter once all blocks are in
        affine["phase"] = com.lattice_phases(affine["theta"][..., :2], affine["phase"] > 0)
        aff["phase"][...] = affine["phase"]
    ds = assemble_strain(affine, phases, map_cfg, reference_lattice=base, attrs={
        **attrs, "prep_config": json.dumps(prep.attrs["config"]),
        "geometry": json.dumps(geom.to_dict()), "map_patterns_per_s": ny * nx / dt})
    write_group(with_pixel_coords(ds.assign_attrs(complete=True)), store, staging(GROUP))
    commit(store, AFFINE, GROUP)
    return store


def _create_affine(store: Path, shape: tuple[int, int], rows_per_block: int, K: int
                   ) -> zarr.Group:
    """The empty staging ``affine`` group, chunked by blocks of whole scan rows."""
    discard_staging(store, AFFINE)
    discard_staging(store, GROUP)
    aff = open_root(store, "r+").create_group(staging(AFFINE))
    ny, nx = shape
    rows = (rows_per_block, nx)
    for name, shp, dtype, chunks, dims in (
        ("theta", (ny, nx, 2, 3), "float32", rows + (2, 3), ("scan_y", "scan_x", "i", "j")),
        ("entry", (ny, nx), "int16", rows, ("scan_y", "scan_x")),
        # the encoder's entry, before the pattern is moved onto its phase's root: what the
        # network itself said (diagnosis of the phase analysis)
        ("class", (ny, nx), "int16", rows, ("scan_y", "scan_x")),
        ("phase", (ny, nx), "int16", rows, ("scan_y", "scan_x")),
        ("residual", (ny, nx), "float32", rows, ("scan_y", "scan_x")),
        # covariance of each fit's linear part (B00, B01, B10, B11), NaN where unknown
        ("cov", (ny, nx, 4, 4), "float32", rows + (4, 4), ("scan_y", "scan_x", "p", "q")),
        ("composition", (ny, nx, K), "float32", rows + (K,), ("scan_y", "scan_x", "entry")),
    ):
        aff.create_array(name, shape=shp, dtype=dtype, chunks=chunks, compressors=CODEC,
                         dimension_names=dims, fill_value=0)
    return aff


def _map_blocks(task: Any, payload: dict, client: Any | None, workers: int | None,
                progress: bool, skip: set[int] = frozenset()) -> int:
    """``task(y0, payload)`` for every block of ``payload``'s scan (:func:`_run_blocks`),
    except the blocks starting at a row of ``skip`` (already written); the worker count."""
    ny, nx = payload["shape"]
    starts = [y0 for y0 in range(0, ny, payload["rows"]) if y0 not in skip]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=ny * nx, unit="pattern", desc="map", dynamic_ncols=True)
        bar.update(sum(min(payload["rows"], ny - y0) * nx for y0 in skip))
    try:
        return _run_blocks(task, [(y0, payload) for y0 in starts], client, workers,
                           lambda _, n: bar.update(n) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


def _run_blocks(task: Any, jobs: list[tuple[int, dict]], client: Any | None,
                workers: int | None, done: Any) -> int:
    """``task(y0, payload)`` for every job ``(y0, payload)`` on ``client`` (a Dask client or
    a future of one; each payload scattered once to every worker) or, without one, on
    ``workers`` local threads; ``done(i, result)`` for job ``i`` as it completes.  Returns
    the worker count."""
    if isinstance(client, Future):
        client = client.result()
    if client is not None:
        from distributed import as_completed

        n_workers = len(client.scheduler_info()["workers"])
        if not jobs:
            return n_workers
        # the distinct payloads, by identity (a centre-of-mass payload carries no model)
        payloads = {id(p): p for _, p in jobs}
        shared = dict(zip(payloads, client.scatter(list(payloads.values()), broadcast=True,
                                                   hash=False), strict=True))
        index, futures = {}, []
        for key in payloads:  # one map call per payload, its blocks in order
            mine = [i for i, (_, p) in enumerate(jobs) if id(p) == key]
            futs = client.map(task, [jobs[i][0] for i in mine], payload=shared[key],
                              pure=False)
            index.update({f.key: i for i, f in zip(mine, futs, strict=True)})
            futures += futs
        try:
            for fut in as_completed(futures):
                done(index[fut.key], fut.result())  # raises the first failed block's error
        finally:
            client.cancel([*futures, *shared.values()])
        return n_workers
    n_workers = _cpus(workers)
    before = torch.get_num_threads()
    try:
        # torch releases the GIL inside its kernels: threads run blocks in parallel
        with ThreadPoolExecutor(n_workers) as ex:
            for i, result in enumerate(ex.map(lambda job: task(*job), jobs)):
                done(i, result)
    finally:
        set_torch_threads(before)
    return n_workers


def _cpus(workers: int | None) -> int:
    """Threads of an in-process map: ``workers``, else the CPUs this process may use."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return workers or (len(cpus) if cpus else os.cpu_count() or 1)


def phase_inputs(prep: zarr.Group, model: CCSTAE, geom: Geometry, map_cfg: MapConfig,
                 rows_per_block: int = 8, threads: int = 1, *, client: Any | None = None,
                 workers: int | None = None, payloads: Payloads | None = None) -> MapInputs:
    """Analyse the dictionary and calibrate its phases on the training sample of ``prep``,
    with the forward model of ``map_cfg.forward_model`` ("auto": the learned entries for
    pooled maps; for single-pattern fits chosen on the data, see
    :func:`choose_forward_model`, which fits whole map blocks of ``rows_per_block`` scan
    rows with ``threads`` torch threads each as map tasks, on ``client`` or ``workers``
    local threads as :func:`map_store`, their payloads from ``payloads`` (default: new
    ones); the choice is in the result's ``forward_model``)."""
    n = min(int(prep["train"].shape[0]), CALIBRATION_SAMPLE)
    scale = prep["train_scale"][:n]
    bg = torch.from_numpy(prep["background"][...]) if "background" in prep else None
    x = train_input(prep["train"][:n], scale, bg).numpy()
    rec = recorded_at(prep, prep["train_index"][:n]) if "train_index" in prep else None
    # the encoder's entry and start of each calibration pattern, once for every step below
    encoded = encode(model, torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    info = analyse_dictionary(model.dictionary().detach().numpy(), geom.ring,
                              map_cfg.symmetry, encoded[0].numpy(), training_vacuum(prep, n))
    candidates: dict[str, MapInputs] = {}
    profile = None
    wanted = map_cfg.forward_model
    if wanted == "auto" and map_cfg.pool_sigma != 0:
        # pooled maps: the learned entries (the sharp-disk fits pooled to a larger error)
        wanted = "dictionary"
    if wanted in ("auto", "disks"):
        profile = measure_profile(x, geom.center, geom.radius)
        disks = fit_entries(info.patterns, info.labels, np.flatnonzero(~info.vacuum), profile,
                            geom.center)
        disks = whole_detector_disks(encoded, info, x, disks, geom, map_cfg.refine_iters,
                                     map_cfg.symmetry, rec)
        # the frames are calibrated with the model the map fits (its fits and theirs agree)
        phases = calibrate(encoded, info, x, scale, geom.ring, map_cfg.refine_iters,
                           DiskEntries.from_model(disks, info.labels),
                           symmetry=map_cfg.symmetry, recorded=rec)
        candidates["disks"] = MapInputs(info, phases, disks)
    if wanted in ("auto", "dictionary"):
        phases = calibrate(encoded, info, x, scale, geom.ring, map_cfg.refine_iters,
                           symmetry=map_cfg.symmetry, recorded=rec)
        candidates["dictionary"] = MapInputs(info, phases)
    if len(candidates) == 1:
        (name, inputs), = candidates.items()
        inputs.forward_model = {"chosen": name, "asked": map_cfg.forward_model}
    else:
        inputs = choose_forward_model(prep, model, geom, map_cfg, candidates, rows_per_block,
                                      threads, client=client, workers=workers,
                                      payloads=payloads)
    if profile is not None:
        inputs.forward_model["disk_profile"] = {"radius_px": profile.radius,
                                                "edge_10_90_px": profile.edge_px}
        dm = candidates["disks"].disks
        if dm is not None and dm.labels is not None:
            # what the disk model covers: the disks of each sample entry, the fitted pixels
            inputs.forward_model["disk_model"] = {
                "disks_per_entry": {str(int(k)): int(dm.labels[k].max())
                                    for k in np.flatnonzero(~inputs.info.vacuum)},
                "region_px": int(np.asarray(dm.region).sum())}
    return inputs


def vacuum_record(info: DictionaryInfo) -> dict:
    """Which dictionary entries are vacuum and the rule that decided each (for the maps'
    attributes: a user can see whether the data's flags or the contrast fallback spoke)."""
    return {"vacuum": np.asarray(info.vacuum, bool).tolist(),
            "decided_by": info.vacuum_rule.tolist(), "rules": VACUUM_RULES}


def training_vacuum(prep: zarr.Group, n: int) -> np.ndarray | None:
    """Preprocessing's vacuum flag of the first ``n`` training patterns (the calibration
    sample); None for stores written before ``prep/train_index`` existed (the dictionary's
    vacuum entries are then decided on their Bragg contrast,
    :func:`ccstae_hpc.core.phases.vacuum_entries`)."""
    if "train_index" not in prep or "vacuum" not in prep:
        return None
    return np.asarray(prep["vacuum"][...]).ravel()[prep["train_index"][:n]]


def whole_detector_disks(encoded: tuple[torch.Tensor, torch.Tensor], info: DictionaryInfo,
                         x: np.ndarray, ring_model: DiskModel, geom: Geometry, iters: int,
                         symmetry: int, recorded: np.ndarray | None = None) -> DiskModel:
    """The sharp-disk model re-fitted on the calibration sample ``x`` and grown over the
    whole detector (:func:`ccstae_hpc.core.disks.extend_model`): up to
    :data:`REGISTERED_PATTERNS` of the sample per entry are registered onto their encoder
    entries (``encoded``: the encoder's entry and start of each; the learned images, trained
    on the Bragg annulus only), and each entry's registered mean gives the disks' amplitudes,
    the corner disks and the background; ``ring_model`` (the disks of the learned entries)
    gives the lattice.  ``recorded``: the pixels of ``x`` that hold recorded counts
    (:func:`ccstae_hpc.stages.prep.recorded_at`), None all."""
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    rec = None if recorded is None else torch.from_numpy(np.asarray(recorded, bool))
    entries = np.flatnonzero(~info.vacuum)
    cls, theta0 = encoded
    sel = torch.from_numpy(np.isin(cls.numpy(), entries))
    if int(sel.sum()) == 0:
        return ring_model
    idx = torch.nonzero(sel).squeeze(1)
    idx = torch.cat([idx[cls[idx] == k][:REGISTERED_PATTERNS] for k in entries])
    xt, cls, theta0 = xt[idx], cls[idx], theta0[idx]
    rec = None if rec is None else rec[idx]
    fit = refine_checked(xt, cls, theta0, info.patterns, info.masks, geom.ring, iters,
                         symmetry, ~info.vacuum, recorded=rec)
    theta = fit.theta
    c = cls.numpy()
    # fits thrown off (a few at low dose) would blur the mean: keep the linear parts near
    # their entry's median
    lin = theta[:, :, :2].reshape(-1, 4).numpy()
    good = np.isfinite(lin).all(1)
    for k in entries:
        m = (c == k) & good
        if m.any():
            dev = np.abs(lin[m] - np.median(lin[m], 0)).max(1)
            good[np.flatnonzero(m)[dev > REGISTERED_MAX_DEVIATION]] = False
    keep = torch.from_numpy(good)
    return extend_model(xt[keep], theta[keep], c[good], ring_model, info.labels, entries,
                        geom.center, ring_inner_radius(geom.radius),
                        None if rec is None else rec[keep])


def choose_forward_model(prep: zarr.Group, model: CCSTAE, geom: Geometry, map_cfg: MapConfig,
                         candidates: dict[str, MapInputs], rows_per_block: int = 8,
                         threads: int = 1, *, client: Any | None = None,
                         workers: int | None = None, payloads: Payloads | None = None
                         ) -> MapInputs:
    """The candidate whose fits of a few central scan rows (about :data:`CHOICE_PATTERNS`
    patterns) scatter least between neighbouring probe positions
    (:func:`ccstae_hpc.core.mapping.neighbour_scatter`): the better forward model for these
    data, judged by the precision it reaches on them, not by the model's own assumptions.
    The sharp-disk model wins on flat, aperture-shaped disks; the learned entry where the
    disks have inner structure (measured: multislice WS2 with dynamical disks).

    The rows are whole map blocks of ``rows_per_block`` rows, each fitted by a map task
    (:func:`fit_rows`, ``threads`` torch threads) on ``client``'s workers or on ``workers``
    local threads, every candidate's blocks at once: the chosen candidate keeps its fits
    (``block_fits``) and the map does not fit those rows again.  On a cluster the choice
    runs where the map runs, not serially in the calling process (on a 48x48 scan its
    three blocks of four rows are a quarter of the map).
    """
    ny, nx = prep["patterns"].shape[:2]
    rows = min(ny, max(CHOICE_MIN_ROWS, -(-CHOICE_PATTERNS // nx)))
    # the fewest whole map blocks that hold these rows, centred on the scan
    n_blocks, total = -(-rows // rows_per_block), -(-ny // rows_per_block)
    b0 = max(0, min(total - n_blocks, round(ny / 2 / rows_per_block - n_blocks / 2)))
    y0, y1 = b0 * rows_per_block, min(ny, (b0 + n_blocks) * rows_per_block)
    starts = list(range(y0, y1, rows_per_block))
    if payloads is None:
        payloads = Payloads(str(Path(prep.store.root).resolve()), model, geom, map_cfg,
                            (ny, nx), rows_per_block, threads)
    names = list(candidates)
    jobs = [(b, payloads(candidates[name])) for name in names for b in starts]
    results: list[Any] = [None] * len(jobs)
    t = time.perf_counter()
    _run_blocks(timed_fit_rows, jobs, client, workers, results.__setitem__)
    wall = time.perf_counter() - t
    scatter, fits, busy = {}, {}, {}
    for i, name in enumerate(names):
        mine = results[i * len(starts):(i + 1) * len(starts)]
        outs = [out for out, _ in mine]
        busy[name] = sum(sec for _, sec in mine)
        fits[name] = dict(zip(starts, outs, strict=True))
        out = {k: np.concatenate([o[k] for o in outs]) for k in ("theta", "entry", "phase")}
        scatter[name] = neighbour_scatter(out["theta"].reshape(y1 - y0, nx, 2, 3),
                                          out["entry"].reshape(y1 - y0, nx),
                                          out["phase"].reshape(y1 - y0, nx), map_cfg.symmetry)
    finite = {k: v for k, v in scatter.items() if np.isfinite(v)}
    # without neighbouring sample fits to judge by, the learned entries (the method's own)
    best = min(finite, key=finite.get) if finite else "dictionary"
    inputs = candidates[best]
    inputs.block_fits = fits[best]
    # the chosen blocks' share of the choice's wall time (its tasks' share of the busy time):
    # what the map would have spent fitting them as tasks
    share = busy[best] / max(sum(busy.values()), 1e-9)
    inputs.forward_model = {"chosen": best, "scan_rows": [int(y0), int(y1)],
                            "neighbour_scatter": scatter, "block_fits_s": wall * share,
                            "choice_s": wall}
    return inputs


def _base_lattice(root: zarr.Group, prep: zarr.Group, geom: Geometry, inputs: MapInputs
                  ) -> dict:
    """Reciprocal basis of the base phase's root entry (the common frame), with the
    detector calibration when the raw data carry one."""
    ph = inputs.phases
    base = [e for e in range(len(ph.phase_of_entry))
            if ph.phase_of_entry[e] > 0 and ph.root_of_entry[e] == e
            and np.allclose(np.nan_to_num(ph.frames[e]), np.eye(2))]
    if not base:
        return {"found": False}
    lat = fit_lattice(inputs.info.patterns[base[0]], geom.center, ring_inner_radius(geom.radius))
    return _with_calibration(lat, root, prep)


def _with_calibration(lat: dict, root: zarr.Group, prep: zarr.Group) -> dict:
    """A lattice fit (detector pixels) with the detector calibration of the raw data, when
    it carries one."""
    cal = dict(root["raw"].attrs.get("calibration", {}) or {}) if "raw" in root else {}
    ps = cal.get("detector_pixel_size_inv_A")
    if ps:
        lat["pixel_size_inv_A"] = float(ps) * int(prep.attrs.get("bin_factor", 1))
    return lat


# ---------------------------------------------------------------- the worker side

# the models of the current map run, built once per worker process:
# token -> (model, geometry, map config, map inputs); the forward-model choice's two
# candidates, the chosen one's payload also the map's own (Payloads): the two most recent
# are kept
MAP_CACHE_MODELS = 2
_MAP_CACHE: dict[str, tuple[Any, Any, Any, Any]] = {}
_MAP_LOCK = threading.Lock()


def map_payload(store: str, model: Any, geom: Any, map_cfg: Any, shape: tuple[int, int],
                rows: int, threads: int, inputs: dict) -> dict:
    """Everything a worker needs to map blocks of ``store``: plain arrays and dicts.

    Sent once per worker (``client.scatter(..., broadcast=True)``); the model is rebuilt
    from it once per worker process and cached under the payload's token.
    """
    return {
        "token": uuid.uuid4().hex,
        "store": store,
        "weights": {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
        "model_config": model.cfg.to_dict(),
        "detector": int(model.detector),
        "center": [float(c) for c in geom.center],
        "radius": float(geom.radius),
        "map_config": map_cfg.to_dict(),
        "shape": [int(shape[0]), int(shape[1])],
        "rows": int(rows),
        "threads": int(threads),
        "inputs": inputs,
        "group": staging(AFFINE),  # where the blocks go until the map run commits
    }


class Payloads:
    """The map payload (:func:`map_payload`) of each candidate's inputs of one map run,
    built on first use and handed out again for the same inputs object: the forward-model
    choice's tasks and the map's own share the chosen candidate's, so that each worker
    builds its model once."""

    def __init__(self, store: str, model: Any, geom: Any, map_cfg: Any,
                 shape: tuple[int, int], rows: int, threads: int) -> None:
        self._args = (store, model, geom, map_cfg, shape, rows, threads)
        self._made: list[tuple[MapInputs, dict]] = []  # by identity: inputs are not hashable

    def __call__(self, inputs: MapInputs) -> dict:
        for known, payload in self._made:
            if known is inputs:
                return payload
        payload = map_payload(*self._args, inputs.to_dict())
        self._made.append((inputs, payload))
        return payload


def _cached(payload: dict) -> tuple[Any, Any, Any, Any]:
    with _MAP_LOCK:
        hit = _MAP_CACHE.get(payload["token"])
        if hit is None:
            while len(_MAP_CACHE) >= MAP_CACHE_MODELS:  # the oldest first (insertion order)
                del _MAP_CACHE[next(iter(_MAP_CACHE))]
            w = {k: torch.from_numpy(v) for k, v in payload["weights"].items()}
            Q = payload["detector"]
            model = CCSTAE(ModelConfig.from_dict(payload["model_config"]), Q,
                           tuple(payload["center"]), payload["radius"])
            model.load_state_dict(w)
            model.eval()
            geom = Geometry.from_disk(tuple(payload["center"]), payload["radius"], Q)
            hit = (model, geom, MapConfig.from_dict(payload["map_config"]),
                   MapInputs.from_dict(payload["inputs"]))
            _MAP_CACHE[payload["token"]] = hit
            # the objects that live for the whole run (modules, the model) leave the garbage
            # collector's generations: its full passes over them stalled block reads by up to
            # 0.5 s (measured: a zarr read of 768 patterns, median 0.03 s, max 0.42-0.50 s)
            gc.freeze()
    return hit


def cached_models() -> list[str]:
    """Tokens of the payloads whose model this process holds (at most
    :data:`MAP_CACHE_MODELS`)."""
    with _MAP_LOCK:
        return list(_MAP_CACHE)


def fit_rows(y0: int, payload: dict) -> dict[str, np.ndarray]:
    """The fits of scan rows ``y0 : y0 + rows`` of ``prep/patterns`` (one array per output,
    ``(n, ...)``), read and fitted as a map task does (:func:`map_rows`)."""
    # per calling thread (OpenMP keeps the setting per thread): identical numerics everywhere
    set_torch_threads(payload["threads"])
    keep_work_memory()
    model, geom, cfg, inputs = _cached(payload)
    ny, nx = payload["shape"]
    y1 = min(y0 + payload["rows"], ny)
    path = payload["store"]
    x, scale = read_block(path, y0, y1)
    rec = read_recorded(path, y0, y1)
    return map_block(model, x.reshape(-1, *x.shape[2:]), scale, geom.ring, cfg, inputs, rec)


def timed_fit_rows(y0: int, payload: dict) -> tuple[dict[str, np.ndarray], float]:
    """:func:`fit_rows` and the seconds it took (the forward-model choice's tasks)."""
    t = time.perf_counter()
    out = fit_rows(y0, payload)
    return out, time.perf_counter() - t


def map_rows(y0: int, payload: dict) -> int:
    """Map scan rows ``y0 : y0 + rows`` of ``prep/patterns`` into ``affine/`` (a region write).

    The unit of distributed inference, run the same way in a Dask worker and in a local
    thread: reads its own block (nothing is gathered), fixes torch's thread count so that
    the result does not depend on where it runs (:func:`fit_rows`), and returns only the
    number of patterns.
    """
    y1 = min(y0 + payload["rows"], payload["shape"][0])
    return _write_rows(payload, y0, y1, fit_rows(y0, payload))


def _write_rows(payload: dict, y0: int, y1: int, out: dict[str, np.ndarray]) -> int:
    """Scan rows ``y0:y1`` of every affine array (``(n, ...)`` per pattern) into the run's
    staging group; the number of patterns.  Region writes aligned with the row chunks:
    blocks never share a chunk."""
    nx = payload["shape"][1]
    for name, v in out.items():
        zarr.open_array(payload["store"], path=f"{payload['group']}/{name}", mode="r+")[
            y0:y1] = v.reshape(y1 - y0, nx, *v.shape[1:])
    return (y1 - y0) * nx


# ------------------------------------------------------------- the centre-of-mass baseline


def com_reference(prep: zarr.Group) -> ComLattice:
    """The CoM reference lattice from the mean of the re-centred patterns."""
    return com.reference_lattice(np.asarray(prep["mean"][...]),
                                 float(prep.attrs["disk_radius"]))


def com_payload(store: str, lattice: ComLattice, shape: tuple[int, int], rows: int) -> dict:
    """What a worker needs to fit blocks of ``store`` with the CoM baseline."""
    return {"store": store, "shape": [int(shape[0]), int(shape[1])], "rows": int(rows),
            "origin": lattice.origin.tolist(), "G": lattice.G.tolist(),
            "hk": lattice.hk.tolist(), "radius": float(lattice.radius),
            "group": staging(AFFINE)}


def com_rows(y0: int, payload: dict) -> int:
    """CoM lattice fits of scan rows ``y0 : y0 + rows`` into ``affine/`` (the same arrays
    as :func:`map_rows`: entry 0 sample, entry 1 where no lattice was found or prep flagged
    vacuum)."""
    keep_work_memory()
    ny, nx = payload["shape"]
    y1 = min(y0 + payload["rows"], ny)
    path = payload["store"]
    lat = ComLattice(np.asarray(payload["origin"]), np.asarray(payload["G"]),
                     np.asarray(payload["hk"], np.int64), payload["radius"])
    x = zarr.open_array(path, path="prep/patterns", mode="r")[y0:y1]
    vac = zarr.open_array(path, path="prep/vacuum", mode="r")[y0:y1].reshape(-1)
    fit = com.fit_patterns(x.reshape(-1, *x.shape[2:]), lat)
    A = fit["Gp"] @ np.linalg.inv(lat.G)
    found = np.isfinite(A).all(axis=(-2, -1)) & ~vac
    n = len(A)
    theta = np.zeros((n, 2, 3), np.float32)
    theta[..., :2] = np.where(found[:, None, None], A, np.eye(2))
    return _write_rows(payload, y0, y1, {
        "theta": theta, "entry": np.where(found, 0, 1).astype(np.int16),
        "class": np.where(found, 0, 1).astype(np.int16),
        "phase": found.astype(np.int16), "residual": np.full(n, np.nan, np.float32),
        "cov": np.full((n, 4, 4), np.nan, np.float32),
        "composition": np.full((n, 2), np.nan, np.float32)})
