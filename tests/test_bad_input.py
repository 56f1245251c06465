"""Bad input through the ``ccstae`` command line (issue 14, "Bad input").

Every case gets one line ``error: <problem>. <what to do>`` on stderr, exit code 2 (1 for
internal errors), no traceback unless ``--verbose``, and leaves every existing store byte for
byte unchanged (hashed before and after).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from tree_digest import tree_digest

from ccstae_hpc import cli
from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.sim.simulate import simulate
from ccstae_hpc.stages import readers

# small enough that ingest + preprocess take well under a second, large enough for the floors
# of the stages (16 probe positions, 32 px detector)
SCAN = (6, 6)
DETECTOR = 64
DOSE = 1000.0
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# a subprocess `ccstae run` includes Python and Prefect start-up
SUBPROCESS_TIMEOUT_S = 300


# ------------------------------------------------------------------------------------ helpers




def fails(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str,
          code: int = cli.EXIT_USAGE, one_line: bool = True) -> str:
    """Run ``ccstae argv`` in-process; check the exit code and the one ``error:`` line."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    if one_line:
        assert len(lines) == 1, err
    # "<problem>. <what to do>"
    assert ". " in lines[-1], lines[-1]
    for w in words:
        assert w.lower() in lines[-1].lower(), (w, lines[-1])
    return lines[-1]


def write_npy_header(path: Path, shape: tuple[int, ...], dtype: str, body: bytes) -> Path:
    """A .npy file whose header says ``shape``/``dtype`` whatever ``body`` holds."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": dtype, "fortran_order": False, "shape": shape})
        f.write(body)
    return path


def write_mib(path: Path, data: np.ndarray) -> Path:
    """Quantum Detectors Merlin .mib (384-byte ASCII header per frame, big-endian u16) and
    its .hdr; the fields of ``tests/test_ingest.py``'s writer."""
    ny, nx, ky, kx = data.shape
    with open(path, "wb") as f:
        for i, frame in enumerate(data.reshape(-1, ky, kx)):
            t = i + (i // nx) * 100
            fields = [
                "MQ1", f"{i + 1:06d}", "00384", "01", f"{kx:04d}", f"{ky:04d}", "U16",
                "   1x1", "01", "2024-01-01 00:00:00.000000", "0.001000", "0", "0", "0",
                *["1.000000E+1"] * 8, "3RX", *["000"] * 30,
                f"2024-01-01T00:{t // 60000 % 60:02d}:{t // 1000 % 60:02d}.{t % 1000:03d}000000Z",
                "1.000000E+6ns", "12", "",
            ]
            f.write(",".join(fields).encode("ascii").ljust(384, b"\0"))
            f.write(frame.astype(">u2").tobytes())
    path.with_suffix(".hdr").write_text(
        "HDR,\t\nChip Type (Medipix 3.0, Medipix 3.1, Medipix 3RX):\tMedipix 3RX\n"
        "Assembly Size (NX1, 2X2):\t   1x1\n"
        f"Frames in Acquisition (Number):\t{ny * nx}\nFrames per Trigger (Number):\t{nx}\n"
        "End\t\n")
    return path


def write_blo(path: Path, data: np.ndarray) -> Path:
    """NanoMegas blockfile, written by rosettasciio's own writer."""
    axes = [{"size": n, "index_in_array": i, "name": f"a{i}", "scale": 1.0, "offset": 0.0,
             "units": "nm" if i < 2 else "cm", "navigate": i < 2}
            for i, n in enumerate(data.shape)]
    readers.import_rsciio("blo").file_writer(
        str(path), {"data": data, "axes": axes, "metadata": {}, "original_metadata": {},
                    "attributes": {"_lazy": False}})
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))
    return path


