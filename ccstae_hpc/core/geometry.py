"""Detector geometry: the central disk and the Bragg annulus, as every stage sees them.

Preprocessing measures the central disk on the mean pattern and records it in ``prep``
attrs; training, the model's radial descriptors, phase finding and mapping all rebuild the
annulus from it with :func:`ring_inner_radius`, so there is one rule for where the Bragg
disks begin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ccstae_hpc.core.patterns import central_disk, ring_mask

__all__ = ["RING_RADII", "RING_MARGIN_PX", "Geometry", "estimate_geometry", "ring_inner_radius"]

# inner radius of the Bragg annulus in central-disk radii: one radius of margin beyond the
# disk's edge for descan drift between probe positions ...
RING_RADII = 2.0
# ... plus a fixed margin for the disk's blurred rim
RING_MARGIN_PX = 2.0


def ring_inner_radius(radius: float) -> float:
    """Inner radius (px) of the Bragg annulus around a central disk of ``radius`` px."""
    return RING_RADII * radius + RING_MARGIN_PX


@dataclass(frozen=True)
class Geometry:
    """Detector geometry derived from the mean pattern."""

    center: tuple[float, float]  # (row, col) of the mean central disk
    radius: float  # central disk radius, px
    ring: np.ndarray = field(repr=False)  # annulus that excludes the central disk

    @classmethod
    def from_disk(cls, center: tuple[float, float], radius: float, size: int) -> Geometry:
        """The geometry of a ``size`` x ``size`` detector with this central disk."""
        c = (float(center[0]), float(center[1]))
        return cls(c, float(radius), ring_mask((size, size), c, ring_inner_radius(radius)))

    @property
    def r_in(self) -> int:
        """First whole-pixel radius of the annulus (the radial descriptors start there)."""
        return int(ring_inner_radius(self.radius))

    def to_dict(self) -> dict:
        return {"center": list(self.center), "radius": self.radius}


def estimate_geometry(mean_pattern: np.ndarray) -> Geometry:
    """Central disk and Bragg annulus from the mean pattern."""
    r, c, rad = central_disk(mean_pattern)
    return Geometry((r, c), rad, ring_mask(mean_pattern.shape, (r, c), ring_inner_radius(rad)))
