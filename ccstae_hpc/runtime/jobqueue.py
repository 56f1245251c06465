"""Dask clusters from YAML site configs, batch templates for multi-node DDP, SLURM helpers.

Site configs live in ``cluster/clusters.yaml`` (sections ``local``, ``slurm-cpu``,
``slurm-gpu``, ``pbs-cpu``, ``pbs-gpu``, ``slurm-test``) and ``cluster/sites/SITE.yaml``
(addressed as ``SITE:SECTION``, e.g. ``perlmutter:gpu``).  A section has ``type: local |
slurm | pbs``; its other keys are keyword arguments of ``distributed.LocalCluster``,
``dask_jobqueue.SLURMCluster`` or ``dask_jobqueue.PBSCluster``.  Placeholders filled in by the
submitting process: ``{env:NAME}`` (shell-quoted value of an environment variable; a list
item naming an unset variable is dropped) and ``{python}`` (``sys.executable``).  The
directory is ``$CCSTAE_CLUSTER_DIR`` if set, else ``cluster/`` next to this package.

GPU sections run one worker process per GPU (``processes`` = GPUs per job, ``--resources
GPU=1``) and preload this module: :func:`dask_setup` then restricts ``CUDA_VISIBLE_DEVICES``
of worker *i* of a job to the job's *i*-th GPU.  Choosing CUDA/NCCL or CPU/gloo is left to
the training code.

Schedulers and dashboards listen on 127.0.0.1 unless a section names a host
(:func:`bind_loopback`); batch-queue schedulers keep the section's ``interface``.

Nothing here imports dask_jobqueue or starts anything at import time, so that the module is
cheap to preload in every worker.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ccstae_hpc.core.config import Config, check

if TYPE_CHECKING:
    from distributed import Client
    from distributed.deploy import Cluster

log = logging.getLogger(__name__)

CLUSTER_TYPES = ("local", "slurm", "pbs")
DEFAULT_FILE = "clusters.yaml"
GPU_PRELOAD = "ccstae_hpc.runtime.jobqueue"
# set in the job script so that the preloaded dask_setup knows how many workers share the job
PROCESSES_ENV = "CCSTAE_PROCESSES_PER_JOB"
# the scheduler address a rendered job script shows instead of a live one
SCRIPT_SCHEDULER = "tcp://SCHEDULER-ADDRESS:8786"
# Where the scheduler and its dashboard listen unless a section says otherwise: the loopback
# interface, so that nobody else on the network can reach (and run code through) them.  Reach
# a remote one with an SSH tunnel, e.g. `ssh -L 8787:127.0.0.1:8787 login-node`.
LOOPBACK = "127.0.0.1"
# LocalCluster: any free port (several flows may run on one machine); batch-queue clusters:
# dask-jobqueue's usual port (a taken port makes distributed pick another)
LOCAL_DASHBOARD = f"{LOOPBACK}:0"
JOBQUEUE_DASHBOARD = f"{LOOPBACK}:8787"
# the dashboards of workers on compute nodes: loopback, any free port (`dask worker` would
# serve them on every interface of the node)
WORKER_DASHBOARD = f"{LOOPBACK}:0"
# JobQueueCluster keywords that belong to the cluster/scheduler, not to the Job (job script)
_CLUSTER_ONLY_KEYS = frozenset(
    {
        "n_workers",
        "loop",
        "security",
        "shared_temp_directory",
        "silence_logs",
        "name",
        "asynchronous",
        "dashboard_address",
        "host",
        "scheduler_options",
        "scheduler_cls",
        "job_cls",
    }
)
_ENV_RE = re.compile(r"\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
_PYTHON_RE = re.compile(r"\{python\}")
# template placeholders: {lower_case_name} not preceded by '$', so that shell ${VAR} is kept
_TEMPLATE_RE = re.compile(r"(?<!\$)\{([a-z_][a-z0-9_]*)\}")


# --------------------------------------------------------------------------- configuration


def cluster_dir() -> Path:
    """Directory holding ``clusters.yaml``, ``sites/`` and ``templates/``."""
    env = os.environ.get("CCSTAE_CLUSTER_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "cluster"


@dataclass(frozen=True)
class ClusterConfig(Config):
    """One resolved cluster section: what :func:`make_cluster` builds, kept for provenance.

    Parameters
    ----------
    name : str
        How the section was addressed (``"slurm-gpu"``, ``"perlmutter:gpu"``, ``"f.yaml:x"``).
    type : str
        ``"local"``, ``"slurm"`` or ``"pbs"``.
    options : dict
        Keyword arguments of the cluster class, placeholders filled and overrides applied.
    """

    name: str
    type: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(
            self.type in CLUSTER_TYPES,
            f"cluster section {self.name!r} has type {self.type!r}; "
            f"type must be one of {list(CLUSTER_TYPES)}",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (options deep-copied so that the record cannot alias the config)."""
        out = super().to_dict()
        out["options"] = copy.deepcopy(self.options)
        return out


