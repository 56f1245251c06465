"""Fuzz test of bad input (issue 14, "Must show"): seeded, randomly corrupted files fed to
``ccstae ingest`` and ``ccstae run``.

Corruptions: truncations, bit flips in the header and in the body, shape and dtype edits of
``.npy`` headers, NaN/inf in float data, and random bytes under every supported extension.
Some cases aim at an existing store, without ``--overwrite`` (must be refused) and with it
(a refused input must leave the store as it was).  Counted: tracebacks (or exit codes other
than 0 and 2, or a crashed interpreter), hangs (no answer within ``CASE_TIMEOUT_S``), and
existing stores whose bytes changed; all three must be 0.

The cases run in a worker process (``ccstae`` in-process there, one case after the other) so
that a crash in a C library (HDF5) or a hang is counted instead of taking pytest down; the
worker is restarted after either.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from tree_digest import tree_digest

from ccstae_hpc.core.config import SimConfig
from ccstae_hpc.sim.simulate import simulate
from ccstae_hpc.stages.readers import FORMATS

SEED = 20261204
N_CASES = 240  # the issue asks for at least 200
CASE_TIMEOUT_S = 60.0  # one ingest of a tiny file takes < 1 s; 60 s is a hang
WORKER_START_TIMEOUT_S = 120.0
# corrupted files that still pass every check of `ccstae run` are run through the whole
# pipeline (Prefect flow, training) in a subprocess: ~15 s each, so only a few
N_FLOW_RUNS = 2
FLOW_TIMEOUT_S = 600.0
# fraction of cases aimed at the existing store (half of them with --overwrite)
EXISTING_FRACTION = 0.25
SCAN = (4, 4)  # 16 probe positions: the floor of `ccstae run`
DETECTOR = 64  # twice the floor: the Bragg disks of the simulation are in view
EXTENSIONS = sorted({e for exts in FORMATS.values() for e in exts} | {"dat", "raw"})
NPY_DTYPES = ["<u1", "<u2", ">u2", "<i2", "<i4", "<f2", "<f4", ">f8", "|b1", "<c8", "|O",
              "<U4", "|V8", "<m8", "<u8"]
TRACEBACK = "Traceback (most recent call last)"
STDERR_SHOWN = 1500  # characters of a bad result's stderr in the failure message


# ---------------------------------------------------------------------------- the worker side

WORKER = """
import contextlib, io, json, sys, traceback
from ccstae_hpc import cli
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    argv = json.loads(line)
    err, out = io.StringIO(), io.StringIO()
    escaped = None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = cli.main(argv)
    except BaseException:  # noqa: BLE001 - counted by the test as a traceback
        rc, escaped = None, traceback.format_exc()
    print(json.dumps({"rc": rc, "stderr": err.getvalue(), "escaped": escaped}), flush=True)
