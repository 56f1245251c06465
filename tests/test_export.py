"""Export of the strain maps (NetCDF, CSV, HyperSpy, EMD/py4DSTEM) and import of py4DSTEM files.

Exports are read back with the other tools' own readers: xarray, pandas, rosettasciio's hspy
reader and, when its environment exists (``make bench-peers``), py4DSTEM 0.14.18 in a
subprocess; the same environment writes a py4DSTEM DataCube that ingest must read exactly.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from tree_digest import tree_digest

from ccstae_hpc.stages import export as ex
from ccstae_hpc.stages.export import ExportError, export_format, export_store
from ccstae_hpc.stages.ingest import ingest
from ccstae_hpc.stages.store import with_pixel_coords, write_group

PEERS_PYTHON = Path(__file__).resolve().parents[1] / ".venv-peers" / "bin" / "python"
needs_peers = pytest.mark.skipif(not PEERS_PYTHON.exists(),
                                 reason="py4DSTEM environment missing (make bench-peers)")
SHAPE = (12, 17)  # rows != columns: a transposed axis cannot pass
STEP_NM = 0.25
COMPONENTS = ("exx", "eyy", "exy", "theta")


def _strain(seed: int = 0) -> xr.Dataset:
    """A strain Dataset as the map stage writes it: maps, NaN vacuum, phases, a 4D variable."""
    rng = np.random.default_rng(seed)
    ny, nx = SHAPE
    phase = np.ones(SHAPE, np.int16)
    phase[:, 10:] = 2
    phase[:3, :4] = 0
    sample = phase > 0
    dims = ("scan_y", "scan_x")
    maps = {}
    for k, scale in zip(COMPONENTS, (0.01, 0.01, 0.005, 0.3), strict=True):
        v = rng.normal(0, scale, SHAPE).astype(np.float32)
        v[~sample] = np.nan
        maps[k] = (dims, v, {"units": "deg" if k == "theta" else "1"})
        maps[k + "_std"] = (dims, np.where(sample, scale / 10, np.nan).astype(np.float32))
    phases = [{"phase": 0, "pixels": int((phase == 0).sum()), "name": "vacuum"},
              {"phase": 1, "pixels": int((phase == 1).sum())},
              {"phase": 2, "pixels": int((phase == 2).sum())}]
    ds = xr.Dataset(
        {**maps, "phase": (dims, phase), "sample": (dims, sample),
         "deformation": (dims + ("i", "j"), rng.normal(1, 0.01, (ny, nx, 2, 2)).astype(
             np.float32))},
        attrs={"conventions": "x = scan columns, y = scan rows; theta in degrees (±)",
               "phases": json.dumps(phases), "reference_mode": "global", "complete": True,
               "map_patterns_per_s": 512.5})
    return with_pixel_coords(ds)


def _store(path: Path, step_nm: float | None = STEP_NM) -> Path:
    """A store with a raw array (calibration attrs only matter) and a strain group."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    raw = root.create_array("raw", shape=(*SHAPE, 4, 4), dtype="uint16")
    raw.attrs["calibration"] = {"scan_step_nm": step_nm, "detector_pixel_size_inv_A": None}
    write_group(_strain(), path, "strain")
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return _store(tmp_path / "data.zarr")


def _no_leftovers(d: Path) -> None:
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------ formats


def test_netcdf(store: Path, tmp_path: Path) -> None:
    before = tree_digest(store)
    out = export_store(store, tmp_path / "strain.nc")
    assert out == tmp_path / "strain.nc"
    with xr.open_dataset(out) as back:
        back = back.load()
    ref = xr.open_zarr(store, group="strain").load()
    xr.testing.assert_equal(back, ref)
    assert back.attrs["conventions"] == ref.attrs["conventions"]
    assert back.attrs["scan_step_nm"] == STEP_NM
    assert back.attrs["exported_from"] == str(store)
    assert tree_digest(store) == before
    _no_leftovers(tmp_path)


def test_csv(store: Path, tmp_path: Path) -> None:
    out = export_store(store, tmp_path / "strain.csv")
    df = pd.read_csv(out)
    ny, nx = SHAPE
    ref = _strain()
    assert len(df) == ny * nx
    assert list(df.columns[:8]) == ["scan_y", "scan_x", "y_nm", "x_nm", *COMPONENTS]
    assert "deformation" not in df.columns and "phase" in df.columns
    yy, xx = np.divmod(np.arange(ny * nx), nx)
    np.testing.assert_array_equal(df["scan_y"], yy)
    np.testing.assert_array_equal(df["scan_x"], xx)
    np.testing.assert_allclose(df["x_nm"], xx * STEP_NM)
    np.testing.assert_allclose(df["y_nm"], yy * STEP_NM)
    for k in (*COMPONENTS, "exx_std"):
        np.testing.assert_array_equal(df[k].to_numpy(np.float32), ref[k].values.ravel())
    np.testing.assert_array_equal(df["phase"], ref.phase.values.ravel())


