"""Training stage: ``prep/train`` -> ``model/`` of a store, on one process or DDP ranks.

The loop itself is :func:`ccstae_hpc.core.training.fit`; this module reads each rank's
shards, resumes and writes checkpoints, and writes the trained model.

Checkpoints
-----------
Rank 0 writes ``model/checkpoint_a`` or ``model/checkpoint_b`` (alternately, so a kill while
writing leaves the other intact) every ``CheckpointConfig.every`` steps and at the end:
``weights`` and ``optimizer`` (Adam's moments; tensors packed into one flat array per dtype
with the layout in the attrs, since every Zarr array costs tens of ms to create), the
starting classes ``labels0``, the loss ``masks``, the loss curve ``history``, and in the
attrs the step, epoch and step within the epoch (the data position), the loss
normalisation, Adam's scalars and param groups and the scheduler.  The ``model`` attrs hold
the configs and the prep identity and point at the last complete slot.
The torch RNG is reseeded from ``(seed, step, rank)`` every step, so there is no RNG state to
carry over.  ``model/weights`` and ``model/dictionary`` are written once training completes
(:func:`load_model` reads them).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ccstae_hpc import __version__
from ccstae_hpc.core.config import Config, ModelConfig, TrainConfig, check
from ccstae_hpc.core.model import CCSTAE
from ccstae_hpc.core.training import TrainData, fit, shard_sizes, train_input
from ccstae_hpc.runtime.ddp import (
    Comm,
    DistEnv,
    device_for,
    env_from_environ,
    process_group,
    run_on_dask,
)
from ccstae_hpc.runtime.memory import keep_work_memory
from ccstae_hpc.runtime.threads import settle_torch_threads
from ccstae_hpc.stages.lock import held_lock_token, store_lock
from ccstae_hpc.stages.prep import open_prep, prep_geometry
from ccstae_hpc.stages.store import check_stage, commit, discard_staging, open_root, staging

__all__ = [
    "TrainError",
    "NonFiniteTrainingError",
    "CheckpointConfig",
    "read_shards",
    "read_checkpoint",
    "read_packed",
    "train_rank",
    "train_store",
    "load_model",
]

_SLOTS = ("checkpoint_a", "checkpoint_b")
MODEL = "model"
# the model being trained: its checkpoints, until the final weights are committed as model/
STAGED = staging(MODEL)


class TrainError(ValueError):
    """Training cannot start as asked, or diverged; the message says what to do."""


class NonFiniteTrainingError(TrainError):
    """NaN/Inf in the training set, or a training that diverged to NaN/Inf.

    A subclass, so that callers that start over on a TrainError (a checkpoint of other
    settings: ``flows.tasks``) do not retrain for nothing: a restart would only repeat it.
    """


@dataclass(frozen=True)
class CheckpointConfig(Config):
    """How often training writes its checkpoint into the store."""

    every: int = 100  # optimiser steps between checkpoints (0: only at the end)

    def __post_init__(self) -> None:
        check(self.every >= 0, "checkpoint every must be >= 0 (0: only at the end)")


def read_shards(store: str | Path, rank: int = 0, world: int = 1) -> TrainData:
    """Rank ``rank``'s shards of ``prep/train`` (shards ``rank, rank + world, ...``).

    Shards are the array's chunks along the pattern axis, so every read is whole chunks.
    Shards of counts are normalised with ``prep/train_scale`` and ``prep/background`` is
    subtracted (:func:`ccstae_hpc.core.patterns.normalised`); patterns stay float16 in memory
    and become float32 one batch at a time.
    """
    g = zarr.open_group(str(store), mode="r")["prep"]
    arr = g["train"]
    n, S = int(arr.shape[0]), int(arr.chunks[0])
    sizes = shard_sizes(n, S)
    if world > len(sizes):
        raise TrainError(
            f"{world} ranks but prep/train has only {len(sizes)} shard(s) of {S} patterns; "
            f"use at most {len(sizes)} ranks or preprocess again with a smaller shard_size")
    scale = g["train_scale"][...] if "train_scale" in g else None
    if scale is not None:  # the whole array on every rank: they all refuse together
        _refuse_non_finite(store, "train_scale", _non_finite_rows(np.asarray(scale)))
    bg = g["background"][...] if "background" in g else None
    bg = torch.from_numpy(bg) if bg is not None and np.any(bg) else None
    shards = {}
    for k in range(rank, len(sizes), world):
        x = np.asarray(arr[k * S:k * S + sizes[k]])
        if (scale is not None and x.dtype != np.float16) or bg is not None:
            # torch converts to float16 ~4x faster
            x = train_input(x, None if scale is None else scale[k * S:k * S + sizes[k]],
                            bg).half().numpy()
        shards[k] = x
    return TrainData(sizes, shards)


def _non_finite_rows(a: np.ndarray) -> int:
    """Patterns (rows) of ``a`` holding NaN/Inf; 0 for integer counts."""
    if a.dtype.kind != "f" or a.size == 0:
        return 0
    return int(len(a) - np.count_nonzero(np.isfinite(a).reshape(len(a), -1).all(axis=1)))


def _refuse_non_finite(store: str | Path, name: str, n_bad: int) -> None:
    """Refuse NaN/Inf in the training set before training (they end as a NaN loss, or in
    an index error deep in the model's input features)."""
    if n_bad:
        raise NonFiniteTrainingError(
            f"{store}/prep/{name} holds NaN/Inf for {n_bad} training pattern(s); nothing was "
            "trained. Check the raw data for NaN/Inf, empty (all-zero) or saturated patterns, "
            f"fix them and run `ccstae preprocess {store} --overwrite` before training")


def prep_identity(store: str | Path) -> dict:
    """What a checkpoint must agree with to be resumed: the training set's layout and origin."""
    prep = open_root(store)["prep"]
    t = prep["train"]
    return {"shape": list(t.shape), "chunks": list(t.chunks),
            "prep_config": json.loads(json.dumps(prep.attrs.get("config")))}


def _write_tree(g: zarr.Group, name: str, arrays: dict[str, np.ndarray]) -> None:
    """One array per entry (what :func:`ccstae_hpc.stages.map.load_model` reads)."""
    sub = g.create_group(name)
    for k, v in arrays.items():
        sub.create_array(k, data=np.ascontiguousarray(v))


def _write_packed(g: zarr.Group, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Many small arrays as one flat array per dtype plus a layout in the attrs.

    Creating a Zarr array costs tens of ms; a checkpoint of ~100 tensors in ~4 arrays
    keeps checkpointing well below a training step.
    """
    sub = g.create_group(name)
    layout, flat = [], {}
    for k, v in arrays.items():
        v = np.ascontiguousarray(v)
        dt = v.dtype.str
        parts = flat.setdefault(dt, [])
        off = sum(p.size for p in parts)
        parts.append(v.ravel())
        layout.append([k, list(v.shape), dt, off])
    for dt, parts in flat.items():
        sub.create_array(dt.strip("<>|="), data=np.concatenate(parts))
    sub.attrs["layout"] = layout


def read_packed(g: zarr.Group) -> dict[str, np.ndarray]:
    flat = {k: np.asarray(g[k][...]) for k in g.array_keys()}
    out = {}
    for k, shape, dt, off in g.attrs["layout"]:
        a = flat[dt.strip("<>|=")]
        n = int(np.prod(shape, dtype=np.int64))
        out[k] = a[off:off + n].reshape(shape).copy()
    return out


def _optimizer_arrays(sd: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Adam's state as arrays ``{i}.{name}`` plus JSON (scalars, param groups)."""
    arrays, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            v = v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
            if v.ndim == 0:
                scalars[f"{i}.{k}"] = [v.item(), str(v.dtype)]
            else:
                arrays[f"{i}.{k}"] = v
    return arrays, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _optimizer_state(arrays: dict[str, np.ndarray], meta: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in arrays.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = torch.from_numpy(v)
    for key, (v, dt) in meta["scalars"].items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = torch.tensor(v, dtype=getattr(torch, dt))
    return {"state": state, "param_groups": meta["param_groups"]}


_HIST = ("step", "epoch", "loss", "patterns_per_s")


class CheckpointWriter:
    """Rank 0's writer of the model being trained (``model.partial``): alternating checkpoint
    slots, then the final weights, committed as ``model/``."""

    def __init__(self, store: str | Path, meta: dict, fresh: bool) -> None:
        self.path = str(store)
        self.meta = meta
        self.fresh = fresh  # replace model/ on the first write (a new run)
        self.slot = 0

    def _group(self) -> zarr.Group:
        if self.fresh:
            discard_staging(self.path, MODEL)
            g = open_root(self.path, "r+").create_group(STAGED)
            g.attrs.update({**self.meta, "complete": False})
            self.fresh = False
            return g
        return open_root(self.path, "r+")[STAGED]

    def __call__(self, st: dict) -> None:
        g = self._group()
        cur = g.attrs.get("checkpoint", {}).get("slot")
        name = _SLOTS[1] if cur == _SLOTS[0] else _SLOTS[0]
        if name in g:
            del g[name]
        c = g.create_group(name)
        _write_packed(c, "weights", st["weights"])
        opt_arrays, opt_meta = _optimizer_arrays(st["optimizer"])
        _write_packed(c, "optimizer", opt_arrays)
        c.create_array("labels0", data=np.asarray(st["labels0"], np.int64))
        c.create_array("masks", data=np.asarray(st["masks"]))
        h = np.array([[r[k] for k in _HIST] for r in st["history"]], np.float64).reshape(-1, 4)
        c.create_array("history", data=h)
        pos = {k: int(st[k]) for k in ("step", "epoch", "step_in_epoch")}
        if st.get("schedule_dictionary") is not None:
            c.create_array("schedule_dictionary", data=np.asarray(st["schedule_dictionary"]))
        c.attrs.update({**pos, "loss_scale": float(st["loss_scale"]),
                        "optimizer": _jsonable(opt_meta),
                        "scheduler": _jsonable(st["scheduler"]),
                        "schedule": _jsonable(st.get("schedule"))})
        # the pointer moves only once the slot is complete: a kill mid-write keeps the other
        g.attrs.update({"checkpoint": {"slot": name, **pos},
                        "loss": [r["loss"] for r in st["history"]]})

    def final(self, model: CCSTAE, history: list[dict], extra: dict) -> None:
        """Write ``model/weights`` and ``model/dictionary`` and mark the model complete."""
        g = self._group()
        for name in ("weights", "dictionary"):
            if name in g:
                del g[name]
        _write_tree(g, "weights", {k: t.detach().cpu().numpy()
                                   for k, t in model.state_dict().items()})
        g.create_array("dictionary", data=model.dictionary().detach().numpy(),
                       dimension_names=("class", "k_y", "k_x"))
        g.attrs.update({
            "loss": [h["loss"] for h in history],
            "epochs_run": history[-1]["epoch"] + 1 if history else 0,
            "patterns_per_s": history[-1]["patterns_per_s"] if history else None,
            **extra, "complete": True,
        })
        commit(self.path, MODEL)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                 else None))


def read_checkpoint(store: str | Path) -> dict | None:
    """The last checkpoint of an interrupted training run (``STORE/model.partial``), else None.

    Returns the training state (as passed to the checkpoint writer) plus ``meta``, the
    ``model`` attrs (configs, prep identity).
    """
    root = open_root(store)
    if STAGED not in root:
        return None
    g = root[STAGED]
    attrs = dict(g.attrs)
    ptr = attrs.get("checkpoint")
    if attrs.get("complete") or not ptr or ptr.get("slot") not in g:
        return None
    c = g[ptr["slot"]]
    h = np.asarray(c["history"][...])
    return {
        "weights": read_packed(c["weights"]),
        "optimizer": _optimizer_state(read_packed(c["optimizer"]), c.attrs["optimizer"]),
        "scheduler": dict(c.attrs["scheduler"]),
        "step": c.attrs["step"], "epoch": c.attrs["epoch"],
        "step_in_epoch": c.attrs["step_in_epoch"], "loss_scale": c.attrs["loss_scale"],
        "labels0": np.asarray(c["labels0"][...]), "masks": np.asarray(c["masks"][...]),
        "schedule": c.attrs.get("schedule"),
        "schedule_dictionary": (np.asarray(c["schedule_dictionary"][...])
                                if "schedule_dictionary" in c else None),
        "history": [{"step": int(r[0]), "epoch": int(r[1]), "loss": float(r[2]),
                     "patterns_per_s": float(r[3])} for r in h],
        "meta": attrs,
    }


def _resolve(ck: dict | None, model_cfg: ModelConfig | None, train_cfg: TrainConfig | None,
             ident: dict, store: str | Path) -> tuple[dict | None, ModelConfig, TrainConfig]:
    """Decide between resuming ``ck`` and a fresh run; the configs to use."""
    if ck is None:
        return None, model_cfg or ModelConfig(), train_cfg or TrainConfig()
    meta = ck["meta"]
    m_ck = ModelConfig.from_dict(meta["model_config"])
    t_ck = TrainConfig.from_dict(meta["train_config"])
    how = f"pass --restart (restart=True) to train {store} from scratch"
    if meta.get("prep_identity") != ident:
        raise TrainError(f"the checkpoint in {store}/model was made from other training data "
                         f"(prep/train changed); {how}")
    for given, saved, what in ((model_cfg, m_ck, "model"), (train_cfg, t_ck, "training")):
        if given is not None and given != saved:
            raise TrainError(f"{store}/model holds a checkpoint with other {what} settings "
                             f"({saved.to_json()}); resume without options or {how}")
    return ck, m_ck, t_ck


def _check_finite(model: CCSTAE, history: list[dict], store: str | Path, lr: float,
                  main: bool) -> None:
    """Refuse to commit a model whose training diverged (loss or weights NaN/Inf).

    Every rank checks (the loss is reduced over the ranks and the weights are identical), so
    all of them raise together; rank 0 discards the staging group, whose checkpoints hold
    the same divergence and would otherwise be resumed by the next run.  ``model/`` itself,
    if one exists, is left as it was.

    Raises
    ------
    NonFiniteTrainingError
        The last loss or a weight is not finite.
    """
    loss = history[-1]["loss"] if history else float("nan")
    bad = [k for k, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if math.isfinite(loss) and not bad:
        return
    if main:
        discard_staging(store, MODEL)
    what = (f"the loss ended at {loss}" if not math.isfinite(loss)
            else f"weights {bad[:3]} hold NaN/Inf")
    raise NonFiniteTrainingError(
        f"training diverged ({what}, step {history[-1]['step'] if history else 0}); nothing "
        f"was written to {store}/model. Check the data for NaN/Inf or saturated "
        "(clipped) detector pixels (`ccstae preprocess --overwrite` after fixing the raw "
        f"data), then train again with a lower learning rate (now {lr:g}: TrainConfig.lr, "
        "or the flows' config {'train': {'lr': ...}})")


class _ProgressBar:
    """A tqdm bar over training steps, fed the loop's records (rank 0)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, rec: dict) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=rec["steps"], initial=rec["step"] - 1, unit="step",
                            desc="train", dynamic_ncols=True, mininterval=0.5)
        self.bar.set_postfix(loss=f"{rec['loss']:.4g}",
                             patterns_per_s=f"{rec['patterns_per_s']:.0f}")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_rank(
    env: DistEnv,
    store: str | Path,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    *,
    checkpoint: CheckpointConfig | None = None,
    restart: bool = False,
    progress: bool | Callable[[dict], None] = False,
    lock_token: str | None = None,
) -> list[dict]:
    """One rank of store-based training (single process, Dask rank or ``--launcher env``).

    Reads this rank's shards of ``prep/train``, resumes an incomplete checkpoint in
    ``model/`` unless ``restart``, trains, and (rank 0) writes checkpoints and the final
    model.  ``lock_token``: the store lock held by the process that started this rank
    (:func:`~ccstae_hpc.stages.lock.held_lock_token`), under which rank 0 commits the model.
    Returns the loss curve on rank 0 and ``[]`` elsewhere.
    """
    keep_work_memory()
    settle_torch_threads()  # the same model from the same store, run after run
    ckpt_cfg = checkpoint or CheckpointConfig()
    device = device_for(env.local_rank)
    with process_group(env, device):
        comm = Comm(env, device)
        geom = prep_geometry(open_prep(store))
        ident = prep_identity(store)
        ck = None if restart else read_checkpoint(store)
        ck, model_cfg, train_cfg = _resolve(ck, model_cfg, train_cfg, ident, store)
        data = read_shards(store, env.rank, env.world_size)
        # each rank sees its own shards: sum the counts so that every rank refuses together
        n_bad = sum(_non_finite_rows(x) for x in data.shards.values())
        _refuse_non_finite(store, "train",
                           int(comm.allreduce_sum(np.array([n_bad], np.float64))[0]))
        # rank 0 may replace model/ once training starts: every rank has read it by now
        comm.barrier()
        writer = None
        if env.is_main:
            meta = {"model_config": model_cfg.to_dict(), "train_config": train_cfg.to_dict(),
                    "checkpoint_config": ckpt_cfg.to_dict(), "detector": data.detector,
                    "prep_identity": ident, "run_id": uuid.uuid4().hex,
                    "ccstae_hpc_version": __version__}
            writer = CheckpointWriter(store, meta, fresh=ck is None)
        t0 = time.perf_counter()
        bar = _ProgressBar() if progress is True and env.is_main else None
        report = bar or (progress if callable(progress) and env.is_main else None)
        try:
            model, history = fit(data, geom, model_cfg, train_cfg, comm=comm, progress=report,
                                 resume=ck, checkpoint=writer, checkpoint_every=ckpt_cfg.every)
        finally:
            if bar is not None:
                bar.close()
        _check_finite(model, history, store, train_cfg.lr, env.is_main)
        if writer is not None:
            # the commit takes the store lock: a Dask worker of an external scheduler is no
            # descendant of the `ccstae train` holding it, so it joins that lock by its token
            with store_lock(store, join=lock_token, log=None):
                writer.final(model, history, {"world_size": env.world_size,
                                              "steps_run": len(history),
                                              "converged_at_step": next(
                                                  (h["step"] for h in history
                                                   if h.get("converged")), None),
                                              "device": device.type,
                                              "elapsed_s": time.perf_counter() - t0,
                                              "resumed_from_step": int(ck["step"]) if ck else 0})
        comm.barrier()  # the model is complete before any rank returns
    return history if env.is_main else []


def train_store(store: str | Path, model_cfg: ModelConfig | None = None,
                train_cfg: TrainConfig | None = None,
                progress: bool | Callable[[dict], None] = False, *,
                client: Any | None = None, launcher: str = "auto", restart: bool = False,
                checkpoint: Any | None = None, overwrite: bool = False) -> list[dict]:
    """Train on the shards of ``prep/train``; write ``model/`` (checkpoints, then weights).

    Checkpoints go to ``model.partial``; the trained model replaces ``model/`` only once
    complete (:mod:`ccstae_hpc.stages.store`).  An interrupted run's checkpoint is resumed
    (its configs are used when none are given; given ones must match) unless ``restart``.

    Parameters
    ----------
    progress : True shows a tqdm bar on rank 0; a callable gets each step's record on rank 0
        (in the worker process under Dask).
    client : a ``distributed.Client``: one DDP rank per worker (``launcher="auto"``).
    launcher : ``"auto"`` (Dask ranks with a client, else this process), ``"single"``,
        ``"dask"``, or ``"env"`` (this process is one rank of a job started by
        srun/torchrun/mpiexec; see :func:`ccstae_hpc.runtime.ddp.env_from_environ`).
    restart : discard an incomplete checkpoint and start over.
    checkpoint : a :class:`CheckpointConfig` (every 100 steps by default).
    overwrite : replace a complete ``model/`` (refused otherwise).

    Returns
    -------
    The loss curve (one record per step) on rank 0; ``[]`` on other ranks.
    """
    open_prep(store)  # fail here, with the message that says what to do
    check_stage(store, MODEL, overwrite)
    kw = {"checkpoint": checkpoint, "restart": restart, "progress": progress}
    if launcher == "auto":
        launcher = "dask" if client is not None else "single"
    if launcher == "dask":
        if client is None:
            raise ValueError("launcher 'dask' needs a distributed.Client")
        # workers resolve the path themselves: make it absolute (shared file system)
        # the ranks run in the workers: rank 0 commits under this process's lock, if any
        return run_on_dask(client, train_rank, str(Path(store).resolve()), model_cfg,
                           train_cfg, lock_token=held_lock_token(store), **kw)[0]
    if launcher == "env":
        return train_rank(env_from_environ(), store, model_cfg, train_cfg, **kw)
    if launcher == "single":
        return train_rank(DistEnv(), store, model_cfg, train_cfg, **kw)
    raise ValueError(f"unknown launcher {launcher!r}; use auto, single, dask or env")


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