"""


class Worker:
    """A ``python`` process running ``ccstae`` commands in-process, one JSON line each way."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER], cwd=self.cwd, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc, self.lines), daemon=True).start()
        first = self.lines.get(timeout=WORKER_START_TIMEOUT_S)
        assert first is not None and json.loads(first).get("ready"), first

    @staticmethod
    def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # EOF: the process ended

    def run(self, argv: list[str], timeout: float) -> dict[str, Any]:
        """The result of ``ccstae argv``; ``{"hang": True}`` or ``{"crash": code}`` instead
        when the worker did not answer in time or died (it is restarted next time)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(argv) + "\n")
            self.proc.stdin.flush()
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            return {"hang": True}
        except BrokenPipeError:
            line = None
        if line is None:
            code = self.proc.wait()
            self.proc = None
            return {"crash": code}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


# ----------------------------------------------------------------------------- the test cases


@dataclass
class Case:
    """One corrupted input and how it is fed."""

    name: str
    path: Path
    target: str = "new"  # "new" store, "existing" store, "existing+overwrite"
    extra: list[str] = field(default_factory=list)


def _npy_bytes(shape: tuple[int, ...], descr: str, body: bytes, fortran: bool = False) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue() + body


def _flip(raw: bytes, lo: int, hi: int, n: int, rng: np.random.Generator) -> bytes:
    b = bytearray(raw)
    hi = min(hi, len(b))
    if hi <= lo:
        return bytes(b)
    for pos in rng.integers(lo, hi, n):
        b[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def _header_len(raw: bytes, fmt: str) -> int:
    if fmt == "npy":
        return raw.index(b"\n") + 1
    return {"hdf5": 2048, "mib": 384, "blo": 512, "empad": len(raw)}.get(fmt, 256)


def _shape_edit(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
    s = list(shape)
    op = int(rng.integers(0, 7))
    i = int(rng.integers(0, len(s)))
    if op == 0:
        s[i] = -s[i]
    elif op == 1:
        s[i] = 0
    elif op == 2:
        s[i] = s[i] * int(rng.integers(2, 5))
    elif op == 3:
        s[i] = max(1, s[i] // int(rng.integers(2, 5)))
    elif op == 4:
        s = s[:-1]
    elif op == 5:
        s = [*s, int(rng.integers(1, 4))]
    else:
        s[i] = int(rng.integers(2**31, 2**62))
    return tuple(s)


def make_bases(d: Path, data: np.ndarray) -> dict[str, Path]:
    """One small valid file per format that has a writer here."""
    from test_bad_input import write_blo, write_mib

    np.save(d / "base.npy", data)
    np.save(d / "base_f4.npy", data.astype(np.float32))
    with h5py.File(d / "base.h5", "w") as f:
        f.create_dataset("data", data=data, chunks=(1, *data.shape[1:]), compression="gzip")
    write_mib(d / "base.mib", data)
    write_blo(d / "base.blo", data.astype(np.uint8))
    return {"npy": d / "base.npy", "npy_f4": d / "base_f4.npy", "hdf5": d / "base.h5",
            "mib": d / "base.mib", "blo": d / "base.blo"}


def make_cases(d: Path, bases: dict[str, Path], data: np.ndarray, n: int,
               rng: np.random.Generator) -> list[Case]:
    """``n`` corrupted inputs, written under ``d``."""
    kinds = ["truncate", "flip-header", "flip-body", "npy-shape", "npy-dtype", "random-bytes",
             "nonfinite"]
    cases: list[Case] = []
    for k in range(n):
        kind = kinds[k % len(kinds)]
        fmt = ["npy", "npy_f4", "hdf5", "mib", "blo"][int(rng.integers(0, 5))]
        base = bases[fmt]
        raw = base.read_bytes()
        ext = base.suffix
        if kind == "truncate":
            out = raw[: int(rng.integers(0, len(raw)))]
        elif kind == "flip-header":
            out = _flip(raw, 0, _header_len(raw, fmt.split("_")[0]), int(rng.integers(1, 5)),
                        rng)
        elif kind == "flip-body":
            out = _flip(raw, _header_len(raw, fmt.split("_")[0]), len(raw),
                        int(rng.integers(1, 17)), rng)
        elif kind == "npy-shape":
            ext = ".npy"
            body = data.astype("<u2").tobytes()
            out = _npy_bytes(_shape_edit(data.shape, rng), "<u2", body, bool(rng.random() < .1))
        elif kind == "npy-dtype":
            ext = ".npy"
            descr = NPY_DTYPES[int(rng.integers(0, len(NPY_DTYPES)))]
            out = _npy_bytes(data.shape, descr, data.astype("<u2").tobytes())
        elif kind == "random-bytes":
            ext = "." + EXTENSIONS[int(rng.integers(0, len(EXTENSIONS)))]
            out = rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8).tobytes()
            if rng.random() < 0.5:  # a valid magic, garbage after it
                magic = {".npy": b"\x93NUMPY\x01\x00", ".h5": b"\x89HDF\r\n\x1a\n",
                         ".mib": b"MQ1,", ".blo": b"IMGBLO"}.get(ext, b"")
                out = magic + out
        else:  # NaN/inf somewhere in float data
            ext = ".npy"
            f = data.astype(np.float32)
            idx = tuple(int(rng.integers(0, s)) for s in f.shape)
            f[idx] = [np.nan, np.inf, -np.inf][int(rng.integers(0, 3))]
            out = _npy_bytes(f.shape, "<f4", f.tobytes())
        path = d / f"case{k:03d}{ext}"
        path.write_bytes(out)
        if ext == ".mib" and bases["mib"].with_suffix(".hdr").exists():
            shutil.copy(bases["mib"].with_suffix(".hdr"), path.with_suffix(".hdr"))
        u = rng.random()
        target = ("new" if u >= EXISTING_FRACTION else
                  "existing" if u < EXISTING_FRACTION / 2 else "existing+overwrite")
        cases.append(Case(f"{kind}/{fmt}", path, target))
    return cases


# ------------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(tmp_path_factory.mktemp("worker"))
    yield w
    w.close()


def _bad(res: dict[str, Any]) -> str | None:
    """Why a result breaks the rules (a traceback, a crash, an unclear exit), or None."""
    if res.get("crash") is not None:
        return f"worker died with code {res['crash']}"
    if res.get("escaped"):
        return "exception escaped main: " + res["escaped"].strip().splitlines()[-1]
    if TRACEBACK in res["stderr"]:
        return "traceback on stderr:\n" + res["stderr"][-STDERR_SHOWN:]
    if res["rc"] not in (0, 2):
        return f"exit code {res['rc']}: {res['stderr'].strip()[-300:]}"
    if res["rc"] == 2:
        last = (res["stderr"].strip().splitlines() or [""])[-1]
        if not last.startswith("error: "):
            return f"no error line: {res['stderr'].strip()[-300:]}"
    return None


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fuzz_ingest_and_run(tmp_path: Path, worker: Worker,
                             capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(SEED)
    data, _ = simulate(SimConfig(scan=SCAN, detector=DETECTOR, dose=1000.0, seed=1))
    data = data.astype(np.uint16)
    bases = make_bases(tmp_path, data)
    existing = tmp_path / "existing.zarr"
    pristine = tmp_path / "pristine.zarr"
    res = worker.run(["ingest", str(bases["npy"]), str(pristine), "--no-progress"],
                     CASE_TIMEOUT_S)
    assert res.get("rc") == 0, res
    shutil.copytree(pristine, existing)
    before = tree_digest(existing)
    cases = make_cases(tmp_path, bases, data, N_CASES, rng)

    problems: list[str] = []
    counts = {"cases": 0, "refused": 0, "accepted": 0, "tracebacks": 0, "hangs": 0,
              "changed": 0, "run_cases": 0, "flow_runs": 0, "flow_ok": 0}
    runnable: list[Case] = []

    def check(case: Case, argv: list[str], res: dict[str, Any], store: Path | None,
              refused_expected: bool = False) -> None:
        if res.get("hang"):
            counts["hangs"] += 1
            problems.append(f"{case.name} {case.path.name}: hang ({' '.join(argv[:1])})")
            return
        why = _bad(res)
        if why is not None:
            counts["tracebacks"] += 1
            problems.append(f"{case.name} {case.path.name}: {why}")
        if refused_expected and res.get("rc") != 2:
            problems.append(f"{case.name} {case.path.name}: existing store not refused")
        if store is not None and res.get("rc") != 0 and tree_digest(store) != before:
            counts["changed"] += 1
            problems.append(f"{case.name} {case.path.name}: existing store changed")

    for k, case in enumerate(cases):
        counts["cases"] += 1
        new = tmp_path / f"new{k:03d}.zarr"
        store = {"new": new, "existing": existing, "existing+overwrite": existing}[case.target]
        argv = ["ingest", str(case.path), str(store), "--no-progress"]
        if case.target == "existing+overwrite":
            argv.append("--overwrite")
        res = worker.run(argv, CASE_TIMEOUT_S)
        check(case, argv, res, store if case.target != "new" else None,
              refused_expected=case.target == "existing")
        counts["refused" if res.get("rc") == 2 else "accepted"] += 1
        if res.get("rc") == 0 and case.target == "existing+overwrite":
            # a corrupted file that is still a valid array replaced the store, as asked
            shutil.rmtree(existing)
            shutil.copytree(pristine, existing)
        shutil.rmtree(new, ignore_errors=True)
        if case.path.suffix == ".npy" and k % 2 == 0:
            # `ccstae run`: refused files are refused before any work (in-process, instant);
            # the ones that pass every check run the whole pipeline (below, a few)
            out = existing if k % 4 == 0 else tmp_path / f"run{k:03d}.zarr"
            argv = ["run", str(case.path), "--out", str(out), "--quiet", "--epochs", "1"]
            if out != existing and _passes_run_checks(case.path):
                runnable.append(case)
                continue
            counts["run_cases"] += 1
            res = worker.run(argv, CASE_TIMEOUT_S)
            check(case, argv, res, existing if out == existing else None,
                  refused_expected=out == existing)
            assert not out.exists() or out == existing

    for case in runnable[:N_FLOW_RUNS]:
        counts["flow_runs"] += 1
        out = tmp_path / f"flow_{case.path.stem}.zarr"
        try:
            r = subprocess.run([sys.executable, "-m", "ccstae_hpc.cli", "run", str(case.path),
                                "--out", str(out), "--quiet", "--epochs", "1"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=FLOW_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # subprocess.run has killed it
            check(case, ["run"], {"hang": True}, None)
            continue
        check(case, ["run"], {"rc": r.returncode, "stderr": r.stderr}, None)
        counts["flow_ok"] += r.returncode == 0
    assert tree_digest(existing) == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

    with capsys.disabled():
        print(f"\nfuzz: {counts['cases']} corrupted inputs to ccstae ingest "
              f"({counts['refused']} refused, {counts['accepted']} accepted as valid arrays), "
              f"{counts['run_cases']} to ccstae run before any work and {counts['flow_runs']} "
              f"through the whole pipeline ({counts['flow_ok']} completed); tracebacks "
              f"{counts['tracebacks']}, hangs {counts['hangs']}, existing data changed "
              f"{counts['changed']}")
    assert not problems, "\n".join(problems)
    assert counts["cases"] >= 200
    assert counts["tracebacks"] == counts["hangs"] == counts["changed"] == 0
    assert leftovers == []


def _passes_run_checks(path: Path) -> bool:
    """True when ``ccstae run`` would start the pipeline on ``path`` (every check passes)."""
    from ccstae_hpc import cli

    try:
        data = cli.load_npy(path)
        cli.validate_array(data)
        cli.check_content(data)
    except cli.CliError:
        return False
    return True


def test_worker_reports_crashes(tmp_path: Path) -> None:
    """The harness itself: a worker that dies is counted, not fatal, and restarted."""
    w = Worker(tmp_path)
    try:
        assert w.run(["--version"], CASE_TIMEOUT_S)["rc"] == 0
        assert w.proc is not None
        w.proc.kill()
        assert "crash" in w.run(["--version"], CASE_TIMEOUT_S)
        assert w.run(["--version"], CASE_TIMEOUT_S)["rc"] == 0
    finally:
        w.close()