@pytest.fixture(scope="module")
def good() -> np.ndarray:
    """A valid (6, 6, 64, 64) uint16 scan at 1e3 e-/pattern."""
    data, _ = simulate(SimConfig(scan=SCAN, detector=DETECTOR, dose=DOSE))
    return data.astype(np.uint16)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, good: np.ndarray) -> dict[str, Path]:
    """Stores at each stage: ``raw`` (ingested), ``prep`` (preprocessed); copy before use."""
    d = tmp_path_factory.mktemp("stores")
    np.save(d / "good.npy", good)
    assert cli.main(["ingest", str(d / "good.npy"), str(d / "raw.zarr"), "--no-progress"]) == 0
    shutil.copytree(d / "raw.zarr", d / "prep.zarr")
    assert cli.main(["preprocess", str(d / "prep.zarr")]) == 0
    return {"npy": d / "good.npy", "raw": d / "raw.zarr", "prep": d / "prep.zarr"}


def copy_store(stores: dict[str, Path], stage: str, tmp_path: Path) -> Path:
    dst = tmp_path / f"{stage}.zarr"
    shutil.copytree(stores[stage], dst)
    return dst


def mark_complete(store: Path, *groups: str) -> None:
    """Stand-ins for finished stages: only their ``complete`` marker is looked at."""
    root = zarr.open_group(str(store), mode="r+", zarr_format=3)
    for g in groups:
        root.create_group(g).attrs["complete"] = True


@pytest.fixture
def unchanged(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """``unchanged(store)`` registers a store whose bytes must be the same after the test."""
    watched: list[tuple[Path, dict[str, str]]] = []
    yield lambda p: watched.append((p, tree_digest(p)))
    for p, before in watched:
        assert tree_digest(p) == before, f"{p} was modified"


# ----------------------------------------------------------------------- ccstae ingest: paths


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fails(["ingest", str(tmp_path / "nope.npy"), str(tmp_path / "o.zarr")], capsys,
          "does not exist", "check the path")
    assert list(tmp_path.iterdir()) == []


def test_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d.npy").mkdir()
    fails(["ingest", str(tmp_path / "d.npy"), str(tmp_path / "o.zarr")], capsys,
          "is a directory")
    fails(["run", str(tmp_path / "d.npy"), "--out", str(tmp_path / "o.zarr")], capsys,
          "is a directory")
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.skipif(IS_ROOT, reason="root reads any file")
def test_unreadable_permissions(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                good: np.ndarray) -> None:
    src = tmp_path / "locked.npy"
    np.save(src, good)
    src.chmod(0)
    try:
        fails(["ingest", str(src), str(tmp_path / "o.zarr")], capsys, "permission denied")
        fails(["run", str(src), "--out", str(tmp_path / "o.zarr")], capsys, "permission denied")
    finally:
        src.chmod(0o644)
    assert not (tmp_path / "o.zarr").exists()


def test_unreadable_permissions_as_any_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], good: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same path as root: the reader's open() raises what a locked file gives."""
    src = tmp_path / "locked.npy"
    np.save(src, good)

    def denied(*_a: object, **_k: object) -> None:
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(readers, "open", denied, raising=False)
    fails(["ingest", str(src), str(tmp_path / "o.zarr")], capsys, "permission denied",
          "chmod")
    assert not (tmp_path / "o.zarr").exists()


def test_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for ext in ("npy", "h5", "mib"):
        (tmp_path / f"e.{ext}").write_bytes(b"")
        fails(["ingest", str(tmp_path / f"e.{ext}"), str(tmp_path / "o.zarr")], capsys,
              "is empty")
    assert not (tmp_path / "o.zarr").exists()


def test_output_exists_without_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stores: dict[str, Path],
    unchanged: Callable[[Path], None],
) -> None:
    s = copy_store(stores, "raw", tmp_path)
    unchanged(s)
    fails(["ingest", str(stores["npy"]), str(s)], capsys, "complete ingest", "--overwrite")


def test_output_inside_the_input(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 stores: dict[str, Path]) -> None:
    npy = tmp_path / "in.npy"
    shutil.copy(stores["npy"], npy)
    before = tree_digest(tmp_path)
    fails(["ingest", str(npy), str(npy / "o.zarr")], capsys, "is a file, not a directory")
    fails(["ingest", str(npy), str(npy), "--overwrite"], capsys, "contain or replace the input")
    fails(["run", str(npy), "--out", str(npy / "o.zarr")], capsys, "is a file, not a directory")
    assert tree_digest(tmp_path) == before


