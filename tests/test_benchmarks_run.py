"""Every benchmark this issue added runs on tiny sizes, so none rots (their figures are
measured at full size by hand; see README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv", [
    ["benchmarks/bench_multislice.py", "--quick"],
    ["benchmarks/bench_ablation.py", "--scan", "16", "--doses", "none"],
    ["benchmarks/bench_phase_cost.py", "--scan", "16", "--repeat", "2"],
    ["benchmarks/bench_peers.py", "--scan", "16"],
    ["benchmarks/bench_training.py", "--scan", "16"],
], ids=["multislice", "ablation", "phase_cost", "peers", "training"])
def test_benchmark_runs(argv: list[str], tmp_path: Path) -> None:
    if "phase_cost" not in argv[0]:
        argv = [*argv, "--results", str(tmp_path)]  # the committed full-size results stay
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exx" in r.stdout or "throughput ratio" in r.stdout, r.stdout[-2000:]