def _read_yaml(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"cluster config file {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(
            f"{path}: expected a mapping of section name -> mapping of options "
            "(see cluster/clusters.yaml)"
        )
    return data


def available_sections() -> list[str]:
    """Names accepted by :func:`make_cluster`: default sections, then ``site:section``."""
    root = cluster_dir()
    names = list(_read_yaml(root / DEFAULT_FILE))
    for site in sorted((root / "sites").glob("*.yaml")):
        names += [f"{site.stem}:{s}" for s in _read_yaml(site)]
    return names


def _is_path(spec: str) -> bool:
    # "dir/f.yaml", "f.yaml", "f.yml:section" are files; "gpu" and "site:gpu" are names
    return "/" in spec or re.search(r"\.ya?ml(:|$)", spec) is not None


def _locate(spec: str) -> tuple[Path, str | None, str]:
    """Map a name or path to (file, section or None for 'the only one', display name)."""
    if _is_path(spec):
        # "path/to/f.yaml:section" -- split at the last ':' only when the tail is no path
        path_part, sep, section = spec.rpartition(":")
        if sep and path_part.endswith((".yaml", ".yml")) and "/" not in section and section:
            return Path(path_part).expanduser(), section, spec
        return Path(spec).expanduser(), None, spec
    if ":" in spec:
        site, _, section = spec.partition(":")
        path = cluster_dir() / "sites" / f"{site}.yaml"
        if not path.is_file():
            raise ValueError(
                f"unknown cluster site {site!r} in {spec!r}: no {path}. "
                f"Available sections: {', '.join(available_sections())}"
            )
        return path, section, spec
    return cluster_dir() / DEFAULT_FILE, spec, spec


def _expand(value: Any, where: str) -> Any:
    """Fill ``{env:NAME}`` and ``{python}``; drop list items that name unset variables."""
    if isinstance(value, str):
        missing = [m for m in _ENV_RE.findall(value) if m not in os.environ]
        if missing:
            raise ValueError(
                f"{where}: environment variable(s) {missing} not set in the submitting "
                "process; set them or override this option"
            )
        value = _ENV_RE.sub(lambda m: shlex.quote(os.environ[m.group(1)]), value)
        return _PYTHON_RE.sub(lambda _: sys.executable, value)
    if isinstance(value, list):
        # an unset variable drops its whole list item (e.g. a prologue line `export X={env:X}`)
        # instead of exporting an empty value over the node's own setting
        kept = [
            v
            for v in value
            if not (isinstance(v, str) and any(n not in os.environ for n in _ENV_RE.findall(v)))
        ]
        return [_expand(v, where) for v in kept]
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    return value


def load_cluster_config(name_or_path: str = "local", **overrides: Any) -> ClusterConfig:
    """Resolve a section name or YAML path into a :class:`ClusterConfig`.

    Parameters
    ----------
    name_or_path : str
        ``"local"``, ``"slurm-gpu"``, ... (``cluster/clusters.yaml``); ``"site:section"``
        (``cluster/sites/site.yaml``); or a YAML path, optionally ``"path.yaml:section"``.
    **overrides
        Replace (not merge) the section's options of the same name.

    Returns
    -------
    ClusterConfig
    """
    path, section, display = _locate(name_or_path)
    sections = _read_yaml(path)
    if section is None:
        if len(sections) != 1:
            raise ValueError(
                f"{path} holds {len(sections)} sections {sorted(sections)}; "
                f"choose one as '{path}:SECTION'"
            )
        section = next(iter(sections))
    if section not in sections:
        if path.parent.name == "sites" or path == cluster_dir() / DEFAULT_FILE:
            avail = available_sections()
        else:
            avail = [f"{path}:{s}" for s in sections]
        raise ValueError(
            f"unknown cluster section {display!r}. Available sections: {', '.join(avail)}"
        )
    raw = {k.replace("-", "_"): v for k, v in sections[section].items()}
    if "type" in overrides:
        raise ValueError("the cluster type cannot be overridden; choose another section")
    kind = raw.pop("type", None)
    if kind is None:
        raise ValueError(f"section {display!r} in {path} has no 'type' ({'|'.join(CLUSTER_TYPES)})")
    options = _expand(raw, display)
    options.update(overrides)
    if kind != "local":
        options = _with_processes_env(options)
    return ClusterConfig(name=display, type=kind, options=options)


