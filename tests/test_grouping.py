"""Grouping of dictionary entries into phases by their lattices (``phases.group_entries``).

Each case is a seeded set of calibration patterns whose lattice parameters are drawn from a
known distribution and cut into entries; composition cannot tell the entries apart, so the
lattice alone decides.  The cases are built so that the pairwise test chains the entries
(neighbours within ``LATTICE_SEPARATION``, the ends beyond it), which is what the chain
test must resolve.
"""

from __future__ import annotations

import numpy as np
import pytest

from ccstae_hpc.core.phases import LATTICE_SEPARATION, LatticeSample, group_entries, lattice_gap

NOISE = 0.01  # spread of one pattern's log lattice parameter


def _phases(values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Group entries whose patterns have log lattice parameters ``values[k]``; returns the
    pairwise lattice gaps and the phase of each entry."""
    K = len(values)
    a = np.concatenate(values)
    cls = np.concatenate([np.full(len(v), k) for k, v in enumerate(values)])
    # the fitted sampling affine of a lattice scaled by exp(a) is exp(-a) I
    A = np.exp(-a)[:, None, None] * np.eye(2)[None]
    relations = np.zeros((K, K, 2, 3))
    relations[:, :, 0, 0] = relations[:, :, 1, 1] = 1.0
    counts = np.bincount(cls, minlength=K)
    entries = np.arange(K)
    gap = lattice_gap(A, cls, relations, entries, K)
    no_composition = np.zeros((K, K))
    phase, _ = group_entries(no_composition, np.ones((K, K)), gap, entries, counts, K, 1.0,
                             LatticeSample(A, cls, np.ones(len(a)), relations))
    return gap, phase


def _assert_chain(gap: np.ndarray) -> None:
    K = len(gap)
    assert all(gap[k, k + 1] < LATTICE_SEPARATION for k in range(K - 1)), gap
    assert gap[0, K - 1] > LATTICE_SEPARATION, gap


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_entry_holding_two_phases_does_not_join_them(seed: int) -> None:
    # two lattices 6.5 spreads apart; the middle entry holds patterns of both, so it is near
    # each (seen at 1e3 e-/pattern): the chain must be cut between the lattices
    rng = np.random.default_rng(seed)
    first = lambda n: rng.normal(0.0, NOISE, n)  # noqa: E731
    second = lambda n: rng.normal(6.5 * NOISE, NOISE, n)  # noqa: E731
    gap, phase = _phases([first(128), np.concatenate([first(70), second(58)]), second(128)])
    _assert_chain(gap)
    assert phase[0] != phase[2]
    assert sorted(set(phase)) == [1, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_gradient_cut_into_entries_is_one_phase(seed: int) -> None:
    # a uniform spread of lattices (a strain gradient), noise-free apart from a little
    rng = np.random.default_rng(seed)
    a = np.sort(rng.uniform(0.0, 0.1, 384) + rng.normal(0.0, 0.2 * NOISE, 384))
    gap, phase = _phases([a[:128], a[128:256], a[256:]])
    _assert_chain(gap)
    assert set(phase) == {1}


@pytest.mark.parametrize("entries", [3, 4])
def test_a_ripple_cut_into_entries_is_one_phase(entries: int) -> None:
    # a sinusoidal ripple: the arcsine distribution peaks at both ends, with no gap between
    rng = np.random.default_rng(entries)
    n = 128 * entries
    a = np.sort(0.05 * np.sin(rng.uniform(0.0, 2 * np.pi, n)) + rng.normal(0.0, 0.2 * NOISE, n))
    gap, phase = _phases(np.split(a, entries))
    _assert_chain(gap)
    assert set(phase) == {1}


def test_two_separate_lattices_stay_two_phases() -> None:
    rng = np.random.default_rng(5)
    gap, phase = _phases([rng.normal(0.0, NOISE, 128), rng.normal(8 * NOISE, NOISE, 128)])
    assert gap[0, 1] > LATTICE_SEPARATION
    assert sorted(phase) == [1, 2]
