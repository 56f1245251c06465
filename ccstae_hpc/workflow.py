"""Store-based stages: ingest -> preprocess -> train -> map, one Zarr store per dataset.

The CLI and the Prefect flows call these functions; each reads the group(s) before it and
writes its own (``raw``, ``prep``, ``model``, ``affine``, ``strain``), and records its
config in the group's attrs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from . import __version__
from .config import MapConfig, ModelConfig, TrainConfig
from .mapping import MapInputs, assemble_strain
from .model import CCSTAE
from .phases import analyse_dictionary, calibrate
from .prep import PrepConfig, fit_lattice, open_prep, preprocess_store
from .preprocess import ring_mask
from .strain import affine_to_deformation, polar_decompose
from .train import Geometry, train_input

__all__ = [
    "geometry_from_prep",
    "save_model",
    "load_model",
    "train_store",
    "map_store",
    "run_store",
]

# training-set patterns used to group the dictionary into phases and calibrate their frames
CALIBRATION_SAMPLE = 1024
_CODEC = zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")


def geometry_from_prep(prep: zarr.Group) -> Geometry:
    """The detector geometry recorded by preprocessing (centre, disk radius, annulus)."""
    size = prep["patterns"].shape[-1]
    c = tuple(prep.attrs["center"])
    r = float(prep.attrs["disk_radius"])
    return Geometry(c, r, ring_mask((size, size), c, 2 * r + 2))


def save_model(root: zarr.Group, model: CCSTAE, model_cfg: ModelConfig, train_cfg: TrainConfig,
               history: list[dict]) -> zarr.Group:
    """Write the weights (one array per tensor) and provenance into ``model/``."""
    if "model" in root:
        del root["model"]
    g = root.create_group("model")
    w = g.create_group("weights")
    for name, t in model.state_dict().items():
        w.create_array(name, data=t.detach().cpu().numpy())
    g.create_array("dictionary", data=model.dictionary().detach().numpy(),
                   dimension_names=("class", "k_y", "k_x"))
    g.attrs.update({
        "model_config": model_cfg.to_dict(),
        "train_config": train_cfg.to_dict(),
        "detector": model.detector,
        "loss": [h["loss"] for h in history],
        "epochs_run": history[-1]["epoch"] + 1 if history else 0,
        "patterns_per_s": history[-1]["patterns_per_s"] if history else None,
        "ccstae_hpc_version": __version__,
        "complete": True,
    })
    return g


def load_model(store: str | Path) -> tuple[CCSTAE, ModelConfig, TrainConfig]:
    """Rebuild the trained model from ``STORE/model``."""
    root = zarr.open_group(str(store), mode="r", zarr_format=3)
    if "model" not in root or not root["model"].attrs.get("complete"):
        raise FileNotFoundError(f"{store} has no trained model; run `ccstae train {store}`")
    g = root["model"]
    mcfg = ModelConfig.from_dict(g.attrs["model_config"])
    tcfg = TrainConfig.from_dict(g.attrs["train_config"])
    w = g["weights"]
    state = {k: torch.from_numpy(np.asarray(w[k][...])) for k in w.array_keys()}
    model = CCSTAE(mcfg, int(g.attrs["detector"]), tuple(state["center"].tolist()),
                   float(state["radius"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        # e.g. a model of an older version (its classifier still had a LayerNorm)
        raise FileNotFoundError(
            f"{store} holds a model this version cannot load ({str(e).splitlines()[0]}); "
            f"retrain it with `ccstae train {store} --restart`") from e
    model.eval()
    return model, mcfg, tcfg


def train_store(store: str | Path, model_cfg: ModelConfig | None = None,
                train_cfg: TrainConfig | None = None,
                progress: bool | Callable[[dict], None] = False, *,
                client: Any | None = None, launcher: str = "auto", restart: bool = False,
                checkpoint: Any | None = None) -> list[dict]:
    """Train on the shards of ``prep/train``; write ``model/`` (checkpoints, then weights).

    An incomplete checkpoint in ``model/`` is resumed (its configs are used when none are
    given; given ones must match) unless ``restart``.

    Parameters
    ----------
    progress : True shows a tqdm bar on rank 0; a callable gets each step's record on rank 0
        (in the worker process under Dask).
    client : a ``distributed.Client``: one DDP rank per worker (``launcher="auto"``).
    launcher : ``"auto"`` (Dask ranks with a client, else this process), ``"single"``,
        ``"dask"``, or ``"env"`` (this process is one rank of a job started by
        srun/torchrun/mpiexec; see :func:`ccstae_hpc.ddp.env_from_environ`).
    restart : discard an incomplete checkpoint and start over.
    checkpoint : a :class:`ccstae_hpc.train.CheckpointConfig` (every 100 steps by default).

    Returns
    -------
    The loss curve (one record per step) on rank 0; ``[]`` on other ranks.
    """
    from .ddp import DistEnv, env_from_environ, run_on_dask
    from .train import train_rank

    open_prep(store)  # fail here, with the message that says what to do
    kw = {"checkpoint": checkpoint, "restart": restart, "progress": progress}
    if launcher == "auto":
        launcher = "dask" if client is not None else "single"
    if launcher == "dask":
        if client is None:
            raise ValueError("launcher 'dask' needs a distributed.Client")
        # workers resolve the path themselves: make it absolute (shared file system)
        return run_on_dask(client, train_rank, str(Path(store).resolve()), model_cfg,
                           train_cfg, **kw)[0]
    if launcher == "env":
        return train_rank(env_from_environ(), store, model_cfg, train_cfg, **kw)
    if launcher == "single":
        return train_rank(DistEnv(), store, model_cfg, train_cfg, **kw)
    raise ValueError(f"unknown launcher {launcher!r}; use auto, single, dask or env")


def map_store(store: str | Path, map_cfg: MapConfig | None = None, client: Any | None = None,
              rows_per_block: int = 8, *, threads: int = 1, workers: int | None = None,
              progress: bool = False) -> Path:
    """Blockwise inference into ``affine/``, then the ``strain`` group of the store.

    Each block of ``rows_per_block`` scan rows is one task that reads its patterns, maps
    them and writes its rows of ``affine/`` (a region write): no patterns reach the caller.
    The model goes once to each worker.  Every task runs with ``threads`` torch threads, so
    the results are the same on any number of workers and in this process.

    Parameters
    ----------
    client : a ``distributed.Client`` to map on; None maps in this process on ``workers``
        threads (default: the CPUs available).
    threads : torch threads per task.
    progress : a tqdm bar over the blocks.
    """
    from .ddp import map_payload, map_rows
    from .store import _write_group, with_pixel_coords

    map_cfg = map_cfg or MapConfig()
    store = Path(store)
    prep = open_prep(store)
    geom = geometry_from_prep(prep)
    model, mcfg, tcfg = load_model(store)
    ny, nx = prep["patterns"].shape[:2]
    inputs = phase_inputs(prep, model, geom, map_cfg)
    K = len(inputs.info.patterns)
    # the consolidated block (written with strain/) is stale for the groups rewritten here
    root = zarr.open_group(str(store), mode="r+", zarr_format=3, use_consolidated=False)
    if "affine" in root:
        del root["affine"]
    aff = root.create_group("affine")
    rows = (rows_per_block, nx)
    for name, shape, dtype, chunks, dims in (
        ("theta", (ny, nx, 2, 3), "float32", rows + (2, 3), ("scan_y", "scan_x", "i", "j")),
        ("entry", (ny, nx), "int16", rows, ("scan_y", "scan_x")),
        ("phase", (ny, nx), "int16", rows, ("scan_y", "scan_x")),
        ("residual", (ny, nx), "float32", rows, ("scan_y", "scan_x")),
        ("composition", (ny, nx, K), "float32", rows + (K,), ("scan_y", "scan_x", "entry")),
    ):
        aff.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=_CODEC,
                         dimension_names=dims, fill_value=0)
    payload = map_payload(str(store.resolve()), model, geom, map_cfg, (ny, nx), rows_per_block,
                          threads, inputs.to_dict())
    starts = list(range(0, ny, rows_per_block))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=ny * nx, unit="pattern", desc="map", dynamic_ncols=True)
    t0 = time.perf_counter()
    if client is not None:
        from distributed import as_completed

        n_workers = len(client.scheduler_info()["workers"])
        [shared] = client.scatter([payload], broadcast=True, hash=False)
        futures = client.map(map_rows, starts, payload=shared, pure=False)
        try:
            for fut in as_completed(futures):
                n = fut.result()  # raises the first failed block's error
                if bar is not None:
                    bar.update(n)
        finally:
            client.cancel([*futures, shared])
    else:
        from concurrent.futures import ThreadPoolExecutor

        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        n_workers = workers or (len(cpus) if cpus else os.cpu_count() or 1)
        before = torch.get_num_threads()
        try:
            # torch releases the GIL inside its kernels: threads run blocks in parallel
            with ThreadPoolExecutor(n_workers) as ex:
                for n in ex.map(lambda y0: map_rows(y0, payload), starts):
                    if bar is not None:
                        bar.update(n)
        finally:
            torch.set_num_threads(before)
    if bar is not None:
        bar.close()
    dt = time.perf_counter() - t0
    aff.attrs.update({"map_config": map_cfg.to_dict(), "elapsed_s": dt,
                      "patterns_per_s": ny * nx / dt, "workers": n_workers,
                      "threads_per_task": threads, "rows_per_block": rows_per_block,
                      "complete": True})
    affine = {k: aff[k][...] for k in ("theta", "entry", "phase", "residual")}
    ds = assemble_strain(affine, inputs.phases, map_cfg, reference_lattice=_base_lattice(
        root, prep, geom, inputs), attrs={
            "model_config": mcfg.to_json(), "train_config": tcfg.to_json(),
            "prep_config": json.dumps(prep.attrs["config"]),
            "geometry": json.dumps(geom.to_dict()),
            "final_loss": float(np.mean(root["model"].attrs["loss"][-10:])),
            "map_patterns_per_s": ny * nx / dt,
            "entry_relations": json.dumps(_entry_relations(inputs)),
        })
    if "strain" in root:
        del root["strain"]
    _write_group(with_pixel_coords(ds), store)
    return store


def phase_inputs(prep: zarr.Group, model: CCSTAE, geom: Geometry, map_cfg: MapConfig
                 ) -> MapInputs:
    """Analyse the dictionary and calibrate its phases on the training sample of ``prep``."""
    info = analyse_dictionary(model.dictionary().detach().numpy(), geom.ring, map_cfg.symmetry)
    n = min(int(prep["train"].shape[0]), CALIBRATION_SAMPLE)
    scale = prep["train_scale"][:n]
    bg = torch.from_numpy(prep["background"][...]) if "background" in prep else None
    x = train_input(prep["train"][:n], scale, bg).numpy()
    phases = calibrate(model, info, x, scale, geom.ring, map_cfg.refine_iters)
    return MapInputs(info, phases)


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
    lat = fit_lattice(inputs.info.patterns[base[0]], geom.center, 2 * geom.radius + 2)
    cal = dict(root["raw"].attrs.get("calibration", {}) or {}) if "raw" in root else {}
    ps = cal.get("detector_pixel_size_inv_A")
    if ps:
        lat["pixel_size_inv_A"] = float(ps) * int(prep.attrs.get("bin_factor", 1))
    return lat


def _entry_relations(inputs: MapInputs) -> list[dict]:
    """Strain and rotation between the sample entries' lattices (calibrated relations)."""
    ph, info = inputs.phases, inputs.info
    out = []
    sample = np.nonzero(~info.vacuum)[0]
    for a, j in enumerate(sample):
        for k in sample[a + 1:]:
            M = affine_to_deformation(ph.relations[k, j, :, :2].astype(np.float64))
            rot, U = polar_decompose(M)
            out.append({"entries": [int(j), int(k)],
                        "max_strain": float(np.abs(U - np.eye(2)).max()),
                        "rotation_deg": float(rot),
                        "dictionary_residual": float(info.relation_residual[k, j]),
                        "same_phase": bool(ph.phase_of_entry[j] == ph.phase_of_entry[k])})
    return out


def run_store(
    inp: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    prep_cfg: PrepConfig | None = None,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    map_cfg: MapConfig | None = None,
    client: Any | None = None,
    progress: bool | Callable[[dict], None] = True,
    log: Callable[[str], None] = print,
) -> Path:
    """All stages into a new store, built beside ``out`` and renamed into place at the end.

    An existing ``out`` is replaced only with ``overwrite`` and only once the new store is
    complete: a failure at any stage leaves ``out`` as it was.
    """
    from .io import ingest
    from .store import _sibling, publish

    out = Path(out)
    tmp = _sibling(out, "tmp")
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out, overwrite)
    return out