def _with_processes_env(options: dict[str, Any]) -> dict[str, Any]:
    """Tell the GPU preload how many worker processes share a job (see :func:`dask_setup`)."""
    args = [str(a) for a in options.get("worker_extra_args") or []]
    if GPU_PRELOAD not in args:
        return options
    prologue = [
        line
        for line in options.get("job_script_prologue") or []
        if not line.startswith(f"export {PROCESSES_ENV}=")
    ]
    prologue.append(f"export {PROCESSES_ENV}={int(options.get('processes') or 1)}")
    return {**options, "job_script_prologue": prologue}


def _jobqueue_classes(kind: str) -> tuple[type, type]:
    import dask_jobqueue  # deferred: this module is preloaded in workers

    if kind == "slurm":
        return dask_jobqueue.SLURMCluster, dask_jobqueue.slurm.SLURMJob
    return dask_jobqueue.PBSCluster, dask_jobqueue.pbs.PBSJob


def make_cluster(name_or_path: str = "local", **overrides: Any) -> Cluster:
    """Start the Dask cluster of a config section (no workers yet for SLURM/PBS).

    Parameters
    ----------
    name_or_path : str
        See :func:`load_cluster_config`.
    **overrides
        Keyword arguments of the cluster class replacing the section's values.

    Returns
    -------
    distributed.deploy.Cluster
        ``LocalCluster``, ``SLURMCluster`` or ``PBSCluster``; ``cluster.ccstae_config``
        holds the :class:`ClusterConfig` used.  Scale with :func:`scale_and_wait`.
    """
    cfg = load_cluster_config(name_or_path, **overrides)
    opts = bind_loopback(cfg.type, cfg.options)
    try:
        if cfg.type == "local":
            # workers forked from a server that imported the stages once (runtime.clients)
            from ccstae_hpc.runtime.clients import local_cluster

            cluster = local_cluster(**opts)
        else:
            cls, _ = _jobqueue_classes(cfg.type)
            cluster = cls(**opts)
    except TypeError as exc:
        raise ValueError(f"cluster section {cfg.name!r}: {exc}") from exc
    cluster.ccstae_config = cfg  # type: ignore[attr-defined]
    return cluster


def loopback_address(address: str | int | None, default: str) -> str | None:
    """A dashboard address with the loopback host filled in where it names none.

    Parameters
    ----------
    address : str, int or None
        As written in a section: ``":8787"``, ``8787`` or ``"0.0.0.0:8787"``; None is kept
        (distributed then serves its HTTP routes on the scheduler's own host only).
    default : str
        Used when ``address`` is the empty string.

    Returns
    -------
    str or None
        ``"127.0.0.1:PORT"`` for a host-less address; an address that names a host, including
        ``"0.0.0.0:PORT"`` (every interface), is the user's choice and stays as it is.
    """
    if address is None:
        return None
    text = str(address).strip()
    if not text:
        return default
    if "://" in text or (":" in text and not text.startswith(":")):
        return text  # a host was given
    # distributed reads ":PORT" and "PORT" as "every interface"
    return f"{LOOPBACK}:{text.lstrip(':')}"


