"""Worker processes of the clusters this project starts end without library noise.

While a worker closes it may still log a heartbeat that met the scheduler's closed
connection ("Failed to communicate with scheduler during heartbeat", with a traceback)
straight to the command's stderr: a race in distributed's shutdown, after the run's result
is decided, that says nothing to the user (it made ``ccstae run --quiet`` print a traceback
after a failed flow, in about one run of many).  :class:`QuietShutdown` raises the worker's
``distributed`` loggers to CRITICAL when the worker starts to close (``Worker.close``
removes its plugins before it stops its heartbeat and closes its connections); what the
worker logs while it runs is unchanged.

Registered only on clusters the project starts itself (``runtime.clients.dask_client``,
``flows.dask_cluster.DaskCluster``), never on a scheduler the user names.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["QUIET_SHUTDOWN", "QuietShutdown", "quiet_shutdown"]

# the name the plugin is registered under (registering it again replaces it)
QUIET_SHUTDOWN = "ccstae-quiet-shutdown"
# the logger tree silenced at close: distributed's own (the worker, its comms, its nanny)
_LIBRARY_LOGGER = "distributed"


class QuietShutdown(WorkerPlugin):
    """At a worker's close, only CRITICAL records of ``distributed`` are still emitted."""

    def teardown(self, worker: Any) -> None:  # noqa: ARG002 - WorkerPlugin's signature
        logging.getLogger(_LIBRARY_LOGGER).setLevel(logging.CRITICAL)


def quiet_shutdown(client: Any) -> None:
    """Register :class:`QuietShutdown` on every present and future worker of ``client``."""
    client.register_plugin(QuietShutdown(), name=QUIET_SHUTDOWN)
