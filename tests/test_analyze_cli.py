"""`ccstae analyze` and the analysis group through the command line: a simulated core found
where it is, refusals that leave the store byte-for-byte unchanged, `ccstae run` writing it.

The mapped store is built without training (``ccstae map --method com``): seconds instead of
minutes, and the same strain group and stage rules as the model's maps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from cli_checks import fails as _fails
from tree_digest import tree_digest

from ccstae_hpc import cli
from ccstae_hpc.core import analysis as an
from ccstae_hpc.core.config import AnalyzeConfig, SimConfig
from ccstae_hpc.sim.simulate import LATTICE_A, burgers_vector_px, save_simulation
from ccstae_hpc.stages import store

# one edge dislocation in a 32 x 32 WS2 scan (default 128 px detector: the centre-of-mass
# baseline needs the Bragg disks resolved), noise-free
SIM = SimConfig(scan=(32, 32), heterostructure=False, dislocations=((15.0, 16.0, 1, 0),))
CORE_TOL_PX = 1.5  # the analysis issue's tolerance on core positions
BURGERS_TOL = 0.25  # |b found - b true| over the lattice parameter (as tests/test_analysis.py)


def _ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, (argv, out, err)
    return out


def _ingest(tmp: Path, cfg: SimConfig, capsys: pytest.CaptureFixture[str]) -> Path:
    npy, _ = save_simulation(tmp / "data.npy", cfg)
    s = tmp / "data.zarr"
    _ok(["ingest", str(npy), str(s), "--scan-step", str(cfg.scan_step_A / 10),
         "--pixel-size", str(cfg.pixel_size), "--no-progress"], capsys)
    return s


@pytest.fixture(scope="module")
def mapped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SIM dataset ingested (with its scan calibration), preprocessed and mapped with
    the centre-of-mass baseline, through the CLI; no analysis yet."""
    tmp = tmp_path_factory.mktemp("analyze_cli")
    npy, _ = save_simulation(tmp / "data.npy", SIM)
    s = tmp / "data.zarr"
    argv = [["ingest", str(npy), str(s), "--scan-step", str(SIM.scan_step_A / 10),
             "--pixel-size", str(SIM.pixel_size), "--no-progress"],
            ["preprocess", str(s)], ["map", str(s), "--method", "com", "--quiet"]]
    for a in argv:
        assert cli.main(a) == 0, a
    assert store.group_state(s, "strain") == "complete"
    assert store.group_state(s, "analysis") == "absent"
    return s