def bind_loopback(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Cluster options whose scheduler and dashboard listen on loopback unless configured.

    A ``local`` section without ``host`` or ``interface`` gets ``host: 127.0.0.1`` (the
    scheduler and the workers), and its dashboard ``127.0.0.1:0`` when none is given.
    Batch-queue sections keep their ``interface`` (the workers on other nodes must reach the
    scheduler), but the dashboard goes to ``scheduler_options.dashboard_address =
    127.0.0.1:8787`` unless given.  In both, a dashboard address without a host (``":8787"``,
    which distributed would serve on every interface) gets the loopback host; write
    ``0.0.0.0:8787`` to serve it on every interface on purpose.  The workers' own
    dashboards on the compute nodes get ``--dashboard-address 127.0.0.1:0`` unless
    ``worker_extra_args`` sets one (or ``--no-dashboard``).
    """
    opts = dict(options)
    if kind == "local":
        if not opts.get("host") and not opts.get("interface"):
            opts["host"] = LOOPBACK
        opts["dashboard_address"] = loopback_address(
            opts.get("dashboard_address", LOCAL_DASHBOARD), LOCAL_DASHBOARD)
        return opts
    # dask-jobqueue takes the dashboard address only through scheduler_options
    sched = dict(opts.get("scheduler_options") or {})
    sched["dashboard_address"] = loopback_address(
        sched.get("dashboard_address", JOBQUEUE_DASHBOARD), JOBQUEUE_DASHBOARD)
    opts["scheduler_options"] = sched
    args = [str(a) for a in opts.get("worker_extra_args") or []]
    if not any(a.startswith("--dashboard-address") or a == "--no-dashboard" for a in args):
        opts["worker_extra_args"] = [*args, "--dashboard-address", WORKER_DASHBOARD]
    return opts


def cluster_job_script(name_or_path: str, **overrides: Any) -> str:
    """Render the job script a SLURM/PBS section would submit, without starting anything.

    The scheduler address reads ``tcp://SCHEDULER-ADDRESS:8786`` and the worker name
    ``dummy-name``; everything else is what :func:`make_cluster` would submit.
    """
    cfg = load_cluster_config(name_or_path, **overrides)
    if cfg.type == "local":
        raise ValueError(
            f"section {cfg.name!r} is a LocalCluster: it runs no batch jobs and has no job script"
        )
    _, job_cls = _jobqueue_classes(cfg.type)
    job_kwargs = {k: v for k, v in cfg.options.items() if k not in _CLUSTER_ONLY_KEYS}
    try:
        job = job_cls(SCRIPT_SCHEDULER, name="dummy-name", **job_kwargs)
    except TypeError as exc:
        raise ValueError(f"cluster section {cfg.name!r}: {exc}") from exc
    return job.job_script()


def scale_and_wait(cluster: Cluster, n: int, timeout: float = 120.0) -> Client:
    """Scale to ``n`` workers and return a connected client once they are all up.

    Parameters
    ----------
    cluster : distributed.deploy.Cluster
        E.g. from :func:`make_cluster`.
    n : int
        Workers to wait for (worker processes, not jobs: a job holds ``processes`` workers).
    timeout : float
        Seconds to wait, queueing time included.

    Returns
    -------
    distributed.Client
        Connected to ``cluster``; close it when done (or use it as a context manager).

    Raises
    ------
    TimeoutError
        If fewer than ``n`` workers connected within ``timeout`` seconds; the message lists
        the batch jobs and their queue states.  The client is closed, the cluster is not.
    """
    from distributed import Client

    cluster.scale(n)
    client = Client(cluster)
    try:
        client.wait_for_workers(n, timeout=timeout)
    except (TimeoutError, asyncio.TimeoutError) as exc:  # distinct types on Python 3.10
        n_up = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        client.close()
        jobs = _job_ids(cluster)
        detail = f"; batch jobs {jobs}" if jobs else ""
        if jobs and shutil.which("squeue"):
            detail += ":\n" + _squeue(jobs)
        raise TimeoutError(
            f"{n_up} of {n} Dask workers connected after {timeout:g} s{detail}"
        ) from exc
    return client


def _job_ids(cluster: Cluster) -> list[str]:
    workers = getattr(cluster, "workers", {}) or {}
    return [str(j) for w in workers.values() if (j := getattr(w, "job_id", None))]


def _squeue(job_ids: Sequence[str]) -> str:
    res = subprocess.run(
        ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T %r"],
        capture_output=True,
        text=True,
        check=False,
    )
    return res.stdout.strip() or res.stderr.strip()


# --------------------------------------------------------------------------- GPU preload


def gpu_for_worker(worker_name: str, processes: int, visible: str | None) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` value for one worker of a multi-worker job.

    Parameters
    ----------
    worker_name : str
        ``dask worker --nworkers N --name JOB`` names its workers ``JOB-0 ... JOB-{N-1}``.
    processes : int
        Worker processes in the job (N).
    visible : str or None
        The job's ``CUDA_VISIBLE_DEVICES`` (set by SLURM's gres; unset under PBS: all GPUs).

    Returns
    -------
    str or None
        The device of this worker, or None to leave the environment alone (one worker per
        job, or a name without a process index).
    """
    if processes <= 1:
        return None
    head, _, tail = worker_name.rpartition("-")
    if not head or not tail.isdigit():
        return None
    index = int(tail)
    devices = [d for d in (visible or "").split(",") if d.strip()] or [
        str(i) for i in range(processes)
    ]
    if index >= len(devices):
        log.warning(
            "worker %s: index %d but only %d GPU(s) visible (%s); leaving CUDA_VISIBLE_DEVICES",
            worker_name,
            index,
            len(devices),
            visible,
        )
        return None
    return devices[index].strip()


def dask_setup(worker: Any) -> None:
    """Worker preload (``--preload ccstae_hpc.runtime.jobqueue``): pin this worker to its own GPU.

    Runs in the worker process before any task, hence before CUDA is initialised.
    """
    processes = int(os.environ.get(PROCESSES_ENV, "1"))
    device = gpu_for_worker(str(worker.name), processes, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        log.info("worker %s: CUDA_VISIBLE_DEVICES=%s", worker.name, device)


# --------------------------------------------------------------------------- batch templates

# Parameters of each template and their defaults; None = optional (a template line that
# uses an unset optional parameter is left out).  Derived values are filled in render_template.
_TEMPLATE_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddp.sbatch": {
        "store": None,  # required
        "nodes": 1,
        "gpus_per_node": 4,
        "ranks_per_node": None,  # default: gpus_per_node, or 1 without GPUs
        "cpus_per_task": None,
        "walltime": "01:00:00",
        "account": None,
        "partition": None,
        "qos": None,
        "constraint": None,
        "output": None,
        "job_name": "ccstae-ddp",
        "master_port": 29500,
        "python": "python",
        "train_args": (),
        "extra": "",
    },
    "ddp.pbs": {
        "store": None,  # required
        "nodes": 1,
        "gpus_per_node": 4,
        "ranks_per_node": None,
        "walltime": "01:00:00",
        "account": None,
        "queue": None,
        "select_suffix": ":system=polaris",
        "filesystems": "home:eagle",
        "launcher_args": "--depth=8 --cpu-bind depth",
        "output": None,
        "job_name": "ccstae-ddp",
        "master_port": 29500,
        "python": "python",
        "train_args": (),
        "extra": "",
    },
}


