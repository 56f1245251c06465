"""Ingest of microscope files into the ``raw`` Zarr v3 array: formats, layout, resume, safety.

Every input is a small seeded synthetic file written here; every store is a real Zarr store
under ``tmp_path``.  Small shards (``rows_per_shard=2``) give several shards per file, with a
partial last shard.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from ccstae_hpc.stages import readers
from ccstae_hpc.stages.ingest import (
    IngestConfig,
    IngestError,
    ingest,
    ingest_main,
    plan_layout,
)

ingest_mod = importlib.import_module("ccstae_hpc.stages.ingest")

CFG = IngestConfig(rows_per_shard=2)
# one shard at a time: the interruption tests count shards deterministically
SERIAL = IngestConfig(rows_per_shard=2, in_flight=1)


def patterns(shape: tuple[int, ...], dtype: Any = np.uint16, seed: int = 0) -> np.ndarray:
    """Poisson counts, different in every pattern (a shuffled row would be noticed)."""
    rng = np.random.default_rng(seed)
    return rng.poisson(5.0, size=shape).astype(dtype)


def tree_digest(path: Path) -> dict[str, str]:
    """Content hash of every file under ``path``: 'unchanged' means byte-identical."""
    return {
        str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def assert_layout(g: zarr.Group, shape: tuple[int, ...], rows: int) -> None:
    raw = g["raw"]
    ny, nx, ky, kx = shape
    assert raw.shape == shape
    assert raw.chunks == (1, nx, ky, kx)  # a whole scan row per chunk, never one pattern
    assert raw.shards == (rows, nx, ky, kx)
    assert raw.metadata.dimension_names == ("scan_y", "scan_x", "k_y", "k_x")
    assert raw.metadata.zarr_format == 3
    (blosc,) = raw.compressors
    assert isinstance(blosc, BloscCodec)
    assert blosc.cname.value == "zstd"
    assert blosc.shuffle.value == "bitshuffle"
    assert g.attrs["complete"] is True
    assert raw.attrs["complete"] is True
    assert g.attrs["ingest_done_shards"] == [[0, -(-ny // rows)]]


def record_shard_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Keys of shard files that zarr reads (a read during ingest means read-modify-write)."""
    keys: list[str] = []
    orig = LocalStore.get

    async def get(self: LocalStore, key: str, *args: Any, **kwargs: Any) -> Any:
        out = await orig(self, key, *args, **kwargs)
        # zarr asks for every shard before writing it; only an existing shard costs a read
        if key.startswith("raw/c/") and out is not None:
            keys.append(key)
        return out

    monkeypatch.setattr(LocalStore, "get", get)
    return keys


@pytest.fixture
def shard_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return record_shard_reads(monkeypatch)


# --------------------------------------------------------------------------------------------
# formats


def test_npy_round_trip_layout_and_provenance(tmp_path: Path, shard_reads: list[str]) -> None:
    data = patterns((7, 5, 16, 12))
    src = tmp_path / "scan.npy"
    np.save(src, data)
    g = ingest(src, tmp_path / "out.zarr", config=CFG)
    assert shard_reads == []  # every shard written whole, none read back
    np.testing.assert_array_equal(g["raw"][:], data)
    assert g["raw"].dtype == np.uint16
    assert_layout(g, data.shape, rows=2)

    prov = g.attrs["provenance"]
    assert prov["source_path"] == str(src.resolve())
    assert prov["source_size_bytes"] == src.stat().st_size
    assert prov["reader"] == "npy"
    assert {"zarr", "numpy", "numcodecs", "ccstae_hpc"} <= set(prov["versions"])
    assert prov["started_at"] and prov["finished_at"]
    assert g.attrs["source"]["mtime_ns"] == src.stat().st_mtime_ns
    assert IngestConfig.from_dict(g.attrs["ingest_config"]) == CFG
    # nothing in the file: every calibration value is stated unknown
    assert g.attrs["calibration_unknown"] == list(readers.CALIBRATION_KEYS)
    assert all(v is None for v in g.attrs["calibration"].values())
    # the store reopens as plain zarr
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "out.zarr" / "raw")[3], data[3])


@pytest.mark.parametrize("variant", ["big-endian", "fortran", "float64"])
def test_npy_variants(tmp_path: Path, variant: str) -> None:
    data = patterns((5, 3, 8, 6))
    stored = {"big-endian": data.astype(">u2"), "fortran": np.asfortranarray(data),
              "float64": data.astype(np.float64)}[variant]
    np.save(tmp_path / "v.npy", stored)
    g = ingest(tmp_path / "v.npy", tmp_path / "out.zarr", config=CFG)
    assert g["raw"].dtype == stored.dtype.newbyteorder("=")
    np.testing.assert_array_equal(g["raw"][:], data)


