"""The training schedule: a fixed epoch count decays over the whole run; otherwise training
stops once the loss curve and the dictionary have converged, and never beyond its cap."""

from __future__ import annotations

import math

import numpy as np

from ccstae_hpc.core import training as tr


def _run(schedule: tr.Schedule, loss, dictionary) -> int:
    """Drive the schedule step by step as fit does; the step it stops at."""
    losses: list[float] = []
    for step in range(1, 10_000):
        losses.append(loss(step))
        schedule.update(step, losses[-2 * tr.CONVERGENCE_WINDOW:], lambda s=step: dictionary(s))
        if schedule.done(step):
            return step
    raise AssertionError("never stopped")


def test_fixed_epochs_decay_over_the_whole_run() -> None:
    s = tr.Schedule(cap=400, fixed=True, min_steps=150)
    for step in (0, 100, 200, 400, 500):
        f = min(step / 400, 1.0)
        assert math.isclose(s.factor(step),
                            0.5 * (1 + math.cos(math.pi * f)) * (1 - tr.LR_FLOOR) + tr.LR_FLOOR)
    assert _run(s, lambda k: 1.0, lambda k: np.ones(4)) == 400  # flat loss does not stop it


def test_converged_curve_stops_after_its_decay() -> None:
    w = tr.CONVERGENCE_WINDOW
    s = tr.Schedule(cap=2000, fixed=False, min_steps=150)
    # loss flat from step 200 on, dictionary still
    stop = _run(s, lambda k: 1.0 + max(0, 200 - k) / 100, lambda k: np.ones(4))
    start = s.converged_at
    assert start is not None and start % w == 0 and 200 <= start <= 200 + 2 * w
    assert stop == start + max(w, int(tr.DECAY_FRACTION * start))
    assert s.factor(start) == 1.0 and math.isclose(s.factor(stop), tr.LR_FLOOR)


def test_not_before_min_steps_and_not_while_the_dictionary_moves() -> None:
    flat = tr.Schedule(cap=2000, fixed=False, min_steps=150)
    _run(flat, lambda k: 1.0, lambda k: np.ones(4))
    assert flat.converged_at == 150
    moving = tr.Schedule(cap=2000, fixed=False, min_steps=150)
    # the dictionary keeps changing by 5 % per window until step 500
    _run(moving, lambda k: 1.0, lambda k: np.full(4, 1.0 + 0.002 * min(k, 500)))
    assert moving.converged_at is not None and moving.converged_at >= 500


def test_a_curve_that_never_settles_decays_to_end_at_the_cap() -> None:
    s = tr.Schedule(cap=600, fixed=False, min_steps=150)
    stop = _run(s, lambda k: 10.0 * 0.97 ** (k / 10), lambda k: np.full(4, float(k)))
    assert s.converged_at is None and stop == 600
    assert s.decay_start is not None and s.decay_start + s.decay_len == 600
