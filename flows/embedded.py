"""A temporary Prefect server for flows run in this process, stopped with it whatever happens.

Without ``PREFECT_API_URL``, Prefect starts a server (uvicorn, a subprocess) the first time a
flow talks to its API and stops it only in an ``atexit`` hook.  That leaves two problems:

* a SIGTERM (batch-job end, ``kill``, a supervisor) kills the process without running atexit
  hooks, so the uvicorn subprocess and the Dask worker processes of a running flow are
  orphaned;
* the atexit hook logs "Stopping temporary server" through Prefect's console handler, whose
  stream may already be closed at interpreter exit (pytest's captured streams, a closed
  pipe): Python then prints ``--- Logging error ---`` with a traceback.

:func:`embedded_prefect` starts the server itself (Prefect's own, which listens on
127.0.0.1 only), turns SIGTERM into an exception that unwinds the flow (its Dask cluster
closes on the way out), sends the queued logs and events while the server still listens,
stops the server inside the ``with`` block and removes Prefect's atexit hook.  After a
signal it also ends any child process started inside the block that is still alive, then
lets the signal take its usual course (the process ends with it).

A command that knows early that it will run a flow (``ccstae run``) can start the server's
process before it imports Prefect at all (:func:`spawn_server`, 10 ms) and hand it to
:func:`embedded_prefect`: the server then boots on another core while the command checks its
input and imports Prefect, torch and the flows, instead of after Prefect's server module
(2 s) has been imported.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse
from urllib.request import urlopen

__all__ = ["LOOPBACK", "EarlyServer", "Terminated", "embedded_prefect", "offline_defaults",
           "spawn_server"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Prefect's default wait for a fresh server is shorter than a first database migration on a
# small machine (~25 s on two cores)
STARTUP_TIMEOUT_S = 120
# seconds to send queued logs/events before the server stops (shorter after a signal: the
# process is asked to go)
DRAIN_S = 5.0
DRAIN_AFTER_SIGNAL_S = 1.0
# seconds a leftover child process gets between SIGTERM and SIGKILL
CHILD_GRACE_S = 3.0
# characters of the server's output quoted when it fails to start
SERVER_LOG_TAIL = 3000
# seconds between looks for the server's process while stderr goes to its log
SPAWN_POLL_S = 0.005
# seconds between health requests to a server that is starting, and each request's limit
HEALTH_POLL_S = 0.05
HEALTH_TIMEOUT_S = 2.0
# seconds a stopping server gets between SIGTERM and SIGKILL (as Prefect's own stop)
SERVER_STOP_S = 5.0
# the exit status of uvicorn that could not bind its port (taken meanwhile): try another
EXIT_PORT_IN_USE = 3
# what Prefect's own temporary server sets in its process's environment
# (prefect.server.api.server.SubprocessASGIServer): no UI; the app built once, in ephemeral
# mode (no background services)
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
              "PREFECT__SERVER_FINAL": "1"}


class Terminated(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt
    """Raised in the main thread by SIGTERM inside :func:`embedded_prefect`.

    A BaseException, so that ``except Exception`` in flow code does not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signal.Signals(signum).name}")
        self.signum = signum


def _drain_prefect_workers(timeout: float) -> None:
    """Send the queued logs and events while the server still listens (after it stops they
    fail at exit and print connection errors)."""
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout)
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout)


