"""`make demo` as a newcomer sees it: `python -m ccstae_hpc.demo` in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import xarray as xr

STAGES = ("simulate", "preprocess", "train", "map", "analyze", "ccstae run (total)")


def test_demo_prints_a_complete_report_and_writes_its_files(tmp_path: Path) -> None:
    out = tmp_path / "demo_out"
    r = subprocess.run([sys.executable, "-m", "ccstae_hpc.demo", "--out", str(out),
                        "--scan", "16", "--epochs", "1"], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for noise in ("Logging error", "Traceback", "INFO"):
        assert noise not in r.stderr and noise not in r.stdout, noise
    lines = r.stdout.splitlines()
    # the error table has its column headings, and its numbers are those of errors.json
    head = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["MAE", "p95", "max"])
    errors = json.loads((out / "errors.json").read_text())
    exx = lines[head + 1].split()
    assert exx[:2] == ["exx", "(%)"]
    assert abs(float(exx[2]) - 100 * errors["mae_exx"]) < 1e-4 * 100
    # the timing section names every stage with a time
    timing = lines[lines.index("timing:") + 1:]
    for stage in STAGES:
        row = next((ln for ln in timing if ln.strip().startswith(stage)), None)
        assert row is not None and " s" in row, (stage, r.stdout)
    for name in ("data.npy", "data.truth.npz", "strain_maps.png", "loss.png", "errors.json"):
        f = out / name
        assert f.exists() and f.stat().st_size > 0, name
        assert str(f) in r.stdout, name  # every file it promises is named
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    ds = xr.open_zarr(out / "strain.zarr", group="strain")
    assert (ds.sizes["scan_y"], ds.sizes["scan_x"]) == (16, 16)
