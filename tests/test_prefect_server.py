"""End to end with a real Prefect server: `ccstae serve` a schedule file, trigger, check results.

Starts ``prefect server start`` on a free loopback port (its own PREFECT_HOME and database in a
temporary directory; the database is a copy of the session's freshly migrated one), serves the
``pipeline`` deployment of a schedule file with ``ccstae serve``, triggers a run through the
API, waits for it and checks the strain maps against the simulator's truth.  Every process is
started in its own process group and terminated in ``finally``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.sim.simulate import save_simulation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SERVER_START_S = 180  # generous: a fresh database would migrate in 25-40 s on two cores
REGISTER_S = 120
RUN_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _wait(what: str, check: Callable[[], Any], timeout: float, proc: subprocess.Popen,
          log: Path) -> Any:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{_tail(log)}")
        out = check()
        if out:
            return out
        time.sleep(1.0)
    pytest.fail(f"{what}: not ready after {timeout:.0f} s\n{_tail(log)}")


@contextmanager
def _process(cmd: list[str], env: dict[str, str], cwd: Path, log: Path
             ) -> Iterator[subprocess.Popen]:
    """A subprocess in its own process group; the whole group is stopped on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)  # the group: flow runs and Dask workers too
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue


def _healthy(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    return check


def test_served_pipeline_runs_on_a_real_server(prefect_server: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ccstae_hpc.sim.evaluate import load_truth, strain_errors
    from ccstae_hpc.stages.store import open_strain

    npy, truth = save_simulation(tmp_path / "scan.npy", SimConfig(scan=(16, 16), dose=None))
    store = tmp_path / "scan.zarr"
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    db = tmp_path / "prefect.db"
    shutil.copyfile(prefect_server, db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect_home"),
        "PREFECT_API_URL": url,
        "PREFECT_UI_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
        # a copy of the session's already migrated database: a fresh one takes 25-40 s
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}",
        # `ccstae serve` looks for due runs every second instead of every 10 s
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    })
    schedule = tmp_path / "schedules.yaml"
    schedule.write_text(yaml.safe_dump({"deployments": [{
        "name": "ci",
        "flow": "pipeline",
        "cron": "0 0 1 1 *",  # a real schedule that will not fire during the test
        "parameters": {
            "input_path": npy.name,  # relative: resolved against the serve directory
            "store_path": str(store),
            "truth_path": str(truth),
            "cluster": "local",
            "config": {"cluster": {"n_workers": 1, "dashboard_address": ":0"}},
        },
    }]}))

    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                  "--port", str(port)]
    serve_cmd = [sys.executable, "-m", "ccstae_hpc.cli", "serve", "--schedule", str(schedule)]
    with _process(server_cmd, env, tmp_path, server_log) as server:
        _wait("prefect server", _healthy(url), SERVER_START_S, server, server_log)
        with _process(serve_cmd, env, tmp_path, serve_log) as serving, \
                temporary_settings(updates={PREFECT_API_URL: url}):

            def registered() -> Any:
                with get_client(sync_client=True) as client:
                    try:
                        return client.read_deployment_by_name("pipeline/ci")
                    except ObjectNotFound:
                        return None

            dep = _wait("ccstae serve", registered, REGISTER_S, serving, serve_log)
            assert [s.schedule.cron for s in dep.schedules] == ["0 0 1 1 *"]
            assert dep.parameters["input_path"] == str(npy)

            run = run_deployment("pipeline/ci", timeout=RUN_S, poll_interval=2)
            assert run.state is not None and run.state.is_completed(), (
                f"flow run ended {run.state}\n{_tail(serve_log, 80)}")

    ds = open_strain(store).load()
    errors = strain_errors(ds, load_truth(truth))
    assert errors["acc_sample"] >= 0.95, errors
    assert (tmp_path / "scan.strain_maps.png").is_file()
