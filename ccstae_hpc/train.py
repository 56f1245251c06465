"""Training CC-ST-AE: one loop for a single process and for DDP ranks, with checkpoints.

Data order
----------
The training set is a list of shards (the chunks of ``prep/train``; an in-memory array is one
shard).  Rank ``r`` of ``W`` holds shards ``r, r + W, ...`` (one rank holds all).  In epoch
``e`` every shard ``k`` contributes a quota proportional to its size, in the order
``default_rng((seed, e, k)).permutation``, and global step ``s`` takes the ``s``-th of the
epoch's equal slices of every quota.  The global batch is therefore the same set of patterns
for any number of ranks (each rank supplies the slices of its own shards), and a resumed run
replays the order from ``(seed, epoch, step)`` alone.  Each rank's loss is weighted by its
share of the global batch, so that DDP's gradient average equals the gradient of the global
batch mean: ``W`` ranks with ``B / W`` patterns each step like one rank with ``B``.

Initialisation
--------------
k-means starting classes (radial descriptors gathered on rank 0, labels broadcast), class
means (summed over ranks) and the loss normalisation (probe losses summed over ranks) come
out the same for any number of ranks; rank 0's values are broadcast so every rank starts
from identical weights.

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
(:func:`ccstae_hpc.workflow.load_model` reads them).
"""

from __future__ import annotations

import json
import math
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from . import __version__
from .config import ModelConfig, TrainConfig, _check, _Config
from .ddp import Comm, DistEnv, device_for, process_group
from .model import CCSTAE, cycle_loss, radial_features
from .preprocess import central_disk, disk_mask, kmeans, ring_mask

__all__ = [
    "TrainError",
    "Geometry",
    "estimate_geometry",
    "initial_classes",
    "class_masks",
    "train_model",
    "CheckpointConfig",
    "TrainData",
    "EpochPlan",
    "epoch_plan",
    "fit",
    "read_shards",
    "read_checkpoint",
    "train_rank",
]

# patterns of the loss-normalisation probe
_PROBE = 512
_SLOTS = ("checkpoint_a", "checkpoint_b")


class TrainError(ValueError):
    """Training cannot start as asked; the message says what to do."""


@dataclass(frozen=True)
class Geometry:
    """Detector geometry derived from the mean pattern."""

    center: tuple[float, float]  # (row, col) of the mean central disk
    radius: float  # central disk radius, px
    ring: np.ndarray = field(repr=False)  # annulus that excludes the central disk

    def to_dict(self) -> dict:
        return {"center": list(self.center), "radius": self.radius}


@dataclass(frozen=True)
class CheckpointConfig(_Config):
    """How often training writes its checkpoint into the store."""

    every: int = 100  # optimiser steps between checkpoints (0: only at the end)

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint every must be >= 0 (0: only at the end)")


def estimate_geometry(mean_pattern: np.ndarray) -> Geometry:
    """Central disk and Bragg annulus from the mean pattern."""
    r, c, rad = central_disk(mean_pattern)
    # leave a margin of one radius for descan drift between probe positions
    ring = ring_mask(mean_pattern.shape, (r, c), r_in=2.0 * rad + 2.0)
    return Geometry((r, c), rad, ring)


def _descriptors(x: np.ndarray, geom: Geometry) -> np.ndarray:
    """Radial descriptors (:func:`ccstae_hpc.model.radial_features`) of ``x``, 1024 at a time."""
    center = torch.tensor(geom.center, dtype=torch.float32)
    r_in = int(2 * geom.radius + 2)
    feats = [
        radial_features(torch.from_numpy(np.ascontiguousarray(x[i:i + 1024], np.float32)),
                        center, geom.radius, r_in).numpy()
        for i in range(0, len(x), 1024)
    ]
    return np.concatenate(feats)


def initial_classes(x: np.ndarray, geom: Geometry, k: int, seed: int = 0) -> np.ndarray:
    """Data-derived starting classes: k-means on rotation-invariant radial profiles.

    The same descriptor the classifier sees (:func:`ccstae_hpc.model.radial_features`).
    """
    if k == 1:
        return np.zeros(len(x), dtype=np.int64)
    return kmeans(_descriptors(x, geom), k, seed=seed, restarts=10)


