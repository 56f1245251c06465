"""Unattended and safe (issue 14): loopback-only servers, no orphans after SIGTERM, no
``Logging error`` at exit, file parameters checked before any work, a non-finite training
refused before it is committed, error messages that fit what the user gave."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
# a fresh Prefect database migrates in ~25 s on two cores; the whole child must fit in this
CHILD_S = 150
ORPHAN_S = 5.0  # the uvicorn and Dask children must be gone this soon after SIGTERM


def _listening(procs: list[psutil.Process]) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket of ``procs``."""
    out = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        out += [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def _is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


# --------------------------------------------------------------------------- loopback


def test_loopback_address_rules() -> None:
    from ccstae_hpc.runtime.jobqueue import bind_loopback, loopback_address

    assert loopback_address(":0", "x") == "127.0.0.1:0"
    assert loopback_address(8787, "x") == "127.0.0.1:8787"
    assert loopback_address("", "127.0.0.1:1") == "127.0.0.1:1"
    assert loopback_address(None, "x") is None
    # a host the user wrote is theirs, including every interface on purpose
    assert loopback_address("0.0.0.0:8787", "x") == "0.0.0.0:8787"
    assert loopback_address("tcp://10.1.2.3:8787", "x") == "tcp://10.1.2.3:8787"

    local = bind_loopback("local", {"n_workers": 1})
    assert local["host"] == "127.0.0.1" and local["dashboard_address"] == "127.0.0.1:0"
    assert "host" not in bind_loopback("local", {"interface": "eth0"})
    slurm = bind_loopback("slurm", {"interface": "ib0"})
    assert slurm["interface"] == "ib0"  # the workers on other nodes must reach the scheduler
    assert slurm["scheduler_options"]["dashboard_address"] == "127.0.0.1:8787"
    kept = bind_loopback("slurm", {"scheduler_options": {"dashboard_address": ":0", "x": 1}})
    assert kept["scheduler_options"] == {"dashboard_address": "127.0.0.1:0", "x": 1}
    # the workers' dashboards on the compute nodes too, unless the section chose one
    assert slurm["worker_extra_args"] == ["--dashboard-address", "127.0.0.1:0"]
    own = bind_loopback("pbs", {"worker_extra_args": ["--preload", "m", "--no-dashboard"]})
    assert own["worker_extra_args"] == ["--preload", "m", "--no-dashboard"]


def test_flow_local_cluster_listens_on_loopback_only() -> None:
    """The flows' `local` cluster (a real one), with the ':0' dashboard the tests' configs
    and many users write: scheduler, dashboard and workers listen on loopback only."""
    from flows.dask_cluster import DaskCluster

    me = psutil.Process()
    before = set(_listening([me]))
    with DaskCluster("local", {"n_workers": 1, "threads_per_worker": 1,
                               "dashboard_address": ":0"}) as dc:
        client = dc.client()
        sched = client.scheduler.address
        assert _is_loopback(sched.split("://")[1].rsplit(":", 1)[0]), sched
        link = client.dashboard_link
        assert link.startswith("http://127.0.0.1:"), link
        workers = me.children(recursive=True)
        opened = [a for a in _listening([me, *workers]) if a not in before]
        assert opened, "the cluster opened no listening socket?"
        assert all(_is_loopback(host) for host, _ in opened), opened
        # its workers close without library noise (runtime.worker_logs; the behaviour is
        # tested in test_clients)
        from ccstae_hpc.runtime.worker_logs import QUIET_SHUTDOWN

        plugins = client.run(lambda dask_worker: list(dask_worker.plugins))
        assert all(QUIET_SHUTDOWN in p for p in plugins.values()), plugins
        # and fork from the preloaded server (runtime.clients), not spawned by this process
        from ccstae_hpc.runtime.clients import worker_start_method

        if worker_start_method() == "forkserver":
            parents = client.run(os.getppid)
            assert os.getpid() not in parents.values(), parents


def test_jobqueue_dashboard_not_on_every_interface() -> None:
    """A SLURM section keeps its `interface` (here lo) but its dashboard must not bind
    0.0.0.0, which dask-jobqueue's default ':8787' does.  No job is submitted."""
    pytest.importorskip("dask_jobqueue")
    from ccstae_hpc.runtime.jobqueue import make_cluster

    me = psutil.Process()
    before = set(_listening([me]))
    cluster = make_cluster("slurm-cpu", interface="lo", job_script_prologue=[])
    try:
        opened = [a for a in _listening([me]) if a not in before]
        assert len(opened) >= 2, opened  # scheduler and dashboard
        assert all(_is_loopback(host) for host, _ in opened), opened
    finally:
        cluster.close()


# --------------------------------------------------------------------------- embedded server

_CHILD = """
import sys, time
from prefect import flow, get_run_logger
from flows.dask_cluster import DaskCluster
from flows.embedded import embedded_prefect, spawn_server


@flow
def busy() -> None:
    with DaskCluster("local", {"n_workers": 1, "threads_per_worker": 1}) as dc:
        dc.client()
        get_run_logger().info("workers up")
        print("ready", flush=True)
        while True:
            time.sleep(0.1)


if __name__ == "__main__":
    early = spawn_server() if sys.argv[1:] == ["early"] else None
    with embedded_prefect(early=early) as url:
        print("url", url, flush=True)
        busy()
"""

_CHILD_EXIT = """
import io, sys
real = sys.stderr
sys.stderr = console = io.StringIO()  # Prefect's console handler keeps the stream it sees
import prefect.logging.configuration as conf
from prefect import flow, get_run_logger
conf.setup_logging()
sys.stderr = real
from flows.embedded import embedded_prefect, spawn_server


@flow
def hello() -> int:
    get_run_logger().info("hello")
    return 1


def server_stderr() -> str:
    import os, psutil
    [uv] = [p for p in psutil.Process().children(recursive=True) if "uvicorn" in p.cmdline()]
    return os.readlink(f"/proc/{uv.pid}/fd/2")


if __name__ == "__main__":
    early = spawn_server() if sys.argv[1:] == ["early"] else None
    if early is not None:
        print("early", early.api_url, flush=True)
    with embedded_prefect(preload=("xml.dom.minidom",), early=early) as url:
        print("url", url, flush=True)
        print("preloaded", "xml.dom.minidom" in sys.modules, flush=True)
        hello()
        from prefect.client.orchestration import get_client
        with get_client(sync_client=True) as client:  # the server the flow reported to
            print("runs", len(client.read_flow_runs()), flush=True)
        print("server-stderr", server_stderr(), flush=True)
    console.close()  # as pytest closes its captured streams before the interpreter exits
    print("done", flush=True)
"""


def _child_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT),
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _uvicorn(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if "uvicorn" in p.cmdline():
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.mark.timeout(CHILD_S + 60)
@pytest.mark.parametrize("early", [False, True], ids=["started-inside", "spawned-early"])
def test_sigterm_ends_server_and_workers(tmp_path: Path, early: bool) -> None:
    """SIGTERM during a flow run that holds a Dask worker: the process ends by the signal,
    the uvicorn server and the worker process end with it, and stderr shows no logging
    error.  (Before flows.embedded, uvicorn outlived its parent.)  The same for a server
    started before Prefect was imported (``spawn_server``, as ``ccstae run`` does)."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_CHILD))
    err = tmp_path / "stderr.txt"
    with open(err, "w") as ferr:
        proc = subprocess.Popen([sys.executable, str(script), *(["early"] if early else [])],
                                stdout=subprocess.PIPE,
                                stderr=ferr, text=True, env=_child_env(tmp_path),
                                start_new_session=True)
    try:
        url, t_end = None, time.monotonic() + CHILD_S
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("url "):
                url = line.split()[1]
            if line.startswith("ready") or time.monotonic() > t_end:
                break
        assert url is not None and url.startswith("http://127.0.0.1:"), err.read_text()
        kids = psutil.Process(proc.pid).children(recursive=True)
        servers = _uvicorn(kids)
        assert len(servers) == 1, [k.cmdline() for k in kids]
        # the server listens on loopback only
        ports = _listening(servers)
        assert ports and all(_is_loopback(h) for h, _ in ports), ports
        assert len(kids) >= 2, "no Dask worker process?"

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        _, alive = psutil.wait_procs(kids, timeout=ORPHAN_S)
        dt = time.monotonic() - t0
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
        assert rc == -signal.SIGTERM, (rc, err.read_text()[-2000:])
        assert dt < 30
        text = err.read_text()
        assert "Logging error" not in text, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
    finally:
        # anything of the child's left in its own process group (only on failure)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.timeout(CHILD_S + 30)
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("early", [False, True], ids=["started-inside", "spawned-early"])
def test_normal_exit_no_logging_error(tmp_path: Path, early: bool) -> None:
    """Prefect's own atexit hook logs "Stopping temporary server" through a console handler
    whose stream is closed by then (as under pytest): `--- Logging error ---`.  The context
    manager stops the server inside the block and removes that hook.  The server's own
    output (e.g. the database operations its shutdown cancels) goes to a file, removed
    after a clean stop, not to the user's terminal, also when modules are imported while
    it starts.  A server spawned before Prefect was imported is the one the flow reports
    to."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_CHILD_EXIT))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    res = subprocess.run([sys.executable, str(script), *(["early"] if early else [])],
                         capture_output=True, text=True,
                         env=_child_env(tmp_path) | {"TMPDIR": str(tmp)}, timeout=CHILD_S,
                         start_new_session=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done" in res.stdout
    assert "preloaded True" in res.stdout  # imported while the server started
    urls = dict(ln.split(None, 1) for ln in res.stdout.splitlines()
                if ln.startswith(("early ", "url ")))
    assert urls["url"].startswith("http://127.0.0.1:")
    if early:
        assert urls["url"] == urls["early"]
    assert "runs 1" in res.stdout  # the flow run is recorded on the server of the block
    [where] = [ln.split(None, 1)[1] for ln in res.stdout.splitlines()
               if ln.startswith("server-stderr")]
    assert Path(where).parent == tmp and Path(where).name.startswith("ccstae-prefect-server-")
    assert not any(tmp.iterdir())
    assert "Logging error" not in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]


