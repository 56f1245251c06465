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

This module is the loop and its data order, with no I/O: the collectives come in as a
``comm`` (:class:`ccstae_hpc.runtime.ddp.Comm`), checkpoints go out through a callback
(:mod:`ccstae_hpc.stages.train` writes them into the store).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ccstae_hpc.core.config import ModelConfig, TrainConfig
from ccstae_hpc.core.geometry import Geometry
from ccstae_hpc.core.model import CCSTAE, cycle_loss, radial_features
from ccstae_hpc.core.patterns import disk_mask, kmeans

__all__ = [
    "Collectives",
    "training_loss",
    "make_optimiser",
    "initial_classes",
    "class_masks",
    "TrainData",
    "EpochPlan",
    "epoch_plan",
    "shard_sizes",
    "steps_per_epoch",
    "train_input",
    "fit",
]

# patterns of the loss-normalisation probe
_PROBE = 512
# the original's penalty on scale and shear: free up to this fraction ...
DEFORMATION_FREE = 0.03
# ... and this weight on the squared excess beyond it
DEFORMATION_PENALTY = 10.0
# the dictionary learns this many times faster than the encoder and the heads
DICTIONARY_LR_FACTOR = 5
# the cosine learning-rate schedule ends at this fraction of the rate
LR_FLOOR = 0.05
# convergence (TrainConfig.epochs None): every CONVERGENCE_WINDOW steps the mean loss of the
# last window is compared with the window before; the curve has converged when it fell by
# less than LOSS_TOL (relative) and the dictionary moved by less than DICTIONARY_TOL
# (relative L2 change over the window).  Then the rate decays (cosine) over
# DECAY_FRACTION of the steps so far (at least CONVERGENCE_WINDOW) and training stops.
# A decay of 0.3 of the steps (not 0.6) gave the same strain MAE within +-2.5 % (96x96 at
# 2e3 e-/pattern: converged at 200 steps, 260 steps instead of 320, 22 s instead of 27 s;
# 48x48 at 1e3 e-, pooled and single-pattern fits) and 0.15 too, so 0.3 keeps a margin
CONVERGENCE_WINDOW = 25
LOSS_TOL = 0.01
DICTIONARY_TOL = 0.01
DECAY_FRACTION = 0.3


class Collectives(Protocol):
    """What the loop needs of the job's process group (:class:`ccstae_hpc.runtime.ddp.Comm`)."""

    device: torch.device

    @property
    def rank(self) -> int: ...

    @property
    def world(self) -> int: ...

    def allreduce_sum(self, a: np.ndarray) -> np.ndarray: ...

    def broadcast(self, a: np.ndarray) -> np.ndarray: ...

    def broadcast_object(self, obj: Any) -> Any: ...

    def gather_objects(self, obj: Any) -> list[Any]: ...


def _descriptors(x: np.ndarray, geom: Geometry) -> np.ndarray:
    """Radial descriptors (:func:`~ccstae_hpc.core.model.radial_features`) of ``x``, in blocks."""
    center = torch.tensor(geom.center, dtype=torch.float32)
    feats = [
        radial_features(torch.from_numpy(np.ascontiguousarray(x[i:i + 1024], np.float32)),
                        center, geom.radius, geom.r_in).numpy()
        for i in range(0, len(x), 1024)
    ]
    return np.concatenate(feats)


def input_features(model: CCSTAE, x: np.ndarray, block: int = 1024
                   ) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`CCSTAE.input_features` of patterns ``x`` ``(N, Q, Q)``, in blocks: central-disk
    centres ``(N, 2)`` and radial profiles.  A function of the input alone, so training
    computes it once per pattern (it cost about an eighth of each step)."""
    cen, rad = [], []
    with torch.no_grad():
        for i in range(0, len(x), block):
            c, r = model.input_features(
                torch.from_numpy(np.ascontiguousarray(x[i:i + block], np.float32)))
            cen.append(c.numpy())
            rad.append(r.numpy())
    return np.concatenate(cen), np.concatenate(rad)


def initial_classes(x: np.ndarray, geom: Geometry, k: int, seed: int = 0) -> np.ndarray:
    """Data-derived starting classes: k-means on rotation-invariant radial profiles.

    The same descriptor the classifier sees (:func:`ccstae_hpc.core.model.radial_features`).
    """
    if k == 1:
        return np.zeros(len(x), dtype=np.int64)
    return kmeans(_descriptors(x, geom), k, seed=seed, restarts=10)


def class_masks(dictionary: np.ndarray, ring: np.ndarray, floor: float = 0.25) -> np.ndarray:
    """Loss weights per class ``(K, Q, Q)``: the Bragg-disk mask on a low floor over the ring.

    The floor keeps a disk-free (vacuum) entry from winning by having nothing to compare.
    """
    return np.stack([ring * (floor + (1 - floor) * disk_mask(d, ring)) for d in dictionary])


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
    background (:func:`ccstae_hpc.core.patterns.normalised`); float16 shards (float data) are stored
    scaled already."""
    t = torch.from_numpy(np.asarray(x).astype(np.float32))
    if scale is not None and x.dtype != np.float16:
        t *= torch.from_numpy(np.asarray(scale))[:, None, None]
    if bg is not None:
        t -= bg
    return t


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


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence((seed, step, rank)).generate_state(1)[0])