def class_masks(dictionary: np.ndarray, ring: np.ndarray, floor: float = 0.25) -> np.ndarray:
    """Loss weights per class ``(K, Q, Q)``: the Bragg-disk mask on a low floor over the ring.

    The floor keeps a disk-free (vacuum) entry from winning by having nothing to compare.
    """
    return np.stack([ring * (floor + (1 - floor) * disk_mask(d, ring)) for d in dictionary])


# ------------------------------------------------------------------------------------ data


@dataclass
class TrainData:
    """The training patterns one rank holds: some shards of the global training set."""

    sizes: tuple[int, ...]  # patterns per shard, every shard of the set
    shards: dict[int, np.ndarray]  # shard id -> (n, Q, Q) patterns held by this rank

    @classmethod
    def from_array(cls, x: np.ndarray) -> TrainData:
        """An in-memory set as a single shard."""
        return cls((len(x),), {0: x})

    @property
    def total(self) -> int:
        return int(sum(self.sizes))

    @property
    def offsets(self) -> np.ndarray:
        """Global index of each shard's first pattern."""
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    @property
    def detector(self) -> int:
        return int(next(iter(self.shards.values())).shape[-1])

    def local(self) -> list[int]:
        return sorted(self.shards)

    def take(self, pieces: Sequence[tuple[int, np.ndarray]]) -> np.ndarray:
        """Patterns ``(n, Q, Q)`` float32 of ``(shard, local indices)`` pieces, in order."""
        parts = [self.shards[k][idx] for k, idx in pieces if len(idx)]
        if not parts:
            Q = self.detector
            return np.empty((0, Q, Q), np.float32)
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def global_index(self, pieces: Sequence[tuple[int, np.ndarray]]) -> np.ndarray:
        off = self.offsets
        return np.concatenate([off[k] + idx for k, idx in pieces] or [np.empty(0, np.int64)])


def shard_sizes(n: int, shard: int) -> tuple[int, ...]:
    """Sizes of the ``ceil(n / shard)`` shards of ``n`` patterns."""
    return tuple(min(shard, n - s) for s in range(0, n, shard))


def train_input(x: np.ndarray, scale: np.ndarray | None, bg: torch.Tensor | None
                ) -> torch.Tensor:
    """Model input (float32) of patterns of ``prep/train``: counts * ``train_scale`` -
    background (:func:`ccstae_hpc.prep.normalised`); float16 shards (float data) are stored
    scaled already."""
    t = torch.from_numpy(np.asarray(x).astype(np.float32))
    if scale is not None and x.dtype != np.float16:
        t *= torch.from_numpy(np.asarray(scale))[:, None, None]
    if bg is not None:
        t -= bg
    return t


