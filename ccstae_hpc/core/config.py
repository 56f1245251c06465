"""Frozen, serialisable configuration objects, one per stage.

Each config is a frozen dataclass with ``to_dict`` / ``from_dict`` so that it can be stored
in Zarr attrs and in checkpoints for provenance.  Validation happens in ``__post_init__``
and raises ``ValueError`` with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T", bound="Config")


class Config:
    """Base of every stage config: dict/JSON round trip for frozen dataclasses.

    Subclass as ``@dataclass(frozen=True)`` and validate in ``__post_init__`` with :func:`check`.
    """

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out["__config__"] = type(self).__name__
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        d = dict(d)
        name = d.pop("__config__", cls.__name__)
        if name != cls.__name__:
            raise ValueError(f"config is a {name}, expected {cls.__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} field(s) {sorted(unknown)}; "
                f"valid fields are {sorted(known)}"
            )
        kw = {}
        for k, v in d.items():
            kw[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def check(cond: bool, msg: str) -> None:
    """Raise ``ValueError(msg)`` unless ``cond``: the message says what to change."""
    # explicit check instead of assert: asserts vanish under python -O
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class SimConfig(Config):
    """Synthetic WS2/WSe2 lateral heterostructure 4D-STEM dataset.

    ``dose`` is electrons per pattern (Poisson); ``None`` gives noise-free expected
    intensities.  ``background_weight`` is the original benchmark's Lorentzian mixing weight.
    """

    scan: tuple[int, int] = (64, 64)  # (ny, nx) probe positions
    detector: int = 128  # detector side, px
    dose: float | None = None  # e-/pattern (Poisson); None: noise-free expected intensities
    background_weight: float = 0.0  # Lorentzian diffuse background mixing weight, [0, 1)
    seed: int = 0  # random seed of the fields, the noise and the hot pixels
    # another draw of the shot noise alone, the sample and detector unchanged (a repeated
    # acquisition); 0: the noise of ``seed``
    noise_seed: int = 0
    pixel_size: float = 0.0183  # 1/A per detector pixel: WS2 {100} at ~20 px
    disk_radius: float = 4.5  # px, from the convergence angle
    global_rotation_deg: float = 17.0  # in-plane orientation of the lattice
    ripple_amplitude_deg: float = 1.5  # amplitude of the sinusoidal rotation ripple
    ripple_wavelength: float = 40.0  # scan pixels
    strain_amplitude: float = 0.01  # amplitude of the smooth strain fields
    # coherent-interface strain at the WS2/WSe2 boundary (WS2 stretched, WSe2 compressed)
    interface_strain: float = 0.01
    drift_px: float = 3.0  # descan drift of the pattern origin across the scan, px
    diffuse_fraction: float = 0.1  # share of the intensity in the diffuse halo
    central_fraction: float = 0.4  # share of the intensity in the central disk
    n_hot_pixels: int = 4  # detector pixels with a large constant excess
    vacuum: bool = True  # a vacuum corner in the scan
    # False: the whole sample is WS2 (no WSe2 shell, no interface strain), e.g. to check
    # that a dictionary larger than the number of phases does not split one phase
    heterostructure: bool = True
    # edge dislocations, each (y, x, h, k): core at scan pixel (y, x), Burgers vector
    # h a1 + k a2 of the relaxed WS2 lattice turned by global_rotation_deg
    # (ccstae_hpc.sim.simulate.dislocation_distortion); () leaves every dataset unchanged
    dislocations: tuple[tuple[float, float, float, float], ...] = ()
    # scan step (Angstrom per probe position); used only to place dislocations' Burgers
    # vectors in scan pixels: |a| / step = 0.79 makes them strong enough to see
    scan_step_A: float = 4.0

    def __post_init__(self) -> None:
        check(len(self.scan) == 2 and min(self.scan) >= 2, "scan must be (ny, nx) >= 2")
        check(self.detector >= 32, "detector must be at least 32 px")
        check(self.dose is None or self.dose > 0, "dose must be positive or None (noise-free)")
        check(self.noise_seed >= 0, "noise_seed must be >= 0 (0: the noise of seed)")
        check(0 <= self.background_weight < 1, "background_weight must be in [0, 1)")
        check(self.scan_step_A > 0, "scan_step_A must be positive (Angstrom per scan step)")
        # JSON gives lists: normalise to hashable float tuples (the simulator caches by config)
        try:
            disl = tuple(tuple(float(v) for v in d) for d in self.dislocations)
        except (TypeError, ValueError):
            raise ValueError("dislocations must be a sequence of (y, x, h, k) numbers") from None
        for d in disl:
            check(len(d) == 4, f"dislocation {d} must be (y, x, h, k)")
            y, x, h, k = d
            check(math.isfinite(y) and math.isfinite(x) and 0 <= y <= self.scan[0] - 1
                  and 0 <= x <= self.scan[1] - 1,
                  f"dislocation core (y, x) = ({y}, {x}) must lie inside the scan {self.scan}; "
                  "give each dislocation as (y, x, h, k)")
            check(h == round(h) and k == round(k) and (h, k) != (0, 0),
                  f"dislocation Burgers vector (h, k) = ({h}, {k}) must be a non-zero lattice "
                  "vector (integers)")
        object.__setattr__(self, "dislocations", disl)


@dataclass(frozen=True)
class ModelConfig(Config):
    """CC-ST-AE architecture."""

    num_base: int = 3  # dictionary size: phases + vacuum
    input_size: int = 64  # encoder input (patterns are binned to this)
    channels: tuple[int, ...] = (16, 32, 64, 64)  # encoder convolution widths, per level
    latent: int = 32  # width of the encoder's feature vector
    max_scale: float = 0.1  # |scale - 1| bound of the affine head
    max_shear: float = 0.1  # |shear| bound of the affine head
    max_shift: float = 0.05  # learned correction to the measured origin, fraction of half-width

    def __post_init__(self) -> None:
        check(self.num_base >= 1, "num_base must be >= 1")
        check(self.input_size % 16 == 0, "input_size must be a multiple of 16")


@dataclass(frozen=True)
class TrainConfig(Config):
    """Training loop."""

    # None (default): train until converged (ccstae_hpc.core.training.Schedule: the loss
    # and the dictionary stop moving, then a short decay), but not before ``min_steps``
    # steps and not beyond 6 epochs (or ``min_steps`` steps if more); an int: exactly that
    # many epochs with a cosine decay over all of them.  Below ~150 steps the dictionary is
    # measurably worse (96x96 at 2e3 e-: +2-6 % MAE after 100 steps)
    epochs: int | None = None
    min_steps: int = 150  # optimiser steps before convergence may stop training
    batch_size: int = 64  # patterns per optimiser step (per rank under DDP)
    lr: float = 2e-3  # Adam learning rate (the dictionary's is DICTIONARY_LR_FACTOR times it)
    seed: int = 0  # model initialisation and batch order
    max_patterns: int = 8192  # patterns sampled per epoch (subsampled when larger)
    class_anchor: float = 1.0  # weight of the pull toward the data-derived classes

    def __post_init__(self) -> None:
        check(self.epochs is None or self.epochs >= 1, "epochs must be >= 1 (or None)")
        check(self.min_steps >= 0, "min_steps must be >= 0")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.lr > 0, "lr must be positive")

    def epochs_for(self, steps_per_epoch: int) -> int:
        """Epochs to run at ``steps_per_epoch``: ``epochs`` when given, else
        ``max(6, ceil(min_steps / steps_per_epoch))``."""
        if self.epochs is not None:
            return self.epochs
        return max(6, -(-self.min_steps // max(1, steps_per_epoch)))


@dataclass(frozen=True)
class MapConfig(Config):
    """Inference, per-pattern refinement and strain assembly.

    ``reference`` is ``None`` for the automatic reference, or a scan box
    ``(y0, y1, x0, x1)`` (half-open, scan pixels).
    """

    # Gauss-Newton iterations of the per-pattern refinement (the first two on a blurred
    # dictionary and every other pixel, for a wider capture range; ccstae_hpc.core.refine
    # REFINE_ITERS says how 5 was chosen)
    refine_iters: int = 5
    batch_size: int = 256  # patterns encoded and registered together (by class) per step
    # None: automatic (robust median lattice of the largest phase); or a scan box
    # (y0, y1, x0, x1), half-open, whose median lattice is the reference
    reference: tuple[int, int, int, int] | None = None
    # "global": one reference lattice for the whole field of view (every phase in one frame,
    # so lattice mismatch shows as strain); "per_phase": each phase against its own lattice
    reference_mode: str = "global"
    symmetry: int = 6  # rotational symmetry of the pattern: theta is unwrapped modulo 360/symmetry
    # Gaussian pooling of the fitted deformation over neighbouring probe positions of the
    # same phase (scan px).  None (the default) chooses the width per phase from the data:
    # the one of least estimated mean squared error (Stein's unbiased risk, from each fit's
    # own uncertainty against the field's variation; 0 for noise-free data and for fields
    # that change between neighbouring positions).  A number fixes it, 0 turns pooling off
    pool_sigma: float | None = None
    # fits further than this many robust sigmas from their phase are dropped as diverged
    outlier_mad: float = 8.0
    # "ccstae": the trained model and per-pattern refinement; "com": the centre-of-mass
    # lattice-fit baseline (ccstae_hpc.core.com, no model needed), same strain contract
    method: str = "ccstae"
    # what the last registration steps fit to each pattern: "disks", the dictionary entry's
    # Bragg disks redrawn with the disk profile measured on the data's own central disks
    # (sharp at any sub-pixel position, ccstae_hpc.core.disks); "dictionary", the learned
    # entry image, interpolated; "auto" (default): for single-pattern fits (pool_sigma 0)
    # fits a few central scan rows both ways and keeps the model whose fits scatter less
    # between neighbouring probe positions; for pooled maps the learned entries (they pooled
    # to the lower error, measured: README "The forward model of the fine iterations")
    forward_model: str = "auto"
    # what a fit of the disk model reports: "mean" (default), the mean of the pattern's
    # likelihood over its geometry (importance-sampled about its maximum; at low dose the
    # likelihood has local optima closer together than its precision, and the mean averages
    # over them: ccstae_hpc.core.refine.POSTERIOR_SAMPLES), or "mode", its maximum
    disk_estimate: str = "mean"

    def __post_init__(self) -> None:
        check(self.refine_iters >= 0, "refine_iters must be >= 0")
        check(self.disk_estimate in ("mean", "mode"), "disk_estimate must be 'mean' or 'mode'")
        check(self.forward_model in ("auto", "disks", "dictionary"),
              "forward_model must be 'auto', 'disks' or 'dictionary'")
        check(self.method in ("ccstae", "com"), "method must be 'ccstae' or 'com'")
        if self.reference is not None:
            check(len(self.reference) == 4, "reference must be (y0, y1, x0, x1)")
            y0, y1, x0, x1 = self.reference
            check(y1 > y0 and x1 > x0, "reference box must be non-empty: y1 > y0 and x1 > x0")
        check(self.symmetry >= 1, "symmetry must be >= 1")
        check(self.reference_mode in ("global", "per_phase"),
               "reference_mode must be 'global' (one reference lattice) or 'per_phase'")
        check(self.pool_sigma is None or self.pool_sigma >= 0,
              "pool_sigma must be None (automatic) or >= 0 (0 disables pooling)")
        check(self.outlier_mad > 0, "outlier_mad must be positive")


@dataclass(frozen=True)
class AnalyzeConfig(Config):
    """Analysis products of a strain map (``ccstae_hpc.stages.analyze``): derived maps,
    dislocations and ripples.  Detection thresholds come from the data's own noise; the
    only statistical choice is ``false_alarms``."""

    # side (scan px, even) of the circuits that test for dislocation cores; None: twice two
    # pooling widths of the strain map (at least 4), so a core smeared by pooling fits inside
    loop_px: int | None = None
    # expected number of false detections per map: sets the dislocation and ripple levels
    false_alarms: float = 0.01
    # Angstrom per scan step, used only when the raw data carry no scan calibration
    # (Burgers vectors in Angstrom and in lattice units need it)
    scan_step_A: float | None = None

    def __post_init__(self) -> None:
        check(self.loop_px is None or (self.loop_px >= 2 and self.loop_px % 2 == 0),
              "loop_px must be None (automatic) or an even number >= 2")
        check(0 < self.false_alarms < 1, "false_alarms must be in (0, 1), e.g. 0.01")
        check(self.scan_step_A is None or self.scan_step_A > 0,
              "scan_step_A must be None or positive (Angstrom per scan step)")