def test_default_layout_is_whole_rows_in_64_to_256_mb_shards() -> None:
    for shape, itemsize in [((256, 256, 128, 128), 2), ((512, 512, 256, 256), 4),
                            ((1024, 1024, 64, 64), 1)]:
        lay = plan_layout(shape, itemsize, IngestConfig())
        row = int(np.prod(shape[1:])) * itemsize
        assert lay.chunks == (1, *shape[1:])
        assert lay.shards[1:] == tuple(shape[1:])
        assert 64e6 <= lay.shards[0] * row <= 256e6
        assert lay.in_flight >= 1


def test_calibration_options_fill_what_the_file_lacks(tmp_path: Path) -> None:
    src = tmp_path / "scan.npy"
    np.save(src, patterns((3, 4, 8, 8)))
    g = ingest(src, tmp_path / "out.zarr", calibration={"beam_energy_keV": 300,
                                                         "scan_step_nm": 0.5})
    cal = g.attrs["calibration"]
    assert cal["beam_energy_keV"] == 300.0 and cal["scan_step_nm"] == 0.5
    assert g.attrs["calibration_source"] == {"beam_energy_keV": "option",
                                             "scan_step_nm": "option"}
    assert g.attrs["calibration_unknown"] == ["detector_pixel_size_inv_A",
                                              "convergence_semiangle_mrad"]
    assert g["raw"].attrs["calibration"] == cal


def test_hdf5_named_dataset_and_choice(tmp_path: Path) -> None:
    a, b = patterns((5, 3, 8, 8), seed=1), patterns((4, 3, 8, 8), np.float32, seed=2)
    src = tmp_path / "multi.h5"
    with h5py.File(src, "w") as f:
        f["a/one"] = a
        f.create_dataset("b/two", data=b, chunks=(1, 1, 8, 8), compression="gzip")
        f["meta/image"] = np.zeros((4, 4))
    g = ingest(src, tmp_path / "b.zarr", dataset="b/two", config=CFG)
    np.testing.assert_array_equal(g["raw"][:], b)
    assert g["raw"].dtype == np.float32
    assert g.attrs["source"]["dataset"] == "/b/two"
    assert_layout(g, b.shape, rows=2)

    # several 4D datasets and no name: the error lists them
    with pytest.raises(IngestError, match="several 4D datasets") as e:
        ingest(src, tmp_path / "none.zarr")
    assert "/a/one (5, 3, 8, 8)" in str(e.value) and "/b/two" in str(e.value)
    assert "--dataset" in str(e.value)
    assert not (tmp_path / "none.zarr").exists()