def test_input_inside_the_output_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stores: dict[str, Path],
    unchanged: Callable[[Path], None],
) -> None:
    s = copy_store(stores, "raw", tmp_path)
    shutil.copy(stores["npy"], s / "in.npy")
    unchanged(s)
    fails(["ingest", str(s / "in.npy"), str(s), "--overwrite"], capsys,
          "contain or replace the input")
    fails(["run", str(s / "in.npy"), "--out", str(s), "--overwrite"], capsys,
          "inside the output store")


def test_output_in_read_only_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stores: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused before any work, naming the directory (not a hidden temporary path)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if IS_ROOT:  # root writes anywhere: os.access answers as for a read-only directory
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: Path(p) != ro and real(p, m, **k))
    else:
        ro.chmod(0o555)
    try:
        for argv in (["ingest", str(stores["npy"]), str(ro / "o.zarr")],
                     ["run", str(stores["npy"]), "--out", str(ro / "o.zarr")]):
            line = fails(argv, capsys, "cannot write in", str(ro))
            assert ".tmp" not in line
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_store_in_read_only_location(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stores: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch, unchanged: Callable[[Path], None],
) -> None:
    """The stages refuse a store they cannot write before starting."""
    raw, prep = copy_store(stores, "raw", tmp_path), copy_store(stores, "prep", tmp_path)
    unchanged(raw)
    unchanged(prep)
    real = os.access
    locked = {raw, prep}
    monkeypatch.setattr(os, "access", lambda p, m, **k: Path(p) not in locked and real(p, m, **k))
    fails(["preprocess", str(raw)], capsys, "cannot write in", str(raw))
    fails(["train", str(prep)], capsys, "cannot write in", str(prep))
    fails(["map", str(prep), "--method", "com"], capsys, "cannot write in", str(prep))


# -------------------------------------------------------------- ccstae ingest: damaged files


def test_truncated_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         good: np.ndarray) -> None:
    np.save(tmp_path / "t.npy", good)
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f["data"] = good
    shutil.copy(tmp_path / "t.h5", tmp_path / "t.emd")
    write_mib(tmp_path / "t.mib", good)
    write_blo(tmp_path / "t.blo", good.astype(np.uint8))
    for name, words in (("t.npy", ["truncated"]), ("t.h5", ["not a readable HDF5"]),
                        ("t.emd", ["not a readable HDF5"]), ("t.mib", ["truncated"]),
                        ("t.blo", ["truncated or corrupt"])):
        src = truncate(tmp_path / name)
        fails(["ingest", str(src), str(tmp_path / "o.zarr")], capsys, *words)
        if name.endswith(".npy"):
            fails(["run", str(src), "--out", str(tmp_path / "o.zarr")], capsys, *words)
    assert not (tmp_path / "o.zarr").exists()


def test_header_bit_flip_tokenize_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        good: np.ndarray) -> None:
    src = tmp_path / "flip.npy"
    np.save(src, good)
    raw = bytearray(src.read_bytes())
    raw[raw.index(b"), }")] ^= 1  # ")" -> "(": numpy's header parser raises TokenError
    src.write_bytes(bytes(raw))
    fails(["ingest", str(src), str(tmp_path / "o.zarr")], capsys, "not a readable .npy")
    fails(["run", str(src), "--out", str(tmp_path / "o.zarr")], capsys, "not a readable .npy")


