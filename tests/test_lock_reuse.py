"""The store lock against reused pids and restarted hosts, and ``ccstae train`` holding it for
its whole run (issue 14), with real processes.

A lock names its holder by host, pid, the pid's start time and the boot id: a live process
that merely got the pid of a crashed holder, or a holder from before a reboot, does not keep
the store locked.  The store of the ``train`` tests is a 16 x 16 scan, 64 px detector,
1000 e- (256 training patterns, 4 steps an epoch), made with the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tree_digest import tree_digest

from ccstae_hpc import cli
from ccstae_hpc.stages import store as store_mod
from ccstae_hpc.stages.lock import (
    StoreLockedError,
    boot_id,
    held_lock_token,
    lock_path,
    parse_stat,
    process_start_time,
    read_lock,
    store_lock,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="start times and boot ids are read from Linux /proc")

# seconds a child gets to reach a state the test waits for (two shared cores, torch import)
WAIT_S = 120.0
POLL_S = 0.02
SLEEP = shutil.which("sleep") or "/bin/sleep"
# a command name with the characters that break a naive split of /proc/PID/stat
ODD_NAME = "x) (y z"


def _wait_for(cond: Callable[[], bool], what: str) -> None:
    t_end = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """A live process of this host that holds no lock (a `sleep`)."""
    child = subprocess.Popen([SLEEP, "600"])
    try:
        yield child
    finally:
        child.kill()
        child.wait(timeout=60)


def _write_lock(store: Path, **fields: object) -> dict:
    info = {"host": socket.gethostname(), "command": "ccstae run crashed-holder",
            "started": "2026-01-01T00:00:00+0000", "token": "t0", **fields}
    lock_path(store).write_text(json.dumps(info))
    return info


# ------------------------------------------------------------------ /proc/PID/stat parsing


def test_parse_stat_counts_fields_after_the_last_parenthesis(tmp_path: Path) -> None:
    # fields 3..24 of a made-up line: state, ppid 17, then 4..21 filler, starttime 987654
    rest = ["S", "17", *[str(100 + i) for i in range(5, 22)], "987654", "123", "456"]
    assert parse_stat(f"4242 ({ODD_NAME}) S) {' '.join(rest)}\n") == ("S", 17, 987654)
    assert parse_stat(f"4242 (plain) {' '.join(rest)}") == ("S", 17, 987654)
    for bad in ("", "4242 no parenthesis S 17", f"4242 (short) {' '.join(rest[:10])}"):
        with pytest.raises(ValueError):
            parse_stat(bad)

    # a real process whose command name holds spaces and ")": its parent is this process,
    # and it started between a process started before it and one started after it
    odd = tmp_path / ODD_NAME
    shutil.copy(SLEEP, odd)
    kids = [subprocess.Popen([exe, "600"]) for exe in (SLEEP, str(odd), SLEEP)]
    try:
        text = Path(f"/proc/{kids[1].pid}/stat").read_text()
        assert f"({ODD_NAME})" in text  # the awkward case is the one tested
        state, ppid, start = parse_stat(text)
        assert ppid == os.getpid() and state in "RSD"
        starts = [process_start_time(k.pid) for k in kids]
        assert starts[1] == start
        assert starts[0] <= starts[1] <= starts[2]
        # this process started before its children; a pid that does not exist has no start
        assert process_start_time(os.getpid()) <= starts[0]
    finally:
        for k in kids:
            k.kill()
            k.wait(timeout=60)
    assert process_start_time(kids[1].pid) is None


# ------------------------------------------------------------------ stale-lock judgement


def test_a_reused_pid_or_a_restarted_host_does_not_keep_the_lock(
        tmp_path: Path, sleeper: subprocess.Popen) -> None:
    out = tmp_path / "a.zarr"
    pid, start, boot = sleeper.pid, process_start_time(sleeper.pid), boot_id()
    assert start is not None and boot is not None
    notes: list[str] = []

    # the holder crashed and the system gave its pid to the sleeper: other start time
    _write_lock(out, pid=pid, pid_start=start - 1, boot_id=boot)
    with store_lock(out, "second", log=notes.append) as lk:
        assert json.loads(lk.read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()
    assert len(notes) == 1 and f"pid {pid}" in notes[0] and "another process" in notes[0]
    assert "crashed-holder" in notes[0]

    # the same process (pid and start time): a live holder, refused, naming it
    held = _write_lock(out, pid=pid, pid_start=start, boot_id=boot)
    with pytest.raises(StoreLockedError) as e, store_lock(out, log=notes.append):
        pass
    for part in (str(out), "crashed-holder", f"pid {pid}", f"host {socket.gethostname()}",
                 held["started"], str(lock_path(out))):
        assert part in str(e.value)
    assert read_lock(out) == held and len(notes) == 1

    # a lock written before start times were recorded: the pid alone decides, as before
    old = _write_lock(out, pid=pid)
    with pytest.raises(StoreLockedError, match=f"pid {pid}"), store_lock(out):
        pass
    assert read_lock(out) == old

    # taken before the host was restarted: whatever runs under that pid now is not it
    _write_lock(out, pid=pid, pid_start=start, boot_id="another-boot")
    with store_lock(out, log=notes.append):
        pass
    assert len(notes) == 2 and "restarted" in notes[1] and f"process {pid}" in notes[1]
    assert not list(tmp_path.iterdir())  # no lock or temporary file left


def test_a_zombie_holder_does_not_keep_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "a.zarr"
    child = subprocess.Popen([SLEEP, "600"])
    start = process_start_time(child.pid)
    os.kill(child.pid, signal.SIGKILL)  # dead, but not reaped: its pid still exists
    try:
        _wait_for(lambda: parse_stat(Path(f"/proc/{child.pid}/stat").read_text())[0] == "Z",
                  "the child to be a zombie")
        _write_lock(out, pid=child.pid, pid_start=start, boot_id=boot_id())
        notes: list[str] = []
        with store_lock(out, log=notes.append):
            pass
        assert len(notes) == 1 and "zombie" in notes[0] and f"process {child.pid}" in notes[0]
    finally:
        child.wait(timeout=60)


# a child that takes the lock (joining the token given) and says what it saw
_TAKE = ("import json, sys; from ccstae_hpc.stages.lock import read_lock, store_lock\n"
         "store, join = sys.argv[1], sys.argv[2] or None\n"
         "try:\n"
         "    with store_lock(store, log=lambda s: print('note:', s), join=join):\n"
         "        print('ran under', json.dumps(read_lock(store)))\n"
         "except ValueError as e:\n"
         "    print('refused:', e)\n")


def _take(store: Path, join: str = "") -> str:
    """What a child of this process saw taking ``store``'s lock."""
    kid = subprocess.run([sys.executable, "-c", _TAKE, str(store), join], capture_output=True,
                         text=True, timeout=WAIT_S)
    assert kid.returncode == 0, kid.stderr
    return kid.stdout


