"""``ccstae serve``: register the flows' deployments from a YAML schedule file and serve them.

The schedule file (default ``flows/schedules.yaml``) lists deployments::

    deployments:
      - name: nightly              # deployment name; runs are addressed as FLOW/NAME
        flow: pipeline             # ingest | preprocess | train | map_strain | analyze | pipeline
        cron: "0 2 * * *"          # optional: one cron string or a list of them
        timezone: Europe/Berlin    # optional (default UTC)
        paused: false              # optional: register with its schedule paused
        parameters:                # default parameters of every run (validated here)
          input_path: data/scan.npy
          store_path: data/scan.zarr
          config: {train: {epochs: 6}}
        tags: [ccstae]             # optional
        description: ...           # optional
        concurrency_limit: 1       # optional: runs of this deployment at once

Relative paths in parameters whose name ends in ``_path`` are made absolute against the
directory ``ccstae serve`` was started in, since the runs execute in other processes.  Only
their syntax is checked here; each run checks the files when it starts, before any stage
(``flows.params``): a missing input fails the run at once, a missing ``truth_path`` (e.g. the
example's, kept by a run triggered on another input) only skips the comparison, with a
warning.
A deployment without ``cron`` runs only when triggered (UI, ``prefect deployment run`` or
``prefect.deployments.run_deployment``).

``serve`` runs until interrupted; each flow run executes in a subprocess of it.  It needs a
Prefect server (``PREFECT_API_URL``): served deployments live there.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = ["DeploymentSpec", "ScheduleFile", "ServeError", "build_deployments",
           "default_schedule", "load_schedule", "serve"]

FlowName = Literal["ingest", "preprocess", "train", "map_strain", "analyze", "pipeline"]


class ServeError(ValueError):
    """Bad schedule file or no server; the message says what to do."""


class DeploymentSpec(BaseModel):
    """One deployment of the schedule file."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^/%&><]+$")]
    flow: FlowName
    cron: str | list[str] | None = None
    timezone: str | None = None
    paused: bool = False
    parameters: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    description: str | None = None
    concurrency_limit: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _schedule(self) -> DeploymentSpec:
        # Prefect's own schedule model checks the cron strings and the time zone
        from prefect.client.schemas.schedules import CronSchedule

        if isinstance(self.cron, str):
            self.cron = [self.cron]
        for c in self.cron or []:
            try:
                CronSchedule(cron=c, timezone=self.timezone)
            except ValidationError as e:
                raise ValueError("; ".join(err["msg"].removeprefix("Value error, ")
                                           for err in e.errors())) from None
        return self


class ScheduleFile(BaseModel):
    """The whole schedule file."""

    model_config = ConfigDict(extra="forbid")

    deployments: list[DeploymentSpec] = Field(min_length=1)

    @field_validator("deployments")
    @classmethod
    def _unique(cls, v: list[DeploymentSpec]) -> list[DeploymentSpec]:
        seen = set()
        for d in v:
            if (d.flow, d.name) in seen:
                raise ValueError(f"deployment {d.flow}/{d.name} is listed twice")
            seen.add((d.flow, d.name))
        return v


def default_schedule() -> Path:
    """``schedules.yaml`` of the ``flows`` package (found without importing Prefect)."""
    spec = importlib.util.find_spec("flows")
    if spec is None or not spec.submodule_search_locations:
        return Path("flows") / "schedules.yaml"
    return Path(list(spec.submodule_search_locations)[0]) / "schedules.yaml"


def load_schedule(path: str | os.PathLike[str]) -> ScheduleFile:
    """Read and validate a schedule file.

    Raises
    ------
    ServeError
        Missing file, bad YAML or an invalid entry.
    """
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ServeError(f"cannot read schedule file {p}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ServeError(f"schedule file {p} is not valid YAML: {e}") from e
    try:
        return ScheduleFile.model_validate(data)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                         for err in e.errors())
        raise ServeError(f"schedule file {p}: {msgs}") from e