def _children() -> dict[int, Any]:
    import psutil

    try:
        return {p.pid: p for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return {}


def _end_new_children(before: set[int]) -> None:
    """Terminate, then kill, the child processes started since ``before`` was taken."""
    import psutil

    new = [p for pid, p in _children().items() if pid not in before]
    for p in new:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(new, timeout=CHILD_GRACE_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=CHILD_GRACE_S)


def _server() -> Any:
    """Prefect's temporary server: the singleton its ephemeral clients start and use."""
    from prefect.server.api.server import SubprocessASGIServer

    return SubprocessASGIServer()


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """File descriptor 2 of this process on ``path`` inside the block (a subprocess started
    there keeps it); unchanged where stderr is no file descriptor."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _start(server: Any, log_path: Path, preload: Sequence[str] = ()) -> None:
    """Start ``server``, its output going to ``log_path``, and check that it listens on
    loopback only; import the modules ``preload`` while it starts.

    The server's output is for diagnosis, not for the user of a run: it prints, for one,
    the database operations that its shutdown cancels (a SQLAlchemy traceback, harmless).
    Its process inherits this process's stderr when it is spawned, so stderr goes to the
    file only until then; the server then boots in its own process (3-4 s, on another core)
    while this thread imports ``preload`` (`ccstae run`'s flow modules: 1.4 s once Prefect's
    server module is loaded) and a helper thread waits for the server to answer.
    """
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as TIMEOUT

    timeout = max(int(TIMEOUT.value() or 0), STARTUP_TIMEOUT_S)
    failed: list[BaseException] = []

    def start() -> None:
        try:
            server.start(timeout=timeout)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread below
            failed.append(e)

    waiter = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    with _stderr_to(log_path):
        waiter.start()
        # until the server's process exists (or its start failed)
        while server.server_process is None and waiter.is_alive():
            time.sleep(SPAWN_POLL_S)
    for name in preload:
        importlib.import_module(name)
    waiter.join()
    if failed:
        raise _not_started(failed[0], log_path) from failed[0]
    host = urlparse(server.address).hostname
    if host != LOOPBACK:
        raise RuntimeError(f"Prefect's temporary server listens on {host}, not {LOOPBACK}; "
                           "start a server yourself (`prefect server start --host "
                           "127.0.0.1`) and set PREFECT_API_URL")


def _not_started(why: object, log_path: Path) -> RuntimeError:
    """The error of a server that did not start, quoting the end of its output."""
    tail = log_path.read_text(errors="replace")[-SERVER_LOG_TAIL:] if log_path.exists() \
        else ""
    return RuntimeError(f"Prefect's temporary server did not start: {why}\n"
                        f"its output ({log_path}) ends with:\n{tail}")


def _log_path() -> Path:
    return Path(tempfile.gettempdir()) / f"ccstae-prefect-server-{os.getpid()}.log"


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# how an early server's process runs uvicorn: it first asks the kernel to end it with its
# parent (Linux: PR_SET_PDEATHSIG), so that no signal or crash of the parent, even one that
# runs no clean-up (SIGKILL, a SIGTERM before embedded_prefect handles it), leaves it behind
_LAUNCH = """\
import os, sys
try:
    import ctypes, signal
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
except (OSError, AttributeError, TypeError):
    pass  # not Linux (no prctl): embedded_prefect and the caller's finally stop it
if os.getppid() != int(os.environ.pop("CCSTAE_SERVER_PARENT")):
    sys.exit(0)  # the parent ended before the request above
import runpy
sys.argv = sys.argv[1:]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


class EarlyServer:
    """Prefect's temporary server (the process its ephemeral mode starts: uvicorn serving
    ``prefect.server.api.server:create_app`` on 127.0.0.1), started without importing Prefect
    in this process; its output goes to a log file.  :func:`embedded_prefect` waits for it,
    points this process's Prefect settings at it and stops it."""

    def __init__(self) -> None:
        self.log_path = _log_path()
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._start()

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/api"

    def _start(self) -> None:
        spec = importlib.util.find_spec("prefect")
        if spec is None or spec.origin is None:
            raise RuntimeError("Prefect is not installed; run `make venv` (or pip install -e .)")
        self.port = _free_port()
        # the directory that holds the prefect package, as Prefect's own start passes it
        app_dir = Path(spec.origin).parent.parent
        cmd = [sys.executable, "-c", _LAUNCH, "uvicorn", "--app-dir", str(app_dir), "--factory",
               "prefect.server.api.server:create_app", "--host", LOOPBACK, "--port",
               str(self.port), "--log-level", "error", "--lifespan", "on"]
        with open(self.log_path, "ab") as out:
            env = os.environ | SERVER_ENV | {"CCSTAE_SERVER_PARENT": str(os.getpid())}
            self.process = subprocess.Popen(cmd, env=env,
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def wait(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Until the server answers its health check.

        Raises
        ------
        RuntimeError
            The server ended or did not answer within ``timeout`` seconds (its log is kept
            and quoted).
        """
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.process is not None
            rc = self.process.poll()
            if rc == EXIT_PORT_IN_USE:  # the port was taken between our look and its bind
                self._start()
                continue
            if rc is not None:
                self._fail(f"it exited with status {rc}")
            try:
                with urlopen(f"{self.api_url}/health", timeout=HEALTH_TIMEOUT_S) as r:
                    if r.status == 200:
                        return
            except (URLError, OSError):
                pass
            time.sleep(HEALTH_POLL_S)
        self._fail(f"it did not answer within {timeout:.0f} s")

    def _fail(self, why: str) -> None:
        self.stop()
        raise _not_started(why, self.log_path)

    def stop(self) -> None:
        """End the server's process (SIGTERM, then SIGKILL); idempotent."""
        proc, self.process = self.process, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=SERVER_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def discard(self) -> None:
        """Stop the server and remove its log (a server that was not needed, or that ended
        its work)."""
        self.stop()
        self.log_path.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def offline_defaults() -> None:
    """Prefect's environment for a machine without network whose server is started here:
    no analytics (they would try to reach the network) and a startup timeout that a new
    database's migrations (~25 s) fit in.  Only defaults: the user's variables win.  Set
    before Prefect's settings are first read (by an import or by the server's process)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                          str(STARTUP_TIMEOUT_S))


def spawn_server() -> EarlyServer | None:
    """Start Prefect's temporary server now, for a later :func:`embedded_prefect`; None
    when ``PREFECT_API_URL`` names a server (in the environment, or in Prefect's settings
    when Prefect is imported already, e.g. a test harness's; a profile that names one is
    found only once Prefect is imported: :func:`embedded_prefect` then stops this one)."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    if "prefect.settings" in sys.modules:  # loaded already: asking costs nothing
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            return None
    offline_defaults()  # the server reads them when it starts
    return EarlyServer()


def _stop_server(server: Any) -> None:
    # our stop replaces Prefect's atexit hook, which would log after the streams closed
    atexit.unregister(server.stop)
    server.stop()


@contextlib.contextmanager
def embedded_prefect(preload: Sequence[str] = (), early: EarlyServer | None = None
                     ) -> Iterator[str | None]:
    """Run flows in this process against a temporary local Prefect server.

    With ``PREFECT_API_URL`` set nothing is started (the runs are recorded there), and a
    server that is already running in this process (e.g. a test harness's) is used and left
    running.  Otherwise Prefect's temporary server is started on 127.0.0.1 (4 s; 25 s when
    its database is new) and stopped when the block ends.  The modules named in ``preload``
    are imported before the block begins, while the server starts.  A server ``early``
    from :func:`spawn_server` is used instead of starting one (and stopped, also when
    ``PREFECT_API_URL`` turns out to name another).

    Inside the block SIGTERM raises :class:`Terminated` in the main thread (SIGINT keeps
    raising KeyboardInterrupt), so that flows unwind and close their Dask clusters.  When the
    block ends by a signal, child processes started inside it that are still alive are
    terminated, the previous signal handler is restored and the signal delivered again: a
    process killed with SIGTERM still ends as killed by SIGTERM, without orphans.

    Yields
    ------
    str or None
        The API URL of the temporary server, or None when ``PREFECT_API_URL`` names one.
    """
    offline_defaults()
    from prefect.exceptions import TerminationSignal
    from prefect.settings import PREFECT_API_URL

    before = set(_children())
    main = threading.current_thread() is threading.main_thread()
    previous: Any = None
    stopping = threading.Event()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if not stopping.is_set():  # a second SIGTERM during the clean-up must not cut it
            raise Terminated(signum)

    if early is not None and PREFECT_API_URL.value():
        early.discard()  # a profile names a server: runs are recorded there
        early = None
    server = None if PREFECT_API_URL.value() or early is not None else _server()
    log_path = _log_path()
    # a server already running here (e.g. a test harness's) is used and left running
    ours = server is not None and not server.running
    if main:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    signum: int | None = None
    started = False
    # the early server's settings: closed after its queued logs are sent, in the finally
    settings = contextlib.ExitStack()
    try:
        if ours:
            _start(server, log_path, preload)  # imports preload while the server starts
            started = True
        else:  # no server to wait for, or one that boots meanwhile: imported at once
            for name in preload:
                importlib.import_module(name)
        if early is not None:
            try:
                early.wait()
            except RuntimeError:
                early = None  # stopped; its log is kept, the error names it
                raise
            from prefect.settings import temporary_settings

            settings.enter_context(temporary_settings({PREFECT_API_URL: early.api_url}))
        yield early.api_url if early is not None else (
            server.api_url if server is not None else None)
    except Terminated as e:
        signum = e.signum
        raise
    except TerminationSignal as e:  # Prefect's own SIGTERM bridge inside a flow run
        signum = e.signal
        raise
    except KeyboardInterrupt:
        signum = signal.SIGINT
        raise
    finally:
        stopping.set()
        try:
            drain = DRAIN_S if signum is None else DRAIN_AFTER_SIGNAL_S
            if ours:
                if server.running:
                    _drain_prefect_workers(drain)
                _stop_server(server)
                if started:  # kept where the server failed to start: that error names it
                    log_path.unlink(missing_ok=True)
            if early is not None:
                if early.running:
                    _drain_prefect_workers(drain)
                early.discard()
            if signum is not None:
                _end_new_children(before)
        finally:
            settings.close()
            if main:  # None: a handler not set from Python, i.e. the default
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if signum == signal.SIGTERM and main and previous in (signal.SIG_DFL, None):
            # end as the signal would have: exit status "killed by SIGTERM", no traceback
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.kill(os.getpid(), signal.SIGTERM)
