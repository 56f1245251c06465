"""The README's recipes for reading results (issue 13), run as written on a real store.

The code between ``<!-- recipes -->`` and ``<!-- /recipes -->`` in README.md is executed block
by block in one namespace, in a directory holding the store as ``data.zarr`` (so the text a
user copies is exactly what runs here); the names it defines are then checked against numpy
computations on the stored arrays and against the simulation's truth.  To check a draft of
the section before it is in README.md, point ``CCSTAE_RECIPES_MD`` at the draft.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from tree_digest import tree_digest

from ccstae_hpc.core.config import MapConfig, SimConfig
from ccstae_hpc.sim.simulate import save_simulation
from ccstae_hpc.stages.analyze import analyze_store
from ccstae_hpc.stages.ingest import ingest
from ccstae_hpc.stages.map import map_store
from ccstae_hpc.stages.prep import preprocess_store

README = Path(__file__).resolve().parents[1] / "README.md"
RECIPES = re.compile(r"<!-- recipes -->(.*?)<!-- /recipes -->", re.S)
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
COMPONENTS = ("exx", "eyy", "exy", "theta")
# a 20 x 20 WS2/WSe2 heterostructure at 1e3 e-/pattern mapped by the centre-of-mass baseline
# (a real store in ~5 s: no training); row 10 crosses the interface twice
SIM = SimConfig(scan=(20, 20), detector=128, dose=1000.0, seed=1)
SCAN_STEP_NM = 0.4
# per-pattern error of the COM maps at 1e3 e- (README: MAE 0.27 %): medians of >= 5 pixels
STEP_TOL = 0.005


def recipe_blocks() -> list[str]:
    """The python blocks of README.md's recipes section (or of ``$CCSTAE_RECIPES_MD``)."""
    source = Path(os.environ.get("CCSTAE_RECIPES_MD", README))
    found = RECIPES.search(source.read_text(encoding="utf-8"))
    if found is None:
        pytest.fail(f"{source} has no <!-- recipes --> ... <!-- /recipes --> section")
    return BLOCK.findall(found.group(1))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``data.zarr`` through ingest (scan step known), preprocess, map (COM) and analyze."""
    tmp = tmp_path_factory.mktemp("recipes")
    npy, _ = save_simulation(tmp / "sim.npy", SIM)
    path = tmp / "data.zarr"
    ingest(npy, path, calibration={"scan_step_nm": SCAN_STEP_NM})
    preprocess_store(path)
    map_store(path, MapConfig(method="com"), workers=1)
    analyze_store(path)
    return path


@pytest.fixture(scope="module")
def ran(store: Path) -> Iterator[dict[str, Any]]:
    """The namespace after running every recipe block, in the store's directory."""
    before = tree_digest(store)
    ns: dict[str, Any] = {"__name__": "recipes"}
    cwd = Path.cwd()
    os.chdir(store.parent)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            for block in recipe_blocks():
                exec(compile(block, "README.md recipes", "exec"), ns)
    finally:
        os.chdir(cwd)
    ns["_printed"] = printed.getvalue()
    assert tree_digest(store) == before, "a recipe changed the store"
    yield ns


@pytest.fixture(scope="module")
def strain(store: Path) -> xr.Dataset:
    return xr.open_zarr(store, group="strain").load()


def _in(ns: dict[str, Any], *names: str) -> list[Any]:
    missing = [n for n in names if n not in ns]
    assert not missing, f"the recipes no longer define {missing}"
    return [ns[n] for n in names]


def test_the_recipes_run(ran: dict[str, Any]) -> None:
    assert len(recipe_blocks()) >= 5
    assert "vacuum" in ran["_printed"]  # the per-phase table was printed with its names


def test_region(ran: dict[str, Any], strain: xr.Dataset) -> None:
    region, same, mean = _in(ran, "region", "same_region", "region_exx")
    exx = strain.exx.values
    np.testing.assert_array_equal(region.exx.values, exx[4:12, 2:10])
    np.testing.assert_array_equal(same.exx.values, exx[4:12, 2:10])
    np.testing.assert_array_equal(region.scan_x.values, np.arange(2, 10))
    np.testing.assert_allclose(mean, np.nanmean(exx[4:12, 2:10]), rtol=1e-6)


