"""Distributed execution: DDP process groups, their collectives, and the Dask launchers.

Training runs one rank per process, started in one of three ways:

* **single process**: ``DistEnv()`` (world size 1, no process group);
* **Dask**: :func:`run_on_dask` pins one task per worker of a ``distributed.Client`` (rank
  ``r`` on the ``r``-th worker in address order) and passes each the rendezvous address
  (rank 0's host, a port found free there);
* **environment**: ranks started by ``srun``/``torchrun``/``mpiexec`` read
  :func:`env_from_environ` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``, with SLURM/PMI/Open MPI fallbacks).

Each rank then enters :func:`process_group` (NCCL on ``cuda:LOCAL_RANK`` where CUDA is
available, gloo on CPU) and runs the same training function; :class:`Comm` wraps the few
collectives that training needs so that the single-process path runs the same code.

Inference needs no process group: its tasks (:func:`ccstae_hpc.stages.map.map_rows`) run on
the workers of the same Dask clients (:mod:`ccstae_hpc.runtime.clients`).
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ccstae_hpc.runtime.threads import set_torch_threads

__all__ = [
    "DistEnv",
    "Comm",
    "env_from_environ",
    "free_port",
    "device_for",
    "process_group",
    "run_on_dask",
]

# how long a rank waits for its peers (rendezvous and each collective) before failing
DEFAULT_TIMEOUT_S = 600.0

# standard variable first, then SLURM, PMI (MPICH/Cray/PALS) and Open MPI equivalents
_RANK_VARS = ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
_WORLD_VARS = ("WORLD_SIZE", "SLURM_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
_LOCAL_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "PMI_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    """Where this rank sits in the job and how to reach rank 0."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.local_rank < 0:
            raise ValueError(f"local rank {self.local_rank} is negative")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first(environ: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for n in names:
        v = environ.get(n)
        if v not in (None, ""):
            return v
    return None


def env_from_environ(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This rank's :class:`DistEnv` from the launcher's environment variables.

    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, or set in the batch script) take
    precedence over ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` and the PMI/Open MPI
    equivalents.  Without any, this is a single process.  ``MASTER_ADDR`` defaults to
    127.0.0.1 (right for ranks on one host) and ``MASTER_PORT`` to 29500.
    """
    env = os.environ if environ is None else environ
    rank = int(_first(env, _RANK_VARS) or 0)
    world = int(_first(env, _WORLD_VARS) or 1)
    local = int(_first(env, _LOCAL_VARS) or 0)
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    port = int(env.get("MASTER_PORT") or 29500)
    return DistEnv(rank, world, local, addr, port)


def free_port(host: str = "") -> int:
    """A TCP port that is free on this host now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def device_for(local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` where CUDA is available, else the CPU.

    A worker that sees a single GPU (``CUDA_VISIBLE_DEVICES`` restricted per worker, as
    :mod:`ccstae_hpc.runtime.jobqueue` does) uses it whatever its local rank.
    """
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    """Join the default process group for the duration of the block (no-op for one rank)."""
    if not env.distributed:
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already active in this "
                           "process; run one rank per process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=env.timeout_s),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


class Comm:
    """The collectives training needs; identities when there is a single rank.

    Arrays travel as float64 (or int64) tensors on the process group's device.
    """

    def __init__(self, env: DistEnv, device: torch.device) -> None:
        self.env = env
        self.device = device

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world(self) -> int:
        return self.env.world_size

    def allreduce_sum(self, a: np.ndarray) -> np.ndarray:
        """Elementwise sum over ranks."""
        if not self.env.distributed:
            return np.asarray(a)
        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def broadcast(self, a: np.ndarray) -> np.ndarray:
        """Rank 0's array on every rank (shape and dtype must agree)."""
        if not self.env.distributed:
            return np.asarray(a)
        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        dist.broadcast(t, src=0)
        return t.cpu().numpy()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's picklable object on every rank."""
        if not self.env.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order, on every rank."""
        if not self.env.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.env.distributed:
            dist.barrier()


# ------------------------------------------------------------------------------ Dask launcher


def _worker_threads() -> int:
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return max(1, torch.get_num_threads())


def _rank_task(fn: Callable[..., Any], env: DistEnv, args: tuple, kwargs: dict) -> Any:
    """Body of one pinned Dask task: run ``fn(env, *args, **kwargs)`` as one rank."""
    before = torch.get_num_threads()
    # one torch thread per worker thread: ranks sharing a host must not oversubscribe it
    set_torch_threads(_worker_threads())
    try:
        return fn(env, *args, **kwargs)
    finally:
        set_torch_threads(before)


def _peer_failure(e: BaseException | None) -> bool:
    """An error raised because another rank went away (not a cause of its own)."""
    text = str(e)
    return isinstance(e, dist.DistBackendError) or any(
        w in text for w in ("Connection closed by peer", "Connection reset by peer",
                            "Broken pipe", "NCCL communicator was aborted"))


def run_on_dask(
    client: Any,
    fn: Callable[..., Any],
    *args: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    workers: list[str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(env, *args, **kwargs)`` as one rank per Dask worker; results in rank order.

    Each rank is one ``client.submit(..., workers=[addr], pure=False)`` pinned to its worker.
    Rank 0 is the first worker in address order; the rendezvous is a port found free on
    rank 0's host.  Every worker must be its own process (``torch.distributed`` keeps one
    process group per process) and have a free thread: a busy worker delays every rank.

    Raises
    ------
    RuntimeError
        Fewer than one worker, or workers that share a process.
    Exception
        The first rank's failure; the other ranks are cancelled (they also fail on their
        own once their peer's connections close).
    """
    from distributed import as_completed, wait
    from distributed.comm import get_address_host

    addrs = sorted(workers or client.scheduler_info()["workers"])
    if not addrs:
        raise RuntimeError("the Dask cluster has no workers; start some before training")
    pids = client.run(os.getpid, workers=addrs)
    if len(set(pids.values())) < len(addrs):
        raise RuntimeError(
            "Dask workers share a process; DDP needs one process per rank "
            "(LocalCluster(processes=True) or one worker process per GPU)")
    hosts = [get_address_host(a) for a in addrs]
    master = hosts[0]
    port = client.run(free_port, workers=[addrs[0]])[addrs[0]]
    seen: dict[str, int] = {}
    futures = []
    for rank, (addr, host) in enumerate(zip(addrs, hosts, strict=True)):
        local = seen.get(host, 0)
        seen[host] = local + 1
        env = DistEnv(rank, len(addrs), local, master, int(port), timeout_s)
        futures.append(client.submit(_rank_task, fn, env, args, kwargs, workers=[addr],
                                     allow_other_workers=False, pure=False,
                                     key=f"ccstae-ddp-rank{rank}-{port}"))
    # fail fast: the first failure cancels what has not started instead of leaving ranks
    # blocked in a collective until the timeout.  Peers of a failed rank fail too (their
    # connections close), often first: report the rank whose error is not such a follow-on.
    for fut in as_completed(futures):
        if fut.status == "error":
            try:
                wait(futures, timeout=10)
            except TimeoutError:
                pass
            errors = [f for f in futures if f.status == "error"]
            cause = next((f for f in errors if not _peer_failure(f.exception())), fut)
            client.cancel([f for f in futures if f.status == "pending"])
            cause.result()  # re-raises that rank's exception with its remote traceback
    return client.gather(futures)