def test_analyze_finds_the_simulated_core(mapped: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = _ok(["analyze", str(mapped)], capsys)
    assert "dislocations: 1 found" in out and "ripple:" in out
    assert str(mapped / "analysis") in out
    ds = xr.open_zarr(mapped, group="analysis").load()
    assert ds.attrs["complete"] and ds.sizes["dislocation"] == 1
    y, x, h, k = SIM.dislocations[0]
    assert np.hypot(float(ds["y"][0]) - y, float(ds["x"][0]) - x) <= CORE_TOL_PX
    # the Burgers vector in Angstrom (scan step from the raw calibration) and in lattice units
    # of the store's own reference basis
    assert ds.attrs["burgers_unit"] == "Angstrom"
    b_true = burgers_vector_px(SIM)[0] * SIM.scan_step_A
    b = np.array([float(ds["burgers_x"][0]), float(ds["burgers_y"][0])])
    assert np.hypot(*(b - b_true)) < BURGERS_TOL * LATTICE_A[1], (b, b_true)
    lattice = json.loads(xr.open_zarr(mapped, group="strain").attrs["reference_lattice"])
    hk_true = an.index_burgers(b_true[None], np.asarray(lattice["real_basis_A"]))[0][0]
    assert (float(ds["burgers_h"][0]), float(ds["burgers_k"][0])) == tuple(hk_true)
    # the position printed is the table's
    assert f"y = {float(ds['y'][0]):.1f}, x = {float(ds['x'][0]):.1f}" in out
    assert AnalyzeConfig.from_dict(json.loads(ds.attrs["analyze_config"])) == AnalyzeConfig()
    assert "analysis" in store.stage_timings(mapped)


def test_refusals_leave_the_store_unchanged(mapped: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    if store.group_state(mapped, "analysis") == "absent":
        _ok(["analyze", str(mapped), "--quiet"], capsys)
    before = tree_digest(mapped.parent)
    _fails(["analyze", str(mapped)], capsys, "analysis is complete", "--overwrite",
           "nothing was changed")
    for bad, words in ((["--loop-px", "3"], ["--loop-px", "even"]),
                       (["--loop-px", "0"], ["--loop-px"]),
                       (["--false-alarms", "0"], ["--false-alarms", "(0, 1)"]),
                       (["--false-alarms", "nan"], ["--false-alarms", "finite"]),
                       (["--scan-step-A", "-4"], ["--scan-step-A", "positive"]),
                       (["--scan-step-A", "inf"], ["--scan-step-A", "finite"]),
                       (["--loop-px", "four"], ["--loop-px", "invalid int"])):
        _fails(["analyze", str(mapped), "--overwrite", *bad], capsys, *words)
    _fails(["analyze", str(mapped.parent / "nope.zarr")], capsys, "does not exist")
    assert tree_digest(mapped.parent) == before


def test_overwrite_with_other_settings(mapped: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _ok(["analyze", str(mapped), "--overwrite", "--loop-px", "6", "--false-alarms",
               "0.001", "--quiet"], capsys)
    assert "dislocations" not in out and str(mapped / "analysis") in out  # --quiet
    ds = xr.open_zarr(mapped, group="analysis")
    assert ds.attrs["loop_px"] == 6
    cfg = AnalyzeConfig.from_dict(json.loads(ds.attrs["analyze_config"]))
    assert cfg == AnalyzeConfig(loop_px=6, false_alarms=0.001)
    assert not (mapped / store.staging("analysis")).exists()


def test_remapping_removes_the_stale_analysis(mapped: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    if store.group_state(mapped, "analysis") == "absent":
        _ok(["analyze", str(mapped), "--quiet"], capsys)
    # map refuses, naming the analysis among what a replacement removes
    _fails(["map", str(mapped), "--method", "com", "--quiet"], capsys, "--overwrite",
           "analysis")
    out = _ok(["map", str(mapped), "--method", "com", "--quiet", "--overwrite"], capsys)
    assert f"run `ccstae analyze {mapped}`" in out
    assert store.group_state(mapped, "strain") == "complete"
    assert store.group_state(mapped, "analysis") == "absent"
    _ok(["analyze", str(mapped), "--quiet"], capsys)
    assert store.group_state(mapped, "analysis") == "complete"


def test_needs_strain_maps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = _ingest(tmp_path, SimConfig(scan=(6, 6), detector=64), capsys)
    before = tree_digest(tmp_path)
    _fails(["analyze", str(s)], capsys, "no strain group", f"ccstae map {s}` first")
    assert tree_digest(tmp_path) == before


def _dead_sibling(out: Path, kill: bool) -> Path:
    """A hidden ``tmp`` sibling of ``out`` made by :func:`store.sibling` in a child process
    that then exits (or is killed with SIGKILL while holding it, as a killed run is)."""
    code = ("import sys, time; from pathlib import Path; "
            "from ccstae_hpc.stages.store import sibling; "
            "p = sibling(Path(sys.argv[1]), 'tmp'); (p / 'raw').mkdir(parents=True); "
            "(p / 'zarr.json').write_text('{}'); print(p, flush=True); "
            "time.sleep(600 if sys.argv[2] == '1' else 0)")
    child = subprocess.Popen([sys.executable, "-c", code, str(out), "1" if kill else "0"],
                             stdout=subprocess.PIPE, text=True)
    path = Path(child.stdout.readline().strip())
    if kill:
        os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    child.stdout.close()
    assert path.is_dir() and path.name.startswith(f".{out.name}.tmp-")
    return path


@pytest.mark.timeout(600)
def test_run_direct_writes_analysis_and_clears_killed_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "sim.npy"
    _ok(["simulate", str(inp), "--scan", "12", "12", "--detector", "64"], capsys)
    out = tmp_path / "res.zarr"
    stale = _dead_sibling(out, kill=True)
    figure = stale.with_name(stale.name + ".strain_maps.png")  # a killed flow's figure
    figure.write_bytes(b"png")
    # a concurrent run's sibling (this process is alive) is left alone
    live = store.sibling(out, "tmp")
    live.mkdir()
    text = _ok(["run", str(inp), "--out", str(out), "--epochs", "1", "--engine", "direct"],
               capsys)
    assert not stale.exists() and not figure.exists() and live.is_dir()
    assert f"removed {stale}" in text
    assert "dislocations:" in text and "ripple:" in text
    assert store.group_state(out, "analysis") == "complete"
    ds = xr.open_zarr(out, group="analysis")
    assert ds["dilatation"].dims == ("scan_y", "scan_x") and "dislocation" in ds["y"].dims
    strain = xr.open_zarr(out, group="strain")
    # derived from the store's own strain: the dilatation is det(I + eps) - 1
    exx, eyy, exy = (strain[k].values.astype(np.float64) for k in ("exx", "eyy", "exy"))
    ok = np.isfinite(exx)
    np.testing.assert_allclose(ds["dilatation"].values[ok],
                               ((1 + exx) * (1 + eyy) - exy**2 - 1)[ok], atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [live.name]


@pytest.mark.timeout(900)
def test_run_prefect_writes_analysis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "sim.npy"
    _ok(["simulate", str(inp), "--scan", "12", "12", "--detector", "64"], capsys)
    out = tmp_path / "res.zarr"
    stale = _dead_sibling(out, kill=False)
    text = _ok(["run", str(inp), "--out", str(out), "--epochs", "1", "--quiet"], capsys)
    assert "dislocations:" in text and not stale.exists()
    assert store.group_state(out, "analysis") == "complete"
    assert "ccstae_flow" in xr.open_zarr(out, group="analysis").attrs  # the flow's marker
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.timeout(900)
def test_analyze_flow_skips_when_done(prefect_server: Path, mapped: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The ``analyze`` flow runs once, is skipped on rerun, and runs again after the group
    was rewritten outside the flows or its maps were replaced."""
    import ccstae_hpc.stages.analyze as analyze_stage
    from flows.pipeline import FLOWS

    calls: list[int] = []
    real = analyze_stage.analyze_store

    def counted(*a: object, **kw: object) -> xr.Dataset:
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(analyze_stage, "analyze_store", counted)
    flow = FLOWS["analyze"]
    s = str(mapped)
    flow(store_path=s)
    assert len(calls) == 1 and "ccstae_flow" in xr.open_zarr(s, group="analysis").attrs
    flow(store_path=s)
    assert len(calls) == 1  # up to date: skipped
    _ok(["analyze", s, "--overwrite", "--quiet"], capsys)  # rewritten outside the flows
    flow(store_path=s)
    assert len(calls) == 3
    _ok(["map", s, "--method", "com", "--quiet", "--overwrite"], capsys)  # new maps
    flow(store_path=s)
    assert len(calls) == 4 and store.group_state(mapped, "analysis") == "complete"
