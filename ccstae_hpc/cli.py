"""The ``ccstae`` command: thin wrappers around the library functions.

Subcommands::

    ccstae simulate OUT.npy [--scan NY NX] [--detector Q] [--dose D] [--seed S] ...
    ccstae run INPUT.npy --out STORE.zarr [--overwrite] [--epochs N] [--num-base K] ...
    ccstae ingest ...            (see ``ccstae ingest --help``)
    ccstae preprocess | train | map STORE.zarr ...   (one stage at a time)
    ccstae analyze STORE.zarr [--loop-px N] [--false-alarms F] [--scan-step-A A] ...

Bad input gets one line ``error: <problem>. <what to do>`` on stderr and exit code 2, and
nothing is written: every check that can fail runs before any computation.  Any other
failure is an internal error: one line and exit code 1.  No traceback is printed unless
``--verbose`` is given (anywhere on the command line).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import math
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from ccstae_hpc.core.config import AnalyzeConfig, MapConfig, ModelConfig, SimConfig, TrainConfig
from ccstae_hpc.stages import store
from ccstae_hpc.stages.ingest import OneLineParser, check_store_location
from ccstae_hpc.stages.prep import MIN_DETECTOR, MIN_PATTERNS
from ccstae_hpc.stages.readers import IngestError, read_npy_header
from ccstae_hpc.stages.resume import continue_build
from ccstae_hpc.stages.store import StageExistsError

if TYPE_CHECKING:
    from flows.embedded import EarlyServer

__all__ = ["EXIT_INTERNAL", "EXIT_USAGE", "CliError", "check_content",
           "check_finite", "load_npy", "main", "run_npy", "validate_array"]

EXIT_USAGE = 2  # bad input, options or stores: the user can fix it
EXIT_INTERNAL = 1  # anything else: a bug or the environment (disk, network)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
VERBOSE_FLAG = "--verbose"
# bytes of input checked for NaN/inf per step: bounded memory whatever the file size
_CHECK_BLOCK_BYTES = 64 * 2**20
# loggers of the embedded flow run that `run --quiet` limits to warnings and errors
_FLOW_LOGGERS = ("prefect", "distributed")
# what `run` imports before its first training step, loaded while Prefect's server starts
# (its process boots on the other core for ~4 s): the flow modules (torch, Dask, the stages;
# 2.8 s) and torch._dynamo, which torch.optim imports in the first optimiser's constructor
# (1.1-1.4 s on two cores)
RUN_PRELOAD = ("flows.pipeline", "torch._dynamo")


class CliError(Exception):
    """A user error: printed as ``error: <problem>. <what to do>``, exit code 2."""

    def __init__(self, problem: str, todo: str = "") -> None:
        super().__init__(problem)
        self.problem = problem.rstrip(".")
        self.todo = todo

    def line(self) -> str:
        # one line whatever the wrapped exception's text holds
        return " ".join(f"error: {self.problem}. {self.todo}".split())

    @classmethod
    def of(cls, e: BaseException, todo: str = "Check the input data.") -> CliError:
        """A CliError from a stage's user error, whose text is ``<problem>. <what to do>``
        already or gets ``todo`` appended."""
        text = " ".join(str(e).split())
        return cls(text) if ". " in text else cls(text, todo)


# ---------------------------------------------------------------------------------------------
# input checks (cheap, before any computation)


def load_npy(path: Path) -> np.ndarray:
    """Memory-map a ``.npy`` file read-only; raise :class:`CliError` if it is not one."""
    if not path.exists():
        raise CliError(f"input file {path} does not exist", "Check the path.")
    if path.is_dir():
        raise CliError(f"input {path} is a directory", "Pass a .npy file.")
    if not path.is_file():
        raise CliError(f"input {path} is not a regular file", "Pass a .npy file.")
    try:
        # the header checked against the file size: a corrupt header is refused here, not
        # mapped onto the wrong shape
        h = read_npy_header(path)
        if 0 in h.shape:  # numpy cannot map an empty array; validate_array says what is wrong
            return np.zeros(h.shape, h.dtype)
        return np.memmap(path, dtype=h.dtype, mode="r", offset=h.offset, shape=h.shape,
                         order="F" if h.fortran else "C")
    except IngestError as e:
        raise CliError.of(e, "Pass a NumPy .npy file written by numpy.save.") from e
    except PermissionError as e:
        raise CliError(
            f"cannot read {path}: permission denied", "Check the file's permissions."
        ) from e
    except (ValueError, OSError) as e:
        raise CliError(f"{path} is not a readable .npy file ({e})",
                       "Pass a NumPy .npy file written by numpy.save.") from e


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


def check_content(data: np.ndarray) -> None:
    """Refuse data without usable diffraction, on the sample preprocessing will use: all zero,
    negative counts, saturated or constant, no central disk with room for Bragg disks.

    The same checks as ``ccstae preprocess`` (:func:`ccstae_hpc.stages.prep.check_sample`,
    :func:`~ccstae_hpc.stages.prep.find_disk`), run before the pipeline starts.
    """
    from ccstae_hpc.stages.prep import PrepConfig, PrepError, check_sample, find_disk, sample_stats

    ny, nx = data.shape[:2]
    redo = "run again on the corrected file"
    try:
        stats = sample_stats(lambda y0, y1: np.asarray(data[y0:y1]), ny, nx)
        check_sample(stats, data.dtype, redo)
        find_disk(stats, data.dtype, PrepConfig().hot_nsigma)
    except PrepError as e:
        raise CliError.of(e) from e


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
    kw["forward_model"] = args.forward_model
    kw["disk_estimate"] = args.disk_estimate
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
    p.add_argument(
        "--forward-model", choices=("auto", "disks", "dictionary"), default="auto",
        help="what the final registration fits to each pattern: disks (the entry's Bragg "
             "disks redrawn with the disk profile measured on the data's central disks, sharp "
             "at any sub-pixel position), dictionary (the learned entry image) or auto "
             "(default: with --pool-sigma 0 both on a few central scan rows, keeping the one "
             "whose fits scatter less between neighbouring probe positions; else dictionary)")
    p.add_argument(
        "--disk-estimate", choices=("mean", "mode"), default="mean",
        help="what a fit of the disk model reports: mean (default), the mean of the "
             "pattern's likelihood over its lattice (steadier at low dose, where the "
             "likelihood has many close local maxima), or mode, its maximum")


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
    verbose: bool = False,
) -> xr.Dataset:
    """What ``ccstae run`` does: check, load, validate, run the pipeline, write the store.

    Every check that can fail runs before any computation.  ``progress`` is passed to
    the training stage (``True`` shows progress, a callable receives the training records;
    False also quietens the flow's logs).  ``verbose`` keeps the flow's tracebacks.

    Raises
    ------
    CliError
        Bad input or output path; nothing was written.
    """
    inp, out = Path(inp), Path(out)
    map_cfg = map_cfg or MapConfig()
    _check_output(inp, out, overwrite)
    # Prefect's server boots on the other core while the input is checked and Prefect and
    # the flows load (4 s of the run's start); the flow stops it, or the finally below
    from flows.embedded import spawn_server  # standard library only: instant

    early = spawn_server() if engine == "prefect" else None
    try:
        data = load_npy(inp)
        validate_array(data, map_cfg.reference)
        check_content(data)
        ny, nx, qy, qx = data.shape
        del data
        print(f"ccstae run: {inp} ({ny} x {nx} scan, {qy} x {qx} detector) -> {out}")
        _run_engine(inp, out, overwrite, model_cfg, train_cfg, map_cfg, progress, engine,
                    verbose, early)
    finally:
        # not taken over by the flow: a check refused the input, the store was locked
        if early is not None and early.running:
            early.discard()
    return store.open_strain(out).load()


def _run_engine(inp: Path, out: Path, overwrite: bool, model_cfg: ModelConfig | None,
                train_cfg: TrainConfig | None, map_cfg: MapConfig,
                progress: bool | Callable[[dict], None], engine: str, verbose: bool,
                early: EarlyServer | None) -> None:
    """The run itself, after the checks: the Prefect flow or the plain stage sequence."""
    try:
        if engine == "prefect":
            _run_flow(inp, out, overwrite, model_cfg, train_cfg, map_cfg,
                      quiet=progress is False, verbose=verbose, early=early)
        else:
            # imported here: torch loads in seconds, and the checks above must stay instant
            from ccstae_hpc.stages.run import run_store

            run_store(inp, out, overwrite=overwrite, model_cfg=model_cfg,
                      train_cfg=train_cfg, map_cfg=map_cfg, progress=progress,
                      log=(lambda s: print(f"  {s}")) if progress else (lambda s: None))
    except FileExistsError as e:  # the output appeared while we computed
        raise CliError.of(e, "Choose another --out or pass --overwrite.") from e
    except ValueError as e:
        if not isinstance(e, _user_errors()):
            raise  # not a refusal of the data: an internal error (exit code 1)
        # ingest / preprocessing / training refused the data
        raise CliError.of(e) from e


def _check_output(inp: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output ``run`` must not or cannot write, before reading the input."""
    # `run` builds the whole store (raw, prep, model, affine, strain, analysis) beside the
    # output and renames it into place, so --overwrite replaces all of it, and only at the
    # very end
    if os.path.lexists(out):
        if not store.is_store(out):
            raise CliError(f"output {out} exists and is not a Zarr store",
                           "Choose another --out (it is never replaced, even with --overwrite).")
        if not overwrite:
            raise CliError(f"output store {out} exists",
                           "Pass --overwrite to replace it or choose another --out.")
        if out.resolve() in inp.resolve().parents:
            raise CliError(f"the input {inp} is inside the output store {out}, which --overwrite "
                           "would delete", "Move the input out of the store or choose another "
                           "--out.")
    try:
        # the new store is built beside `out` and renamed into place: its directory must be
        # writable (an output inside the input file, a read-only directory fail here)
        check_store_location(out.parent if os.path.lexists(out) else out)
    except IngestError as e:
        raise CliError.of(e) from e


def _run_flow(inp: Path, out: Path, overwrite: bool, model_cfg: ModelConfig | None,
              train_cfg: TrainConfig | None, map_cfg: MapConfig | None, *,
              quiet: bool = False, verbose: bool = False,
              early: EarlyServer | None = None) -> None:
    """The Prefect ``pipeline`` flow, embedded (no separate server), into a sibling store
    that replaces ``out`` only once complete.

    Unless ``verbose``, the flow's log records lose their tracebacks (the error is reported
    once, as one line, by :func:`main`); ``quiet`` keeps only warnings and errors.  A
    temporary Prefect server this run started is stopped before returning, so that its
    shutdown messages come before the result or the error line, not after it.
    """
    from flows.embedded import embedded_prefect, offline_defaults

    offline_defaults()  # before Prefect is imported
    from flows.params import PipelineConfig

    cfg = PipelineConfig(model=model_cfg or ModelConfig(), train=train_cfg or TrainConfig(),
                         map=map_cfg or MapConfig())
    from ccstae_hpc.stages.lock import store_lock

    note = None if quiet else (lambda s: print(f"  {s}"))
    with store_lock(out, log=note):
        # a run of this input killed before it published: continue its build store (the
        # flows skip the stages it finished) instead of starting over
        tmp = continue_build(out, inp, cfg.ingest.identity(), note)
        try:
            # the pipeline's imports (torch, Dask) load while Prefect's server starts
            with _flow_logging(quiet, verbose), embedded_prefect(RUN_PRELOAD, early):
                from flows.pipeline import run_pipeline_embedded

                run_pipeline_embedded(inp, tmp, config=cfg)
            store.publish(tmp, out, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            _move_figures(tmp, None)
            raise
        _move_figures(tmp, out)


def _move_figures(tmp: Path, out: Path | None) -> None:
    """Give the figures the flow wrote beside ``tmp`` the final store's names (replacing
    those of a store ``out`` replaced), or remove them (``out`` None)."""
    from ccstae_hpc.plot import default_figure_dir
    from flows.report import figure_paths

    pairs = list(zip(figure_paths(tmp), figure_paths(out or tmp), strict=True))
    pairs.append((default_figure_dir(tmp), default_figure_dir(out or tmp)))
    for src, dst in pairs:
        if not os.path.lexists(src):
            continue
        if out is None:
            if src.is_dir():
                shutil.rmtree(src, ignore_errors=True)
            else:
                src.unlink(missing_ok=True)
        elif src.is_dir() and os.path.lexists(dst):
            store.swap_into_place(src, dst)  # a directory cannot be replaced in one rename
        else:
            os.replace(src, dst)


class _NoTraceback(logging.Filter):
    """Drops the traceback (and any line after the first) of log records: without
    ``--verbose`` an error is reported once, as the command's last line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text or record.stack_info:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            record.msg = (record.getMessage().splitlines() or [""])[0]
            record.args = None
        return True


class _BelowWarning(logging.Filter):
    """Keeps only warnings and errors: the library logs of a run are for ``--verbose``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


class _StageProgress(logging.Handler):
    """The default terminal output of an embedded flow run, from its task-run log records:
    one line per finished stage with its time, and a progress bar while training."""

    _STEP = re.compile(r"step (\d+)/(\d+)")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.t0 = time.perf_counter()
        self.bar: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stage = getattr(record, "task_name", None) or "stage"
            msg = record.getMessage()
            step = self._STEP.search(msg) if stage == "train" else None
            if step is not None:
                if self.bar is None:
                    from tqdm.auto import tqdm

                    self.bar = tqdm(total=int(step.group(2)), unit="step", desc="train",
                                    dynamic_ncols=True, leave=False)
                self.bar.total = int(step.group(2))  # the schedule decides the end as it goes
                self.bar.update(int(step.group(1)) - self.bar.n)
            elif msg.startswith("Beginning flow run"):
                now = time.perf_counter()
                print(f"  {'start':<11s} done in {now - self.t0:6.1f} s (Prefect, the flow run)",
                      file=sys.stderr, flush=True)
                self.t0 = now
            elif msg.startswith("Finished in state Completed") and stage != "stage":
                self.close_bar()
                now = time.perf_counter()
                print(f"  {stage:<11s} done in {now - self.t0:6.1f} s", file=sys.stderr,
                      flush=True)
                self.t0 = now
        except Exception:  # noqa: BLE001 - progress output must never break a run
            self.handleError(record)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _all_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return list({id(h): h for lg in loggers for h in lg.handlers}.values())


@contextlib.contextmanager
def _flow_logging(quiet: bool, verbose: bool) -> Iterator[None]:
    """Prefect/Dask logging for one embedded flow run; restored afterwards (tests run many
    commands in one process)."""
    # Prefect sets up its log handlers when its flow API is first imported: before they are
    # collected here (the flow modules themselves load later, while Prefect's server starts)
    from prefect import flow  # noqa: F401

    filt = _NoTraceback()
    handlers = [] if verbose else _all_handlers()
    for h in handlers:
        h.addFilter(filt)
    # default: the stages' progress instead of the library logs (those stay for --verbose)
    console = [h for h in handlers if type(h).__name__ != "APILogHandler"
               and isinstance(h, logging.StreamHandler)] if not quiet else []
    below = _BelowWarning()
    for h in console:
        h.addFilter(below)
    progress = _StageProgress() if not (quiet or verbose) else None
    run_logs = [logging.getLogger(n) for n in ("prefect.task_runs", "prefect.flow_runs")]
    if progress is not None:
        for lg in run_logs:
            lg.addHandler(progress)
    levels: dict[str, int] = {}
    if quiet:
        for name, lg in list(logging.root.manager.loggerDict.items()):
            if isinstance(lg, logging.Logger) and name.split(".")[0] in _FLOW_LOGGERS:
                levels[name] = lg.level
                lg.setLevel(max(lg.level, logging.WARNING))
        for name in _FLOW_LOGGERS:
            lg = logging.getLogger(name)
            levels.setdefault(name, lg.level)
            lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(filt)
        for h in console:
            h.removeFilter(below)
        if progress is not None:
            progress.close_bar()
            for lg in run_logs:
                lg.removeHandler(progress)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _cmd_run(args: argparse.Namespace) -> int:
    from ccstae_hpc.sim.evaluate import summarize
    from ccstae_hpc.stages.analyze import ANALYSIS, summarize_analysis

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
        verbose=getattr(args, "verbose", False),
    )
    dt = time.perf_counter() - t0
    print(summarize(ds))
    print(summarize_analysis(xr.open_zarr(args.out, group=ANALYSIS)))
    print(f"done in {dt:.1f} s; strain maps in {args.out} (group 'strain'), their analysis "
          f"in group '{ANALYSIS}'")
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
        "noise_seed": args.noise_seed,
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


def _cmd_ingest(argv: Sequence[str], verbose: bool = False) -> int:
    try:
        from ccstae_hpc.stages.ingest import ingest_main
    except ImportError as e:
        raise CliError(f"ingest is not available ({e})", "Reinstall ccstae-hpc.") from e
    try:
        return int(ingest_main(list(argv), verbose=verbose))
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
    p = OneLineParser(
        prog="ccstae",
        description="CC-ST-AE strain mapping for 4D-STEM.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # taken out of the arguments by main() wherever it stands; declared here for --help
    p.add_argument(VERBOSE_FLAG, action="store_true",
                   help="print the traceback of an error (may stand anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="one of the commands below; `ccstae COMMAND --help` lists its "
                           "options")

    s = sub.add_parser("simulate", help="write a synthetic WS2/WSe2 dataset with ground truth")
    s.add_argument("out", metavar="OUT.npy", help="data file; the truth goes to OUT.truth.npz")
    s.add_argument("--scan", type=int, nargs=2, metavar=("NY", "NX"), help="scan size (64 64)")
    s.add_argument("--detector", type=int, metavar="Q", help="detector size in px (128)")
    s.add_argument("--dose", type=float, metavar="D", help="e-/pattern (default: noise-free)")
    s.add_argument("--seed", type=int, metavar="S", help="random seed (0)")
    s.add_argument("--noise-seed", type=int, metavar="N",
                   help="another draw of the shot noise of the same sample (0: the seed's)")
    s.add_argument("--background-weight", type=float, metavar="W", help="in [0, 1) (0)")
    s.add_argument("--overwrite", action="store_true", help="replace existing files")
    s.set_defaults(func=_cmd_simulate)

    r = sub.add_parser("run", help="strain maps and their analysis from a 4D-STEM .npy array")
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
    pp.add_argument("store", metavar="STORE.zarr",
                    help="Zarr store of the dataset, ingested (`ccstae ingest`)")
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
    t.add_argument("store", metavar="STORE.zarr",
                   help="Zarr store of the dataset, preprocessed (`ccstae preprocess`)")
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
    m.add_argument("store", metavar="STORE.zarr",
                   help="Zarr store of the dataset, trained (`ccstae train`; preprocessed "
                   "is enough for --method com)")
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

    a = sub.add_parser(
        "analyze", help="derived maps, dislocations and ripple: STORE/strain -> STORE/analysis",
        description="Read the strain maps of STORE/strain and write STORE/analysis: derived "
        "maps (dilatation, principal strains, rotation gradients), a table of dislocation "
        "cores with their Burgers vectors (closure failure of test circuits), and the "
        "ripple of the lattice rotation (wavelength, direction, amplitude). Detection levels "
        "come from the map's own noise.")
    a.add_argument("store", metavar="STORE.zarr",
                   help="Zarr store of the dataset, mapped (`ccstae map` or `ccstae run`)")
    a.add_argument("--loop-px", type=int, metavar="N",
                   help="side of the test circuits for dislocation cores, in scan pixels, "
                   "even and >= 2 (default: four pooling widths of the strain map, at least "
                   "4)")
    a.add_argument("--false-alarms", type=float, metavar="F",
                   help="expected number of false detections per map, in (0, 1); sets the "
                   f"dislocation and ripple detection levels ({AnalyzeConfig.false_alarms})")
    a.add_argument("--scan-step-A", type=float, metavar="A",
                   help="Angstrom per scan step, used only when the raw data carry no scan "
                   "calibration (Burgers vectors in Angstrom and lattice units need it)")
    a.add_argument("--overwrite", action="store_true",
                   help="replace an existing analysis group")
    a.add_argument("--quiet", action="store_true",
                   help="print only where the result is, not the summary")
    a.set_defaults(func=_cmd_analyze)

    pl = sub.add_parser(
        "plot", help="figures for a paper (PNG, PDF) of STORE/strain (and STORE/analysis)",
        description="Write the strain maps, their standard errors and (when STORE/analysis "
        "exists) the derived maps with dislocation symbols as publication figures: "
        "diverging colour maps centred on zero with shared limits, scale bar from the scan "
        "calibration, phase outlines. The store is only read.")
    pl.add_argument("store", metavar="STORE.zarr",
                    help="Zarr store of the dataset, mapped (`ccstae map` or `ccstae run`)")
    pl.add_argument("--out", metavar="DIR",
                    help="directory of the figures (default: NAME_figures beside the store)")
    pl.add_argument("--format", nargs="+", default=["png", "pdf"], metavar="FMT",
                    help="file formats matplotlib writes, e.g. png pdf svg (default: png pdf)")
    pl.set_defaults(func=_cmd_plot)

    ex = sub.add_parser(
        "export", help="STORE/strain to NetCDF, CSV, HyperSpy (.hspy) or EMD/py4DSTEM (.emd)",
        description="Write the strain maps of a store to a file other tools read: NetCDF "
        "(.nc, xarray), CSV (.csv, one row per probe position), HyperSpy (.hspy) or EMD 1.0 "
        "(.emd/.h5, read by py4DSTEM as a RealSlice). The store is only read; an existing "
        "output is never replaced.")
    ex.add_argument("store", metavar="STORE.zarr",
                    help="Zarr store of the dataset, mapped (`ccstae map` or `ccstae run`)")
    ex.add_argument("out", metavar="OUT", help="output file (.nc, .csv, .hspy, .emd or .h5)")
    ex.add_argument("--format", choices=("netcdf", "csv", "hspy", "emd"),
                    help="file format (default: from the extension of OUT)")
    ex.set_defaults(func=_cmd_export)

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


def _locked(p: Path) -> contextlib.AbstractContextManager:
    """The store's lock for a whole stage command: a second command on the store is refused
    at its start, naming the holder, not after its work (every commit takes it anyway)."""
    from ccstae_hpc.stages.lock import store_lock

    return store_lock(p, log=lambda s: print(f"  {s}"))


def _check_workers(n: int) -> None:
    if n < 0:
        raise CliError(f"--workers {n} is negative", "Give 0 (threads in this process) or more.")


def _store_arg(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CliError(f"store {p} does not exist",
                       f"Check the path, or create it with `ccstae ingest INPUT {p}`.")
    if not store.is_store(p):
        raise CliError(f"{p} is not a Zarr store",
                       f"Check the path, or create it with `ccstae ingest INPUT {p}`.")
    try:
        store.open_root(p)
    except Exception as e:  # noqa: BLE001 - any failure to parse the root is a damaged store
        raise CliError(f"{p} is not a readable Zarr store ({type(e).__name__}: {e})",
                       "Check the path, or ingest the data again into a new store.") from e
    return p


# the command that writes each group a stage reads, and what the store is once it has it
_MAKES = {"raw": ("ccstae ingest INPUT {p}", "ingested"),
          "prep": ("ccstae preprocess {p}", "preprocessed"),
          "model": ("ccstae train {p}", "trained"),
          "strain": ("ccstae map {p}", "mapped")}


def _require(p: Path, group: str) -> None:
    """Refuse to run a stage before the one whose group it reads, naming the command to run
    first (stages run out of order)."""
    cmd, done = _MAKES[group]
    state = store.group_state(p, group)
    if state == "absent":
        raise CliError(f"{p} has no {group} group: it is not {done} yet",
                       f"Run `{cmd.format(p=p)}` first.")
    if state == "incomplete":
        raise CliError(f"{p}/{group} is incomplete (its stage was interrupted or failed)",
                       f"Rerun `{cmd.format(p=p)}`.")


def _check_scan(p: Path) -> None:
    """The floors of ``run`` and ``preprocess`` (probe positions, detector) for the later
    stages too: a store preprocessed before they existed is refused the same way."""
    from ccstae_hpc.stages.prep import PrepError, check_raw_shape

    root = store.open_root(p)
    if "raw" in root:
        try:
            check_raw_shape(root["raw"].shape)
        except PrepError as e:
            raise CliError.of(e) from e


def _check_not_done(p: Path, *groups: str, overwrite: bool) -> None:
    """Refuse to replace a complete result without --overwrite, and a store this process
    cannot write; before any work."""
    for g in groups:
        try:
            store.check_stage(p, g, overwrite)
        except StageExistsError as e:
            raise CliError.of(e, "Nothing was changed.") from e
    try:
        check_store_location(p)
    except IngestError as e:
        raise CliError.of(e) from e


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from ccstae_hpc.runtime.clients import dask_client
    from ccstae_hpc.stages.prep import PrepConfig, PrepError, preprocess_store

    p = _store_arg(args.store)
    try:
        cfg = PrepConfig(**({} if args.output_size is None else
                            {"output_size": args.output_size}))
    except ValueError as e:
        raise CliError(str(e), "Fix the option and run again.") from e
    _check_workers(args.workers)
    _require(p, "raw")
    _check_scan(p)
    _check_not_done(p, overwrite=True)  # preprocess_store decides about an existing prep
    try:
        # the cluster closes with the block (its workers are the lock holder's descendants)
        with _locked(p), dask_client(args.workers) as client:
            preprocess_store(p, cfg, client=client, overwrite=args.overwrite, log=print)
    except (PrepError, StageExistsError) as e:
        raise CliError.of(e) from e
    print(f"preprocessed: {p}/prep")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ccstae_hpc.runtime.clients import dask_client
    from ccstae_hpc.runtime.ddp import env_from_environ
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
    _check_workers(args.workers)
    _require(p, "prep")
    _check_scan(p)
    _check_not_done(p, "model", overwrite=args.overwrite)
    main_rank = launcher != "env" or env_from_environ().rank == 0
    # the whole run holds the store's lock, from before the ranks start to after the commit
    # (taken again inside, nested).  It is held by the process that outlives the ranks: this
    # one, alone or as the client of the Dask ranks (its local cluster's workers are its
    # descendants, those of --scheduler join it by its token: see train_store).  Under
    # --launcher env every rank runs this command: only rank 0 (RANK, else SLURM_PROCID, PMI,
    # Open MPI: env_from_environ) takes it; it is the one that commits, and waits for the
    # others at its final barrier, while a lock taken by each rank would refuse all but one
    lock = _locked(p) if main_rank else contextlib.nullcontext()
    try:
        with lock, dask_client(args.workers, args.scheduler) as client:
            hist = train_store(p, mcfg, tcfg, progress=not args.quiet, client=client,
                               launcher=launcher, restart=args.restart, checkpoint=ckpt,
                               overwrite=args.overwrite)
    except (PrepError, TrainError, StageExistsError) as e:
        raise CliError.of(e) from e
    if main_rank:
        last = f"final loss {hist[-1]['loss']:.4g}, " if hist else ""
        print(f"trained: {p}/model ({last}{len(hist)} steps)")
    return 0


def _cmd_map(args: argparse.Namespace) -> int:
    from ccstae_hpc.core.com import ComLatticeError
    from ccstae_hpc.runtime.clients import dask_client_soon
    from ccstae_hpc.stages.prep import PrepError

    p = _store_arg(args.store)
    try:
        mcfg = map_config(args)
    except ValueError as e:
        raise CliError(str(e), "Fix the option and run again.") from e
    if args.rows_per_block < 1:
        raise CliError("--rows-per-block must be >= 1", "Fix the option and run again.")
    _check_workers(args.workers)
    _require(p, "prep")
    if mcfg.method != "com":
        _require(p, "model")
    _check_scan(p)
    _check_not_done(p, "affine", "strain", overwrite=args.overwrite)
    had_analysis = store.group_state(p, "analysis") != "absent"
    try:
        # the workers start while the map stage analyses the dictionary and calibrates
        with _locked(p), dask_client_soon(args.workers, args.scheduler) as client:
            # torch and the stage imported once the workers are starting: their fork server
            # imports the same modules on another core meanwhile (runtime.clients)
            from ccstae_hpc.core.mapping import ReferenceRegionError
            from ccstae_hpc.stages.map import map_store

            try:
                map_store(p, mcfg, client=client, rows_per_block=args.rows_per_block,
                          progress=not args.quiet, overwrite=args.overwrite)
            except ReferenceRegionError as e:
                raise CliError.of(e) from e
    except (PrepError, FileNotFoundError, StageExistsError) as e:
        raise CliError.of(e) from e
    except ComLatticeError as e:
        raise CliError(str(e), "Map with the default method (CC-ST-AE), which needs no "
                       "visible peak in the mean pattern.") from e
    print(f"strain maps in {p} (group 'strain'); read with xarray.open_zarr(\"{p}\", "
          "group=\"strain\")")
    if had_analysis:  # commit removed it: it was made from the maps just replaced
        print(f"the analysis of the previous maps was removed; run `ccstae analyze {p}` for "
              "the new ones")
    return 0


def analyze_config(args: argparse.Namespace) -> AnalyzeConfig:
    """The AnalyzeConfig of ``ccstae analyze``'s options (defaults for those not given);
    ValueError naming the option for a bad value."""
    options = {"loop_px": args.loop_px, "false_alarms": args.false_alarms,
               "scan_step_A": args.scan_step_A}
    kw = {k: v for k, v in options.items() if v is not None}
    for name, value in kw.items():
        if not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} {value} is not a finite number")
    try:
        return AnalyzeConfig(**kw)
    except ValueError as e:
        # the config's message names its fields: name the options the user typed instead
        text = str(e).replace("None", "left out")
        for name in options:
            text = text.replace(name, "--" + name.replace("_", "-"))
        raise ValueError(text) from e


def _cmd_plot(args: argparse.Namespace) -> int:
    from ccstae_hpc.plot import plot_store

    p = _store_arg(args.store)
    _require(p, "strain")
    try:
        paths = plot_store(p, Path(args.out) if args.out else None, tuple(args.format))
    except (FileNotFoundError, ValueError) as e:
        raise CliError.of(e, "Check STORE, --out and --format.") from e
    for path in paths:
        print(path)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ccstae_hpc.stages.export import export_store

    p = _store_arg(args.store)
    _require(p, "strain")
    try:
        out = export_store(p, args.out, args.format)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise CliError.of(e, "Check STORE, OUT and --format.") from e
    except OSError as e:
        raise CliError(f"cannot write {args.out}: {e.strerror or e}",
                       "Choose a writable place with enough free space.") from e
    print(f"wrote {out}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from ccstae_hpc.stages.analyze import ANALYSIS, analyze_store, summarize_analysis

    p = _store_arg(args.store)
    try:
        cfg = analyze_config(args)
    except ValueError as e:
        raise CliError(str(e), "Fix the option and run again.") from e
    _require(p, "strain")
    _check_not_done(p, ANALYSIS, overwrite=args.overwrite)
    t0 = time.perf_counter()
    try:
        with _locked(p):
            ds = analyze_store(p, cfg, overwrite=args.overwrite)
    except (FileNotFoundError, StageExistsError) as e:
        raise CliError.of(e, f"Run `ccstae map {p}` first.") from e
    if not args.quiet:
        print(summarize_analysis(ds))
        print(f"done in {time.perf_counter() - t0:.1f} s")
    print(f"analysis in {p / ANALYSIS}; read it with xarray.open_zarr(\"{p}\", "
          f"group=\"{ANALYSIS}\")")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import ServeError, serve

    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be >= 1", "Fix the option and run again.")
    try:
        return serve(args.schedule, limit=args.limit, check=args.check)
    except ServeError as e:
        raise CliError(str(e)) from e


def _user_errors() -> tuple[type[BaseException], ...]:
    """The stages' user-error classes, from the modules this run has imported (importing one
    here could load torch just to report an error)."""
    names = {"ccstae_hpc.stages.prep": "PrepError", "ccstae_hpc.stages.train": "TrainError",
             "ccstae_hpc.core.mapping": "ReferenceRegionError",
             "ccstae_hpc.core.com": "ComLatticeError"}
    found: list[type[BaseException]] = [IngestError, StageExistsError]
    for mod, name in names.items():
        cls = getattr(sys.modules.get(mod), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def _internal_line(e: BaseException) -> str:
    """One line for an unexpected error, saying how to see more."""
    if isinstance(e, OSError) and e.strerror:
        where = f" ({e.filename})" if e.filename else ""
        return CliError(f"{e.strerror}{where}",
                        "Check the file system (free space, permissions) and run again; "
                        f"{VERBOSE_FLAG} shows the traceback.").line()
    text = (str(e).strip().splitlines() or [""])[0]
    return CliError(f"internal error ({type(e).__name__}: {text})",
                    f"Run again with {VERBOSE_FLAG} for the traceback and report it.").line()


def _pop_verbose(args: list[str]) -> tuple[bool, list[str]]:
    """Take ``--verbose`` out of the arguments wherever it stands (before a ``--``)."""
    end = args.index("--") if "--" in args else len(args)
    head = [a for a in args[:end] if a != VERBOSE_FLAG]
    return len(head) != end, head + args[end:]


def _quiet_unraisable(unraisable: Any) -> None:
    """``sys.unraisablehook`` without ``--verbose``: errors in finalisers are not shown."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ccstae`` console script; returns the exit code.

    Exit codes: 0 success, 2 bad input/options/stores (:data:`EXIT_USAGE`), 1 any other
    error (:data:`EXIT_INTERNAL`), 130 interrupted.  Errors are one line on stderr; the
    traceback only with ``--verbose``.
    """
    verbose, args_list = _pop_verbose(list(sys.argv[1:] if argv is None else argv))
    if not verbose:
        # zarr writes chunks and metadata on its own event loop; when one write fails (a
        # full disk), the concurrent ones that fail after it are logged by asyncio as
        # "Future exception was never retrieved" with a traceback, after our one-line error.
        # The first failure is the one reported; the rest are library logs (--verbose).
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        # an error inside a finaliser that runs whenever the garbage collector gets to it
        # (a file or future of a library) is no outcome of the command: Python would print
        # it with a traceback in the middle of its output
        sys.unraisablehook = _quiet_unraisable
    try:
        if args_list and args_list[0] == "ingest":
            return _cmd_ingest(args_list[1:], verbose)
        try:
            args = build_parser().parse_args(args_list)
        except SystemExit as e:  # argparse exits on usage errors and --help
            return _exit_code(e)
        args.verbose = verbose
        return int(args.func(args))
    except CliError as e:
        if verbose:
            traceback.print_exception(e)
        print(e.line(), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback (see --verbose)
        if verbose:
            traceback.print_exception(e)
        if isinstance(e, _user_errors()):
            print(CliError.of(e).line(), file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" ({e.filename})" if e.filename else ""
            print(CliError(f"no space left on the device{where}",
                           "Free space (or use another file system) and run the same command "
                           "again; the previous result is unchanged.").line(), file=sys.stderr)
            return EXIT_USAGE
        print(_internal_line(e), file=sys.stderr)
        return EXIT_INTERNAL


def entry() -> None:
    """The ``ccstae`` console script (and ``python -m ccstae_hpc.cli``): :func:`main`, then
    exit with its code.

    What the command leaves behind first leaves the garbage collector's generations
    (``gc.freeze``): the interpreter's exit would otherwise run full collections over every
    object torch, distributed and the stages made, 0.8 s of CPU after `ccstae map --workers
    2` (measured on 2 cores; 0.2 s with it).  Everything the command writes is closed
    before :func:`main` returns.  Not in :func:`main` itself: a test or a notebook that
    calls it goes on living.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