def test_an_ancestor_holder_is_matched_by_pid_and_start_time(tmp_path: Path) -> None:
    out = tmp_path / "a.zarr"
    me, start = os.getpid(), process_start_time(os.getpid())
    # a lock of this very process: its child (a Dask worker, say) runs under it
    mine = _write_lock(out, pid=me, pid_start=start, boot_id=boot_id())
    seen = _take(out)
    assert seen.startswith("ran under") and json.loads(seen.split(" ", 2)[2]) == mine
    assert read_lock(out) == mine  # left for its holder
    # a crashed holder's lock whose pid the system gave to this process: the child is no
    # descendant of that holder, and the lock is stale
    _write_lock(out, pid=me, pid_start=start - 1, boot_id=boot_id())
    seen = _take(out)
    assert "another process" in seen.splitlines()[0]
    assert json.loads(seen.splitlines()[1].split(" ", 2)[2])["pid"] != me
    assert not lock_path(out).exists()  # released by the child that took it


def test_a_process_handed_the_token_joins_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "a.zarr"
    result = tmp_path / "result.txt"
    # the workers of an external Dask scheduler are no descendants of the holder: here a
    # grandchild whose parent (sh) exits first, so that it is re-parented away from us
    orphan = ('"$0" -c "import os, sys, time\n'
              'while os.getppid() == int(sys.argv[3]): time.sleep(0.01)\n'
              'exec(sys.argv[4])" "$1" "$2" $$ "$3" > "$4" 2>&1 &')

    def orphan_take(join: str) -> str:
        result.unlink(missing_ok=True)
        subprocess.run(["sh", "-c", orphan, sys.executable, str(out), join, _TAKE,
                        str(result)], check=True, timeout=WAIT_S)
        _wait_for(lambda: result.exists() and result.read_text().endswith("\n"),
                  "the orphan's answer")
        return result.read_text()

    assert held_lock_token(out) is None
    with store_lock(out, "holder") as lk:
        token = held_lock_token(out)
        assert token == json.loads(lk.read_text())["token"]
        with store_lock(out):  # nested: the same lock, the same token
            assert held_lock_token(out) == token
        assert orphan_take("").startswith("refused:")
        assert orphan_take("not-the-token").startswith("refused:")
        joined = orphan_take(token)
        assert joined.startswith("ran under") and f'"token": "{token}"' in joined
        assert json.loads(lk.read_text())["token"] == token  # still ours
    assert held_lock_token(out) is None and not lock_path(out).exists()