def test_hspy_reads_back_with_rosettasciio(store: Path, tmp_path: Path) -> None:
    from rsciio.hspy import file_reader

    out = export_store(store, tmp_path / "strain.hspy")
    (sig,) = file_reader(str(out))
    ref = _strain()
    np.testing.assert_array_equal(sig["data"], np.stack([ref[k].values for k in COMPONENTS]))
    names = [a["name"] for a in sig["axes"]]
    assert names == ["component", "y", "x"]
    assert [a["navigate"] for a in sig["axes"]] == [True, False, False]
    assert [int(a["size"]) for a in sig["axes"]] == [4, *SHAPE]
    for a in sig["axes"][1:]:
        assert a["scale"] == pytest.approx(STEP_NM) and a["units"] == "nm"
    om = sig["original_metadata"]
    assert list(om["ccstae_hpc"]["components"]) == list(COMPONENTS)
    np.testing.assert_array_equal(om["phase"], ref.phase.values)
    assert om["ccstae_hpc"]["strain_attrs"]["conventions"] == ref.attrs["conventions"]
    assert sig["metadata"]["General"]["title"] == ex.HSPY_TITLE


def test_hspy_without_scan_step_is_in_pixels(tmp_path: Path) -> None:
    from rsciio.hspy import file_reader

    store = _store(tmp_path / "data.zarr", step_nm=None)
    (sig,) = file_reader(str(export_store(store, tmp_path / "strain.hspy")))
    for a in sig["axes"][1:]:
        assert a["scale"] == 1.0 and a["units"] == "px"


def test_emd_layout(store: Path, tmp_path: Path) -> None:
    out = export_store(store, tmp_path / "strain.emd")
    ref = _strain()
    with h5py.File(out, "r") as f:
        assert f.attrs["emd_group_type"] == "file"
        assert (f.attrs["version_major"], f.attrs["version_minor"]) == (1, 0)
        root = f[ex.EMD_ROOT]
        assert root.attrs["emd_group_type"] == "root"
        arr = root[ex.EMD_ARRAY]
        assert arr.attrs["emd_group_type"] == "array"
        np.testing.assert_array_equal(arr["data"][()],
                                      np.stack([ref[k].values for k in COMPONENTS]))
        for i, dim in enumerate(("scan_y", "scan_x")):
            assert arr[f"dim{i}"].attrs["name"] == dim
            np.testing.assert_allclose(arr[f"dim{i}"][()], [0.0, STEP_NM * 10])
        assert [s.decode() for s in arr["dim2"][()]] == list(COMPONENTS)
        cal = root["metadatabundle/calibration"]
        assert cal["R_pixel_size"][()] == pytest.approx(STEP_NM * 10)
        np.testing.assert_array_equal(arr["metadatabundle"][ex.EMD_METADATA]["phase"][()],
                                      ref.phase.values)


PY4DSTEM_READ = """
import json, sys
import numpy as np
import py4DSTEM
rs = py4DSTEM.read(sys.argv[1])
out = {"cls": type(rs).__name__, "labels": list(rs.slicelabels),
       "R": float(rs.calibration.get_R_pixel_size()), "R_units": rs.calibration.get_R_pixel_units(),
       "phase": np.asarray(rs.metadata["ccstae"]["phase"]).tolist(),
       "conventions": rs.metadata["ccstae"]["conventions"]}
np.save(sys.argv[2], np.stack([rs.get_slice(k).data for k in out["labels"]]))
print(json.dumps(out))
"""