@pytest.mark.parametrize(
    ("shape", "body_shape", "words"),
    [
        # numpy.memmap: OverflowError "memory mapped length must be positive"
        ((6, -6, 64, 64), (6, 6, 64, 64), ["negative shape"]),
        # ZeroDivisionError in the shard plan
        ((6, 6, 0, 64), (0,), ["k_y axis is empty"]),
        # not blamed on truncation
        ((0, 6, 64, 64), (0,), ["scan_y axis is empty"]),
        # half the bytes: used to start a pipeline on the wrong shape
        ((3, 6, 64, 64), (6, 6, 64, 64), ["more than its header declares"]),
        ((6, 6, 64, 64), (3, 6, 64, 64), ["truncated"]),
        ((6, 6, 64, 10**6), (6, 6, 64, 64), ["truncated"]),
    ],
    ids=["negative-dim", "zero-detector-axis", "zero-scan-axis", "header-declares-fewer-bytes",
         "header-declares-more-bytes", "huge-dim"],
)
def test_corrupt_npy_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], good: np.ndarray,
    shape: tuple[int, ...], body_shape: tuple[int, ...], words: list[str],
) -> None:
    body = np.resize(good, body_shape).astype("<u2").tobytes()
    src = write_npy_header(tmp_path / "h.npy", shape, "<u2", body)
    fails(["ingest", str(src), str(tmp_path / "o.zarr")], capsys, *words)
    fails(["run", str(src), "--out", str(tmp_path / "o.zarr")], capsys)
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize(
    ("shape", "words"),
    [((64, 64), ["2D"]), ((36, 64, 64), ["--scan-shape"]), ((2, 3, 6, 64, 64), ["5D"])],
    ids=["2D", "3D", "5D"],
)
def test_wrong_dimensionality(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              shape: tuple[int, ...], words: list[str]) -> None:
    src = tmp_path / "a.npy"
    np.save(src, np.ones(shape, np.uint16))
    fails(["ingest", str(src), str(tmp_path / "o.zarr")], capsys, *words)
    fails(["run", str(src), "--out", str(tmp_path / "o.zarr")], capsys,
          f"{len(shape)} dimensions")
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_is_refused_by_ingest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], good: np.ndarray, value: float,
) -> None:
    """Inf used to train to loss nan and then make map blame the reference box."""
    data = good.astype(np.float32)
    data[3, 2, 10, 10] = value  # not in the first or last row: found while writing
    np.save(tmp_path / "f.npy", data)
    fails(["ingest", str(tmp_path / "f.npy"), str(tmp_path / "o.zarr")], capsys,
          "NaN or infinite", "y=3, x=2", "replace them")
    fails(["run", str(tmp_path / "f.npy"), "--out", str(tmp_path / "o.zarr")], capsys,
          "NaN or inf", "y=3, x=2")
    assert not (tmp_path / "o.zarr").exists()


def test_bad_input_with_overwrite_leaves_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stores: dict[str, Path],
    good: np.ndarray, unchanged: Callable[[Path], None],
) -> None:
    """Damage found halfway through: the old store is replaced only by a complete new one."""
    s = copy_store(stores, "raw", tmp_path)
    unchanged(s)
    data = good.astype(np.float32)
    data[4, 0, 0, 0] = np.nan
    np.save(tmp_path / "f.npy", data)
    fails(["ingest", str(tmp_path / "f.npy"), str(s), "--overwrite"], capsys,
          "NaN", f"{s} is unchanged")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [("--energy", "0", ["positive"]), ("--scan-step", "-0.5", ["positive"]),
     ("--energy", "300000", ["plausible range", "keV"]),
     ("--pixel-size", "50", ["plausible range"]), ("--convergence", "nan", ["positive"]),
     ("--scan-step", "inf", ["positive"])],
)
def test_calibration_values(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            stores: dict[str, Path], flag: str, value: str,
                            words: list[str]) -> None:
    fails(["ingest", str(stores["npy"]), str(tmp_path / "o.zarr"), flag, value], capsys, *words)
    assert not (tmp_path / "o.zarr").exists()


def test_implausible_calibration_in_the_file_is_not_used(tmp_path: Path,
                                                         good: np.ndarray) -> None:
    src = tmp_path / "c.h5"
    with h5py.File(src, "w") as f:
        f["data"] = good
        f.attrs["beam_energy_keV"] = 3e5  # eV written as keV
    assert cli.main(["ingest", str(src), str(tmp_path / "o.zarr"), "--no-progress"]) == 0
    g = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    assert g.attrs["calibration"]["beam_energy_keV"] is None
    assert "beam_energy_keV" in g.attrs["calibration_unknown"]
    assert g.attrs["reader_metadata"]["calibration_rejected"] == {"beam_energy_keV": 3e5}


