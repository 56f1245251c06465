"""Hidden siblings left by killed runs are removed; a live run's, another host's and an
interrupted swap's are not."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from ccstae_hpc.stages import store

_MAKE = ("import sys, time; from pathlib import Path; "
         "from ccstae_hpc.stages.store import sibling; "
         "p = sibling(Path(sys.argv[1]), sys.argv[2]); (p / 'raw').mkdir(parents=True); "
         "print(p, flush=True); time.sleep(float(sys.argv[3]))")


def _child_sibling(out: Path, tag: str, sleep_s: float) -> tuple[subprocess.Popen, Path]:
    """A sibling of ``out`` made by :func:`store.sibling` in a child process that sleeps."""
    child = subprocess.Popen([sys.executable, "-c", _MAKE, str(out), tag, str(sleep_s)],
                             stdout=subprocess.PIPE, text=True)
    path = Path(child.stdout.readline().strip())
    child.stdout.close()
    assert path.is_dir(), path
    return child, path


def _killed_sibling(out: Path, tag: str = "tmp") -> Path:
    child, path = _child_sibling(out, tag, 600)
    os.kill(child.pid, signal.SIGKILL)  # as a run killed at walltime
    child.wait(timeout=60)
    return path


@pytest.fixture
def live_child(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    child, path = _child_sibling(tmp_path / "a.zarr", "tmp", 600)
    try:
        yield child, path
    finally:
        child.kill()
        child.wait(timeout=60)


def test_sibling_names_hold_host_and_pid(tmp_path: Path) -> None:
    p = store.sibling(tmp_path / "a.zarr", "tmp")
    assert p.parent == tmp_path and p.name.startswith(".a.zarr.tmp-")
    assert f"-{os.getpid()}-" in p.name
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())
    assert host in p.name
    assert store.sibling(tmp_path / "a.zarr", "tmp") != p


def test_killed_runs_siblings_go_live_ones_stay(
        tmp_path: Path, live_child: tuple[subprocess.Popen, Path]) -> None:
    out = tmp_path / "a.zarr"
    out.mkdir()
    dead = [_killed_sibling(out, "tmp"), _killed_sibling(out, "new"), _killed_sibling(out, "old")]
    figure = dead[0].with_name(dead[0].name + ".loss.png")
    figure.write_bytes(b"png")
    figures = dead[1].with_name(dead[1].name + "_figures")  # the flow's figure directory
    (figures / "strain").mkdir(parents=True)
    _, live = live_child
    mine = store.sibling(out, "tmp")  # this process: alive
    mine.mkdir()
    # another host's pid means nothing here, whatever it is
    elsewhere = tmp_path / f".a.zarr.tmp-some_other_host-{dead[0].name.split('-')[-2]}-0123abcd"
    elsewhere.mkdir()
    other_store = tmp_path / f".b.zarr.tmp-{dead[0].name.split('.tmp-')[1]}"
    other_store.mkdir()  # a sibling of another output
    unrelated = tmp_path / ".a.zarr.tmp-notes"
    unrelated.write_text("keep")
    lines: list[str] = []
    removed = store.remove_stale_siblings(out, lines.append)
    assert sorted(removed) == sorted([*dead, figure, figures])
    assert not any(p.exists() for p in removed)
    for kept in (live, mine, elsewhere, other_store, unrelated, out):
        assert kept.exists(), kept
    assert len(lines) == 5 and all("removed" in s for s in lines)
    assert store.remove_stale_siblings(out) == []  # nothing left to do


def test_interrupted_swap_keeps_the_old_store(tmp_path: Path) -> None:
    """Killed between the two renames of a swap: the output is missing, the previous store
    sits at the ``old`` sibling, and nothing is removed."""
    out = tmp_path / "a.zarr"
    old = _killed_sibling(out, "old")
    new = _killed_sibling(out, "tmp")
    lines: list[str] = []
    assert store.remove_stale_siblings(out, lines.append) == []
    assert old.exists() and new.exists()
    assert len(lines) == 1 and "rename it back" in lines[0]


def test_a_stage_commit_clears_killed_runs(tmp_path: Path) -> None:
    """`ccstae map` / `analyze` (any stage's commit) on the output clears killed runs too."""
    out = tmp_path / "a.zarr"
    ds = xr.Dataset({"exx": (("scan_y", "scan_x"), np.zeros((3, 4), np.float32))},
                    attrs={"complete": True})
    store.write_group(ds, out, store.staging("strain"))
    stale = _killed_sibling(out)
    store.commit(out, "strain")
    assert not stale.exists()
    assert store.group_state(out, "strain") == "complete"
