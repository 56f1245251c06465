"""Figures of results.  Called by users, the CLI demo and flows; never by numerics.

Uses matplotlib's object API with the Agg canvas directly (no ``pyplot``), so importing this
module changes no global backend state and works on headless cluster nodes.
"""

from __future__ import annotations

import os
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

__all__ = ["loss_figure", "strain_figure"]

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
