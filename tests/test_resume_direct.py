"""A killed ``ccstae run --engine direct`` continues at its last finished stage (issue 14).

The run is killed with its whole process group (as a batch system ends a job) while it
trains; the rerun of the same command continues the hidden build store it left behind,
keeping ingest and preprocessing byte for byte.  A build of another input, of other ingest
options or of an input changed since is never continued, and a changed prep config redoes
preprocessing and everything after it.

A 16 x 16 scan, 64 px detector, 1000 e- (as ``tests/test_faults.py``).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from tree_digest import tree_digest

from ccstae_hpc.core.config import AnalyzeConfig, MapConfig, ModelConfig, SimConfig, TrainConfig
from ccstae_hpc.sim.simulate import save_simulation
from ccstae_hpc.stages import resume
from ccstae_hpc.stages import store as store_mod
from ccstae_hpc.stages.ingest import IngestConfig, ingest
from ccstae_hpc.stages.prep import PrepConfig, preprocess_store
from ccstae_hpc.stages.run import run_store

CCSTAE = [sys.executable, "-m", "ccstae_hpc.cli"]
# seconds a child gets to reach a state the test waits for (two shared cores, torch import)
WAIT_S = 120.0
POLL_S = 0.05
EPOCHS = 2  # 8 steps of 64 patterns on this scan: the kill lands inside training
KEPT = "{}: done by an earlier run, kept"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different simulated inputs of the same shape."""
    d = tmp_path_factory.mktemp("resume")
    for name, seed in (("a", 1), ("b", 2)):
        save_simulation(d / f"{name}.npy", SimConfig(scan=(16, 16), detector=64, dose=1000,
                                                     seed=seed))
    return {"a": d / "a.npy", "b": d / "b.npy"}


def _wait_for(cond: Callable[[], bool], what: str, child: subprocess.Popen) -> None:
    t_end = time.monotonic() + WAIT_S
    while not cond():
        if child.poll() is not None:
            raise AssertionError(f"the child ended (code {child.returncode}) before {what}")
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def _builds(out: Path, pid: int) -> list[Path]:
    """The build stores process ``pid`` made beside ``out``."""
    return [p for p in out.parent.glob(f".{out.name}.tmp-*-{pid}-*") if p.is_dir()]


def _array_hashes(store: Path, group: str) -> dict[str, str]:
    """Array path -> hash of its dtype, shape and values, for ``group`` (an array, ``raw``)
    or every array below it."""
    g = zarr.open_group(str(store), mode="r", zarr_format=3, use_consolidated=False)[group]
    members = [(group, g)] if isinstance(g, zarr.Array) else g.members(max_depth=None)
    out = {}
    for name, node in members:
        if isinstance(node, zarr.Array):
            a = np.ascontiguousarray(node[...])
            out[name] = hashlib.sha256(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()
    return out


def _mtimes(store: Path, group: str) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_mtime_ns
            for p in sorted((store / group).rglob("*")) if p.is_file()}


def _dead_build(out: Path) -> Path:
    """A build-store path beside ``out`` named after a process that has ended."""
    code = ("import sys; from pathlib import Path; from ccstae_hpc.stages.store import sibling; "
            "print(sibling(Path(sys.argv[1]), 'tmp'))")
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                       check=True, timeout=WAIT_S)
    return Path(r.stdout.strip())


def _ingested(build: Path, npy: Path, options: dict | None = None) -> str:
    """Ingest ``npy`` into ``build`` marked as a run marks it; returns the key."""
    cfg = resume.ingest_config(npy, options or resume.ingest_options())
    key = resume.stage_key(build, "ingest", cfg)
    resume.run_marked(build, "ingest", key, lambda: ingest(npy, build), {"input": cfg["input"]})
    return key