# ------------------------------------------------------------------ `ccstae train`


@pytest.fixture(scope="module")
def prep_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A preprocessed store made with the CLI."""
    d = tmp_path_factory.mktemp("lock_train")
    npy, store = d / "s.npy", d / "s.zarr"
    assert cli.main(["simulate", str(npy), "--scan", "16", "16", "--detector", "64",
                     "--dose", "1000", "--seed", "1"]) == 0
    assert cli.main(["ingest", str(npy), str(store)]) == 0
    assert cli.main(["preprocess", str(store), "--output-size", "64"]) == 0
    return store


# the fewest steps: one epoch of 4 batches, no intermediate checkpoint
TRAIN_ARGS = ["--epochs", "1", "--batch-size", "64", "--checkpoint-every", "0", "--quiet"]

# `ccstae train STORE ...` that waits for a file to exist before training (with the lock
# taken, as the command takes it before its ranks start), and reports the lock after it
_GATED_TRAIN = """
import json, os, sys, time
from pathlib import Path
from ccstae_hpc import cli
from ccstae_hpc.stages import train
from ccstae_hpc.stages.lock import read_lock

store, go = sys.argv[1], Path(sys.argv[2])
real = train.train_store

def gated(*args, **kwargs):
    print("before", json.dumps(read_lock(store)), flush=True)
    while not go.exists():
        time.sleep(0.02)
    hist = real(*args, **kwargs)
    print("after", json.dumps(read_lock(store)), flush=True)
    return hist

train.train_store = gated
sys.argv = ["ccstae", "train", *sys.argv[1:2], *sys.argv[3:]]
sys.exit(cli.main())
"""


def test_train_holds_the_lock_from_start_to_commit(
        prep_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(prep_store, store)
    go = tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c", _GATED_TRAIN, str(store), str(go),
                              *TRAIN_ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        line = child.stdout.readline()
        assert line.startswith("before "), (line, child.stderr.read() if child.poll() else "")
        before = json.loads(line.split(" ", 1)[1])
        assert before["pid"] == child.pid and before["command"].startswith("ccstae train")
        assert before["pid_start"] == process_start_time(child.pid)
        # a second train and a map on the store are refused at their start, naming it
        digest = tree_digest(store)
        for argv in (["train", str(store), *TRAIN_ARGS],
                     ["map", str(store), "--method", "com", "--quiet"]):
            assert cli.main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"in use by ccstae train {store}" in err[0], err
            assert f"pid {child.pid}" in err[0]
        assert tree_digest(store) == digest
        go.touch()
        out, err = child.communicate(timeout=WAIT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=60)
    assert child.returncode == 0, err
    # the same lock all along: still held once training and its commit are done
    after = json.loads(out.splitlines()[0].split(" ", 1)[1])
    assert after == before
    assert "trained:" in out and "4 steps" in out
    assert store_mod.group_state(store, "model") == "complete"
    assert not lock_path(store).exists()


def test_dask_ranks_of_an_external_scheduler_commit_under_the_lock(
        prep_store: Path, tmp_path: Path) -> None:
    """``ccstae train --scheduler``: rank 0 runs in a worker that is no descendant of the
    command holding the lock (here, a worker of this test process's cluster)."""
    from distributed import LocalCluster

    store = tmp_path / "s.zarr"
    shutil.copytree(prep_store, store)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        run = subprocess.run([sys.executable, "-m", "ccstae_hpc.cli", "train", str(store),
                              "--scheduler", cluster.scheduler_address, *TRAIN_ARGS],
                             capture_output=True, text=True, timeout=WAIT_S)
    assert run.returncode == 0, run.stderr
    assert "trained:" in run.stdout
    assert store_mod.group_state(store, "model") == "complete"
    assert not lock_path(store).exists()
