"""Figures of results.  Called by users, the CLI demo and flows; never by numerics.

Uses matplotlib's object API with the Agg canvas directly (no ``pyplot``), so importing this
module changes no global backend state and works on headless cluster nodes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from ccstae_hpc.sim.evaluate import PHASE_NAMES, match_labels, strain_errors, truth_relative

__all__ = [
    "FIGURE_NAMES",
    "PUBLICATION_DPI",
    "ROBUST_PERCENTILE",
    "default_figure_dir",
    "loss_figure",
    "nice_length",
    "plot_store",
    "read_result",
    "result_figures",
    "save_atomic",
    "store_figures",
    "strain_figure",
]

# (name, scale to display units, unit label)
_MAPS = (("exx", 100.0, "%"), ("eyy", 100.0, "%"), ("exy", 100.0, "%"), ("theta", 1.0, "deg"))
_DIVERGING = "RdBu_r"
_PHASE_COLOURS = ("#d9d9d9", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")


def _limit(a: np.ndarray) -> float:
    # robust symmetric limit: one outlier pixel must not wash out a map
    vals = np.abs(a[np.isfinite(a)])
    if vals.size == 0:
        return 1.0
    lim = float(np.percentile(vals, 99))
    return lim if lim > 0 else 1.0


def _image(fig: Figure, ax: Axes, img: np.ndarray, label: str, **kw: Any) -> None:
    im = ax.imshow(img, origin="upper", interpolation="nearest", **kw)
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label(label)
    ax.set_xticks([])
    ax.set_yticks([])


def _phase_image(
    fig: Figure,
    ax: Axes,
    labels: np.ndarray,
    names: Mapping[int, str],
    title: str,
    palette: Sequence[str] = _PHASE_COLOURS,
) -> None:
    # categorical map: one colour per label, -1 (no class) in white
    values = sorted(names)
    cmap = ListedColormap(["white"] + [palette[i % len(palette)] for i in range(len(values))])
    bounds = np.arange(-1.5, len(values) + 0.5)
    index = np.full(labels.shape, -1.0)
    for i, v in enumerate(values):
        index[labels == v] = i
    im = ax.imshow(
        index, origin="upper", interpolation="nearest", cmap=cmap, norm=BoundaryNorm(bounds, cmap.N)
    )
    cb = fig.colorbar(im, ax=ax, shrink=0.8, ticks=np.arange(-1, len(values)))
    cb.ax.set_yticklabels(["none"] + [names[v] for v in values])
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def strain_figure(
    ds: xr.Dataset,
    truth: Mapping[str, Any] | None = None,
    path: str | os.PathLike[str] = "strain_maps.png",
    dpi: int = 110,
) -> Path:
    """PNG of the exx, eyy, exy, theta and phase maps; with ``truth`` a second row of truth.

    The truth row is re-referenced exactly like :func:`ccstae_hpc.sim.evaluate.strain_errors`;
    each component shares symmetric colour limits across rows (99th percentile of ``|value|``
    of the truth if given, else of the result) and the title gives the mean absolute errors.
    The reference region is outlined in black.

    Returns
    -------
    The path written.
    """
    rows = 1 if truth is None else 2
    fig = Figure(figsize=(19, 3.6 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(rows, 5))
    phase = np.asarray(ds["phase"].values)
    sample = np.asarray(ds["sample"].values).astype(bool)
    reference = np.asarray(ds["reference"].values).astype(bool)

    result = {k: np.asarray(ds[k].values, dtype=np.float64) * s for k, s, _ in _MAPS}
    ref_truth: dict[str, np.ndarray] = {}
    if truth is not None:
        rel = truth_relative(ds, truth)
        ref_truth = {k: rel[k] * s for k, s, _ in _MAPS}

    for j, (k, _, unit) in enumerate(_MAPS):
        # with truth, its range sets the scale: a failed result then saturates visibly instead
        # of flattening the truth row to one colour
        lim = _limit(ref_truth[k] if ref_truth else result[k])
        kw = {"cmap": _DIVERGING, "vmin": -lim, "vmax": lim}
        _image(fig, axes[0, j], result[k], f"{k} ({unit})", **kw)
        axes[0, j].set_title(f"{k} result")
        if reference.any():
            axes[0, j].contour(reference, levels=[0.5], colors="k", linewidths=0.6)
        if ref_truth:
            _image(fig, axes[1, j], ref_truth[k], f"{k} ({unit})", **kw)
            axes[1, j].set_title(f"{k} truth (same reference)")

    if truth is None:
        classes = {int(c): f"class {int(c)}" for c in np.unique(phase[phase >= 0])}
        # grey is reserved for vacuum: the classes of sample pixels start at the next colour
        _phase_image(
            fig,
            axes[0, 4],
            np.where(sample, phase, -1),
            classes,
            "phase (sample)",
            _PHASE_COLOURS[1:],
        )
        fig.suptitle("CC-ST-AE strain maps")
    else:
        tphase = np.asarray(truth["phase"]).astype(np.int64)
        mapped = np.full(phase.shape, -1)
        for c, t in match_labels(phase, tphase).items():
            mapped[phase == c] = t
        mapped[~sample] = 0  # what the result calls vacuum, whatever its class
        _phase_image(fig, axes[0, 4], mapped, PHASE_NAMES, "phase result (matched)")
        _phase_image(fig, axes[1, 4], tphase, PHASE_NAMES, "phase truth")
        e = strain_errors(ds, truth)
        fig.suptitle(
            "MAE vs truth: "
            + ", ".join(f"{k} {s * e[f'mae_{k}']:.3f} {u}" for k, s, u in _MAPS)
            + f"; sample accuracy {100 * e['acc_sample']:.1f} %, "
            f"phase accuracy {100 * e['acc_phase']:.1f} %"
        )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def loss_figure(
    losses: Sequence[float] | Mapping[str, Sequence[float]],
    path: str | os.PathLike[str] = "loss.png",
    xlabel: str = "step",
) -> Path:
    """PNG of one or several loss curves (log scale when all values are positive)."""
    curves = dict(losses) if isinstance(losses, Mapping) else {"loss": losses}
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    positive = True
    for name, values in curves.items():
        v = np.asarray(values, dtype=np.float64)
        ax.plot(np.arange(v.size), v, label=name)
        positive &= bool(v.size == 0 or np.nanmin(v) > 0)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    if len(curves) > 1:
        ax.legend()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


# ------------------------------------------------------------ publication figures of a store

# resolution of the PNG figures (journals ask for >= 300 dpi for line art, 200 for halftones)
PUBLICATION_DPI = 300
# percentile of |value| over the sample that sets a map's colour limits: robust to a few
# failed fits, which then saturate instead of flattening the rest of the map
ROBUST_PERCENTILE = 99.0
# vacuum (and every pixel without a value) on the maps
VACUUM_GREY = "#b0b0b0"
# target length of the scale bar as a fraction of the field width (rounded to 1, 2, 5 x 10^n)
SCALE_BAR_FRACTION = 0.2
# thickness of the scale bar as a fraction of the field height
_BAR_THICKNESS = 0.015
# mantissas of the scale bar lengths
_NICE = (1.0, 2.0, 5.0)
# temporaries of plot_store: ".NAME.FORMAT<marker>PID-HEX" beside the final file
_TMP_MARKER = ".plot-tmp-"
# size of the dislocation symbol (points) and of the map text (points)
_CORE_MARKER_PT = 11
_FONT_PT = 8
# width (points) of the first phase's outline; each later phase's is this factor thinner
_OUTLINE_PT = 2.0
_OUTLINE_SHRINK = 0.5
# the maps of the figures: (variable, scale to display units, unit, colour bar label)
_STRAIN_PANELS = (("exx", 100.0, "%", r"$\varepsilon_{xx}$"),
                  ("eyy", 100.0, "%", r"$\varepsilon_{yy}$"),
                  ("exy", 100.0, "%", r"$\varepsilon_{xy}$"),
                  ("theta", 1.0, "deg", r"$\theta$"))
_STRAIN_KEYS = ("exx", "eyy", "exy")
# every figure plot_store may write, in order
FIGURE_NAMES = ("strain", "uncertainty", "analysis")


def default_figure_dir(store: str | os.PathLike[str]) -> Path:
    """``DIR/NAME_figures`` for the store ``DIR/NAME.zarr``: beside the store, never in it."""
    p = Path(store).resolve()
    return p.with_name(f"{p.name.removesuffix('.zarr')}_figures")


def read_result(store: str | os.PathLike[str]
                ) -> tuple[xr.Dataset, xr.Dataset | None, float | None]:
    """``(strain, analysis or None, scan step in nm or None)`` of a store, loaded, read only.

    The scan step is the ``raw`` group's ``calibration.scan_step_nm`` (set at ingest); the
    ``analysis`` group is read only when it is complete.

    Raises
    ------
    FileNotFoundError
        No store or no ``strain`` group (run the map stage first).
    """
    from ccstae_hpc.stages.store import group_state, open_root, open_strain

    strain = open_strain(store).load()
    analysis = None
    if group_state(store, "analysis") == "complete":
        analysis = xr.open_zarr(store, group="analysis").load()
    root = open_root(store)
    cal = dict(root["raw"].attrs.get("calibration", {}) or {}) if "raw" in root else {}
    step = cal.get("scan_step_nm")
    try:
        step_nm = float(step) if step is not None else None
    except (TypeError, ValueError):
        step_nm = None
    if step_nm is not None and not (np.isfinite(step_nm) and step_nm > 0):
        step_nm = None
    return strain, analysis, step_nm


def nice_length(width: float, fraction: float = SCALE_BAR_FRACTION) -> float:
    """The largest 1, 2 or 5 x 10^n not longer than ``fraction * width`` (a scale bar)."""
    target = fraction * width
    if not (np.isfinite(target) and target > 0):
        raise ValueError(f"scale bar for a field of width {width}: give a positive width")
    exp = 10.0 ** np.floor(np.log10(target))
    return max(m * exp for m in _NICE if m * exp <= target * (1 + 1e-9))


def _robust(values: Sequence[np.ndarray]) -> float:
    # one robust limit of |value| over several maps' finite values (1 when there are none)
    v = np.abs(np.concatenate([np.ravel(a[np.isfinite(a)]) for a in values]))
    if v.size == 0:
        return 1.0
    lim = float(np.percentile(v, ROBUST_PERCENTILE))
    return lim if lim > 0 else 1.0


class _Frame:
    """Geometry shared by every panel: scan step, extent, axis labels, masks, phases."""

    def __init__(self, strain: xr.Dataset, step_nm: float | None) -> None:
        self.phase = np.asarray(strain["phase"].values).astype(np.int64)
        self.ny, self.nx = self.phase.shape
        sample = (np.asarray(strain["sample"].values).astype(bool) if "sample" in strain
                  else self.phase > 0)
        self.sample = sample & (self.phase > 0)
        self.step = step_nm or 1.0
        self.unit = "nm" if step_nm else "scan px"
        s = self.step
        # pixel centres at integer multiples of the step, as the contours and cores
        self.extent = (-0.5 * s, (self.nx - 0.5) * s, (self.ny - 0.5) * s, -0.5 * s)
        self.xc = np.arange(self.nx) * s
        self.yc = np.arange(self.ny) * s
        self.phases = [int(p) for p in np.unique(self.phase[self.sample])]
        self.has_vacuum = bool((~self.sample).any())

    def masked(self, a: np.ndarray) -> np.ma.MaskedArray:
        a = np.asarray(a, np.float64)
        return np.ma.masked_where(~self.sample | ~np.isfinite(a), a)


def _phase_colour(i: int) -> str:
    # the i-th sample phase present; grey (the palette's first colour) is vacuum's
    return _PHASE_COLOURS[1 + i % (len(_PHASE_COLOURS) - 1)]


def _cmap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=VACUUM_GREY)


def _map_panel(fig: Figure, ax: Axes, frame: _Frame, img: np.ndarray, name: str, label: str,
               cmap: str, vmin: float, vmax: float) -> None:
    """One map with its colour bar, axes in the calibrated unit, phase outlines, scale bar."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    ax.set_label(name)
    im = ax.imshow(frame.masked(img), origin="upper", interpolation="nearest",
                   extent=frame.extent, cmap=_cmap(cmap), vmin=vmin, vmax=vmax)
    im.set_gid(name)
    fig.colorbar(im, ax=ax, shrink=0.85, pad=0.02).set_label(label)
    ax.set_xlabel(f"x ({frame.unit})")
    ax.set_ylabel(f"y ({frame.unit})")
    for i, p in enumerate(frame.phases):
        if 0 < (frame.phase == p).sum() < frame.phase.size:
            # each later phase thinner on top: a boundary between two phases shows both
            # colours side by side instead of the last one drawn
            ax.contour(frame.xc, frame.yc, (frame.phase == p).astype(float), levels=[0.5],
                       colors=[_phase_colour(i)],
                       linewidths=_OUTLINE_PT * _OUTLINE_SHRINK ** i)
    width = frame.nx * frame.step
    length = nice_length(width)
    bar = AnchoredSizeBar(ax.transData, length, f"{length:g} {frame.unit.split()[-1]}",
                          "lower right", pad=0.3, borderpad=0.4, sep=2, frameon=True,
                          size_vertical=_BAR_THICKNESS * frame.ny * frame.step,
                          color="black")
    bar.patch.set_alpha(0.7)
    bar.set_gid("scale_bar")
    ax.add_artist(bar)


