"""Result store: round trip, consolidated metadata, and never corrupting existing data."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from ccstae_hpc import store

DIMS = ("scan_y", "scan_x")


def _dataset(seed: int = 0, shape: tuple[int, int] = (6, 7)) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    sample = rng.random(shape) > 0.2
    data = {}
    for k in ("exx", "eyy", "exy", "theta", "residual"):
        v = rng.normal(size=shape).astype(np.float32)
        data[k] = (DIMS, np.where(sample, v, np.nan).astype(np.float32) if k != "residual" else v)
    data["phase"] = (DIMS, np.where(sample, rng.integers(0, 3, shape), -1).astype(np.int16))
    data["sample"] = (DIMS, sample)
    data["reference"] = (DIMS, sample & (rng.random(shape) > 0.5))
    attrs = {
        "conventions": "exx = U_xx - 1 ...",
        "model_config": json.dumps({"num_base": 3}),
        "version": "0.1.0",
    }
    return xr.Dataset(data, attrs=attrs)


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith("."))


def test_round_trip_identical(tmp_path: Path) -> None:
    ds = _dataset()
    out = store.write_strain(ds, tmp_path / "a.zarr")
    back = store.open_strain(out)
    expected = store.with_pixel_coords(ds)
    xr.testing.assert_identical(back.load(), expected)
    assert back.scan_y.attrs["units"] == "px"
    np.testing.assert_array_equal(back.scan_x.values, np.arange(7))
    assert back.phase.dtype == np.int16 and back.sample.dtype == bool


def test_consolidated_and_warning_free(tmp_path: Path) -> None:
    path = tmp_path / "a.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.write_strain(_dataset(), path)
        ds = xr.open_zarr(path, group="strain")  # the documented way users read results
        ds.load()
    root = json.loads((path / "zarr.json").read_text())
    assert root["zarr_format"] == 3
    assert "strain/exx" in root["consolidated_metadata"]["metadata"]
    group = zarr.open_consolidated(path, mode="r", zarr_format=3)
    assert "exx" in group["strain"]


def test_parents_created_and_no_temp_left(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "a.zarr"
    store.write_strain(_dataset(), path)
    assert store.is_store(path)
    assert _siblings(path) == []


def test_existing_store_refused_and_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "a.zarr"
    store.write_strain(_dataset(0), path)
    before = _snapshot(tmp_path)
    with pytest.raises(store.StoreExistsError, match="exists; pass --overwrite to replace it"):
        store.write_strain(_dataset(1), path)
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a.zarr"
    store.write_strain(_dataset(0), path)
    new = _dataset(1, shape=(3, 4))
    store.write_strain(new, path, overwrite=True)
    xr.testing.assert_identical(store.open_strain(path).load(), store.with_pixel_coords(new))
    assert _siblings(path) == []


def test_non_store_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "results"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(store.NotAStoreError, match="not a Zarr store"):
        store.write_strain(_dataset(), path, overwrite=True)
    assert (path / "notes.txt").read_text() == "mine"
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(store.NotAStoreError):
        store.write_strain(_dataset(), tmp_path / "file.zarr", overwrite=True)


def test_store_with_other_stages_data_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "a.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.create_array("raw", shape=(2, 2, 32, 32), dtype="uint16")
    before = _snapshot(tmp_path)
    with pytest.raises(store.StoreExistsError, match=r"holds other data \(raw\)"):
        store.write_strain(_dataset(), path, overwrite=True)
    assert _snapshot(tmp_path) == before


def _half_write(monkeypatch: pytest.MonkeyPatch) -> None:
    real = xr.Dataset.to_zarr

    def half(self: xr.Dataset, path: Path, encoding: dict, **kw: object) -> None:
        # write one variable for real, then die: a crash in the middle of a write
        part = self[["exx"]]
        real(part, path, encoding={k: v for k, v in encoding.items() if k in part}, **kw)
        raise RuntimeError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_zarr", half)


def test_failure_mid_write_keeps_old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.zarr"
    old = _dataset(0)
    store.write_strain(old, path)
    before = _snapshot(tmp_path)
    _half_write(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        store.write_strain(_dataset(1), path, overwrite=True)
    assert _snapshot(tmp_path) == before
    monkeypatch.undo()
    xr.testing.assert_identical(store.open_strain(path).load(), store.with_pixel_coords(old))


def test_failure_mid_write_of_new_store_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _half_write(monkeypatch)
    with pytest.raises(RuntimeError):
        store.write_strain(_dataset(), tmp_path / "a.zarr")
    assert list(tmp_path.iterdir()) == []


def test_failure_at_final_rename_restores_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.zarr"
    store.write_strain(_dataset(0), path)
    before = _snapshot(tmp_path)
    real = os.rename

    def flaky(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        # the old store moves aside fine; moving the new one into place fails
        if ".tmp-" in str(src):
            raise OSError("simulated rename failure")
        real(src, dst)

    monkeypatch.setattr(store.os, "rename", flaky)
    with pytest.raises(OSError, match="simulated"):
        store.write_strain(_dataset(1), path, overwrite=True)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before


def test_dask_backed_dataset_can_be_rewritten(tmp_path: Path) -> None:
    store.write_strain(_dataset(), tmp_path / "a.zarr")
    lazy = store.open_strain(tmp_path / "a.zarr")
    store.write_strain(lazy, tmp_path / "b.zarr")
    xr.testing.assert_identical(store.open_strain(tmp_path / "b.zarr").load(), lazy.load())


def test_open_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no Zarr store"):
        store.open_strain(tmp_path / "none.zarr")
    zarr.open_group(tmp_path / "empty.zarr", mode="w", zarr_format=3)
    with pytest.raises(FileNotFoundError, match="no 'strain' group"):
        store.open_strain(tmp_path / "empty.zarr")


def test_large_maps_are_chunked(tmp_path: Path) -> None:
    path = store.write_strain(_dataset(shape=(600, 20)), tmp_path / "a.zarr")
    assert zarr.open_array(path / "strain" / "exx", mode="r").chunks == (512, 20)