@pytest.mark.parametrize(
    "argv",
    [["ingest", "{npy}", "{out}", "--shard-mb", "-1"],
     ["ingest", "{npy}", "{out}", "--clevel", "99"],
     ["ingest", "{npy}", "{out}", "--scan-shape", "0", "5"],
     ["ingest", "{npy}", "{out}", "--format", "tiffish"],
     ["ingest", "{npy}", "{out}", "--energy", "lots"],
     ["run", "{npy}", "--out", "{out}", "--epochs", "0"],
     ["run", "{npy}", "--out", "{out}", "--epochs", "many"],
     ["run", "{npy}", "--out", "{out}", "--num-base", "-1"],
     ["run", "{npy}", "--out", "{out}", "--pool-sigma", "-2"],
     ["run", "{npy}", "--out", "{out}", "--reference", "0", "99", "0", "2"],
     ["run", "{npy}"],
     ["nonsense"]],
)
def test_invalid_option_values(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               stores: dict[str, Path], argv: list[str]) -> None:
    out = tmp_path / "o.zarr"
    fails([a.format(npy=stores["npy"], out=out) for a in argv], capsys)
    assert not out.exists()


# ------------------------------------------------- degenerate data: preprocess and run refuse


def _degenerate(good: np.ndarray, kind: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = good.shape
    if kind == "all-zero":
        return np.zeros(shape, np.uint16)
    if kind == "negative-int16":
        return -good.astype(np.int16)
    if kind == "saturated":
        return np.full(shape, np.iinfo(np.uint16).max, np.uint16)
    if kind == "pure-noise":
        return rng.poisson(5.0, shape).astype(np.uint16)
    if kind == "negative-float":
        return -good.astype(np.float32)
    if kind == "only-vacuum":
        yy, xx = np.indices(shape[2:])
        disk = ((yy - 32) ** 2 + (xx - 32) ** 2 < 20) * 50.0
        return rng.poisson(np.broadcast_to(disk, shape)).astype(np.uint16)
    if kind == "tiny-detector":
        return rng.poisson(5.0, (*shape[:2], 8, 8)).astype(np.uint16)
    if kind == "non-square-tiny":
        return good[:, :, :, :24].copy()
    if kind == "scan-1x1":
        return good[:1, :1].copy()
    raise ValueError(kind)


DEGENERATE = [
    ("all-zero", ["all zero"]),
    ("negative-int16", ["negative counts", "int16"]),
    ("saturated", ["saturated", "65535"]),
    ("pure-noise", ["no central disk"]),
    ("negative-float", ["mostly negative"]),
    ("only-vacuum", ["no Bragg disks", "vacuum"]),
    ("tiny-detector", ["8 x 8", "32"]),
    ("non-square-tiny", ["64 x 24", "32"]),
    ("scan-1x1", ["1 x 1", "16"]),
]


@pytest.mark.parametrize(("kind", "words"), DEGENERATE, ids=[d[0] for d in DEGENERATE])
def test_preprocess_refuses_degenerate_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], good: np.ndarray, kind: str,
    words: list[str], unchanged: Callable[[Path], None],
) -> None:
    np.save(tmp_path / "d.npy", _degenerate(good, kind))
    s = tmp_path / "d.zarr"
    # ingest is a faithful copy: it takes any finite 4D array
    assert cli.main(["ingest", str(tmp_path / "d.npy"), str(s), "--no-progress"]) == 0
    capsys.readouterr()
    unchanged(s)
    fails(["preprocess", str(s)], capsys, *words)


@pytest.mark.parametrize(("kind", "words"), [d for d in DEGENERATE if d[0] != "only-vacuum"],
                         ids=[d[0] for d in DEGENERATE if d[0] != "only-vacuum"])
def test_run_refuses_degenerate_data_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], good: np.ndarray, kind: str,
    words: list[str],
) -> None:
    np.save(tmp_path / "d.npy", _degenerate(good, kind))
    before = tree_digest(tmp_path)
    line = fails(["run", str(tmp_path / "d.npy"), "--out", str(tmp_path / "o.zarr")], capsys)
    # `run` says it its own way for the shape floors; the content checks are preprocess's
    if kind not in ("tiny-detector", "non-square-tiny", "scan-1x1"):
        for w in words:
            assert w.lower() in line.lower()
    assert tree_digest(tmp_path) == before