def _phase_legend(fig: Figure, frame: _Frame) -> None:
    # only what the map holds: vacuum if any, then each sample phase present
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = []
    if frame.has_vacuum:
        handles.append(Patch(facecolor=VACUUM_GREY, edgecolor="none", label="vacuum"))
    for i, p in enumerate(frame.phases):
        handles.append(Line2D([], [], color=_phase_colour(i), lw=_OUTLINE_PT,
                              label=f"phase {p}"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles),
                   frameon=False)


def _core_marker(bx: float, by: float) -> Any:
    """The dislocation symbol, its bar along the Burgers vector ``(bx, by)`` of the scan frame.

    On a display with y down, a vector (bx, by) points at ``atan2(-by, bx)`` counter-clockwise
    from the screen's +x; the stem of the symbol is 90 deg counter-clockwise from the bar.
    """
    from matplotlib.markers import MarkerStyle
    from matplotlib.path import Path as MplPath
    from matplotlib.transforms import Affine2D

    angle = float(np.degrees(np.arctan2(-by, bx))) if np.hypot(bx, by) > 0 else 0.0
    # the path itself is turned (not the marker's transform): what is drawn is the path
    verts = Affine2D().rotate_deg(angle).transform([(-1.0, 0.0), (1.0, 0.0), (0.0, 0.0),
                                                    (0.0, 1.2)])
    return MarkerStyle(MplPath(verts, [MplPath.MOVETO, MplPath.LINETO, MplPath.MOVETO,
                                       MplPath.LINETO]))


