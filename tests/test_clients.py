"""Local Dask clients of the stage commands (ccstae_hpc.runtime.clients)."""

from __future__ import annotations

import os
import sys

import pytest

from ccstae_hpc.runtime.clients import dask_client, worker_start_method


def _worker_state() -> tuple[int, bool, bool, str | None, int]:
    import gc

    return (os.getppid(), "torch" in sys.modules, "ccstae_hpc.stages.map" in sys.modules,
            os.environ.get("CCSTAE_TEST_CLIENTS"), gc.get_freeze_count())


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
    # the server froze what it imported (runtime.fork_ready) before it forked them: torch's
    # and the stages' objects alone are well over 10^5
    assert all(s[4] > 100_000 for s in state.values()), state


def test_no_workers_no_scheduler_no_client() -> None:
    with dask_client(0) as client:
        assert client is None


# a worker plugin that logs an error while its worker closes, as distributed's heartbeat
# does when it meets the scheduler's closed connection (the race that printed a traceback
# after a failed `ccstae run --quiet`)
_NOISY_CLOSE = r'''
import asyncio, logging, sys
from distributed.diagnostics.plugin import WorkerPlugin
from ccstae_hpc.runtime import worker_logs
from ccstae_hpc.runtime.clients import dask_client

class Noise(WorkerPlugin):
    async def teardown(self, worker):
        await asyncio.sleep(0.1)  # after every other plugin's teardown
        logging.getLogger("distributed.worker").error("NOISE-AT-CLOSE")

if __name__ == "__main__":  # the workers import this script again
    if sys.argv[1] == "bare":  # the cluster without the project's plugin
        worker_logs.quiet_shutdown = lambda client: None
    with dask_client(1) as client:
        client.register_plugin(Noise(), name="noise")
        assert client.submit(sum, [1, 2]).result() == 3
'''


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["quiet", "bare"])
def test_workers_log_nothing_while_they_close(mode: str, tmp_path) -> None:
    import subprocess

    script = tmp_path / "noisy_close.py"
    script.write_text(_NOISY_CLOSE)
    r = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                       timeout=100, check=True)
    # without the project's plugin the record reaches stderr: the check can fail
    assert ("NOISE-AT-CLOSE" in r.stderr) == (mode == "bare"), r.stderr
