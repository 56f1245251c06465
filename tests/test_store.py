"""The store contract: round trip, consolidated metadata, staging and commit, overwrite rules,
and never corrupting what is already written."""

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

from ccstae_hpc.stages import store

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


def _store(path: Path) -> Path:
    """A store with a complete prep group, as the map stage finds it."""
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.create_group("prep").attrs["complete"] = True
    return path


def _write(ds: xr.Dataset, path: Path, overwrite: bool = False) -> Path:
    """What the map stage does with its result: stage, mark complete, commit."""
    store.check_stage(path, store.GROUP, overwrite)
    store.write_group(store.with_pixel_coords(ds.assign_attrs(complete=True)), path,
                      store.staging(store.GROUP))
    store.commit(path, store.GROUP)
    return path


def _strain(path: Path) -> xr.Dataset:
    return store.open_strain(path).load().drop_attrs(deep=False)


def test_round_trip_identical(tmp_path: Path) -> None:
    ds = _dataset()
    out = _write(ds, _store(tmp_path / "a.zarr"))
    back = store.open_strain(out)
    assert back.attrs.pop("complete") is True
    xr.testing.assert_identical(back.load(), store.with_pixel_coords(ds))
    assert back.scan_y.attrs["units"] == "px"
    np.testing.assert_array_equal(back.scan_x.values, np.arange(7))
    assert back.phase.dtype == np.int16 and back.sample.dtype == bool


def test_consolidated_and_warning_free(tmp_path: Path) -> None:
    path = _store(tmp_path / "a.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _write(_dataset(), path)
        ds = xr.open_zarr(path, group="strain")  # the documented way users read results
        ds.load()
    root = json.loads((path / "zarr.json").read_text())
    assert root["zarr_format"] == 3
    meta = root["consolidated_metadata"]["metadata"]
    assert "strain/exx" in meta and not any(".partial" in k for k in meta)
    group = zarr.open_consolidated(path, mode="r", zarr_format=3)
    assert "exx" in group["strain"]


def test_complete_group_refused_without_overwrite(tmp_path: Path) -> None:
    path = _write(_dataset(0), _store(tmp_path / "a.zarr"))
    before = _snapshot(tmp_path)
    with pytest.raises(store.StageExistsError, match="strain is complete; pass --overwrite"):
        _write(_dataset(1), path)
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_and_leaves_no_staging(tmp_path: Path) -> None:
    path = _write(_dataset(0), _store(tmp_path / "a.zarr"))
    new = _dataset(1, shape=(3, 4))
    _write(new, path, overwrite=True)
    back = store.open_strain(path).load()
    back.attrs.pop("complete")
    xr.testing.assert_identical(back, store.with_pixel_coords(new))
    assert sorted(c.name for c in path.iterdir()) == ["prep", "strain", "zarr.json"]
    assert _siblings(path / "strain") == []


def test_commit_of_an_earlier_stage_removes_what_was_made_from_it(tmp_path: Path) -> None:
    path = _write(_dataset(0), _store(tmp_path / "a.zarr"))
    root = zarr.open_group(path, mode="r+", zarr_format=3)
    root.create_group("model").attrs["complete"] = True
    with pytest.raises(store.StageExistsError, match=r"removes model, affine, strain"):
        store.check_stage(path, "prep", overwrite=False)
    root.create_group(store.staging("prep")).attrs.update(complete=True, version=2)
    store.commit(path, "prep")
    assert sorted(c.name for c in path.iterdir()) == ["prep", "zarr.json"]
    assert store.group_state(path, "prep") == "complete"
    assert store.open_root(path)["prep"].attrs["version"] == 2


def test_incomplete_staging_is_never_committed(tmp_path: Path) -> None:
    path = _write(_dataset(0), _store(tmp_path / "a.zarr"))
    zarr.open_group(path, mode="r+", zarr_format=3).create_group(store.staging("strain"))
    with pytest.raises(RuntimeError, match="not complete"):
        store.commit(path, "strain")
    assert store.group_state(path, "strain") == "complete"


def test_failure_mid_write_keeps_old_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _store(tmp_path / "a.zarr")
    old = _dataset(0)
    _write(old, path)
    real = xr.Dataset.to_zarr

    def half(self: xr.Dataset, where: Path, encoding: dict, **kw: object) -> None:
        # write one variable for real, then die: a crash in the middle of a write
        part = self[["exx"]]
        real(part, where, encoding={k: v for k, v in encoding.items() if k in part}, **kw)
        raise RuntimeError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_zarr", half)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(_dataset(1), path, overwrite=True)
    monkeypatch.undo()
    back = store.open_strain(path).load()
    back.attrs.pop("complete")
    xr.testing.assert_identical(back, store.with_pixel_coords(old))
    # the next run starts its staging group afresh
    store.discard_staging(path, "strain")
    assert not (path / store.staging("strain")).exists()


def test_publish_refuses_then_replaces_whole_stores(tmp_path: Path) -> None:
    dest = _write(_dataset(0), _store(tmp_path / "a.zarr"))
    before = _snapshot(tmp_path)
    tmp = store.sibling(dest, "tmp")
    _write(_dataset(1), _store(tmp))
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        store.publish(tmp, dest, overwrite=False)
    assert _snapshot(tmp_path) == before and not tmp.exists()
    tmp = store.sibling(dest, "tmp")
    _write(_dataset(2), _store(tmp))
    store.publish(tmp, dest, overwrite=True)
    assert _siblings(dest) == []
    np.testing.assert_array_equal(_strain(dest).exx, store.with_pixel_coords(_dataset(2)).exx)


def test_failure_at_final_rename_restores_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = _write(_dataset(0), _store(tmp_path / "a.zarr"))
    tmp = store.sibling(dest, "tmp")
    _write(_dataset(1), _store(tmp))
    shutil_free = _snapshot(tmp_path)
    real = os.rename

    def flaky(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        # the old store moves aside fine; moving the new one into place fails
        if ".tmp-" in str(src):
            raise OSError("simulated rename failure")
        real(src, dst)

    monkeypatch.setattr(store.os, "rename", flaky)
    with pytest.raises(OSError, match="simulated"):
        store.publish(tmp, dest, overwrite=True)
    monkeypatch.undo()
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith("a.zarr")} == {
        k: v for k, v in shutil_free.items() if k.startswith("a.zarr")}


def test_open_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no Zarr store"):
        store.open_strain(tmp_path / "none.zarr")
    zarr.open_group(tmp_path / "empty.zarr", mode="w", zarr_format=3)
    with pytest.raises(FileNotFoundError, match="no 'strain' group"):
        store.open_strain(tmp_path / "empty.zarr")


def test_large_maps_are_chunked(tmp_path: Path) -> None:
    path = _write(_dataset(shape=(600, 20)), _store(tmp_path / "a.zarr"))
    assert zarr.open_array(path / "strain" / "exx", mode="r").chunks == (512, 20)