@needs_peers
@pytest.mark.timeout(300)
def test_emd_reads_back_with_py4dstem(store: Path, tmp_path: Path) -> None:
    out = export_store(store, tmp_path / "strain.h5")
    arrays = tmp_path / "slices.npy"
    res = subprocess.run([str(PEERS_PYTHON), "-c", PY4DSTEM_READ, str(out), str(arrays)],
                         capture_output=True, text=True, timeout=280, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    ref = _strain()
    assert got["cls"] == "RealSlice"
    assert got["labels"] == list(COMPONENTS)
    assert got["R"] == pytest.approx(STEP_NM * 10) and got["R_units"] == "A"
    assert got["conventions"] == ref.attrs["conventions"]
    np.testing.assert_array_equal(got["phase"], ref.phase.values)
    np.testing.assert_array_equal(np.load(arrays), np.stack([ref[k].values for k in COMPONENTS]))


# ---------------------------------------------------------------------------- the rules


def test_format_from_extension_or_option() -> None:
    assert export_format("a.NC") == "netcdf"
    assert export_format("a.h5") == export_format("a.emd") == "emd"
    assert export_format("a.dat", "csv") == "csv"
    assert export_format("a.dat", ".hspy") == "hspy"
    with pytest.raises(ExportError, match="--format"):
        export_format("a.dat")
    with pytest.raises(ExportError, match="netcdf, csv, hspy, emd"):
        export_format("a.nc", "tiff")


def test_explicit_format_overrides_extension(store: Path, tmp_path: Path) -> None:
    out = export_store(store, tmp_path / "maps.txt", fmt="csv")
    assert len(pd.read_csv(out)) == SHAPE[0] * SHAPE[1]


def test_existing_output_is_refused_and_kept(store: Path, tmp_path: Path) -> None:
    for name in ("strain.nc", "strain.csv", "strain.hspy", "strain.emd"):
        out = tmp_path / name
        out.write_bytes(b"precious")
        with pytest.raises(FileExistsError, match="exists"):
            export_store(store, out)
        assert out.read_bytes() == b"precious"
    _no_leftovers(tmp_path)


def test_missing_store_output_dir_and_maps(store: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ccstae run"):
        export_store(tmp_path / "none.zarr", tmp_path / "a.nc")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_store(store, tmp_path / "no" / "dir" / "a.nc")
    bare = tmp_path / "bare.zarr"
    zarr.open_group(str(bare), mode="w", zarr_format=3)
    with pytest.raises(FileNotFoundError, match="strain"):
        export_store(bare, tmp_path / "a.nc")
    assert not (tmp_path / "a.nc").exists()


def test_failed_write_leaves_nothing(store: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import rsciio.hspy

    def broken(filename: str, signal: dict, **kw: object) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(rsciio.hspy, "file_writer", broken)
    before = tree_digest(store)
    with pytest.raises(OSError, match="disk full"):
        export_store(store, tmp_path / "strain.hspy")
    assert not (tmp_path / "strain.hspy").exists()
    _no_leftovers(tmp_path)
    assert tree_digest(store) == before


# ------------------------------------------------------------------ py4DSTEM file as input

PY4DSTEM_SAVE = """
import sys
import numpy as np
import py4DSTEM
data = np.load(sys.argv[2])
dc = py4DSTEM.DataCube(data=data)
dc.calibration.set_R_pixel_size(2.5)
dc.calibration.set_R_pixel_units("A")
dc.calibration.set_Q_pixel_size(0.02)
dc.calibration.set_Q_pixel_units("A^-1")
py4DSTEM.save(sys.argv[1], dc)
"""


@needs_peers
@pytest.mark.timeout(300)
@pytest.mark.parametrize("suffix", [".h5", ".emd"])
def test_ingest_reads_a_py4dstem_datacube(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(3)
    data = rng.poisson(5.0, (6, 7, 32, 32)).astype(np.uint16)  # rows != columns
    data[2, 5, 3, 4] = 60000  # a value no reordering or cast keeps in place by chance
    src = tmp_path / "cube.npy"
    np.save(src, data)
    path = tmp_path / f"cube{suffix}"
    res = subprocess.run([str(PEERS_PYTHON), "-c", PY4DSTEM_SAVE, str(path), str(src)],
                         capture_output=True, text=True, timeout=280, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    root = ingest(path, tmp_path / "cube.zarr")
    raw = root["raw"]
    assert raw.shape == data.shape and raw.dtype == data.dtype
    np.testing.assert_array_equal(raw[...], data)
    calib = raw.attrs["calibration"]
    assert calib["scan_step_nm"] == pytest.approx(0.25)
    assert calib["detector_pixel_size_inv_A"] == pytest.approx(0.02)



def test_output_appearing_while_writing_is_kept(store: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import rsciio.hspy

    out = tmp_path / "strain.hspy"
    real = rsciio.hspy.file_writer

    def racing(filename: str, signal: dict, **kw: object) -> None:
        real(filename, signal, **kw)
        out.write_bytes(b"someone else's")  # another process took the name meanwhile

    monkeypatch.setattr(rsciio.hspy, "file_writer", racing)
    with pytest.raises(FileExistsError, match="appeared"):
        export_store(store, out)
    assert out.read_bytes() == b"someone else's"
    _no_leftovers(tmp_path)


def test_file_system_without_hard_links(store: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(src: object, dst: object) -> None:
        raise PermissionError("operation not permitted")

    monkeypatch.setattr(ex.os, "link", no_link)
    out = export_store(store, tmp_path / "strain.csv")
    assert len(pd.read_csv(out)) == SHAPE[0] * SHAPE[1]
    _no_leftovers(tmp_path)