def render_template(name: str, **params: Any) -> str:
    """Fill a batch template of ``cluster/templates`` (``ddp.sbatch`` or ``ddp.pbs``).

    Parameters
    ----------
    name : str
        Template file name in ``cluster/templates``, or a path to a template.
    **params
        ``store`` (required), ``nodes``, ``gpus_per_node`` (0 = CPU ranks),
        ``ranks_per_node`` (default ``gpus_per_node``), ``walltime``, ``account``,
        ``partition``/``qos``/``constraint`` (SLURM), ``queue``/``select_suffix``/
        ``filesystems``/``launcher_args`` (PBS), ``python``, ``train_args`` (list, appended to
        ``ccstae train``), ``extra`` (lines placed after the directives, e.g. ``module load``),
        ``job_name``, ``master_port``, ``output``.  Optional directives left unset are
        omitted.

    Returns
    -------
    str
        The script text; submit it with :func:`submit_batch` (SLURM) or ``qsub``.
    """
    path = Path(name) if "/" in name else cluster_dir() / "templates" / name
    if not path.is_file():
        avail = sorted(p.name for p in (cluster_dir() / "templates").glob("*"))
        raise ValueError(f"unknown batch template {name!r}; available: {', '.join(avail)}")
    defaults = _TEMPLATE_DEFAULTS.get(path.name, {})
    unknown = set(params) - set(defaults) if defaults else set()
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {sorted(unknown)} for template {path.name}; "
            f"valid: {sorted(defaults)}"
        )
    values = {**defaults, **params}
    if defaults:
        values = _derive_template_values(path.name, values)
    text = path.read_text()

    needed = set(_TEMPLATE_RE.findall(text))
    missing = sorted(needed - set(values))
    if missing:
        raise ValueError(f"template {path.name} needs parameter(s) {missing}")
    out = []
    for line in text.splitlines():
        keys = _TEMPLATE_RE.findall(line)
        if any(values[k] is None for k in keys):
            continue  # optional directive not requested
        out.append(_TEMPLATE_RE.sub(lambda m: str(values[m.group(1)]), line))
    return "\n".join(out) + "\n"


