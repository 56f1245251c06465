"""Local Dask clusters (:func:`local_cluster`: the stage commands' ``--workers N``, the
flows' ``local`` section) and the stage commands' clients (``--scheduler ADDRESS`` too).

A local cluster's worker processes start from a fork server that has imported the modules
their tasks run (:data:`WORKER_MODULES`: torch, the model, the map and training stages)
once, instead of each spawned worker importing them again: measured on 2 cores, a spawned
worker spent about 1.5 s of CPU on imports (torch 0.9 s) while the map stage calibrated on
the other core.  The fork server is a clean process (no threads, torch imported but never
run), so forking it is safe.  Where the platform has no fork server (Windows) the workers
are spawned as before.

This module imports neither torch nor the stages, so that a command can start its workers
before it imports them itself (:func:`dask_client_soon`).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

__all__ = ["WORKER_MODULES", "worker_start_method", "local_cluster", "dask_client",
           "dask_client_soon"]

# what the fork server imports before it forks workers: everything a map block, a
# preprocessing block or a training rank imports.  One list for every command: a process
# has one fork server, and what it imported at its start serves every later cluster of the
# process.  Not the CLI: a worker runs its parent's main module again (as __mp_main__), and
# under `python -m ccstae_hpc.cli` runpy warns when that module is imported already; the
# CLI's own imports beyond the stages take 15 ms
WORKER_MODULES = (
    "distributed",
    "ccstae_hpc.stages.map",
    "ccstae_hpc.stages.prep",
    "ccstae_hpc.stages.train",
    # last: freezes what the ones before imported (see its docstring)
    "ccstae_hpc.runtime.fork_ready",
)


def worker_start_method() -> str:
    """``forkserver`` where the platform has it, else ``spawn``."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _preload(modules: Sequence[str]) -> None:
    """Make the fork server import ``modules`` when it starts (no effect once it runs)."""
    from distributed.utils import get_mp_context

    # distributed sets its own preload list the first time it makes the context; ours,
    # set after it, is the one used when the server starts
    ctx = get_mp_context()
    ctx.set_forkserver_preload(list(modules))


@contextmanager
def _start_method(processes: bool) -> Iterator[None]:
    """Worker processes started while the block runs come from the fork server."""
    import dask

    method = worker_start_method() if processes else None
    if method is None:
        yield
        return
    with dask.config.set({"distributed.worker.multiprocessing-method": method}):
        if method == "forkserver":
            _preload(WORKER_MODULES)
        yield


def local_cluster(**options: Any) -> Any:
    """A ``distributed.LocalCluster(**options)`` whose worker processes are forked from the
    preloaded server (:data:`WORKER_MODULES`), with this process's environment.

    The start method holds while the cluster starts its workers: a worker the nanny
    restarts later is spawned (slower, the same otherwise).  ``processes=False`` clusters
    are started as given.
    """
    from distributed import LocalCluster

    processes = bool(options.get("processes", True))
    if processes:
        # the environment is this process's now, as a spawned worker's would be (a fork
        # server keeps the one it started with); the caller's variables on top
        options["env"] = dict(os.environ) | dict(options.get("env") or {})
    with _start_method(processes):
        cluster = LocalCluster(**options)
    return cluster


@contextmanager
def dask_client(workers: int = 0, scheduler: str | None = None) -> Iterator[Any]:
    """A client of a running scheduler, of a new local cluster of ``workers`` processes
    (one thread each, forked from a server that has imported :data:`WORKER_MODULES`), or
    None (neither given); closed, with its cluster, on exit."""
    if not scheduler and workers <= 0:
        yield None
        return
    from distributed import Client

    from ccstae_hpc.runtime.worker_logs import quiet_shutdown

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    # the nannies read the start method whenever they start (or restart) a worker: it holds
    # for the cluster's whole life
    with _start_method(True):
        # loopback only: nobody else on the network may reach the scheduler; with no
        # dashboard address, distributed serves its HTTP routes on the scheduler's host
        with local_cluster(n_workers=workers, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address=None) as cluster, \
                Client(cluster) as client:
            quiet_shutdown(client)
            yield client


@contextmanager
def dask_client_soon(workers: int = 0, scheduler: str | None = None
                     ) -> Iterator[Future | None]:
    """:func:`dask_client` started in a background thread: yields a ``Future`` of the client
    (None when neither ``workers`` nor ``scheduler`` is given), so that the caller prepares
    its work while the worker processes start (a local cluster takes 1-3 s).

    The client is entered and left in that thread (its context variables must be reset in
    the context that set them) and closed, with its cluster, when the block ends.
    """
    if not scheduler and workers <= 0:
        yield None
        return
    ready: Future = Future()
    stop = threading.Event()

    def life() -> None:
        try:
            with dask_client(workers, scheduler) as client:
                ready.set_result(client)
                stop.wait()
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the Future
            if not ready.done():
                ready.set_exception(e)

    thread = threading.Thread(target=life, name="dask-client", daemon=True)
    thread.start()
    try:
        yield ready
    finally:
        stop.set()
        thread.join()