def _initial_state(
    data: TrainData, feats: dict[int, tuple[np.ndarray, np.ndarray]], model_cfg: ModelConfig,
    train_cfg: TrainConfig, comm: Collectives, labels0: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Global starting classes ``(N,)`` and starting dictionary ``(K, Q, Q)``, as on rank 0.

    ``feats``: :func:`input_features` of this rank's shards (k-means runs on the radial
    profiles, the descriptor the classifier sees)."""
    K, N, Q = model_cfg.num_base, data.total, data.detector
    off = data.offsets
    if labels0 is None:
        if K == 1:
            labels0 = np.zeros(N, np.int64)
        else:
            gathered = comm.gather_objects({k: feats[k][1] for k in data.local()})
            labels0 = None
            if comm.rank == 0:
                merged = {k: f for d in gathered for k, f in d.items()}
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
            xb = np.asarray(x[i:i + 1024], np.float64).reshape(-1, Q * Q)
            onehot = np.eye(K + 1)[lab[i:i + 1024]]
            onehot[:, K] = 1.0  # the last row sums every pattern
            acc += (onehot.T @ xb).reshape(K + 1, Q, Q)
            cnt += onehot.sum(0)
    acc = comm.allreduce_sum(acc)
    cnt = comm.allreduce_sum(cnt)
    init = np.stack([acc[j] / cnt[j] if cnt[j] > 0 else acc[K] / cnt[K] for j in range(K)])
    init = comm.broadcast(init.astype(np.float32))
    return labels0, init


def _loss_scale(model: CCSTAE, data: TrainData, labels0: np.ndarray, masks: torch.Tensor,
                cfg: TrainConfig, comm: Collectives, device: torch.device) -> float:
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


def _batch(data: TrainData, feats: dict[int, tuple[np.ndarray, np.ndarray]],
           pieces: Sequence[tuple[int, np.ndarray]]
           ) -> tuple[np.ndarray, torch.Tensor, int, tuple[np.ndarray, np.ndarray]]:
    """This rank's patterns of one step, their global indices, their count and their
    :func:`input_features`.

    A rank with nothing this step must still join the gradient all-reduce: it gets one
    pattern and a count of 0 (zero weight).
    """
    n_loc = sum(len(idx) for _, idx in pieces)
    if n_loc == 0:
        k = data.local()[0]
        pieces = [(k, np.array([0]))]
    x = data.take(pieces)
    idx = torch.from_numpy(data.global_index(pieces))
    fb = tuple(np.concatenate([feats[k][j][i] for k, i in pieces if len(i)]) for j in (0, 1))
    return x, idx, n_loc, fb


def training_loss(out: dict, xb: torch.Tensor, lab: torch.Tensor, masks: torch.Tensor,
          loss_scale: float, class_anchor: float) -> torch.Tensor:
    """The training objective of one batch: the normalised cycle loss, the class anchor and
    the penalty on scale and shear."""
    m = masks[out["onehot"].argmax(-1)].unsqueeze(1)
    loss, _ = cycle_loss(xb, out, m)
    loss = loss / loss_scale
    # anchor the top-1 classifier to the data-derived classes: without it the
    # straight-through code drifts and merges phases whose lattices differ by
    # a few percent (the affine head can absorb that as scale)
    loss = loss + class_anchor * F.cross_entropy(out["logits"], lab)
    # the original's penalty on scale and shear (DEFORMATION_FREE): keeps one
    # dictionary entry per lattice instead of one stretched over several
    pr = out["params"]
    excess = (torch.relu((pr[:, :2] - 1).abs() - DEFORMATION_FREE).sum(1)
              + torch.relu(pr[:, 2].abs() - DEFORMATION_FREE))
    return loss + DEFORMATION_PENALTY * (excess**2).mean()


class Schedule:
    """Learning-rate factor and stopping: a cosine decay to LR_FLOOR from ``decay_start``
    over ``decay_len`` steps, then stop.

    With a fixed epoch count the decay spans the whole run (``decay_start`` 0).  Otherwise
    the rate stays constant until the loss curve and the dictionary have converged (see
    CONVERGENCE_WINDOW), and ``cap`` steps at most: the decay then starts so as to end at
    ``cap``.  The decision uses only the loss curve (identical on every rank) and the
    dictionary (identical under DDP), so every rank stops at the same step.
    """

    def __init__(self, cap: int, fixed: bool, min_steps: int) -> None:
        self.cap, self.min_steps = cap, min_steps
        self.decay_start: int | None = 0 if fixed else None
        self.decay_len = cap
        self.converged_at: int | None = None
        self._dictionary: np.ndarray | None = None

    def factor(self, step: int) -> float:
        if self.decay_start is None:
            return 1.0
        f = min(max(step - self.decay_start, 0) / max(self.decay_len, 1), 1.0)
        return 0.5 * (1 + math.cos(math.pi * f)) * (1 - LR_FLOOR) + LR_FLOOR

    @property
    def end(self) -> int:
        """The step training ends at, as far as decided: the cap until the decay starts."""
        if self.decay_start is None:
            return self.cap
        return min(self.cap, self.decay_start + self.decay_len)

    def done(self, step: int) -> bool:
        return step >= self.end

    def update(self, step: int, losses: Sequence[float], dictionary: Callable[[], np.ndarray]
               ) -> None:
        """After optimiser step ``step``: start the decay once converged (or to end at cap)."""
        if self.decay_start is not None:
            return
        w = CONVERGENCE_WINDOW
        decay = max(w, int(DECAY_FRACTION * step))
        if step + decay >= self.cap:  # no convergence in time: decay to end at the cap
            self.decay_start, self.decay_len = step, self.cap - step
            return
        if step % w:
            return
        d = dictionary()
        moved = (np.inf if self._dictionary is None else
                 float(np.linalg.norm(d - self._dictionary) / max(np.linalg.norm(d), 1e-12)))
        self._dictionary = d
        if step < max(2 * w, self.min_steps) or len(losses) < 2 * w:
            return
        cur = float(np.mean(losses[-w:]))
        prev = float(np.mean(losses[-2 * w:-w]))
        if (prev - cur) < LOSS_TOL * abs(cur) and moved < DICTIONARY_TOL:
            self.converged_at = step
            self.decay_start, self.decay_len = step, decay

    def state(self) -> dict:
        """JSON-able state (the last window's dictionary travels as ``dictionary``)."""
        return {"decay_start": self.decay_start, "decay_len": self.decay_len,
                "converged_at": self.converged_at, "cap": self.cap}

    def load(self, st: dict, dictionary: np.ndarray | None) -> None:
        self.decay_start, self.decay_len = st["decay_start"], st["decay_len"]
        self.converged_at, self.cap = st.get("converged_at"), st.get("cap", self.cap)
        self._dictionary = dictionary

    @property
    def last_dictionary(self) -> np.ndarray | None:
        return self._dictionary


def make_optimiser(model: CCSTAE, cfg: TrainConfig, schedule: Schedule
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Adam (the dictionary at DICTIONARY_LR_FACTOR x the rate), the rate set by
    ``schedule``."""
    dict_params = list(model.decoder.parameters())
    other = [p for n, p in model.named_parameters() if not n.startswith("decoder")]
    opt = torch.optim.Adam([{"params": other, "lr": cfg.lr},
                            {"params": dict_params, "lr": cfg.lr * DICTIONARY_LR_FACTOR}])
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule.factor)


def _resume(resume: dict, opt: torch.optim.Optimizer, sched: Any
            ) -> tuple[float, list[dict], tuple[int, int, int]]:
    """Load a checkpoint's optimiser and schedule; its loss scale, history and position."""
    opt.load_state_dict(resume["optimizer"])
    sched.load_state_dict(resume["scheduler"])
    pos = (int(resume["step"]), int(resume["epoch"]), int(resume["step_in_epoch"]))
    return float(resume["loss_scale"]), list(resume["history"]), pos


def fit(
    data: TrainData,
    geom: Geometry,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    comm: Collectives,
    labels0: np.ndarray | None = None,
    progress: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
) -> tuple[CCSTAE, list[dict]]:
    """Train CC-ST-AE on this rank's shards ``data``; every rank returns the same model.

    Parameters
    ----------
    data : this rank's shards of the training set.
    geom : detector geometry.
    comm : collectives of the job (:class:`ccstae_hpc.runtime.ddp.Comm`, also for one process).
    labels0 : global starting classes ``(N,)`` (k-means when None).
    progress : rank 0 only: called with each step's record (``steps`` is the total).
    resume : a state from :func:`read_checkpoint` to continue from.
    checkpoint : rank 0 only: called with the training state to persist.
    checkpoint_every : steps between ``checkpoint`` calls (0: only at the end).

    Returns
    -------
    The trained model (on the CPU, eval mode) and the loss curve (one record per step).
    """
    device = comm.device
    main = comm.rank == 0
    N = data.total
    if not data.shards:
        raise ValueError(f"rank {comm.rank} holds no training shard")
    steps = steps_per_epoch(N, train_cfg)
    epochs = train_cfg.epochs_for(steps)
    total = steps * epochs  # at most
    schedule = Schedule(total, fixed=train_cfg.epochs is not None, min_steps=train_cfg.min_steps)

    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    model = CCSTAE(model_cfg, data.detector, geom.center, geom.radius)
    feats = {k: input_features(model, data.shards[k]) for k in data.local()}
    if resume is None:
        labels0, init = _initial_state(data, feats, model_cfg, train_cfg, comm, labels0)
        model.init_dictionary(torch.from_numpy(init))
        masks_np = class_masks(init, geom.ring)
    else:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in resume["weights"].items()})
        labels0, masks_np = resume["labels0"], resume["masks"]
    model.to(device)
    masks = torch.from_numpy(masks_np).to(device)
    opt, sched = make_optimiser(model, train_cfg, schedule)
    if resume is None:
        loss_scale = _loss_scale(model, data, labels0, masks, train_cfg, comm, device)
        history: list[dict] = []
        step, epoch0, s0 = 0, 0, 0
    else:
        loss_scale, history, (step, epoch0, s0) = _resume(resume, opt, sched)
        if resume.get("schedule"):
            schedule.load(resume["schedule"], resume.get("schedule_dictionary"))
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
            "history": list(history), "schedule": schedule.state(),
            "schedule_dictionary": schedule.last_dictionary,
        }

    callback = progress if main else None
    t0, done = time.perf_counter(), 0
    for epoch in range(epoch0, epochs):
        if schedule.done(step):
            break
        plan = epoch_plan(data.sizes, train_cfg, epoch, data.local())
        for s in range(s0 if epoch == epoch0 else 0, plan.steps):
            torch.manual_seed(_step_seed(train_cfg.seed, step, comm.rank))
            n_glob = plan.batch_size(s)
            x, idx, n_loc, fb = _batch(data, feats, plan.pieces(s))
            xb = torch.from_numpy(x).to(device)
            fb = tuple(torch.from_numpy(f).to(device) for f in fb)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = training_loss(net(xb, fb), xb, lab_all[idx].to(device), masks,
                                     loss_scale, train_cfg.class_anchor)
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
            rec = {"step": step, "epoch": epoch, "epochs": epochs,
                   "loss": value, "patterns_per_s": done / (time.perf_counter() - t0)}
            history.append(rec)
            last = s + 1 == plan.steps
            if last:
                # the masks follow the dictionary once per epoch (identical on all ranks)
                with torch.no_grad():
                    masks = torch.from_numpy(class_masks(
                        model.dictionary().detach().cpu().numpy(), geom.ring)).to(device)
            schedule.update(step, [h["loss"] for h in history[-2 * CONVERGENCE_WINDOW:]],
                            lambda: model.dictionary().detach().cpu().numpy())
            end = schedule.done(step)
            rec["steps"] = schedule.end
            rec["converged"] = schedule.converged_at == step
            due = checkpoint_every > 0 and step % checkpoint_every == 0
            if main and checkpoint is not None and (due or end):
                checkpoint(state(epoch + 1, 0) if last else state(epoch, s + 1))
            if callback is not None:
                callback(rec)
            if end:
                break
    model.cpu().eval()
    return model, history
