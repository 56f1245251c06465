"""The ``--epochs`` option of the benchmark scripts that train a model: a fixed number of
training epochs instead of the default stop at convergence.  tests/test_benchmarks_run.py
passes ``--epochs 1`` to check that each script runs end to end (its figures come from the
full-size runs)."""

from __future__ import annotations

import argparse


def add_epochs(ap: argparse.ArgumentParser) -> None:
    """Add ``--epochs N`` (default None: train until converged)."""
    ap.add_argument("--epochs", type=int, default=None,
                    help="training epochs (default: until converged); the tests pass 1 to "
                    "check that the script runs")


def run_epochs(epochs: int | None) -> list[str]:
    """The ``ccstae run`` arguments that fix its training to ``epochs`` (none for None)."""
    return [] if epochs is None else ["--epochs", str(epochs)]