def test_hdf5_single_4d_dataset_and_flat_stack(tmp_path: Path) -> None:
    data = patterns((4, 3, 8, 8))
    src = tmp_path / "one.hdf5"
    with h5py.File(src, "w") as f:
        f["x/stack"] = data
        f["x/small"] = np.zeros((2, 2))
    np.testing.assert_array_equal(ingest(src, tmp_path / "a.zarr")["raw"][:], data)
    # a 3D stack of patterns needs the scan shape
    flat = tmp_path / "flat.h5"
    with h5py.File(flat, "w") as f:
        f["frames"] = data.reshape(12, 8, 8)
    with pytest.raises(IngestError, match="--scan-shape"):
        ingest(flat, tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()
    g = ingest(flat, tmp_path / "b.zarr", scan_shape=(4, 3), config=CFG)
    np.testing.assert_array_equal(g["raw"][:], data)


def write_emd(path: Path, data: np.ndarray) -> None:
    """NCEM EMD 1.0: a data group with emd_group_type=1, dim1..dim4 vectors, microscope attrs."""
    ny, nx, ky, kx = data.shape
    with h5py.File(path, "w") as f:
        f.attrs["version_major"] = 1
        f.attrs["version_minor"] = 0
        grp = f.create_group("data/scan_4d")
        grp.attrs["emd_group_type"] = 1
        grp["data"] = data
        for i, (n, step, name, units) in enumerate(
            [(ny, 0.5, "R_y", "n_m"), (nx, 0.5, "R_x", "n_m"),
             (ky, 0.2, "Q_y", "1/n_m"), (kx, 0.2, "Q_x", "1/n_m")], start=1
        ):
            d = grp.create_dataset(f"dim{i}", data=np.arange(n) * step)
            d.attrs["name"], d.attrs["units"] = name, units
        mic = f.create_group("microscope")
        mic.attrs["high_tension"] = 200000.0  # volts
        mic.attrs["convergence_angle"] = 21.4  # mrad
        # a second 4D dataset outside the EMD group: the EMD data group is still chosen
        f["scratch/copy"] = np.zeros_like(data)


def test_emd_1_0_with_calibration(tmp_path: Path) -> None:
    data = patterns((5, 4, 10, 10), seed=3)
    src = tmp_path / "scan.emd"
    write_emd(src, data)
    # a user value within 1% of the file's is accepted (the file's value is kept)
    g = ingest(src, tmp_path / "out.zarr", config=CFG, calibration={"beam_energy_keV": 201})
    np.testing.assert_array_equal(g["raw"][:], data)
    assert g.attrs["provenance"]["reader"] == "emd"
    assert g.attrs["source"]["dataset"] == "/data/scan_4d/data"
    cal = g.attrs["calibration"]
    assert cal["scan_step_nm"] == pytest.approx(0.5)
    assert cal["detector_pixel_size_inv_A"] == pytest.approx(0.02)  # 0.2 1/nm
    assert cal["beam_energy_keV"] == pytest.approx(200.0)
    assert cal["convergence_semiangle_mrad"] == pytest.approx(21.4)
    assert set(g.attrs["calibration_source"].values()) == {"file"}
    assert g.attrs["calibration_unknown"] == []
    assert_layout(g, data.shape, rows=2)


def test_py4dstem_style_file(tmp_path: Path) -> None:
    """emdfile/py4DSTEM 0.14: emd_group_type 'array' datacube, calibration in metadata."""
    data = patterns((4, 4, 8, 8), seed=4)
    src = tmp_path / "p4.h5"
    with h5py.File(src, "w") as f:
        root = f.create_group("experiment")
        root.attrs["emd_group_type"] = "root"
        cube = root.create_group("datacube")
        cube.attrs["emd_group_type"] = "array"
        cube.attrs["python_class"] = "DataCube"
        cube["data"] = data
        for i, n in enumerate(data.shape):
            d = cube.create_dataset(f"dim{i}", data=np.arange(n, dtype=float))
            d.attrs["units"] = "pixels"
        cal = cube.create_group("metadatabundle/calibration")
        cal.attrs["emd_group_type"] = "metadata"
        cal.attrs["R_pixel_size"] = 2.5
        cal.attrs["R_pixel_units"] = "A"
        cal.attrs["Q_pixel_size"] = 0.015
        cal.attrs["Q_pixel_units"] = "A^-1"
    g = ingest(src, tmp_path / "out.zarr")
    np.testing.assert_array_equal(g["raw"][:], data)
    assert g.attrs["provenance"]["reader"] == "py4dstem"
    assert g.attrs["calibration"]["scan_step_nm"] == pytest.approx(0.25)
    assert g.attrs["calibration"]["detector_pixel_size_inv_A"] == pytest.approx(0.015)
    assert g.attrs["calibration_unknown"] == ["beam_energy_keV", "convergence_semiangle_mrad"]


def write_mib(path: Path, data: np.ndarray, hdr: bool = True, same_time: bool = False) -> None:
    """Quantum Detectors Merlin .mib: per frame a 384-byte ASCII header, then big-endian U16.

    Header fields (Merlin manual, "MQ1" frame header): id, sequence number, data offset,
    number of chips, width, height, pixel depth, sensor layout, chip select, time stamp,
    shutter time (s), counter, colour mode, gain mode, 8 thresholds, DAC block, extended
    time stamp, shutter time (ns), counter depth; NUL-padded to the data offset.
    """
    ny, nx, ky, kx = data.shape
    with open(path, "wb") as f:
        for i, frame in enumerate(data.reshape(-1, ky, kx)):
            # a gap between scan lines in the time stamps (how rosettasciio finds nx without .hdr)
            t = 0 if same_time else i + (i // nx) * 100
            fields = [
                "MQ1", f"{i + 1:06d}", "00384", "01", f"{kx:04d}", f"{ky:04d}", "U16",
                "   1x1", "01", "2024-01-01 00:00:00.000000", "0.001000", "0", "0", "0",
                *["1.000000E+1"] * 8, "3RX", *["000"] * 30,
                f"2024-01-01T00:{t // 60000 % 60:02d}:{t // 1000 % 60:02d}.{t % 1000:03d}000000Z",
                "1.000000E+6ns", "12", "",
            ]
            head = ",".join(fields).encode("ascii")
            assert len(head) < 384
            f.write(head.ljust(384, b"\0"))
            f.write(frame.astype(">u2").tobytes())
    if hdr:
        path.with_suffix(".hdr").write_text(
            "HDR,\t\n"
            "Time and Date Stamp (day, mnth, yr, hr, min, s):\t01/01/2024 00:00:00\n"
            "Chip ID:\tW529_F5,-,-,-\n"
            "Chip Type (Medipix 3.0, Medipix 3.1, Medipix 3RX):\tMedipix 3RX\n"
            "Assembly Size (NX1, 2X2):\t   1x1\n"
            f"Frames in Acquisition (Number):\t{ny * nx}\n"
            f"Frames per Trigger (Number):\t{nx}\n"
            "End\t\n"
        )


def test_merlin_mib_round_trip(tmp_path: Path) -> None:
    data = patterns((5, 4, 16, 12), seed=5)
    src = tmp_path / "scan.mib"
    write_mib(src, data)
    g = ingest(src, tmp_path / "out.zarr", config=CFG)
    # rosettasciio shows Merlin frames flipped vertically (the detector's readout order)
    np.testing.assert_array_equal(g["raw"][:], data[:, :, ::-1, :])
    assert g["raw"].dtype == np.uint16  # native byte order, the file is big-endian
    assert g.attrs["provenance"]["reader"] == "rsciio.quantumdetector"
    assert_layout(g, data.shape, rows=2)

    # without the .hdr: the scan shape from --scan-shape, or refused when it cannot be guessed
    bare = tmp_path / "bare.mib"
    write_mib(bare, data, hdr=False, same_time=True)
    with pytest.raises(IngestError, match="--scan-shape NY NX"):
        ingest(bare, tmp_path / "bare.zarr")
    assert not (tmp_path / "bare.zarr").exists()
    g = ingest(bare, tmp_path / "bare.zarr", scan_shape=(5, 4))
    np.testing.assert_array_equal(g["raw"][:], data[:, :, ::-1, :])


def test_truncated_mib_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "cut.mib"
    write_mib(src, patterns((4, 4, 16, 16)))
    with open(src, "r+b") as f:
        f.truncate(src.stat().st_size - 1000)
    with pytest.raises(IngestError, match="truncated") as e:
        ingest(src, tmp_path / "out.zarr")
    assert "16 frames" in str(e.value)
    assert not (tmp_path / "out.zarr").exists()


def test_empad_round_trip(tmp_path: Path) -> None:
    """EMPAD: an .xml description and a .raw of 128x130 float32 frames (2 footer rows)."""
    ny, nx = 3, 4
    data = patterns((ny, nx, 128, 128), np.float32, seed=6)
    frames = np.zeros((ny, nx, 130, 128), "<f4")
    frames[:, :, :128] = data
    frames.tofile(tmp_path / "scan_x4_y3.raw")
    # rosettasciio's XML reader wants no whitespace between elements
    (tmp_path / "scan.xml").write_text(
        '<?xml version="1.0"?><root>'
        f"<pix_x>{nx}</pix_x><pix_y>{ny}</pix_y>"
        '<raw_file filename="scan_x4_y3.raw"/>'
        "<iom_measurements><optics><get_full_scan_field_of_view>[1.2e-09, 1.6e-09]"
        "</get_full_scan_field_of_view></optics>"
        "<calibrated_pixelsize>1.5e-10</calibrated_pixelsize></iom_measurements></root>"
    )
    g = ingest(tmp_path / "scan.xml", tmp_path / "out.zarr", config=CFG)
    np.testing.assert_array_equal(g["raw"][:], data)
    assert g.attrs["provenance"]["reader"] == "rsciio.empad"
    cal = g.attrs["calibration"]
    assert cal["scan_step_nm"] == pytest.approx(0.4)  # fast axis: 1.6 nm / 4
    assert cal["detector_pixel_size_inv_A"] == pytest.approx(0.015)  # 0.15 1/nm
    assert_layout(g, data.shape, rows=2)


def test_blockfile_round_trip(tmp_path: Path) -> None:
    data = patterns((5, 3, 16, 16), np.uint8, seed=7)
    blo = readers.import_rsciio("blo")  # rosettasciio's own writer makes the test file

    def axis(i: int, name: str, scale: float, units: str, nav: bool) -> dict[str, Any]:
        return {"size": data.shape[i], "index_in_array": i, "name": name, "scale": scale,
                "offset": 0.0, "units": units, "navigate": nav}

    signal = {
        "data": data,
        "axes": [axis(0, "y", 1.5, "nm", True), axis(1, "x", 1.5, "nm", True),
                 axis(2, "dy", 0.5, "cm", False), axis(3, "dx", 0.5, "cm", False)],
        "metadata": {},
        "original_metadata": {},
        "attributes": {"_lazy": False},
    }
    src = tmp_path / "scan.blo"
    blo.file_writer(str(src), signal)
    header = np.memmap(src, dtype=blo._api.get_header_dtype_list(), mode="r+", shape=(1,))
    header["Beam_energy"] = 200_000  # volts
    header.flush()
    del header
    g = ingest(src, tmp_path / "out.zarr", config=CFG)
    np.testing.assert_array_equal(g["raw"][:], data)
    assert g.attrs["provenance"]["reader"] == "rsciio.blockfile"
    assert g.attrs["calibration"]["scan_step_nm"] == pytest.approx(1.5)
    assert g.attrs["calibration"]["beam_energy_keV"] == pytest.approx(200.0)
    # the .blo detector axis is a screen length (cm), not a reciprocal calibration
    assert "detector_pixel_size_inv_A" in g.attrs["calibration_unknown"]


def test_format_from_content_and_option(tmp_path: Path) -> None:
    data = patterns((3, 2, 8, 8))
    src = tmp_path / "scan.dat"
    np.save(tmp_path / "tmp.npy", data)
    (tmp_path / "tmp.npy").rename(src)  # no known extension: the magic bytes decide
    np.testing.assert_array_equal(ingest(src, tmp_path / "a.zarr")["raw"][:], data)
    g = ingest(src, tmp_path / "b.zarr", format="npy")
    np.testing.assert_array_equal(g["raw"][:], data)


# --------------------------------------------------------------------------------------------
# resume, overwrite, full disk


def interrupt_after(
    monkeypatch: pytest.MonkeyPatch, n_ok: int, exc: BaseException, write_first: bool = False
) -> list[int]:
    """Make the shard writer fail on shard call ``n_ok + 1``; returns the indices it ran."""
    calls: list[int] = []
    orig = ingest_mod._write_shard

    def writer(arr: Any, src: Any, index: int, y0: int, y1: int) -> int:
        calls.append(index)
        if len(calls) > n_ok:
            if write_first:  # on disk but not recorded, as when killed between the two
                orig(arr, src, index, y0, y1)
            raise exc
        return orig(arr, src, index, y0, y1)

    monkeypatch.setattr(ingest_mod, "_write_shard", writer)
    return calls


def record_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the shard indices the writer runs, without interrupting."""
    return interrupt_after(monkeypatch, sys.maxsize, RuntimeError("unreachable"))


def shard_mtimes(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_mtime_ns
            for p in (store / "raw" / "c").rglob("*") if p.is_file()}


def test_resume_after_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = patterns((9, 4, 16, 16))  # 5 shards of 2 rows, the last one partial
    src, store = tmp_path / "scan.npy", tmp_path / "out.zarr"
    np.save(src, data)
    calls = interrupt_after(monkeypatch, 2, RuntimeError("simulated crash"), write_first=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest(src, store, config=SERIAL, calibration={"beam_energy_keV": 200})
    assert calls == [0, 1, 2]
    g = zarr.open_group(store, mode="r")
    assert g.attrs["complete"] is False and g["raw"].attrs["complete"] is False
    assert g.attrs["ingest_done_shards"] == [[0, 2]]
    before = shard_mtimes(store)
    assert set(before) == {"raw/c/0/0/0/0", "raw/c/1/0/0/0", "raw/c/2/0/0/0"}

    monkeypatch.undo()
    calls = record_writes(monkeypatch)
    # the option of the first run is kept although this run does not repeat it
    g = ingest(src, store, config=SERIAL)
    assert calls == [2, 3, 4]  # resumed at the first incomplete shard
    after = shard_mtimes(store)
    assert {k: after[k] for k in ("raw/c/0/0/0/0", "raw/c/1/0/0/0")} == {
        k: before[k] for k in ("raw/c/0/0/0/0", "raw/c/1/0/0/0")
    }
    np.testing.assert_array_equal(g["raw"][:], data)
    assert_layout(g, data.shape, rows=2)
    assert g.attrs["calibration"]["beam_energy_keV"] == 200.0
    assert g.attrs["calibration_source"]["beam_energy_keV"] == "option"
    assert len(g.attrs["provenance"]["resumed_at"]) == 1


def test_resume_writes_whole_shards_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard written but not recorded is removed and rewritten, never read back."""
    data = patterns((6, 3, 8, 8))
    src, store = tmp_path / "scan.npy", tmp_path / "out.zarr"
    np.save(src, data)
    interrupt_after(monkeypatch, 1, RuntimeError("crash"), write_first=True)
    with pytest.raises(RuntimeError):
        ingest(src, store, config=SERIAL)
    assert (store / "raw" / "c" / "1" / "0" / "0" / "0").is_file()  # on disk, not recorded
    monkeypatch.undo()
    reads = record_shard_reads(monkeypatch)
    g = ingest(src, store, config=SERIAL)
    assert reads == []
    np.testing.assert_array_equal(g["raw"][:], data)


def test_resume_refuses_contradicting_calibration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, store = tmp_path / "scan.npy", tmp_path / "out.zarr"
    np.save(src, patterns((6, 3, 8, 8)))
    interrupt_after(monkeypatch, 1, RuntimeError("crash"))
    with pytest.raises(RuntimeError):
        ingest(src, store, config=SERIAL, calibration={"beam_energy_keV": 200})
    monkeypatch.undo()
    digest = tree_digest(store)
    with pytest.raises(IngestError, match="started with 200 but this run gives 300"):
        ingest(src, store, config=SERIAL, calibration={"beam_energy_keV": 300})
    assert tree_digest(store) == digest


def test_resume_refuses_another_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = patterns((6, 3, 8, 8))
    src, store = tmp_path / "scan.npy", tmp_path / "out.zarr"
    np.save(src, data)
    interrupt_after(monkeypatch, 1, RuntimeError("crash"))
    with pytest.raises(RuntimeError):
        ingest(src, store, config=SERIAL)
    monkeypatch.undo()
    digest = tree_digest(store)
    # same shape, dtype and size; only the content (and so the mtime) changed
    new = patterns((6, 3, 8, 8), seed=9)
    np.save(src, new)
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    with pytest.raises(IngestError, match="different input") as e:
        ingest(src, store, config=SERIAL)
    assert "mtime" in str(e.value) and "--overwrite" in str(e.value)
    assert tree_digest(store) == digest
    g = ingest(src, store, config=SERIAL, overwrite=True)
    np.testing.assert_array_equal(g["raw"][:], new)
    assert g.attrs["complete"] is True


def test_overwrite_protection(tmp_path: Path) -> None:
    a, b = patterns((4, 3, 8, 8), seed=1), patterns((4, 3, 8, 8), seed=2)
    src_a, src_b, store = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "out.zarr"
    np.save(src_a, a)
    np.save(src_b, b)
    ingest(src_a, store, config=CFG)
    digest = tree_digest(store)
    for src in (src_a, src_b):
        with pytest.raises(IngestError, match="already holds a complete ingest") as e:
            ingest(src, store, config=CFG)
        assert "--overwrite" in str(e.value)
        assert tree_digest(store) == digest
    g = ingest(src_b, store, config=CFG, overwrite=True)
    np.testing.assert_array_equal(g["raw"][:], b)

    # a Zarr store written by someone else: only with overwrite
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(foreign, mode="w").create_array("x", shape=(2,), dtype="i4")
    digest = tree_digest(foreign)
    with pytest.raises(IngestError, match="not written by ccstae ingest"):
        ingest(src_a, foreign)
    assert tree_digest(foreign) == digest

    # something that is not a Zarr store: never, not even with overwrite
    for other in (tmp_path / "notes.txt", tmp_path / "folder"):
        if other.suffix:
            other.write_text("keep me")
        else:
            other.mkdir()
            (other / "keep.txt").write_text("keep me")
        with pytest.raises(IngestError, match="not a Zarr store"):
            ingest(src_a, other, overwrite=True)
        assert "keep me" in (other.read_text() if other.is_file() else
                             (other / "keep.txt").read_text())


def test_full_disk_gives_clear_message_and_resumable_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = patterns((9, 3, 8, 8))
    src, store = tmp_path / "scan.npy", tmp_path / "out.zarr"
    np.save(src, data)
    full = OSError(errno.ENOSPC, "No space left on device")
    interrupt_after(monkeypatch, 2, full)
    with pytest.raises(IngestError) as e:
        ingest(src, store, config=SERIAL)
    msg = str(e.value)
    assert "no space left" in msg and str(store) in msg
    assert "2 of 5 shards" in msg and "resumes" in msg
    assert zarr.open_group(store, mode="r").attrs["complete"] is False

    # same through the command line (same layout: 2 rows of 384 B per shard): exit code 2
    assert ingest_main([str(src), str(store), "--shard-mb", "0.000768"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no space left" in err

    monkeypatch.undo()
    calls = record_writes(monkeypatch)
    g = ingest(src, store, config=SERIAL)
    assert calls == [2, 3, 4]
    np.testing.assert_array_equal(g["raw"][:], data)
    assert g.attrs["complete"] is True


def test_full_disk_while_recording_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on the metadata write after a shard: zarr.json stays intact, the run resumes."""
    data = patterns((6, 3, 8, 8))
    src, store = tmp_path / "scan.npy", tmp_path / "out.zarr"
    np.save(src, data)
    written: set[str] = set()
    orig = LocalStore.set

    async def set_(self: LocalStore, key: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if key == "zarr.json" and "raw/c/1/0/0/0" in written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.add(key)
        await orig(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", set_)
    with pytest.raises(IngestError, match="no space left.*1 of 3 shards"):
        ingest(src, store, config=SERIAL)
    monkeypatch.undo()
    g = zarr.open_group(store, mode="r")
    assert g.attrs["ingest_done_shards"] == [[0, 1]] and g.attrs["complete"] is False
    calls = record_writes(monkeypatch)
    g = ingest(src, store, config=SERIAL)
    assert calls == [1, 2]
    np.testing.assert_array_equal(g["raw"][:], data)


def test_full_disk_while_creating_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, store = _npy(tmp_path), tmp_path / "out.zarr"

    async def set_(self: LocalStore, key: str, value: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalStore, "set", set_)
    with pytest.raises(IngestError, match="no space left on the device") as e:
        ingest(src, store)
    assert str(store) in str(e.value)
    assert not store.exists()  # nothing half-made that a rerun would call foreign


# --------------------------------------------------------------------------------------------
# bad input: IngestError, a message saying what to do, and no store


def _bad_npy_2d(d: Path) -> Path:
    np.save(d / "img.npy", np.zeros((8, 8), np.uint16))
    return d / "img.npy"


def _bad_npy_truncated(d: Path) -> Path:
    p = d / "cut.npy"
    np.save(p, patterns((4, 4, 8, 8)))
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 100)
    return p


def _bad_npy_corrupt(d: Path) -> Path:
    p = d / "bad.npy"
    p.write_bytes(b"\x93NUMPY\x01\x00\x20\x00{'descr': garbage}" + b" " * 200)
    return p


def _bad_h5_truncated(d: Path) -> Path:
    p = d / "cut.h5"
    with h5py.File(p, "w") as f:
        f["data"] = patterns((6, 4, 16, 16))
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)
    return p


def _bad_h5_not_hdf5(d: Path) -> Path:
    p = d / "fake.h5"
    p.write_bytes(b"this is not HDF5" * 10)
    return p


def _bad_h5_3d(d: Path) -> Path:
    p = d / "stack.h5"
    with h5py.File(p, "w") as f:
        f["frames"] = patterns((12, 8, 8))
    return p


def _two_h5(d: Path) -> Path:
    p = d / "two.h5"
    with h5py.File(p, "w") as f:
        f["g/a"] = patterns((2, 2, 8, 8))
        f["g/b"] = patterns((2, 2, 8, 8))
    return p


def _emd(d: Path) -> Path:
    p = d / "scan.emd"
    write_emd(p, patterns((2, 2, 8, 8)))
    return p


def _npy(d: Path) -> Path:
    np.save(d / "ok.npy", patterns((2, 2, 8, 8)))
    return d / "ok.npy"


def _txt(d: Path) -> Path:
    (d / "notes.txt").write_text("hello")
    return d / "notes.txt"


def _empty(d: Path) -> Path:
    (d / "empty.npy").write_bytes(b"")
    return d / "empty.npy"


BAD: list[tuple[str, Callable[[Path], Path], dict[str, Any], str]] = [
    ("missing", lambda d: d / "nope.npy", {}, "does not exist"),
    ("empty", _empty, {}, "is empty"),
    ("unknown format", _txt, {}, "cannot tell the format"),
    ("unknown --format", _npy, {"format": "tiffish"}, "unknown format 'tiffish'"),
    ("2D npy", _bad_npy_2d, {}, "2D"),
    ("truncated npy", _bad_npy_truncated, {}, "truncated"),
    ("corrupt npy", _bad_npy_corrupt, {}, "not a readable .npy"),
    ("truncated hdf5", _bad_h5_truncated, {}, "not a readable HDF5"),
    ("not hdf5", _bad_h5_not_hdf5, {}, "does not start like one"),
    ("3D hdf5 without scan shape", _bad_h5_3d, {}, "--scan-shape"),
    ("bad dataset name", _two_h5, {"dataset": "g/c"}, "'/g/c' does not exist"),
    ("dataset on npy", _npy, {"dataset": "x"}, "only applies to HDF5"),
    ("contradicting calibration", _emd, {"calibration": {"beam_energy_keV": 300}},
     "says 200 but the option gives 300"),
    ("unknown calibration key", _npy, {"calibration": {"voltage": 3}}, "unknown calibration"),
    ("negative calibration", _npy, {"calibration": {"scan_step_nm": -1}}, "positive"),
]


@pytest.mark.parametrize(("make", "kwargs", "phrase"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_input_fails_before_the_store(
    tmp_path: Path, make: Callable[[Path], Path], kwargs: dict[str, Any], phrase: str
) -> None:
    src = make(tmp_path)
    store = tmp_path / "out.zarr"
    with pytest.raises(IngestError) as e:
        ingest(src, store, **kwargs)
    msg = str(e.value)
    assert phrase in msg
    # "<problem>. <what to do>": a sentence break followed by advice
    assert ". " in msg
    assert not store.exists()


def test_corrupt_hdf5_chunk_mid_file_leaves_no_store(tmp_path: Path) -> None:
    """Damage past the probed first/last rows is found while writing; the store is removed."""
    src = tmp_path / "bad.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("data", data=patterns((8, 2, 8, 8)), chunks=(1, 2, 8, 8),
                         compression="gzip")
    with h5py.File(src, "r") as f:
        info = f["data"].id.get_chunk_info_by_coord((5, 0, 0, 0))
    with open(src, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(b"\xff" * info.size)
    store = tmp_path / "out.zarr"
    with pytest.raises(IngestError, match="could not read scan rows 4..5") as e:
        ingest(src, store, config=CFG)
    assert "was removed" in str(e.value)
    assert not store.exists()


def test_bad_input_leaves_previous_store_unchanged(tmp_path: Path) -> None:
    store = tmp_path / "out.zarr"
    ingest(_npy(tmp_path), store)
    digest = tree_digest(store)
    with pytest.raises(IngestError, match="several 4D datasets"):
        ingest(_two_h5(tmp_path), store, overwrite=True)
    with pytest.raises(IngestError, match="truncated"):
        ingest(_bad_npy_truncated(tmp_path), store, overwrite=True)
    assert tree_digest(store) == digest


def test_bad_dataset_name_lists_available(tmp_path: Path) -> None:
    with pytest.raises(IngestError) as e:
        ingest(_two_h5(tmp_path), tmp_path / "out.zarr", dataset="/g/c")
    assert "/g/a (2, 2, 8, 8)" in str(e.value) and "/g/b" in str(e.value)


def test_store_inside_input_is_refused(tmp_path: Path) -> None:
    src = _npy(tmp_path)
    with pytest.raises(IngestError, match="contain or replace the input"):
        ingest(src, src, overwrite=True)
    assert src.is_file()


# --------------------------------------------------------------------------------------------
# command line


def test_ingest_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = patterns((4, 3, 8, 8))
    src = tmp_path / "scan.npy"
    np.save(src, data)
    store = tmp_path / "out.zarr"
    assert ingest_main([str(src), str(store), "--energy", "300", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "ingested" in out and "calibration unknown" in out and "--scan-step" in out
    g = zarr.open_group(store, mode="r")
    np.testing.assert_array_equal(g["raw"][:], data)
    assert g.attrs["calibration"]["beam_energy_keV"] == 300.0

    cases = [
        [str(tmp_path / "missing.npy"), str(tmp_path / "x.zarr")],
        [str(src), str(store)],  # complete store, no --overwrite
        [str(src), str(tmp_path / "y.zarr"), "--format", "nope"],
        [str(_emd(tmp_path)), str(tmp_path / "z.zarr"), "--energy", "120"],
        [str(src), str(tmp_path / "w.zarr"), "--shard-mb", "-1"],
    ]
    for argv in cases:
        assert ingest_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and ". " in err and "\n" not in err, err
    for name in ("x", "y", "z", "w"):
        assert not (tmp_path / f"{name}.zarr").exists()
    assert ingest_main([]) == 2  # argparse usage error