def _absolute(params: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(params)
    for k, v in params.items():
        if k.endswith("_path") and isinstance(v, str) and v and "://" not in v:
            p = Path(v).expanduser()
            out[k] = str(p if p.is_absolute() else (base / p).resolve())
    return out


def build_deployments(sched: ScheduleFile, base: str | os.PathLike[str] | None = None
                      ) -> list[Any]:
    """``RunnerDeployment`` objects for the entries (parameters validated against the flow).

    Raises
    ------
    ServeError
        Parameters a flow does not accept or whose values are invalid.
    """
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ParameterTypeError
    from prefect.schedules import Cron

    from flows.params import deferred_file_checks
    from flows.pipeline import FLOWS

    base = Path(base or os.getcwd())
    out = []
    for d in sched.deployments:
        fl = FLOWS[d.flow]
        params = _absolute(d.parameters, base)
        accepted = set(fl.parameters.properties)
        unknown = sorted(set(params) - accepted)
        if unknown:
            raise ServeError(f"deployment {d.flow}/{d.name}: flow {d.flow!r} has no "
                             f"parameter(s) {unknown}; it takes {sorted(accepted)}")
        if set(fl.parameters.required or []) <= set(params):
            # complete parameters: check them now rather than at the first scheduled run
            try:
                # the files may appear by the first run: each run checks them when it starts
                with deferred_file_checks():
                    fl.validate_parameters(params)
            except ParameterTypeError as e:
                raise ServeError(f"deployment {d.flow}/{d.name}: {e}") from e
        elif d.cron:
            missing = sorted(set(fl.parameters.required or []) - set(params))
            raise ServeError(f"deployment {d.flow}/{d.name} has a schedule but no value for "
                             f"{missing}; scheduled runs need every required parameter")
        schedules = [Cron(c, timezone=d.timezone) for c in (d.cron or [])]
        out.append(fl.to_deployment(
            name=d.name,
            schedules=schedules or None,
            paused=d.paused,
            parameters=params,
            tags=d.tags or None,
            description=d.description,
            concurrency_limit=d.concurrency_limit,
            # module path, not file path: the runs import flows.pipeline whatever the cwd
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return out


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def describe(sched: ScheduleFile) -> str:
    """One line per deployment."""
    lines = []
    for d in sched.deployments:
        when = ", ".join(d.cron) if d.cron else "on demand"
        if d.cron and d.timezone:
            when += f" ({d.timezone})"
        if d.paused:
            when += ", paused"
        lines.append(f"  {d.flow}/{d.name}: {when}")
    return "\n".join(lines)


def serve(schedule: str | os.PathLike[str] | None = None, *, limit: int | None = None,
          check: bool = False) -> int:
    """Register the deployments of ``schedule`` with the Prefect server and serve them.

    Parameters
    ----------
    schedule : schedule file; :func:`default_schedule` when None.
    limit : maximum concurrent flow runs of this process.
    check : validate and print the deployments, then return without serving.

    Returns
    -------
    Exit code (0).  Serving blocks until the process is interrupted.

    Raises
    ------
    ServeError
        Bad schedule file, or no server configured (when serving).
    """
    path = Path(schedule) if schedule is not None else default_schedule()
    sched = load_schedule(path)
    deployments = build_deployments(sched)
    if check:
        print(f"{path}: {len(deployments)} deployment(s)\n{describe(sched)}")
        return 0
    url = _api_url()
    if not url:
        raise ServeError(
            "no Prefect server configured (PREFECT_API_URL is not set). Start one with "
            "`prefect server start --host 127.0.0.1 --port 4200` and run `prefect config set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api` (or export it)")
    from prefect import serve as prefect_serve

    print(f"serving {len(deployments)} deployment(s) from {path} on {url}:\n"
          f"{describe(sched)}", flush=True)
    prefect_serve(*deployments, limit=limit, print_starting_message=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.serve [--schedule FILE] [--limit N] [--check]``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="ccstae serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", metavar="FILE", help="schedule file (flows/schedules.yaml)")
    p.add_argument("--limit", type=int, metavar="N", help="concurrent flow runs")
    p.add_argument("--check", action="store_true", help="validate and list, do not serve")
    args = p.parse_args(argv)
    try:
        return serve(args.schedule, limit=args.limit, check=args.check)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
