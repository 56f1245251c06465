"""The ``ccstae`` command: thin wrappers around the library functions.

Subcommands::

    ccstae simulate OUT.npy [--scan NY NX] [--detector Q] [--dose D] [--seed S] ...
    ccstae run INPUT.npy --out STORE.zarr [--overwrite] [--epochs N] [--num-base K] ...
    ccstae ingest ...            (see ``ccstae ingest --help``)

Bad input gets one line ``error: <problem>. <what to do>`` on stderr and exit code 2, and
nothing is written: every check that can fail runs before any computation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from ccstae_hpc.core.config import MapConfig, ModelConfig, SimConfig, TrainConfig
from ccstae_hpc.stages import store
from ccstae_hpc.stages.store import StageExistsError

__all__ = ["CliError", "check_finite", "load_npy", "main", "run_npy", "validate_array"]

EXIT_USAGE = 2
MIN_DETECTOR = 32  # px per detector axis; the same floor as SimConfig.detector
MIN_PATTERNS = 16  # probe positions: fewer cannot teach a dictionary
# bytes of input checked for NaN/inf per step: bounded memory whatever the file size
_CHECK_BLOCK_BYTES = 64 * 2**20


class CliError(Exception):
    """A user error: printed as ``error: <problem>. <what to do>``, exit code 2."""

    def __init__(self, problem: str, todo: str = "") -> None:
        super().__init__(problem)
        self.problem = problem.rstrip(".")
        self.todo = todo

    def line(self) -> str:
        # one line whatever the wrapped exception's text holds
        return " ".join(f"error: {self.problem}. {self.todo}".split())


# ---------------------------------------------------------------------------------------------
# input checks (cheap, before any computation)


def load_npy(path: Path) -> np.ndarray:
    """Memory-map a ``.npy`` file read-only; raise :class:`CliError` if it is not one."""
    if not path.exists():
        raise CliError(f"input file {path} does not exist", "Check the path.")
    if path.is_dir():
        raise CliError(f"input {path} is a directory", "Pass a .npy file.")
    todo = "Pass a NumPy .npy file written by numpy.save."
    try:
        with open(path, "rb") as fh:
            # checking the magic first gives one clear message for any non-npy file
            np.lib.format.read_magic(fh)
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except PermissionError as e:
        raise CliError(
            f"cannot read {path}: permission denied", "Check the file's permissions."
        ) from e
    except (ValueError, OSError, EOFError) as e:
        raise CliError(f"{path} is not a readable .npy file ({e})", todo) from e
    if not isinstance(data, np.ndarray):  # defensive: np.load of an archive returns NpzFile
        raise CliError(f"{path} is not a single .npy array", todo)
    return data


def check_finite(data: np.ndarray, block_bytes: int = _CHECK_BLOCK_BYTES) -> None:
    """Raise :class:`CliError` at the first NaN/inf, reading a memmap block by block."""
    if not np.issubdtype(data.dtype, np.floating):
        return  # integer counts cannot be NaN
    row_bytes = max(int(np.prod(data.shape[1:], dtype=np.int64)) * data.itemsize, 1)
    step = max(block_bytes // row_bytes, 1)
    for y0 in range(0, data.shape[0], step):
        bad = ~np.isfinite(data[y0 : y0 + step]).all(axis=(-2, -1))
        if bad.any():
            y, x = np.argwhere(bad)[0]
            raise CliError(
                f"input holds NaN or infinite values (first at scan position y={y0 + y}, x={x})",
                "Replace them (e.g. with 0 for dead pixels) and save the array again.",
            )


def validate_array(data: np.ndarray, reference: Sequence[int] | None = None) -> None:
    """Check shape, dtype, detector size, values and the reference box of a 4D-STEM array."""
    if data.ndim != 4:
        raise CliError(
            f"input has {data.ndim} dimensions {tuple(data.shape)}; expected 4 "
            "(scan_y, scan_x, k_y, k_x)",
            "Reshape it, e.g. a flattened scan with data.reshape(ny, nx, qy, qx).",
        )
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise CliError(
            f"input has dtype {data.dtype}; expected integer counts or real intensities",
            "Convert it with data.astype(np.float32).",
        )
    ny, nx, qy, qx = data.shape
    if min(qy, qx) < MIN_DETECTOR:
        raise CliError(
            f"detector is {qy} x {qx} px; at least {MIN_DETECTOR} x {MIN_DETECTOR} is needed",
            "Pass the unbinned patterns.",
        )
    if ny * nx < MIN_PATTERNS:
        raise CliError(
            f"scan is {ny} x {nx}; at least {MIN_PATTERNS} probe positions are needed",
            "Pass a larger scan.",
        )
    if reference is not None:
        y0, y1, x0, x1 = reference
        if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
            raise CliError(
                f"--reference {y0} {y1} {x0} {x1} is not a non-empty box inside the "
                f"{ny} x {nx} scan",
                "Give Y0 Y1 X0 X1 with 0 <= Y0 < Y1 <= ny and 0 <= X0 < X1 <= nx.",
            )
    check_finite(data)


def _configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, MapConfig]:
    try:
        model = ModelConfig(**({} if args.num_base is None else {"num_base": args.num_base}))
        train = TrainConfig(
            **{k: v for k, v in (("epochs", args.epochs), ("seed", args.seed)) if v is not None}
        )
        mapping = map_config(args)
    except ValueError as e:
        raise CliError(str(e), "Fix the option and run again.") from e
    return model, train, mapping


def map_config(args: argparse.Namespace) -> MapConfig:
    """The MapConfig of the mapping options shared by ``run`` and ``map``."""
    kw: dict = {"reference": None if args.reference is None else tuple(args.reference),
                "reference_mode": args.reference_mode}
    kw["pool_sigma"] = _pool_sigma(args.pool_sigma)
    if getattr(args, "method", None):
        kw["method"] = args.method
    return MapConfig(**kw)


def _add_map_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reference", type=int, nargs=4, metavar=("Y0", "Y1", "X0", "X1"),
        help="reference box in scan pixels, half-open: strain is relative to the robust "
             "median lattice of the sample pixels inside it, whatever their phase (default: "
             "the median lattice of the largest phase)")
    p.add_argument(
        "--reference-mode", choices=("global", "per_phase"), default="global",
        help="global (default): one reference lattice for the whole field of view, so a "
             "phase's lattice mismatch shows as strain; per_phase: each phase against its "
             "own median lattice (inside --reference when the box holds some of it)")
    p.add_argument(
        "--pool-sigma", default="auto", metavar="PX|auto",
        help="Gaussian pooling of the fits over neighbouring probe positions of the same "
             "phase, in scan pixels. auto (default): per phase, the width of least estimated "
             "error from each fit's own uncertainty against the field's variation (none on "
             "noise-free data); 0 turns pooling off (single-pattern fits, e.g. for defect "
             "cores); a number fixes the width")


def _pool_sigma(text: str) -> float | None:
    """``--pool-sigma``: ``auto`` (None) or a width >= 0 in scan pixels; ValueError else."""
    if text.strip().lower() == "auto":
        return None
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"--pool-sigma {text!r} is no width: give 'auto' or a number of "
                         "scan pixels >= 0") from None
    if not v >= 0:
        raise ValueError(f"--pool-sigma {text} < 0: give 'auto' or a width >= 0 (0 = off)")
    return v


# ---------------------------------------------------------------------------------------------
# subcommands


def run_npy(
    inp: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    map_cfg: MapConfig | None = None,
    progress: bool | Callable[[dict], None] = True,
    engine: str = "prefect",
) -> xr.Dataset:
    """What ``ccstae run`` does: check, load, validate, run the pipeline, write the store.

    Every check that can fail runs before any computation.  ``progress`` is passed to
    the training stage (``True`` shows progress, a callable receives the training records).

    Raises
    ------
    CliError
        Bad input or output path; nothing was written.
    """
    inp, out = Path(inp), Path(out)
    map_cfg = map_cfg or MapConfig()
    # `run` builds the whole store (raw, prep, model, affine, strain) beside the output and
    # renames it into place, so --overwrite replaces all of it, and only at the very end
    if os.path.lexists(out):
        if not store.is_store(out):
            raise CliError(f"output {out} exists and is not a Zarr store",
                           "Choose another --out (it is never replaced, even with --overwrite).")
        if not overwrite:
            raise CliError(f"output store {out} exists",
                           "Pass --overwrite to replace it or choose another --out.")
    data = load_npy(inp)
    validate_array(data, map_cfg.reference)
    ny, nx, qy, qx = data.shape
    del data

    print(f"ccstae run: {inp} ({ny} x {nx} scan, {qy} x {qx} detector) -> {out}")
    try:
        if engine == "prefect":
            _run_flow(inp, out, overwrite, model_cfg, train_cfg, map_cfg)
        else:
            # imported here: torch loads in seconds, and the checks above must stay instant
            from ccstae_hpc.stages.run import run_store

            run_store(inp, out, overwrite=overwrite, model_cfg=model_cfg,
                      train_cfg=train_cfg, map_cfg=map_cfg, progress=progress,
                      log=(lambda s: print(f"  {s}")) if progress else (lambda s: None))
    except FileExistsError as e:  # the output appeared while we computed
        raise CliError(str(e)) from e
    except ValueError as e:  # ingest / preprocessing refused the data
        raise CliError(str(e), "Check the input data.") from e
    return store.open_strain(out).load()


def _run_flow(inp: Path, out: Path, overwrite: bool, model_cfg: ModelConfig | None,
              train_cfg: TrainConfig | None, map_cfg: MapConfig | None) -> None:
    """The Prefect ``pipeline`` flow, embedded (no separate server), into a sibling store
    that replaces ``out`` only once complete."""
    # no network here and no server to wait for: Prefect's defaults assume both
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.params import PipelineConfig
    from flows.pipeline import run_pipeline_embedded
    from flows.report import figure_paths

    cfg = PipelineConfig(model=model_cfg or ModelConfig(), train=train_cfg or TrainConfig(),
                         map=map_cfg or MapConfig())
    tmp = store.sibling(out, "tmp")
    try:
        run_pipeline_embedded(inp, tmp, config=cfg)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    store.publish(tmp, out, overwrite)
    # the flow's figures sit next to the store it wrote: give them the final store's name
    for src, dst in zip(figure_paths(tmp), figure_paths(out), strict=True):
        if src.exists():
            os.replace(src, dst)


def _cmd_run(args: argparse.Namespace) -> int:
    from ccstae_hpc.sim.evaluate import summarize

    model_cfg, train_cfg, map_cfg = _configs(args)
    t0 = time.perf_counter()
    ds = run_npy(
        args.input,
        args.out,
        overwrite=args.overwrite,
        model_cfg=model_cfg,
        train_cfg=train_cfg,
        map_cfg=map_cfg,
        progress=not args.quiet,
        engine=args.engine,
    )
    dt = time.perf_counter() - t0
    print(summarize(ds))
    print(f"done in {dt:.1f} s; strain maps in {args.out} (group 'strain')")
    print(f'read them with: xarray.open_zarr("{args.out}", group="strain")')
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".npy":
        raise CliError(f"output {out} does not end in .npy", "Name it like data.npy.")
    truth = out.with_suffix(".truth.npz")
    for p in (out, truth):
        if p.exists() and not args.overwrite:
            raise CliError(f"{p} exists", "Pass --overwrite to replace it or choose another name.")
    kw = {
        "scan": None if args.scan is None else tuple(args.scan),
        "detector": args.detector,
        "dose": args.dose,
        "seed": args.seed,
        "background_weight": args.background_weight,
    }
    try:
        cfg = SimConfig(**{k: v for k, v in kw.items() if v is not None})
    except ValueError as e:
        raise CliError(str(e), "Fix the option and run again.") from e

    from ccstae_hpc.sim.simulate import save_simulation

    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    npy_path, truth_path = save_simulation(out, cfg)
    dose = "noise-free" if cfg.dose is None else f"{cfg.dose:g} e-/pattern"
    print(
        f"simulated {cfg.scan[0]} x {cfg.scan[1]} scan, {cfg.detector} px detector, {dose} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    print(f"data:  {npy_path}\ntruth: {truth_path}")
    return 0


def _exit_code(e: SystemExit) -> int:
    # sys.exit() semantics: None is success, an int is the code, anything else was printed
    if e.code is None:
        return 0
    return e.code if isinstance(e.code, int) else 1


def _cmd_ingest(argv: Sequence[str]) -> int:
    try:
        from ccstae_hpc.stages.ingest import ingest_main
    except ImportError as e:
        raise CliError(f"ingest is not available ({e})", "Reinstall ccstae-hpc.") from e
    try:
        return int(ingest_main(list(argv)))
    except SystemExit as e:  # its own argparse: usage errors and --help
        return _exit_code(e)


# ---------------------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ccstae-hpc")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    p = argparse.ArgumentParser(
        prog="ccstae",
        description="CC-ST-AE strain mapping for 4D-STEM.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="write a synthetic WS2/WSe2 dataset with ground truth")
    s.add_argument("out", metavar="OUT.npy", help="data file; the truth goes to OUT.truth.npz")
    s.add_argument("--scan", type=int, nargs=2, metavar=("NY", "NX"), help="scan size (64 64)")
    s.add_argument("--detector", type=int, metavar="Q", help="detector size in px (128)")
    s.add_argument("--dose", type=float, metavar="D", help="e-/pattern (default: noise-free)")
    s.add_argument("--seed", type=int, metavar="S", help="random seed (0)")
    s.add_argument("--background-weight", type=float, metavar="W", help="in [0, 1) (0)")
    s.add_argument("--overwrite", action="store_true", help="replace existing files")
    s.set_defaults(func=_cmd_simulate)

    r = sub.add_parser("run", help="strain maps from a 4D-STEM .npy array")
    r.add_argument("input", metavar="INPUT.npy", help="(scan_y, scan_x, k_y, k_x) array")
    r.add_argument("--out", required=True, metavar="STORE.zarr", help="result store")
    r.add_argument("--overwrite", action="store_true", help="replace an existing store")
    r.add_argument(
        "--epochs", type=int, metavar="N",
        help="training epochs (default: 6, more on small scans to make 200 steps)"
    )
    r.add_argument(
        "--num-base", type=int, metavar="K",
        help=f"largest dictionary size ({ModelConfig.num_base}): entries that turn out to be "
             "one phase are merged, so this is an upper bound on phases + vacuum"
    )
    _add_map_options(r)
    r.add_argument("--seed", type=int, metavar="S", help=f"training seed ({TrainConfig.seed})")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.add_argument("--engine", choices=("prefect", "direct"), default="prefect",
                   help="run the stages as the Prefect pipeline flow, embedded without a "
                   "server (default), or call them directly")
    r.set_defaults(func=_cmd_run)

    # parsed by ingest_main itself (dispatched in main before argparse); listed for --help
    sub.add_parser("ingest", help="read a microscope file into a store (see ccstae ingest -h)")

    pp = sub.add_parser("preprocess", help="STORE/raw -> STORE/prep on a Dask cluster")
    pp.add_argument("store", metavar="STORE.zarr")
    pp.add_argument("--output-size", type=int, metavar="Q", help="model input size (128)")
    pp.add_argument("--workers", type=int, default=0, metavar="N",
                    help="local Dask workers (0: threads in this process)")
    pp.add_argument("--overwrite", action="store_true",
                    help="replace a prep group made with other settings (and what came after it)")
    pp.set_defaults(func=_cmd_preprocess)

    t = sub.add_parser(
        "train", help="train CC-ST-AE on STORE/prep/train -> STORE/model",
        description="Train CC-ST-AE on the shards of STORE/prep/train and write STORE/model. "
        "An interrupted run resumes from its last checkpoint (with the settings it was "
        "started with) unless --restart is given. Ranks: this process (default), one per "
        "Dask worker (--workers/--scheduler), or one per process of a job started by "
        "srun/torchrun/mpiexec (--launcher env: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
        "MASTER_PORT, or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID).")
    t.add_argument("store", metavar="STORE.zarr")
    t.add_argument("--epochs", type=int, metavar="N",
                   help="training epochs (default: 6, more on small scans to make 200 steps)")
    t.add_argument("--num-base", type=int, metavar="K",
                   help=f"dictionary size ({ModelConfig.num_base})")
    t.add_argument("--seed", type=int, metavar="S", help=f"training seed ({TrainConfig.seed})")
    t.add_argument("--batch-size", type=int, metavar="B",
                   help=f"global batch, split over the ranks ({TrainConfig.batch_size})")
    t.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="steps between checkpoints in STORE/model (100; 0: only at the end)")
    t.add_argument("--restart", action="store_true",
                   help="discard an interrupted run's checkpoint and start over")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a trained model (and the maps made with it)")
    t.add_argument("--launcher", choices=("single", "dask", "env"),
                   help="how ranks are started (default: dask with --workers/--scheduler, "
                   "else single)")
    t.add_argument("--workers", type=int, default=0, metavar="N",
                   help="ranks on a local Dask cluster of N worker processes")
    t.add_argument("--scheduler", metavar="ADDRESS",
                   help="one rank per worker of this running Dask scheduler")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    m = sub.add_parser("map", help="inference and strain assembly -> STORE/affine, STORE/strain")
    m.add_argument("store", metavar="STORE.zarr")
    _add_map_options(m)
    m.add_argument("--workers", type=int, default=0, metavar="N",
                   help="local Dask worker processes (0: threads in this process)")
    m.add_argument("--scheduler", metavar="ADDRESS", help="map on this running Dask scheduler")
    m.add_argument("--rows-per-block", type=int, default=8, metavar="R",
                   help="scan rows per task; bounds each worker's memory (8)")
    m.add_argument("--method", choices=("ccstae", "com"), default="ccstae",
                   help="ccstae: the trained model with per-pattern refinement (default); com: "
                   "the centre-of-mass lattice-fit baseline (no model needed), same strain "
                   "group, for comparison")
    m.add_argument("--overwrite", action="store_true", help="replace existing strain maps")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_cmd_map)

    sv = sub.add_parser(
        "serve", help="serve the Prefect flows as deployments (schedules from a YAML file)",
        description="Register the deployments of a schedule file (cron, parameters) with the "
        "Prefect server of PREFECT_API_URL and serve them until interrupted; each run executes "
        "in a subprocess. Start a server first: prefect server start --host 127.0.0.1 "
        "--port 4200.")
    sv.add_argument("--schedule", metavar="FILE",
                    help="schedule file (default: flows/schedules.yaml)")
    sv.add_argument("--limit", type=int, metavar="N", help="flow runs at once (no limit)")
    sv.add_argument("--check", action="store_true",
                    help="validate the file and list the deployments; do not serve")
    sv.set_defaults(func=_cmd_serve)
    return p


def _local_client(n: int):  # noqa: ANN202 - distributed is imported lazily
    if n <= 0:
        return None
    from distributed import Client, LocalCluster

    return Client(LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None))


def _store_arg(path: str) -> Path:
    p = Path(path)
    if not store.is_store(p):
        raise CliError(f"{p} is not a Zarr store", "Run `ccstae ingest INPUT STORE.zarr` first.")
    return p


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from ccstae_hpc.stages.prep import PrepConfig, PrepError, preprocess_store

    p = _store_arg(args.store)
    try:
        cfg = PrepConfig(**({} if args.output_size is None else
                            {"output_size": args.output_size}))
    except ValueError as e:
        raise CliError(str(e), "Fix the option and run again.") from e
    client = _local_client(args.workers)
    try:
        preprocess_store(p, cfg, client=client, overwrite=args.overwrite, log=print)
    except (PrepError, StageExistsError) as e:
        raise CliError(str(e)) from e
    finally:
        if client is not None:
            client.close()
    print(f"preprocessed: {p}/prep")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ccstae_hpc.runtime.ddp import dask_client, env_from_environ
    from ccstae_hpc.stages.prep import PrepError
    from ccstae_hpc.stages.train import CheckpointConfig, TrainError, train_store

    p = _store_arg(args.store)
    dask = bool(args.workers or args.scheduler)
    launcher = args.launcher or ("dask" if dask else "single")
    if launcher == "dask" and not dask:
        raise CliError("--launcher dask needs --workers N or --scheduler ADDRESS",
                       "Give one of them.")
    if launcher != "dask" and dask:
        raise CliError(f"--workers/--scheduler start Dask ranks; they do not go with "
                       f"--launcher {launcher}", "Drop one of them.")
    model_kw = {k: v for k, v in (("num_base", args.num_base),) if v is not None}
    train_kw = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed),
                                   ("batch_size", args.batch_size)) if v is not None}
    try:
        # no option: None, so that a resumed run keeps the settings it was started with
        mcfg = ModelConfig(**model_kw) if model_kw else None
        tcfg = TrainConfig(**train_kw) if train_kw else None
        ckpt = CheckpointConfig(**({} if args.checkpoint_every is None
                                   else {"every": args.checkpoint_every}))
    except ValueError as e:
        raise CliError(str(e), "Fix the option and run again.") from e
    main_rank = launcher != "env" or env_from_environ().rank == 0
    try:
        with dask_client(args.workers, args.scheduler) as client:
            hist = train_store(p, mcfg, tcfg, progress=not args.quiet, client=client,
                               launcher=launcher, restart=args.restart, checkpoint=ckpt,
                               overwrite=args.overwrite)
    except (PrepError, TrainError, StageExistsError) as e:
        raise CliError(str(e)) from e
    if main_rank:
        last = f"final loss {hist[-1]['loss']:.4g}, " if hist else ""
        print(f"trained: {p}/model ({last}{len(hist)} steps)")
    return 0


def _cmd_map(args: argparse.Namespace) -> int:
    from ccstae_hpc.core.mapping import ReferenceRegionError
    from ccstae_hpc.runtime.ddp import dask_client_soon
    from ccstae_hpc.stages.map import map_store
    from ccstae_hpc.stages.prep import PrepError

    p = _store_arg(args.store)
    try:
        mcfg = map_config(args)
    except ValueError as e:
        raise CliError(str(e), "Fix the option and run again.") from e
    if args.rows_per_block < 1:
        raise CliError("--rows-per-block must be >= 1", "Fix the option and run again.")
    try:
        # the workers start while the map stage analyses the dictionary and calibrates
        with dask_client_soon(args.workers, args.scheduler) as client:
            map_store(p, mcfg, client=client, rows_per_block=args.rows_per_block,
                      progress=not args.quiet, overwrite=args.overwrite)
    except (PrepError, FileNotFoundError, ReferenceRegionError, StageExistsError) as e:
        raise CliError(str(e)) from e
    print(f"strain maps in {p} (group 'strain'); read with xarray.open_zarr(\"{p}\", "
          "group=\"strain\")")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import ServeError, serve

    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be >= 1", "Fix the option and run again.")
    try:
        return serve(args.schedule, limit=args.limit, check=args.check)
    except ServeError as e:
        raise CliError(str(e)) from e


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ccstae`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list and args_list[0] == "ingest":
            return _cmd_ingest(args_list[1:])
        try:
            args = build_parser().parse_args(args_list)
        except SystemExit as e:  # argparse exits on usage errors and --help
            return _exit_code(e)
        return int(args.func(args))
    except CliError as e:
        print(e.line(), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
