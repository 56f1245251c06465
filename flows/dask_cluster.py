"""The Dask cluster of the chunked stages (preprocess, map), chosen by name, started lazily.

The Prefect tasks themselves stay in the flow process and hand plain library calls to Dask
(``preprocess_store(..., client=...)``, ``map_store(..., client=...)``).  Running Prefect
tasks *on* Dask workers (prefect-dask's ``DaskTaskRunner``) would make every worker talk to the
Prefect API (or start its own ephemeral server when ``PREFECT_API_URL`` is not set there),
for stages that are one call each anyway.

Names are sections of ``cluster/clusters.yaml`` resolved by ``ccstae_hpc.runtime.jobqueue``
(``local``, ``slurm-cpu``, ``SITE:SECTION``, ``FILE.yaml:SECTION``), or the address of a
running scheduler (``tcp://host:8786``).  When ``ccstae_hpc.runtime.jobqueue`` is not importable,
``local`` falls back to a plain ``LocalCluster``.  The cluster starts on first use, so a
rerun whose chunked stages are all done starts none.  Local schedulers and every dashboard
listen on 127.0.0.1 unless the section or the overrides name another host
(``ccstae_hpc.runtime.jobqueue.bind_loopback``).
"""

from __future__ import annotations

import re
import threading
from types import TracebackType
from typing import Any

__all__ = ["DaskCluster", "is_address"]

_ADDRESS = re.compile(r"^[a-z][a-z0-9+.-]*://")
# where the fallback LocalCluster listens (ccstae_hpc.runtime.jobqueue.bind_loopback otherwise)
_LOOPBACK = "127.0.0.1"


def is_address(name: str) -> bool:
    """True for a scheduler address such as ``tcp://10.0.0.1:8786``."""
    return bool(_ADDRESS.match(name))


def _site() -> Any | None:
    # imported lazily: the module (and dask_jobqueue behind it) is optional for the flows
    try:
        from ccstae_hpc.runtime import jobqueue as site
    except ImportError:
        return None
    return site if hasattr(site, "make_cluster") else None


class DaskCluster:
    """A named Dask cluster, started on the first :meth:`client` call, closed by :meth:`close`.

    Parameters
    ----------
    name : section name or scheduler address.
    overrides : keyword arguments replacing those of the section.
    workers : workers to scale to and wait for (batch-queue sections start with none; for
        ``local`` it sets ``n_workers``).  Default 1 for batch-queue sections.
    timeout : seconds to wait for the workers (queueing time included).
    """

    def __init__(self, name: str = "local", overrides: dict[str, Any] | None = None,
                 workers: int | None = None, timeout: float = 600.0) -> None:
        self.name = name
        self.overrides = dict(overrides or {})
        self.workers = workers
        self.timeout = timeout
        self._cluster: Any | None = None
        self._client: Any | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        """Resolve the section without starting anything (fails fast on a bad name).

        Raises
        ------
        ValueError, FileNotFoundError
            Unknown section or bad options.
        """
        if is_address(self.name):
            return
        site = _site()
        if site is None:
            if self.name != "local":
                raise ValueError(f"cluster {self.name!r} needs ccstae_hpc.runtime.jobqueue, which "
                                 "is not available; use 'local' or a scheduler address")
            return
        site.load_cluster_config(self.name, **self.overrides)

    @property
    def started(self) -> bool:
        """Whether a client exists (the cluster was needed)."""
        return self._client is not None

    def client(self) -> Any:
        """A connected ``distributed.Client``, starting the cluster on first use.

        A client whose connection broke (e.g. a scheduler that died between task retries)
        is replaced by a new cluster.
        """
        with self._lock:
            if self._client is not None and self._client.status not in ("running",
                                                                          "connecting"):
                self._close()
            if self._client is None:
                self._start()
            return self._client

    def _start(self) -> None:
        # the client becomes the process default: library code such as
        # distributed.as_completed(futures) finds the scheduler through it
        from distributed import Client

        from ccstae_hpc.runtime.worker_logs import quiet_shutdown

        if is_address(self.name):
            client = Client(self.name, timeout=self.timeout)
            if self.workers:
                client.wait_for_workers(self.workers, timeout=self.timeout)
            self._client = client
            return
        site = _site()
        opts = dict(self.overrides)
        if site is None:
            from ccstae_hpc.runtime.clients import local_cluster

            if self.workers:
                opts["n_workers"] = self.workers
            # loopback only (nobody else on the network may reach the scheduler or the
            # dashboard); port 0: any free port, several flows may run on one machine
            cluster = local_cluster(**({"host": _LOOPBACK, "dashboard_address": f"{_LOOPBACK}:0"}
                                       | opts))
            self._cluster, self._client = cluster, Client(cluster)
            quiet_shutdown(self._client)
            return
        kind = site.load_cluster_config(self.name, **opts).type
        if kind == "local" and self.workers:
            opts["n_workers"] = self.workers
        cluster = site.make_cluster(self.name, **opts)
        self._cluster = cluster
        try:
            if kind == "local":
                self._client = Client(cluster)
            else:
                self._client = site.scale_and_wait(cluster, self.workers or 1, self.timeout)
            quiet_shutdown(self._client)
        except BaseException:
            cluster.close()
            self._cluster = None
            raise

    def _close(self) -> None:
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        # best effort: a dead scheduler must not turn a finished flow into a failed one
        for obj in (client, cluster):
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # noqa: BLE001
                    pass

    def close(self) -> None:
        """Close the client and the cluster this object started (not an external one)."""
        with self._lock:
            self._close()

    def __enter__(self) -> DaskCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DaskCluster({self.name!r}, started={self.started})"