def test_nonsquare_detector_is_supported(tmp_path: Path, good: np.ndarray) -> None:
    np.save(tmp_path / "n.npy", np.ascontiguousarray(good[:, :, :, 8:56]))
    s = tmp_path / "n.zarr"
    assert cli.main(["ingest", str(tmp_path / "n.npy"), str(s), "--no-progress"]) == 0
    assert cli.main(["preprocess", str(s)]) == 0
    assert zarr.open_group(str(s), mode="r")["prep/patterns"].shape == (*SCAN, 48, 48)


def test_nan_in_an_existing_raw_array(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stores: dict[str, Path],
    unchanged: Callable[[Path], None],
) -> None:
    """A store ingested before ingest refused NaN: preprocess refuses it."""
    np.save(tmp_path / "f.npy", np.load(stores["npy"]).astype(np.float32))
    s = tmp_path / "f.zarr"
    assert cli.main(["ingest", str(tmp_path / "f.npy"), str(s), "--no-progress"]) == 0
    raw = zarr.open_array(str(s), path="raw", mode="r+")
    rows = raw[3:4]
    rows[0, 1, 5, 5] = np.nan
    raw[3:4] = rows
    capsys.readouterr()
    unchanged(s)
    fails(["preprocess", str(s)], capsys, "NaN", "y=3, x=1")


# ---------------------------------------------------------------- stages out of order, floors


def test_stages_out_of_order(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             stores: dict[str, Path],
                             unchanged: Callable[[Path], None]) -> None:
    raw, prep = copy_store(stores, "raw", tmp_path), copy_store(stores, "prep", tmp_path)
    unchanged(raw)
    unchanged(prep)
    missing = tmp_path / "none.zarr"
    for cmd in ("preprocess", "train", "map"):
        fails([cmd, str(missing)], capsys, "does not exist", "ccstae ingest")
    fails(["train", str(raw)], capsys, "no prep group", f"ccstae preprocess {raw}")
    fails(["map", str(raw)], capsys, "no prep group", f"ccstae preprocess {raw}")
    fails(["map", str(raw), "--method", "com"], capsys, "ccstae preprocess")
    fails(["map", str(prep)], capsys, "no model group", f"ccstae train {prep}")
    not_store = tmp_path / "plain"
    not_store.mkdir()
    fails(["preprocess", str(not_store)], capsys, "not a Zarr store")


def test_incomplete_stage_names_the_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          stores: dict[str, Path]) -> None:
    s = copy_store(stores, "raw", tmp_path)
    zarr.open_group(str(s), mode="r+").create_group("prep").attrs["complete"] = False
    fails(["train", str(s)], capsys, "incomplete", f"Rerun `ccstae preprocess {s}`")


def test_results_are_not_replaced_without_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stores: dict[str, Path],
    unchanged: Callable[[Path], None],
) -> None:
    s = copy_store(stores, "prep", tmp_path)
    mark_complete(s, "model", "affine", "strain")
    unchanged(s)
    fails(["preprocess", str(s), "--output-size", "32"], capsys, "prep is complete",
          "--overwrite")
    fails(["train", str(s), "--epochs", "1"], capsys, "model is complete", "--overwrite")
    fails(["map", str(s)], capsys, "is complete", "--overwrite")
    fails(["map", str(s), "--method", "com"], capsys, "is complete", "--overwrite")


def test_scan_floor_is_the_same_for_every_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], good: np.ndarray,
    unchanged: Callable[[Path], None],
) -> None:
    """A 1 x 1 scan (e.g. preprocessed by an older version) is refused by every stage."""
    np.save(tmp_path / "one.npy", good[:1, :1])
    s = tmp_path / "one.zarr"
    assert cli.main(["ingest", str(tmp_path / "one.npy"), str(s), "--no-progress"]) == 0
    mark_complete(s, "prep", "model")
    capsys.readouterr()
    unchanged(s)
    for argv in (["preprocess", str(s), "--overwrite"], ["train", str(s), "--overwrite"],
                 ["map", str(s), "--overwrite"]):
        fails(argv, capsys, "1 x 1", "at least 16")
    fails(["run", str(tmp_path / "one.npy"), "--out", str(tmp_path / "o.zarr")], capsys,
          "1 x 1", "16 probe positions")