def test_statistics_per_phase(ran: dict[str, Any], strain: xr.Dataset) -> None:
    (stats,) = _in(ran, "stats")
    phase = strain.phase.values
    sample = strain.sample.values
    listed = json.loads(strain.attrs["phases"])
    assert len(stats) == len(np.unique(phase))
    for p in listed:
        name = p.get("name", f"phase {p['phase']}")
        sel = sample & (phase == p["phase"])
        for k in COMPONENTS:
            v = strain[k].values[sel]
            v = v[np.isfinite(v)]
            if v.size:
                np.testing.assert_allclose(stats.loc[name, k], v.mean(dtype=np.float64),
                                           rtol=1e-5, atol=1e-9)
            else:
                assert np.isnan(stats.loc[name, k]), (name, k)
        assert stats.loc[name, "pixels"] == np.isfinite(strain.exx.values[sel]).sum()
    assert stats.loc["vacuum", "pixels"] == 0


def _bilinear(a: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear samples of ``a`` and whether all four neighbours were finite."""
    y0 = np.clip(np.floor(y).astype(int), 0, a.shape[0] - 2)
    x0 = np.clip(np.floor(x).astype(int), 0, a.shape[1] - 2)
    fy, fx = y - y0, x - x0
    c = [a[y0, x0], a[y0, x0 + 1], a[y0 + 1, x0], a[y0 + 1, x0 + 1]]
    v = (1 - fy) * ((1 - fx) * c[0] + fx * c[1]) + fy * ((1 - fx) * c[2] + fx * c[3])
    return v, np.isfinite(np.stack(c)).all(0)


def test_line_profile(ran: dict[str, Any], strain: xr.Dataset, store: Path) -> None:
    profile, band, line = _in(ran, "profile", "band", "line")
    y, x = line["scan_y"].values, line["scan_x"].values
    for k in COMPONENTS:
        want, ok = _bilinear(strain[k].values.astype(np.float64), y, x)
        got = profile[k].values
        assert ok.sum() >= len(y) // 2
        np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(band.values, np.nanmean(strain.exx.values[8:12], axis=0),
                               rtol=1e-6)
    # the profile crosses the interface: its exx step between the phases is the truth's
    with np.load(store.parent / "sim.truth.npz") as truth:
        t_exx = truth["exx"][np.rint(y).astype(int), np.rint(x).astype(int)]
        t_phase = truth["phase"][np.rint(y).astype(int), np.rint(x).astype(int)]
    got = profile.exx.values
    offsets = []
    for p in np.unique(t_phase[t_phase > 0]):
        sel = (t_phase == p) & np.isfinite(got)
        assert sel.sum() >= 5, (p, sel.sum())
        offsets.append(np.median(got[sel] - t_exx[sel]))
    assert len(offsets) == 2, "the line no longer crosses the interface"
    assert abs(offsets[0] - offsets[1]) < STEP_TOL, offsets
    steps = [np.median(t_exx[t_phase == p]) for p in np.unique(t_phase[t_phase > 0])]
    assert abs(steps[0] - steps[1]) > 5 * STEP_TOL  # a real interface, not a flat line


def test_netcdf_round_trip(ran: dict[str, Any], store: Path, strain: xr.Dataset) -> None:
    with xr.open_dataset(store.parent / "strain.nc") as back:
        back = back.load()
    xr.testing.assert_equal(back, strain)
    for k, v in strain.attrs.items():
        if isinstance(v, str):
            assert back.attrs[k] == v, k


def test_csv(ran: dict[str, Any], store: Path, strain: xr.Dataset) -> None:
    df = pd.read_csv(store.parent / "strain.csv")
    ny, nx = strain.sizes["scan_y"], strain.sizes["scan_x"]
    assert len(df) == ny * nx
    assert list(df.columns) == ["scan_y", "scan_x", *COMPONENTS, "phase", "sample"]
    yy, xx = np.divmod(np.arange(ny * nx), nx)  # C order: rows of scan_y, then scan_x
    np.testing.assert_array_equal(df["scan_y"], yy)
    np.testing.assert_array_equal(df["scan_x"], xx)
    for k in COMPONENTS:
        np.testing.assert_array_equal(df[k].to_numpy(np.float32), strain[k].values.ravel())
    np.testing.assert_array_equal(df["phase"], strain.phase.values.ravel())
    np.testing.assert_array_equal(df["sample"], strain.sample.values.ravel())


def test_dislocation_table(ran: dict[str, Any], store: Path) -> None:
    an = xr.open_zarr(store, group="analysis")
    df = pd.read_csv(store.parent / "dislocations.csv")
    assert len(df) == an.sizes["dislocation"]
    assert list(df.columns) == ["dislocation", "y", "x", "burgers_x", "burgers_y", "burgers_h",
                                "burgers_k", "confidence"]
    np.testing.assert_allclose(df["y"].to_numpy(np.float64), an["y"].values)
