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
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlparse

__all__ = ["LOOPBACK", "Terminated", "embedded_prefect"]

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
        tail = log_path.read_text(errors="replace")[-SERVER_LOG_TAIL:] if log_path.exists() \
            else ""
        raise RuntimeError(f"Prefect's temporary server did not start: {failed[0]}\n"
                           f"its output ({log_path}) ends with:\n{tail}") from failed[0]
    host = urlparse(server.address).hostname
    if host != LOOPBACK:
        raise RuntimeError(f"Prefect's temporary server listens on {host}, not {LOOPBACK}; "
                           "start a server yourself (`prefect server start --host "
                           "127.0.0.1`) and set PREFECT_API_URL")


def _stop_server(server: Any) -> None:
    # our stop replaces Prefect's atexit hook, which would log after the streams closed
    atexit.unregister(server.stop)
    server.stop()


@contextlib.contextmanager
def embedded_prefect(preload: Sequence[str] = ()) -> Iterator[str | None]:
    """Run flows in this process against a temporary local Prefect server.

    With ``PREFECT_API_URL`` set nothing is started (the runs are recorded there), and a
    server that is already running in this process (e.g. a test harness's) is used and left
    running.  Otherwise Prefect's temporary server is started on 127.0.0.1 (4 s; 25 s when
    its database is new) and stopped when the block ends.  The modules named in ``preload``
    are imported before the block begins, while the server starts.

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
    # no network here and no server to wait for: Prefect's defaults assume both
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.exceptions import TerminationSignal
    from prefect.settings import PREFECT_API_URL

    before = set(_children())
    main = threading.current_thread() is threading.main_thread()
    previous: Any = None
    stopping = threading.Event()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if not stopping.is_set():  # a second SIGTERM during the clean-up must not cut it
            raise Terminated(signum)

    server = None if PREFECT_API_URL.value() else _server()
    log_path = Path(tempfile.gettempdir()) / f"ccstae-prefect-server-{os.getpid()}.log"
    # a server already running here (e.g. a test harness's) is used and left running
    ours = server is not None and not server.running
    if main:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    signum: int | None = None
    started = False
    try:
        if ours:
            _start(server, log_path, preload)  # imports preload while the server starts
            started = True
        else:  # no server of ours to wait for: imported at once
            for name in preload:
                importlib.import_module(name)
        yield server.api_url if server is not None else None
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
            if ours:
                if server.running:
                    _drain_prefect_workers(DRAIN_S if signum is None else DRAIN_AFTER_SIGNAL_S)
                _stop_server(server)
                if started:  # kept where the server failed to start: that error names it
                    log_path.unlink(missing_ok=True)
            if signum is not None:
                _end_new_children(before)
        finally:
            if main:  # None: a handler not set from Python, i.e. the default
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if signum == signal.SIGTERM and main and previous in (signal.SIG_DFL, None):
            # end as the signal would have: exit status "killed by SIGTERM", no traceback
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.kill(os.getpid(), signal.SIGTERM)
