"""``ccstae plot`` and ``ccstae export`` through the command line, on a real mapped store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from tree_digest import tree_digest

from ccstae_hpc import cli
from ccstae_hpc.core.config import MapConfig, SimConfig
from ccstae_hpc.sim.simulate import save_simulation
from ccstae_hpc.stages.analyze import analyze_store
from ccstae_hpc.stages.ingest import ingest
from ccstae_hpc.stages.map import map_store
from ccstae_hpc.stages.prep import preprocess_store

SIM = SimConfig(scan=(16, 16), detector=128, dose=1000.0, seed=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ingest (scan step known), preprocess, centre-of-mass map, analyze: no training."""
    tmp = tmp_path_factory.mktemp("outputs")
    npy, _ = save_simulation(tmp / "sim.npy", SIM)
    path = tmp / "data.zarr"
    ingest(npy, path, calibration={"scan_step_nm": 0.4})
    preprocess_store(path)
    map_store(path, MapConfig(method="com"), workers=1)
    analyze_store(path)
    return path


def test_plot_writes_png_and_pdf_beside_the_store(store: Path, capsys) -> None:
    before = tree_digest(store)
    assert cli.main(["plot", str(store)]) == 0
    printed = [Path(s) for s in capsys.readouterr().out.split()]
    names = {p.name for p in printed}
    assert {"strain.png", "strain.pdf", "uncertainty.png", "analysis.pdf"} <= names, names
    for p in printed:
        assert p.parent == store.parent / "data_figures" and p.stat().st_size > 1000
        magic = b"\x89PNG" if p.suffix == ".png" else b"%PDF"
        assert p.read_bytes()[:4] == magic
    assert tree_digest(store) == before  # the store is only read


def test_export_netcdf_and_csv_equal_the_store(store: Path, tmp_path: Path) -> None:
    ds = xr.open_zarr(store, group="strain").load()
    assert cli.main(["export", str(store), str(tmp_path / "s.nc")]) == 0
    nc = xr.open_dataset(tmp_path / "s.nc").load()
    np.testing.assert_array_equal(nc["exx"].values, ds["exx"].values)
    assert cli.main(["export", str(store), str(tmp_path / "s.txt"), "--format", "csv"]) == 0
    df = pd.read_csv(tmp_path / "s.txt")
    assert len(df) == SIM.scan[0] * SIM.scan[1]
    np.testing.assert_allclose(df["theta"].to_numpy(), ds["theta"].values.ravel(), rtol=1e-6)


def test_export_refuses_an_existing_output_and_leaves_it(store: Path, tmp_path: Path,
                                                          capsys) -> None:
    out = tmp_path / "s.csv"
    out.write_text("keep me")
    assert cli.main(["export", str(store), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "exists" in err[0], err
    assert out.read_text() == "keep me"


def test_plot_and_export_before_map_name_the_command_to_run(tmp_path: Path, capsys) -> None:
    npy, _ = save_simulation(tmp_path / "sim.npy", SimConfig(scan=(4, 4), detector=64))
    path = tmp_path / "raw.zarr"
    ingest(npy, path)
    for argv in (["plot", str(path)], ["export", str(path), str(tmp_path / "x.nc")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "ccstae map" in err, err
    assert not (tmp_path / "x.nc").exists()


def test_run_prints_stage_lines_and_final_paths_not_library_logs(tmp_path: Path) -> None:
    """The default terminal output of `ccstae run` (Prefect engine) is for people: one line
    per stage, the summary naming the final store; no INFO logs, no temporary names."""
    import subprocess
    import sys

    npy, _ = save_simulation(tmp_path / "d.npy", SimConfig(scan=(16, 16), dose=1000.0))
    out = tmp_path / "d.zarr"
    r = subprocess.run([sys.executable, "-m", "ccstae_hpc.cli", "run", str(npy), "--out",
                        str(out), "--epochs", "1"], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    err = r.stderr.replace("\r", "\n")
    for stage in ("ingest", "preprocess", "train", "map", "analyze", "report"):
        assert any(ln.split()[:2] == [stage, "done"] for ln in err.splitlines()), err
    for noise in ("INFO", "Logging error", "Traceback", ".tmp-"):
        assert noise not in err and noise not in r.stdout, noise
    assert f'xarray.open_zarr("{out}", group="strain")' in r.stdout.strip().splitlines()[-1]
    assert xr.open_zarr(out, group="analysis") is not None