def _derive_template_values(name: str, v: dict[str, Any]) -> dict[str, Any]:
    check(v["store"] is not None, f"template {name} needs store=<path of the Zarr store>")
    check(int(v["nodes"]) >= 1, "nodes must be >= 1")
    gpus = int(v["gpus_per_node"])
    check(gpus >= 0, "gpus_per_node must be >= 0 (0 = CPU ranks)")
    if v["ranks_per_node"] is None:
        v["ranks_per_node"] = gpus if gpus > 0 else 1
    check(int(v["ranks_per_node"]) >= 1, "ranks_per_node must be >= 1")
    if name.endswith(".sbatch"):
        v["gpus_per_task"] = 1 if gpus > 0 else None
    # shell words are quoted here; directive values are not shell-parsed
    v["store"] = shlex.quote(str(v["store"]))
    v["python"] = shlex.quote(str(v["python"]))
    args = v["train_args"]
    v["train_args"] = args if isinstance(args, str) else shlex.join(str(a) for a in args)
    if isinstance(v["extra"], (list, tuple)):
        v["extra"] = "\n".join(v["extra"])
    return v


# --------------------------------------------------------------------------- SLURM helpers


def slurm_unavailable_reason() -> str | None:
    """None when a SLURM controller answers and a node accepts jobs, else why not."""
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (no `sinfo`); run scripts/slurm_up.sh as root"
    try:
        res = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=5, check=False
        )
    except subprocess.TimeoutExpired:
        return "`sinfo` did not answer within 5 s (no controller?)"
    if res.returncode != 0:
        return f"`sinfo` failed: {res.stderr.strip() or res.returncode}; run scripts/slurm_up.sh"
    states = res.stdout.split()
    if not any(s.rstrip("*~#").lower() in ("idle", "mixed") for s in states):
        return f"no idle SLURM node (states: {states or 'none'}); run scripts/slurm_up.sh"
    return None


def default_partition() -> str | None:
    """The default SLURM partition (marked ``*`` by ``sinfo``), or None."""
    res = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=False)
    for p in res.stdout.split():
        if p.endswith("*"):
            return p[:-1]
    return None


def submit_batch(
    script_text: str,
    wait: bool = True,
    *,
    cwd: str | os.PathLike[str] | None = None,
    sbatch_args: Sequence[str] = (),
    timeout: float | None = None,
) -> tuple[str, int]:
    """Submit a batch script with ``sbatch --parsable [--wait]``.

    Parameters
    ----------
    script_text : str
        The script (e.g. from :func:`render_template`).
    wait : bool
        Block until the job ends; the return code is then the job's exit code.
    cwd : path, optional
        Submission directory: the job's working directory and where ``slurm-%j.out`` goes.
    sbatch_args : sequence of str
        Extra ``sbatch`` options (override the script's directives).
    timeout : float, optional
        With ``wait``, cancel the job (``scancel``) and raise TimeoutError after this long.

    Returns
    -------
    (job_id, returncode)
    """
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch not found: SLURM is not installed or not on PATH")
    # sbatch copies the script at submission, so the file can go as soon as it has answered
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", prefix="ccstae-") as f:
        f.write(script_text)
        f.flush()
        cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *sbatch_args, f.name]
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        # the job id comes first, at submission; with --wait sbatch then blocks till the end
        first = proc.stdout.readline().strip() if proc.stdout is not None else ""
    job_id = first.split(";", 1)[0]
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        if job_id:
            subprocess.run(["scancel", job_id], check=False)
        proc.kill()
        proc.communicate()
        raise TimeoutError(f"SLURM job {job_id} did not finish within {timeout:g} s") from exc
    if not job_id:
        raise RuntimeError(f"sbatch failed (exit {proc.returncode}): {err.strip()}")
    return job_id, proc.returncode


def wait_for_jobs_gone(job_ids: Sequence[str], timeout: float = 30.0) -> list[str]:
    """Wait until ``squeue`` no longer lists the jobs; return those still listed."""
    left = list(job_ids)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        res = subprocess.run(
            ["squeue", "-h", "-j", ",".join(left), "-o", "%i"],
            capture_output=True,
            text=True,
            check=False,
        )
        left = [j for j in res.stdout.split() if j in left]
        if left:
            time.sleep(0.5)
    return left