@pytest.mark.parametrize(
    "argv",
    [["preprocess", "{s}", "--output-size", "8"], ["preprocess", "{s}", "--workers", "-1"],
     ["train", "{s}", "--epochs", "0"], ["train", "{s}", "--batch-size", "0"],
     ["train", "{s}", "--checkpoint-every", "-1"], ["train", "{s}", "--workers", "-2"],
     ["map", "{s}", "--rows-per-block", "0"], ["map", "{s}", "--pool-sigma", "-1"],
     ["map", "{s}", "--reference-mode", "sideways"], ["map", "{s}", "--workers", "-1"]],
)
def test_invalid_stage_options(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               stores: dict[str, Path], argv: list[str],
                               unchanged: Callable[[Path], None]) -> None:
    s = copy_store(stores, "prep", tmp_path)
    unchanged(s)
    fails([a.format(s=s) for a in argv], capsys)


# ------------------------------------------------------------------- exit codes and --verbose


def test_verbose_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_npy_header(tmp_path / "h.npy", (6, -6, 64, 64), "<u2", b"\0" * 64)
    for argv in (["--verbose", "ingest", str(src), str(tmp_path / "o.zarr")],
                 ["run", str(src), "--out", str(tmp_path / "o.zarr"), "--verbose"]):
        assert cli.main(argv) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_internal_error_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stores: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch, unchanged: Callable[[Path], None],
) -> None:
    import ccstae_hpc.stages.prep as prep

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("a bug\nwith two lines")

    monkeypatch.setattr(prep, "preprocess_store", broken)
    s = copy_store(stores, "raw", tmp_path)
    unchanged(s)
    line = fails(["preprocess", str(s)], capsys, "internal error", "RuntimeError", "--verbose",
                 code=cli.EXIT_INTERNAL)
    assert "two lines" not in line
    assert cli.main(["preprocess", str(s), "--verbose"]) == cli.EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err


def _ccstae(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccstae_hpc.cli", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)


def test_subprocess_errors_have_no_traceback(tmp_path: Path, stores: dict[str, Path],
                                             good: np.ndarray) -> None:
    write_npy_header(tmp_path / "neg.npy", (6, -6, 64, 64), "<u2", b"\0" * 64)
    np.save(tmp_path / "noise.npy", _degenerate(good, "pure-noise"))
    (tmp_path / "empty.npy").write_bytes(b"")
    cases = [
        ("ingest", "neg.npy", "o.zarr"),
        ("ingest", "empty.npy", "o.zarr"),
        ("run", "noise.npy", "--out", "o.zarr"),
        ("preprocess", "none.zarr"),
        ("map", str(stores["raw"])),
    ]
    for argv in cases:
        r = _ccstae(*argv, cwd=tmp_path)
        assert r.returncode == cli.EXIT_USAGE, (argv, r.stderr)
        assert "Traceback" not in r.stderr, (argv, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, r.stderr)
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.timeout(600)
def test_run_on_data_refused_inside_the_flow_ends_with_the_error(
    tmp_path: Path, good: np.ndarray, stores: dict[str, Path],
) -> None:
    """Only vacuum passes the pre-checks (the lattice needs re-centred patterns) and is refused
    by preprocessing inside the Prefect flow: no traceback, the error line last, an existing
    output untouched, no temporary sibling left."""
    np.save(tmp_path / "vac.npy", _degenerate(good, "only-vacuum"))
    out = tmp_path / "o.zarr"
    shutil.copytree(stores["prep"], out)
    before = tree_digest(out)
    r = _ccstae("run", "vac.npy", "--out", "o.zarr", "--overwrite", "--epochs", "1",
                cwd=tmp_path)
    assert r.returncode == cli.EXIT_USAGE, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no Bragg disks" in last, r.stderr
    assert tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