def _cores(ax: Axes, frame: _Frame, analysis: xr.Dataset | None) -> None:
    from matplotlib import patheffects

    if analysis is None or "dislocation" not in analysis.dims:
        return
    halo = [patheffects.withStroke(linewidth=3, foreground="white")]
    for y, x, bx, by in zip(*(np.asarray(analysis[k].values, np.float64)
                              for k in ("y", "x", "burgers_x", "burgers_y")), strict=True):
        (line,) = ax.plot([x * frame.step], [y * frame.step], linestyle="none",
                          marker=_core_marker(bx, by), markersize=_CORE_MARKER_PT,
                          markeredgewidth=1.6, color="black", path_effects=halo)
        line.set_gid("dislocation")


def _ripple_text(analysis: xr.Dataset, frame: _Frame) -> str:
    lam = float(analysis["ripple_wavelength_px"].values)
    if not np.isfinite(lam):
        reason = analysis["ripple_wavelength_px"].attrs.get("reason", "")
        return "no significant ripple" + (f" ({reason})" if reason else "")
    direction = float(analysis["ripple_direction_deg"].values)
    amp = float(analysis["ripple_amplitude_deg"].values)
    unit = frame.unit.split()[-1]
    return (f"ripple: wavelength {lam * frame.step:.3g} {unit}, wave vector {direction:.0f} deg,"
            f" amplitude {amp:.2g} deg")


