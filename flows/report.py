"""Figures and Prefect artifacts of a finished store (reporting only, no numerics).

Written next to the store ``DIR/NAME.zarr``: ``DIR/NAME.strain_maps.png`` and
``DIR/NAME.loss.png``, and the publication figures of :func:`ccstae_hpc.plot.plot_store`
(PNG and PDF) in ``DIR/NAME_figures/`` (not for a hidden store being built).  Artifacts
(keys prefixed with a slug of NAME, so that each dataset has its own history in the UI): the
strain figure and the loss curve as images (embedded as data URLs, so that the UI shows them
without a file server), each publication figure as an image (PNG) with the paths of its PNG
and PDF, a table of mean and standard deviation of exx, eyy, exy, theta per phase over
sample pixels, a small table of the loss per epoch, a link to the store and a markdown
summary of all of it.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

__all__ = ["artifact_slug", "figure_paths", "loss_rows", "phase_rows", "write_report"]

# an image artifact holds its image as a data URL; beyond this the UI gets the file path only
MAX_EMBED_BYTES = 2_000_000
_COMPONENTS = (("exx", 100.0, "%"), ("eyy", 100.0, "%"), ("exy", 100.0, "%"),
               ("theta", 1.0, "deg"))


def artifact_slug(store: str | Path) -> str:
    """Artifact key prefix from the store name: lowercase letters, digits and dashes."""
    stem = Path(store).name.removesuffix(".zarr")
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:40].strip("-")
    return slug or "store"


def figure_paths(store: str | Path) -> tuple[Path, Path]:
    """``(strain figure, loss figure)`` paths next to ``store``."""
    p = Path(store).resolve()
    stem = p.name.removesuffix(".zarr")
    return p.with_name(f"{stem}.strain_maps.png"), p.with_name(f"{stem}.loss.png")


def phase_rows(ds: xr.Dataset) -> list[dict[str, Any]]:
    """Per phase (0 vacuum): pixels, mean and std of exx, eyy, exy (%) and theta (deg)
    against the one reference lattice; vacuum is listed with its pixel count only."""
    phase = np.asarray(ds["phase"].values)
    sample = np.asarray(ds["sample"].values).astype(bool)
    maps = {k: np.asarray(ds[k].values, dtype=np.float64) * s for k, s, _ in _COMPONENTS}
    rows: list[dict[str, Any]] = []
    for c in np.unique(phase[phase >= 0]):
        sel = (phase == c) & sample
        row: dict[str, Any] = {"phase": int(c), "pixels": int((phase == c).sum()),
                               "sample_pixels": int(sel.sum())}
        for k, _, unit in _COMPONENTS:
            v = maps[k][sel]
            v = v[np.isfinite(v)]
            row[f"{k}_mean_{unit}"] = round(float(v.mean()), 4) if v.size else None
            row[f"{k}_std_{unit}"] = round(float(v.std()), 4) if v.size else None
        rows.append(row)
    return rows


def loss_rows(losses: list[float], epochs: int | None) -> list[dict[str, Any]]:
    """The loss curve in at most ``epochs`` rows (else 10): steps, first, last, mean."""
    n = len(losses)
    if n == 0:
        return []
    parts = max(1, min(n, epochs or 10))
    rows = []
    for i, idx in enumerate(np.array_split(np.arange(n), parts)):
        v = np.asarray(losses, dtype=np.float64)[idx]
        rows.append({"epoch" if epochs else "part": i + 1, "steps": f"{idx[0]}-{idx[-1]}",
                     "first": float(f"{v[0]:.5g}"), "last": float(f"{v[-1]:.5g}"),
                     "mean": float(f"{v.mean():.5g}")})
    return rows


def _data_url(png: Path) -> str:
    data = png.read_bytes()
    if len(data) > MAX_EMBED_BYTES:
        return png.as_uri()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |"
            for r in rows]
    return "\n".join(out) + "\n"


def write_report(store: str | Path, truth_path: str | Path | None = None,
                 artifacts: bool = True) -> dict[str, Any]:
    """Write the figures next to ``store`` and (inside a Prefect run) the artifacts.

    Returns
    -------
    dict with ``store``, ``strain_figure``, ``loss_figure`` (paths), ``figures`` (paths of
    the publication figures), ``phases`` and ``loss`` (table rows) and, with a truth,
    ``errors``.
    """
    from ccstae_hpc import plot
    from ccstae_hpc.stages.store import open_strain

    store = Path(store).resolve()
    strain_png, loss_png = figure_paths(store)
    ds = open_strain(store).load()
    truth = None
    errors: dict[str, float] | None = None
    if truth_path is not None:
        from ccstae_hpc.sim.evaluate import load_truth, strain_errors

        try:
            truth = load_truth(truth_path)
            errors = strain_errors(ds, truth)
        except (OSError, ValueError, KeyError) as e:
            # an optional comparison that cannot run must not fail a run whose maps are done
            logging.getLogger(__name__).warning(
                "truth %s cannot be compared with %s (%s): comparison skipped",
                truth_path, store, e)
            truth, errors = None, None
    plot.strain_figure(ds, truth=truth, path=strain_png)
    model = zarr.open_group(str(store / "model"), mode="r", zarr_format=3,
                            use_consolidated=False)
    losses = [float(x) for x in model.attrs.get("loss", [])]
    epochs = model.attrs.get("epochs_run") or (model.attrs.get("train_config") or {}).get("epochs")
    plot.loss_figure(losses, loss_png)
    # a hidden store is a build sibling (stages.store.sibling) renamed into place once
    # complete: a figures directory beside it would be left behind under the hidden name
    figures = [] if store.name.startswith(".") else plot.plot_store(store)
    out: dict[str, Any] = {
        "store": str(store), "strain_figure": str(strain_png), "loss_figure": str(loss_png),
        "figures": [str(p) for p in figures],
        "phases": phase_rows(ds), "loss": loss_rows(losses, epochs),
    }
    if errors is not None:
        out["errors"] = errors
    if artifacts:
        _artifacts(out)
    return out


def _artifacts(r: dict[str, Any]) -> None:
    from prefect.artifacts import (
        create_image_artifact,
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    store = Path(r["store"])
    slug = artifact_slug(store)
    create_image_artifact(image_url=_data_url(Path(r["strain_figure"])),
                          key=f"{slug}-strain-maps",
                          description=f"Strain maps of `{store}`; PNG: `{r['strain_figure']}`")
    create_table_artifact(table=r["phases"], key=f"{slug}-phase-stats",
                          description="Mean and std over sample pixels per phase "
                                      "(strain in %, theta in degrees)")
    create_image_artifact(image_url=_data_url(Path(r["loss_figure"])), key=f"{slug}-loss-curve",
                          description=f"Training loss; PNG: `{r['loss_figure']}`")
    create_table_artifact(table=r["loss"], key=f"{slug}-loss",
                          description="Training loss per epoch")
    figures = [Path(p) for p in r.get("figures", [])]
    for png in (p for p in figures if p.suffix == ".png"):
        others = ", ".join(f"`{p}`" for p in figures if p.stem == png.stem)
        create_image_artifact(image_url=_data_url(png), key=f"{slug}-figure-{png.stem}",
                              description=f"Publication figure `{png.stem}`: {others}")
    create_link_artifact(link=store.as_uri(), link_text=str(store), key=f"{slug}-store",
                         description="Result store; read with "
                                     f"`xarray.open_zarr(\"{store}\", group=\"strain\")`")
    md = [
        f"# Strain maps of `{store.name}`\n",
        f"* store: `{store}` (`xarray.open_zarr(\"{store}\", group=\"strain\")`)",
        f"* strain figure: `{r['strain_figure']}`",
        f"* loss figure: `{r['loss_figure']}`",
        *(f"* publication figure: `{p}`" for p in figures),
        "",
        "## Per phase, against the one reference lattice "
        "(sample pixels; strain in %, theta in degrees)\n",
        _md_table(r["phases"]),
        "## Training loss\n",
        _md_table(r["loss"]),
    ]
    if "errors" in r:
        e = r["errors"]
        keys = ["acc_sample", "acc_phase"] + [f"mae_{k}" for k, _, _ in _COMPONENTS]
        md += ["## Errors against the simulator truth\n",
               _md_table([{k: float(f"{e[k]:.4g}") for k in keys if k in e}])]
        md.append(f"\n<details><summary>all</summary>\n\n```json\n"
                  f"{json.dumps(e, indent=1, sort_keys=True)}\n```\n</details>\n")
    create_markdown_artifact(markdown="\n".join(md), key=f"{slug}-report",
                             description=f"Summary of `{store}`")
