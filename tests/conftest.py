"""Shared, session-cached simulated datasets (cheap: a 12 x 12 scan renders in ~0.1 s)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ccstae_hpc.config import SimConfig
from ccstae_hpc.simulate import simulate

SimResult = tuple[np.ndarray, dict[str, np.ndarray], SimConfig]


@pytest.fixture(scope="session")
def make_sim() -> Callable[..., SimResult]:
    """Factory ``make_sim(**overrides) -> (data, truth, cfg)``, cached by its arguments.

    The base config is ``SimConfig(scan=(12, 12))`` (128 px detector, noise-free); overrides
    replace any field.  Returned arrays are shared between tests: do not modify them.
    """
    cache: dict[tuple[tuple[str, Any], ...], SimResult] = {}

    def _make(**overrides: Any) -> SimResult:
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            cfg = SimConfig(**({"scan": (12, 12)} | overrides))
            data, truth = simulate(cfg)
            data.flags.writeable = False
            for v in truth.values():
                v.flags.writeable = False
            cache[key] = (data, truth, cfg)
        return cache[key]

    return _make


@pytest.fixture(scope="session")
def sim_small(make_sim: Callable[..., SimResult]) -> SimResult:
    """Noise-free 12 x 12 scan, 128 px detector, default config: ``(data, truth, cfg)``."""
    return make_sim()
