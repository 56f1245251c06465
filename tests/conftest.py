"""Session fixtures: cached simulated datasets (a 12 x 12 scan renders in ~0.1 s) and the
one Prefect test server of the session."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.sim.simulate import simulate

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


# the default heterostructure at 1e3 e-/pattern through `ccstae run` (shared by
# tests/test_pipeline.py, tests/test_analysis.py and tests/test_uncertainty.py: training is
# most of its ~45 s)
HETERO_1E3 = SimConfig(scan=(48, 48), dose=1000.0, seed=3)


@pytest.fixture(scope="session")
def hetero_1e3_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimConfig]:
    """``ccstae run --num-base 4`` (one more entry than phases + vacuum) on
    :data:`HETERO_1E3`: the store (raw ... strain, analysis) and the config.  Read it only;
    a test that re-maps works on a copy."""
    from ccstae_hpc import cli
    from ccstae_hpc.sim.simulate import save_simulation

    tmp = tmp_path_factory.mktemp("hetero_1e3")
    npy, _ = save_simulation(tmp / "data.npy", HETERO_1E3)
    store = tmp / "data.zarr"
    assert cli.main(["run", str(npy), "--out", str(store), "--engine", "direct", "--quiet",
                     "--num-base", "4"]) == 0
    return store, HETERO_1E3


@pytest.fixture(scope="session")
def hetero_1e3_single(hetero_1e3_run: tuple[Path, SimConfig],
                      tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of :func:`hetero_1e3_run`'s store re-mapped with single-pattern fits (``ccstae
    map --pool-sigma 0 --overwrite``; shared by tests/test_pipeline.py and
    tests/test_uncertainty.py).  Read it only."""
    import shutil

    from ccstae_hpc import cli

    store, _ = hetero_1e3_run
    out = Path(shutil.copytree(store, tmp_path_factory.mktemp("hetero_1e3_single") / "s.zarr"))
    assert cli.main(["map", str(out), "--pool-sigma", "0", "--overwrite", "--quiet"]) == 0
    return out


MULTISLICE_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def multislice_files() -> dict[str, Path]:
    """The multislice validation sets (``name -> .npy``) in ``tests/data``, simulated with
    abTEM on first use and kept there (git-ignored) for later sessions."""
    from ccstae_hpc.sim.multislice import VALIDATION_SETS, validation_set

    return {name: validation_set(MULTISLICE_DATA, name) for name in VALIDATION_SETS}


def _sqlite_copy(src: Path, dst: Path) -> None:
    """A consistent copy of a live SQLite database (the backup API, not a file copy)."""
    import sqlite3

    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        b.close()
        a.close()


PREFECT_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One temporary Prefect server (and database) for every flow test of the session; yields
    a copy of its database taken right after the migration (see :func:`_sqlite_copy`).

    A fresh database takes ~25 s to migrate on two cores, and Prefect keeps one test harness
    per process: tests/test_flows.py and tests/test_slurm.py share this one, and
    tests/test_prefect_server.py starts its own server on the copy.
    """
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL
    from prefect.testing.utilities import prefect_test_harness

    saved = {k: os.environ.get(k) for k in PREFECT_ENV}
    os.environ.update(PREFECT_ENV)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
            copy = tmp_path_factory.mktemp("prefect_db") / "prefect.db"
            _sqlite_copy(Path(url.split(":///", 1)[1]), copy)
            yield copy
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- two test processes (`make test` runs `pytest -n 2 --dist loadgroup`) ------------------
# the session fixtures whose result is expensive: every file that uses one runs in the same
# process, so that it is built once (hetero_1e3_run trains for ~45 s, a Prefect database
# migrates for ~25 s, the multislice sets are simulated on first use)
SHARED_FIXTURE_GROUPS = {
    "hetero_1e3_run": "hetero_1e3",
    "hetero_1e3_single": "hetero_1e3",
    "prefect_server": "prefect_server",
    "multislice_files": "multislice",
}
# files whose tests share nothing (each starts its own subprocess): sent one test at a time
INDEPENDENT_TESTS = {"test_benchmarks_run.py"}
# the longest groups start first, so that the two processes end together; the rest follow
# in collection order.  Sums of --durations=0 in two processes (2026-12-06, passive OpenMP
# threads): hetero_1e3 ~490 s, prefect_server ~300 s, test_uncertainty.py's other doses
# ~175 s, test_full_disk_real.py ~140 s, test_faults.py ~110 s, multislice ~95 s; all tests
# 2038 s in 1058 s of wall time, so the two processes ended within ~80 s of each other
LONGEST_FIRST = ("hetero_1e3", "prefect_server", "test_uncertainty.py", "test_full_disk_real.py",
                 "test_faults.py", "multislice")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup``: an ``xdist_group`` for every test (its file, or the group
    of a shared session fixture that any test of its file uses), longest groups first."""
    if getattr(config.option, "dist", "no") != "loadgroup":
        return
    # files that use the same expensive session fixture form one group
    file_groups: dict[str, set[str]] = {}
    for item in items:
        groups = file_groups.setdefault(item.path.name, set())
        groups.update(g for f, g in SHARED_FIXTURE_GROUPS.items() if f in item.fixturenames)
    group_of: dict[str, str] = {}
    for name, groups in file_groups.items():
        group_of[name] = "+".join(sorted(groups)) if groups else name
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        if item.path.name in INDEPENDENT_TESTS:
            continue  # no mark: xdist schedules it on its own
        item.add_marker(pytest.mark.xdist_group(group_of[item.path.name]))

    def rank(item: pytest.Item) -> int:
        mark = item.get_closest_marker("xdist_group")
        name = mark.args[0] if mark is not None else ""
        return next((i for i, g in enumerate(LONGEST_FIRST) if g in name.split("+")),
                    len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: each file's tests keep their order