@pytest.mark.timeout(600)
def test_a_killed_direct_run_is_continued_at_its_last_finished_stage(
        inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    argv = [*CCSTAE, "run", str(inputs["a"]), "--out", str(out), "--engine", "direct",
            "--epochs", str(EPOCHS)]
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        # prep is marked before training starts: model.partial means "training"
        _wait_for(lambda: any((p / "model.partial").exists() for p in _builds(out, child.pid)),
                  "training", child)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    [build] = _builds(out, child.pid)
    assert store_mod.group_state(build, "model") == "absent"  # killed before it finished
    kept = {g: (tree_digest(build / g), _array_hashes(build, g), _mtimes(build, g))
            for g in ("raw", "prep")}
    assert kept["raw"][1] and kept["prep"][1]

    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT_S * 3)
    rerun_s = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert f"continuing the run that was killed ({build.name})" in r.stdout, r.stdout
    for name in ("ingest", "preprocess"):
        assert KEPT.format(name) in r.stdout, r.stdout
    for name in ("train", "map", "analyze"):  # not finished by the killed run: done now
        assert KEPT.format(name) not in r.stdout and f"  {name}: " in r.stdout, r.stdout
    for g, (files, arrays, mtimes) in kept.items():
        assert tree_digest(out / g) == files, g  # byte for byte, marker included
        assert _array_hashes(out, g) == arrays, g
        assert _mtimes(out, g) == mtimes, g  # kept, not rewritten with the same bytes
    # the final store is complete, and every stage is marked with the key these configs give
    for g in store_mod.STAGE_GROUPS:
        assert store_mod.group_state(out, g) == "complete", g
    configs = {"ingest": resume.ingest_config(inputs["a"], resume.ingest_options()),
               "prep": PrepConfig().to_dict(),
               "train": resume.train_config(ModelConfig(), TrainConfig(epochs=EPOCHS)),
               "map": MapConfig().to_dict(), "analyze": AnalyzeConfig().to_dict()}
    for stage, cfg in configs.items():
        assert resume.is_done(out, stage, resume.stage_key(out, stage, cfg)), stage
    model = zarr.open_group(str(out / "model"), mode="r", use_consolidated=False).attrs
    assert model["steps_run"] == 4 * EPOCHS  # 256 patterns, batches of 64
    exx = store_mod.open_strain(out)["exx"].values
    assert exx.shape == (16, 16) and np.isfinite(exx).mean() > 0.5
    # nothing is left beside the store: no build, no lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]
    print(f"rerun after the kill: {rerun_s:.1f} s")


def test_only_a_build_of_this_input_and_options_is_continued(inputs: dict[str, Path],
                                                             tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    build = _dead_build(out)
    _ingested(build, inputs["a"])
    assert resume.resumable_build(out, inputs["a"]) == build  # the control
    # the flows' options of a plain ingest are the same: either engine continues the other's
    from flows.params import IngestOptions

    assert resume.ingest_options() == IngestOptions().identity()
    opts = {"config": IngestConfig(clevel=3), "scan_shape": (16, 16)}
    assert resume.ingest_options(**opts) == IngestOptions(**opts).identity()
    # another input, other ingest options: never continued
    assert resume.resumable_build(out, inputs["b"]) is None
    assert resume.resumable_build(out, inputs["a"],
                                  resume.ingest_options(IngestConfig(clevel=3))) is None
    # a live process's build (a concurrent run) is never taken
    live = store_mod.sibling(out, "tmp")
    os.rename(build, live)
    assert resume.resumable_build(out, inputs["a"]) is None
    os.rename(live, build)
    # the input rewritten since (same path, new mtime): not continued either
    copy = tmp_path / "a.npy"
    copy.write_bytes(inputs["a"].read_bytes())
    other = _dead_build(out)
    _ingested(other, copy)
    assert resume.resumable_build(out, copy) == other
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert resume.resumable_build(out, copy) is None
    # and continue_build of another input starts afresh and removes both stale builds
    lines: list[str] = []
    tmp = resume.continue_build(out, inputs["b"], log=lines.append)
    assert not tmp.exists() and not build.exists() and not other.exists()
    assert not any("continuing" in s for s in lines)
    assert sum(s.startswith("removed ") for s in lines) == 2, lines


@pytest.mark.timeout(600)
def test_a_changed_prep_config_redoes_prep_and_what_follows(inputs: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """A killed run's ingest and prep (default PrepConfig); the rerun with another prep
    config keeps the ingest and redoes everything from preprocessing on."""
    out = tmp_path / "o.zarr"
    build = _dead_build(out)
    _ingested(build, inputs["a"])
    old = PrepConfig()
    key = resume.stage_key(build, "prep", old.to_dict())
    resume.run_marked(build, "prep", key, lambda: preprocess_store(build, old))
    raw = (tree_digest(build / "raw"), _mtimes(build, "raw"))
    new = PrepConfig(max_train=128)
    assert new != old
    lines: list[str] = []
    run_store(inputs["a"], out, prep_cfg=new, train_cfg=TrainConfig(epochs=1, batch_size=64),
              progress=False, log=lines.append)
    text = "\n".join(lines)
    assert f"continuing the run that was killed ({build.name})" in text, text
    assert KEPT.format("ingest") in text and KEPT.format("preprocess") not in text, text
    assert (tree_digest(out / "raw"), _mtimes(out, "raw")) == raw
    prep = zarr.open_group(str(out / "prep"), mode="r", use_consolidated=False).attrs
    assert prep["config"] == new.to_dict() and prep["n_train"] == 128
    model = zarr.open_group(str(out / "model"), mode="r", use_consolidated=False).attrs
    assert model["steps_run"] == 2  # trained on the new prep: 128 patterns, batches of 64
    for g in store_mod.STAGE_GROUPS:
        assert store_mod.group_state(out, g) == "complete", g
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]
