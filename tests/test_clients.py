"""Local Dask clients of the stage commands (ccstae_hpc.runtime.clients)."""

from __future__ import annotations

import os
import sys

import pytest

from ccstae_hpc.runtime.clients import dask_client, worker_start_method


def _worker_state() -> tuple[int, bool, bool, str | None]:
    return (os.getppid(), "torch" in sys.modules, "ccstae_hpc.stages.map" in sys.modules,
            os.environ.get("CCSTAE_TEST_CLIENTS"))


@pytest.mark.timeout(120)
def test_local_workers_fork_from_a_server_that_imported_the_stages(monkeypatch) -> None:
    if worker_start_method() != "forkserver":
        pytest.skip("no fork server on this platform: workers are spawned")
    # set after any earlier fork server started: a worker sees this process's environment
    monkeypatch.setenv("CCSTAE_TEST_CLIENTS", "seen")
    with dask_client(2) as client:
        state = client.run(_worker_state)
    assert len(state) == 2
    parents = {s[0] for s in state.values()}
    # both forked by the one server (a spawned worker's parent is this process)
    assert len(parents) == 1 and os.getpid() not in parents
    # torch and the map stage were imported before the fork, not by each worker
    assert all(s[1] and s[2] for s in state.values())
    assert all(s[3] == "seen" for s in state.values())


def test_no_workers_no_scheduler_no_client() -> None:
    with dask_client(0) as client:
        assert client is None
