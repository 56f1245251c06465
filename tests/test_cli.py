"""`ccstae` command line: bad input fails fast with exit code 2 and writes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from cli_checks import fails as _fails
from tree_digest import tree_digest

from ccstae_hpc import cli
from ccstae_hpc.stages import store


def _good_input(tmp_path: Path) -> Path:
    path = tmp_path / "good.npy"
    np.save(path, np.ones((4, 5, 32, 32), np.float32))
    return path


def test_3d_array(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "flat.npy"
    np.save(inp, np.ones((20, 32, 32), np.float32))
    before = tree_digest(tmp_path)
    _fails(["run", str(inp), "--out", str(tmp_path / "o.zarr")], capsys, "3 dimensions", "4")
    assert tree_digest(tmp_path) == before


def test_nan_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = np.ones((6, 5, 32, 32), np.float32)
    data[4, 3, 10, 10] = np.nan
    inp = tmp_path / "nan.npy"
    np.save(inp, data)
    before = tree_digest(tmp_path)
    _fails(["run", str(inp), "--out", str(tmp_path / "o.zarr")], capsys, "NaN", "y=4, x=3")
    assert tree_digest(tmp_path) == before


def test_check_finite_in_small_blocks_finds_last_row(tmp_path: Path) -> None:
    data = np.ones((7, 3, 32, 32), np.float64)
    data[6, 2, 0, 0] = np.inf
    path = tmp_path / "inf.npy"
    np.save(path, data)
    mm = np.load(path, mmap_mode="r")
    # one scan row per block: exercises the block loop and the offset of the reported position
    with pytest.raises(cli.CliError, match="y=6, x=2"):
        cli.check_finite(mm, block_bytes=1)
    cli.check_finite(np.ones((3, 3, 32, 32), np.uint16))  # integers: nothing to check


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(
        ["run", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "o.zarr")],
        capsys,
        "does not exist",
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"hello, this is not numpy\n", b"", b"\x93NUMPY\x01"])
def test_garbage_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes) -> None:
    inp = tmp_path / "garbage.npy"
    inp.write_bytes(content)
    before = tree_digest(tmp_path)
    _fails(["run", str(inp), "--out", str(tmp_path / "o.zarr")], capsys, "not a readable .npy")
    assert tree_digest(tmp_path) == before


def test_npz_archive_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "data.npz"
    np.savez(inp, a=np.ones((4, 4, 32, 32)))
    _fails(["run", str(inp), "--out", str(tmp_path / "o.zarr")], capsys, ".npy")
    assert not (tmp_path / "o.zarr").exists()


def test_existing_output_without_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = _good_input(tmp_path)
    out = tmp_path / "o.zarr"
    ds = xr.Dataset({"exx": (("scan_y", "scan_x"), np.zeros((4, 5), np.float32))})
    store.write_group(ds, out)
    before = tree_digest(tmp_path)
    _fails(["run", str(inp), "--out", str(out)], capsys, "exists", "--overwrite")
    assert tree_digest(tmp_path) == before


def test_existing_non_store_is_never_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = _good_input(tmp_path)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    before = tree_digest(tmp_path)
    _fails(["run", str(inp), "--out", str(out), "--overwrite"], capsys, "not a Zarr store")
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--reference", "0", "9", "0", "2"], ["--reference", "inside the 4 x 5 scan"]),
        (["--reference", "2", "2", "0", "2"], ["non-empty"]),
        (["--epochs", "0"], ["epochs"]),
        (["--num-base", "0"], ["num_base"]),
        (["--pool-sigma", "-1"], ["auto", ">= 0"]),
        (["--pool-sigma", "wide"], ["auto", "scan pixels"]),
    ],
)
def test_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], words: list[str]
) -> None:
    inp = _good_input(tmp_path)
    before = tree_digest(tmp_path)
    _fails(["run", str(inp), "--out", str(tmp_path / "o.zarr"), *extra], capsys, *words)
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.ones((4, 4, 16, 16), np.float32), ["16 x 16", "at least 32"]),
        (np.ones((4, 4, 32, 32), np.complex64), ["dtype complex64"]),
        (np.ones((3, 5, 32, 32), np.uint16), ["3 x 5", "16 probe positions"]),
    ],
)
def test_bad_arrays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], array: np.ndarray, words: list[str]
) -> None:
    inp = tmp_path / "bad.npy"
    np.save(inp, array)
    before = tree_digest(tmp_path)
    _fails(["run", str(inp), "--out", str(tmp_path / "o.zarr")], capsys, *words)
    assert tree_digest(tmp_path) == before


def test_usage_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run"]) == 2  # --out and INPUT missing: argparse's own message
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    capsys.readouterr()


def test_simulate_refuses_existing_and_bad_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fails(["simulate", str(tmp_path / "data.h5")], capsys, ".npy")
    existing = tmp_path / "data.npy"
    existing.write_bytes(b"keep")
    _fails(["simulate", str(existing)], capsys, "exists", "--overwrite")
    assert existing.read_bytes() == b"keep"
    _fails(["simulate", str(tmp_path / "x.npy"), "--detector", "8"], capsys, "detector")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npy"]


def test_simulate_writes_data_and_truth(tmp_path: Path) -> None:
    out = tmp_path / "sim.npy"
    argv = ["simulate", str(out), "--scan", "4", "6", "--detector", "64", "--dose", "100"]
    assert cli.main([*argv, "--seed", "1"]) == 0
    data = np.load(out, mmap_mode="r")
    assert data.shape == (4, 6, 64, 64)
    with np.load(tmp_path / "sim.truth.npz") as truth:
        assert truth["phase"].shape == (4, 6)
        assert truth["F"].shape == (4, 6, 2, 2)


@pytest.mark.timeout(600)
def test_run_end_to_end_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "sim.npy"
    assert cli.main(["simulate", str(inp), "--scan", "12", "12", "--detector", "64"]) == 0
    out = tmp_path / "res.zarr"
    assert cli.main(["run", str(inp), "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "open_zarr" in stdout
    ds = xr.open_zarr(out, group="strain")
    for k in ("exx", "eyy", "exy", "theta", "phase", "sample", "residual", "reference"):
        assert ds[k].dims == ("scan_y", "scan_x")
    assert (ds.sizes["scan_y"], ds.sizes["scan_x"]) == (12, 12)
    assert ds.scan_x.attrs["units"] == "px"
    # the second run is refused, and with --overwrite replaces the store
    assert cli.main(["run", str(inp), "--out", str(out), "--epochs", "1", "--quiet"]) == 2
    assert (
        cli.main(["run", str(inp), "--out", str(out), "--epochs", "1", "--quiet", "--overwrite"])
        == 0
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_ingest_is_delegated(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ingest", "--help"]) == 0
    assert "usage" in capsys.readouterr().out.lower()
    assert cli.main(["ingest"]) == 2  # its own argparse: the input is missing
