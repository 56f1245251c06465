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
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from . import __version__
from .config import MapConfig, ModelConfig, TrainConfig
from .model import CCSTAE
from .pipeline import assemble_strain, map_block, progress_callback, vacuum_classes
from .prep import PrepConfig, open_prep, preprocess_store
from .preprocess import ring_mask
from .train import Geometry, train_model

__all__ = [
    "geometry_from_prep",
    "save_model",
    "load_model",
    "train_store",
    "map_store",
    "run_store",
]

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
    model.load_state_dict(state)
    model.eval()
    return model, mcfg, tcfg


def train_store(store: str | Path, model_cfg: ModelConfig | None = None,
                train_cfg: TrainConfig | None = None,
                progress: bool | Callable[[dict], None] = False) -> list[dict]:
    """Train on the shuffled shards of ``prep/train``; write ``model/``."""
    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or TrainConfig()
    prep = open_prep(store)
    geom = geometry_from_prep(prep)
    x = np.asarray(prep["train"][...], dtype=np.float32)
    model, history = train_model(x, geom, model_cfg, train_cfg,
                                 progress=progress_callback(progress, train_cfg))
    root = zarr.open_group(str(store), mode="r+", zarr_format=3)
    save_model(root, model, model_cfg, train_cfg, history)
    return history


def map_store(store: str | Path, map_cfg: MapConfig | None = None, client: Any | None = None,
              rows_per_block: int = 8) -> Path:
    """Blockwise inference into ``affine/``, then the ``strain`` group of the store."""
    from .store import _write_group, with_pixel_coords

    map_cfg = map_cfg or MapConfig()
    store = Path(store)
    prep = open_prep(store)
    geom = geometry_from_prep(prep)
    model, mcfg, tcfg = load_model(store)
    ny, nx = prep["patterns"].shape[:2]
    root = zarr.open_group(str(store), mode="r+", zarr_format=3)
    if "affine" in root:
        del root["affine"]
    aff = root.create_group("affine")
    aff.create_array("theta", shape=(ny, nx, 2, 3), dtype="float32",
                     chunks=(rows_per_block, nx, 2, 3), compressors=_CODEC,
                     dimension_names=("scan_y", "scan_x", "i", "j"))
    aff.create_array("phase", shape=(ny, nx), dtype="int16", chunks=(rows_per_block, nx),
                     dimension_names=("scan_y", "scan_x"))
    aff.create_array("residual", shape=(ny, nx), dtype="float32", chunks=(rows_per_block, nx),
                     dimension_names=("scan_y", "scan_x"))
    path = str(store)

    def one(y0: int) -> int:
        y1 = min(y0 + rows_per_block, ny)
        x = np.asarray(zarr.open_array(path, path="prep/patterns", mode="r")[y0:y1])
        th, cls, res = map_block(model, x.reshape(-1, *x.shape[2:]), geom, map_cfg)
        g = zarr.open_group(path, mode="r+", zarr_format=3)["affine"]
        # region writes aligned with the row chunks: blocks never share a chunk
        g["theta"][y0:y1] = th.reshape(y1 - y0, nx, 2, 3)
        g["phase"][y0:y1] = cls.reshape(y1 - y0, nx)
        g["residual"][y0:y1] = res.reshape(y1 - y0, nx)
        return y1 - y0

    t0 = time.perf_counter()
    starts = list(range(0, ny, rows_per_block))
    if client is not None:
        client.gather(client.map(one, starts, pure=False))
    else:
        for y0 in starts:
            one(y0)
    dt = time.perf_counter() - t0
    aff.attrs.update({"map_config": map_cfg.to_dict(), "elapsed_s": dt,
                      "patterns_per_s": ny * nx / dt, "complete": True})
    vac = vacuum_classes(model.dictionary().detach().numpy(), geom.ring)
    ds = assemble_strain(aff["theta"][...], aff["phase"][...], aff["residual"][...], vac,
                         map_cfg, attrs={
                             "model_config": mcfg.to_json(), "train_config": tcfg.to_json(),
                             "prep_config": json.dumps(prep.attrs["config"]),
                             "geometry": json.dumps(geom.to_dict()),
                             "final_loss": float(np.mean(root["model"].attrs["loss"][-10:])),
                             "map_patterns_per_s": ny * nx / dt,
                         })
    if "strain" in root:
        del root["strain"]
    _write_group(with_pixel_coords(ds), store)
    return store


def _sibling(p: Path, tag: str) -> Path:
    return p.with_name(f".{p.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


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
    if os.path.lexists(out):
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        old = _sibling(out, "old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    return out
