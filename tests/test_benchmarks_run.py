"""Every benchmark this issue added runs on tiny sizes, so none rots (their figures are
measured at full size by hand; see README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
# training is what these scripts spend their time on, and their figures are not checked here:
# one epoch shows that every step of a script runs (a converged training takes >= 150 steps)
ONE_EPOCH = ["--epochs", "1"]


@pytest.mark.parametrize("argv", [
    ["benchmarks/bench_multislice.py", "--quick", *ONE_EPOCH],
    ["benchmarks/bench_ablation.py", "--scan", "16", "--doses", "none", *ONE_EPOCH],
    ["benchmarks/bench_phase_cost.py", "--scan", "16", "--repeat", "2", *ONE_EPOCH],
    ["benchmarks/bench_peers.py", "--scan", "16", *ONE_EPOCH],
    ["benchmarks/bench_training.py", "--scan", "16"],
    ["benchmarks/bench_memory.py", "--scans", "12", "16", "--epochs", "1"],
    ["benchmarks/bench_gpu_projection.py", "--quick"],
    ["benchmarks/bench_dose.py", "--quick", *ONE_EPOCH],
    ["benchmarks/bench_efficiency.py", "--doses", "1e4", "--patterns", "2", "--workers", "1"],
    ["benchmarks/bench_efficiency.py", "--doses", "1e4", "--scan-pixels", "1", "--patterns",
     "2", "--workers", "1"],
    ["benchmarks/bench_fit_spread.py", "--scan", "16", "--realisations", "2", "--per-phase",
     "4", *ONE_EPOCH],
], ids=["multislice", "ablation", "phase_cost", "peers", "training", "memory",
        "gpu_projection", "dose", "efficiency", "efficiency_scan", "fit_spread"])
def test_benchmark_runs(argv: list[str], tmp_path: Path) -> None:
    if "phase_cost" not in argv[0]:
        argv = [*argv, "--results", str(tmp_path)]  # the committed full-size results stay
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(w in r.stdout for w in ("exx", "throughput ratio", "peak RSS")), r.stdout[-2000:]
    # each result file has its measuring time recorded (the report's "written" stamps)
    results = {f.name for f in tmp_path.glob("*.json")} - {"written.json"}
    if results:
        assert results <= set(json.loads((tmp_path / "written.json").read_text())), results


# the benchmarks that only print (no results file): (argv, what their last lines must show)
PRINTING = [
    (["benchmarks/bench_simulate.py", "--scan", "8", "--repeat", "1"], "patterns/s"),
    (["benchmarks/bench_model.py", "--scan", "16"], "mapping:"),
    (["benchmarks/bench_ingest.py", "--gb", "0.02", "--dir", "{tmp}"], "ratio ingest/np.save"),
    (["benchmarks/bench_ingest_memory.py", "--small", "0.01", "--large", "0.02", "--dir",
      "{tmp}"], "ratio large/small"),
    (["benchmarks/bench_prep.py", "--scan", "16", "--dir", "{tmp}"], "compression ratio"),
    (["benchmarks/bench_map_scaling.py", "--scan", "16", "--repeats", "1"], "worker RSS"),
    (["benchmarks/bench_flow_overhead.py", "--scan", "12", "--epochs", "1", "--repeats", "1"],
     "rerun, all stages done"),
    (["benchmarks/bench_ddp.py", "--scan", "16", "--steps", "2", "--repeats", "1"],
     "DDP step time"),
]


@pytest.mark.parametrize(("argv", "shows"), PRINTING,
                         ids=[a[0].split("bench_")[1].removesuffix(".py") for a, _ in PRINTING])
def test_printing_benchmark_runs(argv: list[str], shows: str, tmp_path: Path) -> None:
    argv = [a.format(tmp=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    # bench_ingest_memory exits 1 when its memory target is missed, which tiny inputs (fixed
    # import costs) do: it must still have measured both sizes
    ok = r.returncode == 0 or ("ingest_memory" in argv[0] and r.returncode == 1)
    assert ok, r.stderr[-3000:]
    assert shows in r.stdout, r.stdout[-2000:]


def test_report_from_results(tmp_path: Path) -> None:
    """The report writes every section: measured ones from the results (with their plots),
    the others as 'not measured yet' with the command that measures them."""
    results = tmp_path / "results"
    results.mkdir()
    # bench_dose's rows; its abTEM ones also make the multislice section
    dose = [{"data": "abtem_single", "dose": None, "method": "ccstae",
             **{f"mae_{k}": 1e-4 for k in ("exx", "eyy", "exy", "theta")}},
            {"data": "abtem_single", "dose": None, "method": "com", "error": "no lattice"}]
    (results / "dose.json").write_text(json.dumps(dose))
    (results / "written.json").write_text(json.dumps({"dose.json": "2026-01-02 03:04 UTC"}))
    (results / "training.json").write_text(json.dumps({"scan": [16, 16]}))  # no recorded time
    out = tmp_path / "REPORT.md"
    r = subprocess.run([sys.executable, "benchmarks/report.py", "--results", str(results),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "| single | noise-free | ccstae | 0.010 % |" in text
    assert "failed: no lattice" in text and (results / "multislice.png").exists()
    assert "Not measured yet: run `python benchmarks/bench_peers.py`" in text
    assert "Not measured yet: run `python benchmarks/bench_efficiency.py --doses 500" in text
    # the time the benchmark recorded, else the file's own time marked as such
    assert ("`python benchmarks/bench_dose.py`, its abTEM rows (written 2026-01-02 03:04 UTC)"
            in text)
    assert "UTC, file time)" in text