_CHILD_KILLED = """
import sys, time
from flows.embedded import spawn_server

server = spawn_server()
print("server", server.process.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(CHILD_S)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_early_server_ends_with_a_killed_parent(tmp_path: Path) -> None:
    """A server started early (``spawn_server``) ends with its parent even when the parent
    runs no clean-up at all (SIGKILL), whatever the parent was doing."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_CHILD_KILLED))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=_child_env(tmp_path) | {"TMPDIR": str(tmp_path)},
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline().split()[1])
        server = psutil.Process(pid)
        time.sleep(1.0)  # well into the server's boot
        assert server.is_running() and "uvicorn" in server.cmdline()
        proc.kill()
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs([server], timeout=ORPHAN_S)
        assert not alive
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.timeout(CHILD_S)
def test_run_refusing_its_input_stops_the_early_server(tmp_path: Path) -> None:
    """`ccstae run` starts Prefect's server before it checks the input (the server boots
    meanwhile): an input the checks refuse ends the command with its message, exit code 2,
    and no server process or server log left behind."""
    import numpy as np

    data = np.ones((6, 5, 32, 32), np.float32)
    data[4, 3, 10, 10] = np.nan
    np.save(tmp_path / "nan.npy", data)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = _child_env(tmp_path) | {"TMPDIR": str(tmp)}
    res = subprocess.run([sys.executable, "-m", "ccstae_hpc.cli", "run", str(tmp_path / "nan.npy"),
                          "--out", str(tmp_path / "o.zarr")], capture_output=True, text=True,
                         env=env, timeout=CHILD_S, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "NaN" in res.stderr and "y=4, x=3" in res.stderr
    assert not any(tmp.iterdir())  # the server's log is removed with it
    ours = []
    for p in psutil.process_iter():
        try:
            if "uvicorn" in p.cmdline() and p.environ().get("PREFECT_HOME") == env["PREFECT_HOME"]:
                ours.append(p)
        except psutil.Error:
            pass
    assert not ours, [p.cmdline() for p in ours]
    assert not (tmp_path / "o.zarr").exists()


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16 x 16 scan (64 px detector), preprocessed and trained for one epoch."""
    from ddp_helpers import make_prepped

    from ccstae_hpc.core.config import TrainConfig
    from ccstae_hpc.stages.train import train_store

    store = make_prepped(tmp_path_factory.mktemp("trained"))
    train_store(store, None, TrainConfig(epochs=1))
    return store


def _model_state(store: Path) -> tuple[str, dict[str, Any]]:
    import zarr

    from ccstae_hpc.stages.train import load_model

    model, _, _ = load_model(store)
    run_id = zarr.open_group(str(store), mode="r")["model"].attrs["run_id"]
    return run_id, {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _assert_same_model(store: Path, before: tuple[str, dict[str, Any]]) -> None:
    import numpy as np
    import zarr

    run_id, weights = _model_state(store)
    assert run_id == before[0]
    for k, v in before[1].items():
        assert np.array_equal(v, weights[k]), k
    assert "model.partial" not in zarr.open_group(str(store), mode="r")  # nothing to resume


def test_train_refuses_a_diverged_model(trained: Path, tmp_path: Path) -> None:
    """A learning rate that blows the weights up: the loss ends NaN, train_store raises a
    TrainError saying what to do, and the model trained before is untouched."""
    from ccstae_hpc.core.config import TrainConfig
    from ccstae_hpc.stages.train import NonFiniteTrainingError, TrainError, train_store

    store = Path(shutil.copytree(trained, tmp_path / "s.zarr"))
    before = _model_state(store)
    with pytest.raises(TrainError, match="training diverged") as e:
        train_store(store, None, TrainConfig(epochs=1, lr=1e30), overwrite=True)
    assert "lower learning rate" in str(e.value) and "NaN/Inf" in str(e.value)
    # its own class: flows.tasks starts over on a plain TrainError (a checkpoint of other
    # settings), which would only repeat this one
    assert type(e.value) is NonFiniteTrainingError
    _assert_same_model(store, before)


def test_train_refuses_inf_in_the_training_set(trained: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Inf in prep after preprocessing: `ccstae train --overwrite` exits 2 with one line
    that says what to do (it was an internal index error), and the model is untouched."""
    import numpy as np
    import zarr

    from ccstae_hpc import cli

    store = Path(shutil.copytree(trained, tmp_path / "s.zarr"))
    before = _model_state(store)
    g = zarr.open_group(str(store), mode="r+")["prep"]
    scale = np.asarray(g["train_scale"][...])
    scale[:8] = np.inf  # e.g. an empty (all-zero) pattern scaled by 1/mean
    g["train_scale"][...] = scale

    rc = cli.main(["train", str(store), "--epochs", "1", "--quiet", "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "NaN/Inf for 8 training pattern(s)" in err and "preprocess" in err, err
    _assert_same_model(store, before)


# --------------------------------------------------------------------------- reference


def _affine(sample: Any) -> dict[str, Any]:
    """Identity fits on a 16 x 16 scan, phase 1 where ``sample`` is True, vacuum elsewhere."""
    import numpy as np

    ny, nx = sample.shape
    rng = np.random.default_rng(0)
    theta = np.zeros((ny, nx, 2, 3), np.float32)
    theta[..., :2] = np.eye(2) + 1e-3 * rng.standard_normal((ny, nx, 2, 2))
    return {"theta": theta, "entry": np.where(sample, 0, 1).astype(np.int16),
            "phase": sample.astype(np.int16), "residual": np.zeros((ny, nx), np.float32)}


def test_reference_error_wording() -> None:
    """A box the user gave that misses the sample: "choose a box inside the sample".  No box
    and nothing to reference: the automatic reference found no valid pattern, what to check,
    and --reference; never "choose a box"."""
    import numpy as np

    from ccstae_hpc.core.config import MapConfig
    from ccstae_hpc.core.mapping import ReferenceRegionError, assemble_strain
    from ccstae_hpc.core.phases import single_phase_map

    left = np.zeros((16, 16), bool)
    left[:, :8] = True
    ds = assemble_strain(_affine(left), single_phase_map(), MapConfig(pool_sigma=0.0))
    assert int(ds.reference.sum()) == 128  # the automatic reference: all of phase 1

    box = MapConfig(pool_sigma=0.0, reference=(0, 16, 10, 16))  # the vacuum half
    with pytest.raises(ReferenceRegionError, match="choose a box inside the sample"):
        assemble_strain(_affine(left), single_phase_map(), box)

    vacuum = np.zeros((16, 16), bool)
    with pytest.raises(ReferenceRegionError) as e:
        assemble_strain(_affine(vacuum), single_phase_map(), MapConfig(pool_sigma=0.0))
    msg = str(e.value)
    assert "no valid pattern was found for the automatic reference" in msg
    assert "--reference" in msg and "preprocess" in msg and "train" in msg
    assert "choose a box" not in msg


# --------------------------------------------------------------------------- flow parameters


def test_file_parameters_are_checked_before_any_work(tmp_path: Path) -> None:
    """The flows' own validation (what Prefect runs before the flow body): a missing input
    or a store path naming a file or a foreign directory fails; a missing truth_path (the
    example's, kept by a run on another input) becomes None with a warning; while
    deployments are registered only the syntax is checked."""
    import logging

    from prefect.exceptions import ParameterTypeError

    from flows.params import deferred_file_checks
    from flows.pipeline import pipeline

    npy = tmp_path / "x.npy"
    npy.write_bytes(b"")
    truth = tmp_path / "x.truth.npz"
    truth.write_bytes(b"")
    good = {"input_path": str(npy), "store_path": str(tmp_path / "x.zarr")}

    assert pipeline.validate_parameters(good | {"truth_path": str(truth)})["truth_path"] == \
        str(truth)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("flows.params").addHandler(handler)
    try:
        params = pipeline.validate_parameters(good | {"truth_path": "demo_out/flow/nope.npz"})
    finally:
        logging.getLogger("flows.params").removeHandler(handler)
    assert params["truth_path"] is None
    assert any("comparison with the truth is skipped" in r.getMessage() for r in records)

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    (tmp_path / "empty").mkdir()
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "s.zarr" / "zarr.json").write_text("{}")
    for bad, match in [({"input_path": str(tmp_path / "missing.npy")}, "does not exist"),
                       ({"store_path": str(npy)}, "is a file"),
                       ({"store_path": str(tmp_path / "other")}, "not a Zarr store")]:
        with pytest.raises(ParameterTypeError, match=match):
            pipeline.validate_parameters(good | bad)
        with deferred_file_checks():
            pipeline.validate_parameters(good | bad)  # a deployment's defaults: syntax only
    for ok in ("empty", "s.zarr"):
        pipeline.validate_parameters(good | {"store_path": str(tmp_path / ok)})
    assert (tmp_path / "other" / "notes.txt").exists()