def read_shards(store: str | Path, rank: int = 0, world: int = 1) -> TrainData:
    """Rank ``rank``'s shards of ``prep/train`` (shards ``rank, rank + world, ...``).

    Shards are the array's chunks along the pattern axis, so every read is whole chunks.
    Shards of counts are normalised with ``prep/train_scale`` and ``prep/background`` is
    subtracted (:func:`ccstae_hpc.prep.normalised`); patterns stay float16 in memory
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


def _apportion(total: int, sizes: Sequence[int]) -> np.ndarray:
    """Split ``total`` over shards in proportion to their sizes (largest remainders, exact)."""
    s = np.asarray(sizes, np.int64)
    q, rem = np.divmod(total * s, s.sum())
    extra = total - int(q.sum())
    q[np.argsort(-rem, kind="stable")[:extra]] += 1
    return q


@dataclass(frozen=True)
class EpochPlan:
    """Which patterns every global step of one epoch uses (see the module docstring)."""

    steps: int
    quotas: np.ndarray  # patterns used per shard this epoch, every shard
    orders: dict[int, np.ndarray]  # shard id -> ordered local indices, held shards only

    def batch_size(self, s: int) -> int:
        """Size of the global batch of step ``s`` (all ranks together)."""
        q = self.quotas
        return int(((s + 1) * q // self.steps - s * q // self.steps).sum())

    def pieces(self, s: int) -> list[tuple[int, np.ndarray]]:
        """This rank's ``(shard, local indices)`` of step ``s``."""
        out = []
        for k, order in sorted(self.orders.items()):
            q = len(order)
            out.append((k, order[s * q // self.steps:(s + 1) * q // self.steps]))
        return out


def steps_per_epoch(n: int, cfg: TrainConfig) -> int:
    return max(1, min(n, cfg.max_patterns) // cfg.batch_size)


def epoch_plan(sizes: Sequence[int], cfg: TrainConfig, epoch: int,
               shards: Iterable[int]) -> EpochPlan:
    """The epoch's sample order for the shards ``shards``; a function of the seed and epoch."""
    n = int(sum(sizes))
    steps = steps_per_epoch(n, cfg)
    quotas = _apportion(min(n, steps * cfg.batch_size), sizes)
    orders = {k: np.random.default_rng((cfg.seed, epoch, k)).permutation(sizes[k])[:quotas[k]]
              for k in shards}
    return EpochPlan(steps, quotas, orders)


# -------------------------------------------------------------------------------- training


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence((seed, step, rank)).generate_state(1)[0])


def _initial_state(
    data: TrainData, geom: Geometry, model_cfg: ModelConfig, train_cfg: TrainConfig,
    comm: Comm, labels0: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Global starting classes ``(N,)`` and starting dictionary ``(K, Q, Q)``, as on rank 0."""
    K, N, Q = model_cfg.num_base, data.total, data.detector
    off = data.offsets
    if labels0 is None:
        if K == 1:
            labels0 = np.zeros(N, np.int64)
        else:
            feats = comm.gather_objects({k: _descriptors(data.shards[k], geom)
                                         for k in data.local()})
            labels0 = None
            if comm.rank == 0:
                merged = {k: f for d in feats for k, f in d.items()}
                allf = np.concatenate([merged[k] for k in range(len(data.sizes))])
                labels0 = kmeans(allf, K, seed=train_cfg.seed, restarts=10)
            labels0 = comm.broadcast_object(labels0)
    labels0 = np.asarray(labels0, np.int64)
    # class means summed over ranks in float64; empty classes fall back to the overall mean
    acc = np.zeros((K + 1, Q, Q))
    cnt = np.zeros(K + 1)
    for k in data.local():
        x = data.shards[k]
        lab = labels0[off[k]:off[k] + len(x)]
        for i in range(0, len(x), 1024):
            xb = np.asarray(x[i:i + 1024], np.float64)
            lb = lab[i:i + 1024]
            for j in range(K):
                sel = lb == j
                acc[j] += xb[sel].sum(0)
                cnt[j] += sel.sum()
            acc[K] += xb.sum(0)
            cnt[K] += len(xb)
    acc = comm.allreduce_sum(acc)
    cnt = comm.allreduce_sum(cnt)
    init = np.stack([acc[j] / cnt[j] if cnt[j] > 0 else acc[K] / cnt[K] for j in range(K)])
    init = comm.broadcast(init.astype(np.float32))
    return labels0, init


def _loss_scale(model: CCSTAE, data: TrainData, labels0: np.ndarray, masks: torch.Tensor,
                cfg: TrainConfig, comm: Comm, device: torch.device) -> float:
    """Mean cycle loss of the starting model on a fixed probe of patterns, over all ranks.

    The cycle loss scales with the Poisson noise (1/dose in normalised units); dividing by
    its value at the start makes the loss, and its balance with the class anchor, the same
    at every dose.
    """
    N = data.total
    probe = np.random.default_rng(cfg.seed).choice(N, min(N, _PROBE), replace=False)
    off = data.offsets
    pieces = []
    for k in data.local():
        sel = probe[(probe >= off[k]) & (probe < off[k] + data.sizes[k])] - off[k]
        pieces.append((k, np.sort(sel)))
    tot = np.zeros(2)
    x = data.take(pieces)
    if len(x):
        with torch.no_grad():
            lab = torch.from_numpy(labels0[data.global_index(pieces)]).to(device)
            xt = torch.from_numpy(x).to(device)
            _, parts = cycle_loss(xt, model(xt), masks[lab].unsqueeze(1))
            tot[:] = float(parts["per_pattern"].double().sum()), len(x)
    tot = comm.allreduce_sum(tot)
    scale = comm.broadcast(np.array([max(tot[0] / tot[1], 1e-12)]))
    return float(scale[0])


def _progress_bar(total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="train", dynamic_ncols=True,
                mininterval=0.5)


def fit(
    data: TrainData,
    geom: Geometry,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    comm: Comm | None = None,
    labels0: np.ndarray | None = None,
    progress: bool | Callable[[dict], None] | None = None,
    resume: dict | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
) -> tuple[CCSTAE, list[dict]]:
    """Train CC-ST-AE on this rank's shards ``data``; every rank returns the same model.

    Parameters
    ----------
    data : this rank's shards of the training set.
    geom : detector geometry.
    comm : collectives of the job (single process when None).
    labels0 : global starting classes ``(N,)`` (k-means when None).
    progress : rank 0 only: True shows a tqdm bar; a callable receives each step's record.
    resume : a state from :func:`read_checkpoint` to continue from.
    checkpoint : rank 0 only: called with the training state to persist.
    checkpoint_every : steps between ``checkpoint`` calls (0: only at the end).

    Returns
    -------
    The trained model (on the CPU, eval mode) and the loss curve (one record per step).
    """
    comm = comm or Comm(DistEnv(), torch.device("cpu"))
    device = comm.device
    main = comm.rank == 0
    N = data.total
    if not data.shards:
        raise ValueError(f"rank {comm.rank} holds no training shard")
    steps = steps_per_epoch(N, train_cfg)
    epochs = train_cfg.epochs_for(steps)
    total = steps * epochs

    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    model = CCSTAE(model_cfg, data.detector, geom.center, geom.radius)
    if resume is None:
        labels0, init = _initial_state(data, geom, model_cfg, train_cfg, comm, labels0)
        model.init_dictionary(torch.from_numpy(init))
        masks_np = class_masks(init, geom.ring)
    else:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in resume["weights"].items()})
        labels0, masks_np = resume["labels0"], resume["masks"]
    model.to(device)
    masks = torch.from_numpy(masks_np).to(device)
    dict_params = list(model.decoder.parameters())
    other = [p for n, p in model.named_parameters() if not n.startswith("decoder")]
    opt = torch.optim.Adam(
        [{"params": other, "lr": train_cfg.lr}, {"params": dict_params, "lr": train_cfg.lr * 5}]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))) * 0.95 + 0.05
    )
    if resume is None:
        loss_scale = _loss_scale(model, data, labels0, masks, train_cfg, comm, device)
        history: list[dict] = []
        step, epoch0, s0 = 0, 0, 0
    else:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        loss_scale = float(resume["loss_scale"])
        history = list(resume["history"])
        step, epoch0, s0 = int(resume["step"]), int(resume["epoch"]), int(resume["step_in_epoch"])
    lab_all = torch.from_numpy(np.asarray(labels0, np.int64))

    net: torch.nn.Module = model
    if comm.world > 1:
        # DDP also broadcasts rank 0's parameters here: all ranks start identical
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = device.type == "cuda"  # bf16 autocast on GPUs only; CPU runs stay float32

    def state(epoch: int, s: int) -> dict:
        return {
            "weights": {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "step": step, "epoch": epoch, "step_in_epoch": s, "loss_scale": loss_scale,
            "labels0": np.asarray(labels0), "masks": masks.cpu().numpy(),
            "history": list(history),
        }

    bar = _progress_bar(total, step) if main and progress is True else None
    callback = progress if main and callable(progress) else None
    t0, done = time.perf_counter(), 0
    try:
        for epoch in range(epoch0, epochs):
            plan = epoch_plan(data.sizes, train_cfg, epoch, data.local())
            for s in range(s0 if epoch == epoch0 else 0, plan.steps):
                torch.manual_seed(_step_seed(train_cfg.seed, step, comm.rank))
                pieces = plan.pieces(s)
                n_glob = plan.batch_size(s)
                x = data.take(pieces)
                idx = torch.from_numpy(data.global_index(pieces))
                n_loc = len(x)
                if n_loc == 0:
                    # this rank has nothing this step but must join the gradient all-reduce:
                    # one pattern with zero weight
                    k = data.local()[0]
                    x, idx = data.take([(k, np.array([0]))]), torch.tensor([data.offsets[k]])
                xb = torch.from_numpy(x).to(device)
                lab = lab_all[idx].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = net(xb)
                    m = masks[out["onehot"].argmax(-1)].unsqueeze(1)
                    loss, parts = cycle_loss(xb, out, m)
                    loss = loss / loss_scale
                    # anchor the top-1 classifier to the data-derived classes: without it the
                    # straight-through code drifts and merges phases whose lattices differ by
                    # a few percent (the affine head can absorb that as scale)
                    loss = loss + train_cfg.class_anchor * F.cross_entropy(out["logits"], lab)
                    # the original's penalty on scale and shear beyond 3%: keeps one
                    # dictionary entry per lattice instead of one stretched over several
                    pr = out["params"]
                    excess = torch.relu((pr[:, :2] - 1).abs() - 0.03).sum(1) + torch.relu(
                        pr[:, 2].abs() - 0.03)
                    loss = loss + 10.0 * (excess**2).mean()
                # DDP averages gradients over ranks: weighting each rank's batch mean by its
                # share of the global batch makes that the gradient of the global mean
                weight = comm.world * n_loc / n_glob
                opt.zero_grad(set_to_none=True)
                (loss * weight if weight != 1.0 else loss).backward()
                opt.step()
                sched.step()
                step += 1
                done += n_glob
                value = float(loss.detach())
                if comm.world > 1:
                    value = float(comm.allreduce_sum(np.array([value * n_loc]))[0] / n_glob)
                rec = {"step": step, "epoch": epoch, "epochs": epochs, "loss": value,
                       "patterns_per_s": done / (time.perf_counter() - t0)}
                history.append(rec)
                last = s + 1 == plan.steps
                if last:
                    # the masks follow the dictionary once per epoch (identical on all ranks)
                    with torch.no_grad():
                        masks = torch.from_numpy(class_masks(
                            model.dictionary().detach().cpu().numpy(), geom.ring)).to(device)
                due = checkpoint_every > 0 and step % checkpoint_every == 0
                if main and checkpoint is not None and (due or step == total):
                    checkpoint(state(epoch + 1, 0) if last else state(epoch, s + 1))
                if bar is not None:
                    bar.set_postfix(loss=f"{value:.4g}",
                                    patterns_per_s=f"{rec['patterns_per_s']:.0f}")
                    bar.update(1)
                if callback is not None:
                    callback(rec)
    finally:
        if bar is not None:
            bar.close()
    model.cpu().eval()
    return model, history


def train_model(
    x: np.ndarray,
    geom: Geometry,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    labels0: np.ndarray | None = None,
    progress: Callable[[dict], None] | None = None,
) -> tuple[CCSTAE, list[dict]]:
    """Train CC-ST-AE on normalised patterns ``x`` ``(N, Q, Q)`` in this process.

    The dictionary starts from the class means of ``labels0`` (k-means classes when None)
    and the classifier is regularised toward those classes.
    """
    return fit(TrainData.from_array(x), geom, model_cfg, train_cfg, labels0=labels0,
               progress=progress)


# ------------------------------------------------------------------------- store: checkpoints


def _open(store: str | Path, mode: str = "r") -> zarr.Group:
    # never the consolidated block: it is stale while training rewrites model/
    return zarr.open_group(str(store), mode=mode, zarr_format=3, use_consolidated=False)


def prep_identity(store: str | Path) -> dict:
    """What a checkpoint must agree with to be resumed: the training set's layout and origin."""
    prep = _open(store)["prep"]
    t = prep["train"]
    return {"shape": list(t.shape), "chunks": list(t.chunks),
            "prep_config": json.loads(json.dumps(prep.attrs.get("config")))}


def _write_tree(g: zarr.Group, name: str, arrays: dict[str, np.ndarray]) -> None:
    """One array per entry (what :func:`ccstae_hpc.workflow.load_model` reads)."""
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


def _read_packed(g: zarr.Group) -> dict[str, np.ndarray]:
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
    """Rank 0's writer of ``model/``: alternating checkpoint slots, then the final model."""

    def __init__(self, store: str | Path, meta: dict, fresh: bool) -> None:
        self.path = str(store)
        self.meta = meta
        self.fresh = fresh  # replace model/ on the first write (a new run)
        self.slot = 0

    def _group(self) -> zarr.Group:
        root = _open(self.path, "r+")
        if self.fresh:
            if "model" in root:
                del root["model"]
            g = root.create_group("model")
            g.attrs.update({**self.meta, "complete": False})
            self.fresh = False
            # readers of the consolidated block must not see the replaced model as complete
            _reconsolidate(self.path)
            return g
        return root["model"]

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
        c.attrs.update({**pos, "loss_scale": float(st["loss_scale"]),
                        "optimizer": _jsonable(opt_meta),
                        "scheduler": _jsonable(st["scheduler"])})
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
        _reconsolidate(self.path)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                 else None))


def _reconsolidate(path: str) -> None:
    """Refresh the root's consolidated metadata if a previous stage wrote one."""
    try:
        has = zarr.open_group(path, mode="r", zarr_format=3).metadata.consolidated_metadata
    except (KeyError, ValueError, FileNotFoundError):
        return
    if has is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata",
                                    category=UserWarning)
            zarr.consolidate_metadata(path, zarr_format=3)


def read_checkpoint(store: str | Path) -> dict | None:
    """The last checkpoint of an incomplete training run in ``STORE/model``, else None.

    Returns the training state (as passed to the checkpoint writer) plus ``meta``, the
    ``model`` attrs (configs, prep identity).
    """
    root = _open(store)
    if "model" not in root:
        return None
    g = root["model"]
    attrs = dict(g.attrs)
    ptr = attrs.get("checkpoint")
    if attrs.get("complete") or not ptr or ptr.get("slot") not in g:
        return None
    c = g[ptr["slot"]]
    h = np.asarray(c["history"][...])
    return {
        "weights": _read_packed(c["weights"]),
        "optimizer": _optimizer_state(_read_packed(c["optimizer"]), c.attrs["optimizer"]),
        "scheduler": dict(c.attrs["scheduler"]),
        "step": c.attrs["step"], "epoch": c.attrs["epoch"],
        "step_in_epoch": c.attrs["step_in_epoch"], "loss_scale": c.attrs["loss_scale"],
        "labels0": np.asarray(c["labels0"][...]), "masks": np.asarray(c["masks"][...]),
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


def train_rank(
    env: DistEnv,
    store: str | Path,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    *,
    checkpoint: CheckpointConfig | None = None,
    restart: bool = False,
    progress: bool | Callable[[dict], None] = False,
) -> list[dict]:
    """One rank of store-based training (single process, Dask rank or ``--launcher env``).

    Reads this rank's shards of ``prep/train``, resumes an incomplete checkpoint in
    ``model/`` unless ``restart``, trains, and (rank 0) writes checkpoints and the final
    model.  Returns the loss curve on rank 0 and ``[]`` elsewhere.
    """
    # imported here: workflow imports this module
    from .prep import open_prep
    from .workflow import geometry_from_prep

    ckpt_cfg = checkpoint or CheckpointConfig()
    device = device_for(env.local_rank)
    with process_group(env, device):
        comm = Comm(env, device)
        geom = geometry_from_prep(open_prep(store))
        ident = prep_identity(store)
        ck = None if restart else read_checkpoint(store)
        ck, model_cfg, train_cfg = _resolve(ck, model_cfg, train_cfg, ident, store)
        data = read_shards(store, env.rank, env.world_size)
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
        model, history = fit(data, geom, model_cfg, train_cfg, comm=comm,
                             progress=progress if env.is_main else None, resume=ck,
                             checkpoint=writer, checkpoint_every=ckpt_cfg.every)
        if writer is not None:
            writer.final(model, history, {"world_size": env.world_size,
                                          "device": device.type,
                                          "elapsed_s": time.perf_counter() - t0,
                                          "resumed_from_step": int(ck["step"]) if ck else 0})
        comm.barrier()  # the model is complete before any rank returns
    return history if env.is_main else []