def _new_figure(rows: int, cols: int) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(3.6 * cols, 3.1 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_2d(fig.subplots(rows, cols)).ravel()


def result_figures(strain: xr.Dataset, analysis: xr.Dataset | None = None,
                   scan_step_nm: float | None = None) -> dict[str, Figure]:
    """The publication figures of a result, by name (no I/O).

    * ``strain``: exx, eyy, exy (%) with one symmetric colour range and theta (deg) with its
      own, each centred on zero (``ROBUST_PERCENTILE`` of ``|value|`` over the sample); vacuum
      grey; phase outlines with a legend of the phases present; axes and a scale bar in nm when
      ``scan_step_nm`` is known, else in scan pixels; with ``analysis``, a dislocation symbol
      at each core (bar along the Burgers vector) and the ripple in the title;
    * ``uncertainty``: the standard errors ``exx_std`` ... ``theta_std`` (when present);
    * ``analysis`` (with ``analysis``): dilatation, maximum shear, principal direction,
      rotation gradients and lattice curvature (per nm when calibrated).
    """
    from matplotlib import rc_context

    frame = _Frame(strain, scan_step_nm)
    out: dict[str, Figure] = {}
    with rc_context({"font.size": _FONT_PT, "axes.titlesize": _FONT_PT + 1}):
        maps = {k: np.asarray(strain[k].values, np.float64) * s for k, s, _, _ in _STRAIN_PANELS}
        lim = _robust([maps[k][frame.sample] for k in _STRAIN_KEYS])
        fig, axes = _new_figure(2, 2)
        for ax, (k, _, unit, tex) in zip(axes, _STRAIN_PANELS, strict=True):
            v = lim if k in _STRAIN_KEYS else _robust([maps[k][frame.sample]])
            _map_panel(fig, ax, frame, maps[k], k, f"{tex} ({unit})", "RdBu_r", -v, v)
            _cores(ax, frame, analysis)
        title = "Strain and lattice rotation"
        if analysis is not None:
            n = analysis.sizes.get("dislocation", 0)
            title += (f"; {n} dislocation{'s' if n != 1 else ''} (⊥, bar along b)\n"
                      + _ripple_text(analysis, frame))
        fig.suptitle(title)
        _phase_legend(fig, frame)
        out["strain"] = fig

        if all(f"{k}_std" in strain for k, _, _, _ in _STRAIN_PANELS):
            std = {k: np.asarray(strain[f"{k}_std"].values, np.float64) * s
                   for k, s, _, _ in _STRAIN_PANELS}
            top = _robust([std[k][frame.sample] for k in _STRAIN_KEYS])
            fig, axes = _new_figure(2, 2)
            for ax, (k, _, unit, tex) in zip(axes, _STRAIN_PANELS, strict=True):
                v = top if k in _STRAIN_KEYS else _robust([std[k][frame.sample]])
                _map_panel(fig, ax, frame, std[k], f"{k}_std", f"std. error of {tex} ({unit})",
                           "viridis", 0.0, v)
            fig.suptitle("Standard errors (after pooling)")
            _phase_legend(fig, frame)
            out["uncertainty"] = fig

        if analysis is not None:
            out["analysis"] = _analysis_figure(analysis, frame)
    return out


def _analysis_figure(analysis: xr.Dataset, frame: _Frame) -> Figure:
    per = "nm" if frame.unit == "nm" else "scan px"

    def get(k: str, scale: float = 1.0) -> np.ndarray:
        return np.asarray(analysis[k].values, np.float64) * scale

    # rotation gradients are stored per scan step
    g = 1.0 / frame.step
    grads = {k: get(k, g) for k in ("dtheta_dx", "dtheta_dy", "lattice_curvature")}
    glim = _robust([grads[k][frame.sample] for k in ("dtheta_dx", "dtheta_dy")])
    panels = (
        ("dilatation", get("dilatation", 100.0), "dilatation (%)", "RdBu_r", None),
        ("max_shear", get("max_shear", 100.0), "max. shear strain (%)", "viridis", 0.0),
        ("principal_direction", get("principal_direction"), "e1 direction (deg)", "twilight",
         (-90.0, 90.0)),
        ("dtheta_dx", grads["dtheta_dx"], f"dθ/dx (deg/{per})", "RdBu_r", glim),
        ("dtheta_dy", grads["dtheta_dy"], f"dθ/dy (deg/{per})", "RdBu_r", glim),
        ("lattice_curvature", grads["lattice_curvature"], f"|∇θ| (deg/{per})", "viridis", 0.0),
    )
    fig, axes = _new_figure(2, 3)
    for ax, (k, img, label, cmap, lim) in zip(axes, panels, strict=True):
        if isinstance(lim, tuple):
            lo, hi = lim
        elif lim is None:  # diverging, own symmetric range
            hi = _robust([img[frame.sample]])
            lo = -hi
        elif lim == 0.0:  # sequential from zero
            lo, hi = 0.0, _robust([img[frame.sample]])
        else:  # diverging, shared symmetric range
            lo, hi = -lim, lim
        _map_panel(fig, ax, frame, img, k, label, cmap, lo, hi)
        _cores(ax, frame, analysis)
    fig.suptitle("Derived maps\n" + _ripple_text(analysis, frame))
    _phase_legend(fig, frame)
    return fig


def store_figures(store: str | os.PathLike[str]) -> dict[str, Figure]:
    """:func:`result_figures` of a store (read only; see :func:`read_result`)."""
    strain, analysis, step_nm = read_result(store)
    return result_figures(strain, analysis, step_nm)


def _clean_stale(out_dir: Path) -> None:
    # temporaries of plot_store runs that died (their process is gone) or of this process
    for tmp in out_dir.glob(f".*{_TMP_MARKER}*"):
        try:
            pid = int(tmp.name.rsplit(_TMP_MARKER, 1)[1].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_atomic(fig: Figure, path: Path, fmt: str, dpi: int = PUBLICATION_DPI) -> Path:
    """Write ``fig`` to ``path`` under a temporary name in its directory, then rename: a killed
    run never leaves a half-written file under the final name."""
    tmp = path.with_name(f".{path.name}{_TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fig.savefig(tmp, format=fmt, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def plot_store(store: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None,
               formats: Sequence[str] = ("png", "pdf"), dpi: int = PUBLICATION_DPI
               ) -> list[Path]:
    """Write the publication figures of a store (:func:`result_figures`) in each format.

    Files ``OUT/strain.FMT``, ``OUT/uncertainty.FMT`` and (when the store has a complete
    ``analysis`` group) ``OUT/analysis.FMT``; ``out_dir`` defaults to
    :func:`default_figure_dir` (``NAME_figures`` beside ``NAME.zarr``).  Each file is written
    atomically; temporaries left by killed runs are removed first, and a figure of an earlier
    run that this store no longer makes (``analysis`` of a store without one now) after.  The
    store is only read.

    Returns
    -------
    The paths written, figure by figure, in the order of ``formats``.

    Raises
    ------
    ValueError
        ``out_dir`` lies inside the store, or a format matplotlib cannot write.
    FileNotFoundError
        No store or no ``strain`` group.
    """
    src = Path(store).resolve()
    out = Path(out_dir).resolve() if out_dir is not None else default_figure_dir(src)
    if out == src or src in out.parents:
        raise ValueError(f"figures directory {out} is inside the store {src}: the store's "
                         "groups belong to the stages; choose a directory outside it")
    fmts = [f.lower().lstrip(".") for f in formats]
    supported = FigureCanvasAgg.get_supported_filetypes()
    bad = [f for f in fmts if f not in supported]
    if bad or not fmts:
        raise ValueError(f"cannot write figures as {bad or 'no format'}; choose from "
                         f"{sorted(supported)}")
    figs = store_figures(src)
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    written = []
    for name, fig in figs.items():
        for fmt in fmts:
            written.append(save_atomic(fig, out / f"{name}.{fmt}", fmt, dpi))
        fig.clear()  # frees the figure's artists now (no pyplot registry holds it)
    # a figure of an earlier run whose source is gone (analysis removed by a new map stage)
    # would otherwise sit beside the new ones as if it belonged to them
    for name in set(FIGURE_NAMES) - set(figs):
        for fmt in fmts:
            (out / f"{name}.{fmt}").unlink(missing_ok=True)
    return written
