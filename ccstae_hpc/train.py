"""Training CC-ST-AE on normalised patterns (single process; DDP wraps the same step)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig, TrainConfig
from .model import CCSTAE, cycle_loss, radial_features
from .preprocess import central_disk, disk_mask, kmeans, ring_mask

__all__ = ["Geometry", "estimate_geometry", "initial_classes", "class_masks", "train_model"]


@dataclass(frozen=True)
class Geometry:
    """Detector geometry derived from the mean pattern."""

    center: tuple[float, float]  # (row, col) of the mean central disk
    radius: float  # central disk radius, px
    ring: np.ndarray = field(repr=False)  # annulus that excludes the central disk

    def to_dict(self) -> dict:
        return {"center": list(self.center), "radius": self.radius}


def estimate_geometry(mean_pattern: np.ndarray) -> Geometry:
    """Central disk and Bragg annulus from the mean pattern."""
    r, c, rad = central_disk(mean_pattern)
    # leave a margin of one radius for descan drift between probe positions
    ring = ring_mask(mean_pattern.shape, (r, c), r_in=2.0 * rad + 2.0)
    return Geometry((r, c), rad, ring)


def initial_classes(x: np.ndarray, geom: Geometry, k: int, seed: int = 0) -> np.ndarray:
    """Data-derived starting classes: k-means on rotation-invariant radial profiles.

    The same descriptor the classifier sees (:func:`ccstae_hpc.model.radial_features`).
    """
    if k == 1:
        return np.zeros(len(x), dtype=np.int64)
    center = torch.tensor(geom.center, dtype=torch.float32)
    r_in = int(2 * geom.radius + 2)
    feats = [
        radial_features(torch.from_numpy(np.ascontiguousarray(x[i:i + 1024])), center,
                        geom.radius, r_in).numpy()
        for i in range(0, len(x), 1024)
    ]
    return kmeans(np.concatenate(feats), k, seed=seed, restarts=10)


def class_masks(dictionary: np.ndarray, ring: np.ndarray, floor: float = 0.25) -> np.ndarray:
    """Loss weights per class ``(K, Q, Q)``: the Bragg-disk mask on a low floor over the ring.

    The floor keeps a disk-free (vacuum) entry from winning by having nothing to compare.
    """
    return np.stack([ring * (floor + (1 - floor) * disk_mask(d, ring)) for d in dictionary])


def train_model(
    x: np.ndarray,
    geom: Geometry,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    labels0: np.ndarray | None = None,
    progress: Callable[[dict], None] | None = None,
) -> tuple[CCSTAE, list[dict]]:
    """Train CC-ST-AE on normalised patterns ``x`` ``(N, Q, Q)``.

    The dictionary starts from the class means of ``labels0`` (k-means classes when None)
    and the classifier is regularised toward those classes.
    """
    torch.manual_seed(train_cfg.seed)
    rng = np.random.default_rng(train_cfg.seed)
    N, Q, _ = x.shape
    if labels0 is None:
        labels0 = initial_classes(x, geom, model_cfg.num_base, train_cfg.seed)
    model = CCSTAE(model_cfg, Q, geom.center, geom.radius)
    init = np.stack(
        [x[labels0 == j].mean(0) if np.any(labels0 == j) else x.mean(0)
         for j in range(model_cfg.num_base)]
    )
    model.init_dictionary(torch.from_numpy(init))
    masks = torch.from_numpy(class_masks(init, geom.ring))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    lab = torch.from_numpy(labels0.astype(np.int64))

    dict_params = list(model.decoder.parameters())
    other = [p for n, p in model.named_parameters() if not n.startswith("decoder")]
    opt = torch.optim.Adam(
        [{"params": other, "lr": train_cfg.lr}, {"params": dict_params, "lr": train_cfg.lr * 5}]
    )
    per_epoch = min(N, train_cfg.max_patterns)
    steps_per_epoch = max(1, per_epoch // train_cfg.batch_size)
    total = steps_per_epoch * train_cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))) * 0.95 + 0.05
    )
    # the cycle loss scales with the Poisson noise (1/dose in normalised units); dividing by
    # its value at the start makes the loss, and its balance with the class anchor, the same
    # at every dose
    with torch.no_grad():
        probe = torch.from_numpy(rng.choice(N, min(N, 512), replace=False))
        out = model(xt[probe])
        loss_scale = float(cycle_loss(xt[probe], out, masks[lab[probe]].unsqueeze(1))[0])
        loss_scale = max(loss_scale, 1e-12)
    history: list[dict] = []
    step = 0
    t0 = time.perf_counter()
    for epoch in range(train_cfg.epochs):
        order = rng.permutation(N)[: steps_per_epoch * train_cfg.batch_size]
        for b in range(steps_per_epoch):
            idx = torch.from_numpy(order[b * train_cfg.batch_size:(b + 1) * train_cfg.batch_size])
            xb = xt[idx]
            out = model(xb)
            m = masks[out["onehot"].argmax(-1)].unsqueeze(1)
            loss, parts = cycle_loss(xb, out, m)
            loss = loss / loss_scale
            # anchor the top-1 classifier to the data-derived classes: without it the
            # straight-through code drifts and merges phases whose lattices differ by a few
            # percent (the affine head can absorb that as scale)
            loss = loss + train_cfg.class_anchor * F.cross_entropy(out["logits"], lab[idx])
            # the original's penalty on scale and shear beyond 3%: keeps one dictionary entry
            # per lattice instead of one entry stretched over several phases
            pr = out["params"]
            excess = torch.relu((pr[:, :2] - 1).abs() - 0.03).sum(1) + torch.relu(
                pr[:, 2].abs() - 0.03)
            loss = loss + 10.0 * (excess**2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            rec = {"step": step, "epoch": epoch, "loss": float(loss.detach()),
                   "patterns_per_s": step * train_cfg.batch_size / (time.perf_counter() - t0)}
            history.append(rec)
            if progress is not None:
                progress(rec)
        with torch.no_grad():
            masks = torch.from_numpy(class_masks(model.dictionary().numpy(), geom.ring))
    model.eval()
    return model, history
