"""One writer per store: a lock file beside it, safe on shared (NFS-like) file systems.

``STORE.zarr`` is locked by ``.STORE.zarr.lock`` in the same directory, a small JSON file
``{host, pid, started, command, token}``.  It is made complete under a unique name and then
hard-linked to the lock's name: ``link`` fails atomically when the lock exists, on local and
NFS file systems alike (``flock``/``fcntl`` locks are not reliable there), and a reader never
sees a half-written lock.  Where hard links are not supported, ``O_CREAT | O_EXCL`` is used.

A second process gets :class:`StoreLockedError` naming the holder.  A lock is **stale**,
and taken over with a note, when

* its holder ran on this host and no process with its pid exists (killed, crashed), or
* it was made on another host more than :data:`FOREIGN_STALE_AGE_S` (7 days) ago: a pid of
  another host cannot be checked from here, so such a lock is otherwise left alone (remove
  it by hand once that run is known to be gone).

The holding process may take the lock again (nested :func:`store_lock`, e.g. a stage's
commit inside ``ccstae run``), and so may its descendants on the same host (the worker
processes of a local Dask cluster it started); it is released when the outermost holder
exits.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ccstae_hpc.stages.readers import IngestError

__all__ = ["FOREIGN_STALE_AGE_S", "StoreLockedError", "lock_path", "read_lock", "store_lock"]

# a lock made on another host is taken over only after this long: its pid cannot be checked
# from here, and one run (training on a large scan) may last days
FOREIGN_STALE_AGE_S = 7 * 24 * 3600.0
# a takeover in progress (the ".break" file) older than this was left by a killed process
_BREAK_STALE_S = 60.0
# attempts at taking a stale lock before giving up (others may be taking it at the same time)
_ATTEMPTS = 5
_RETRY_S = 0.05
# parent processes looked at for a lock held by an ancestor (a Dask worker's nanny, its client)
_MAX_ANCESTRY = 8

# locks this process holds: lock path -> nesting depth
_held: dict[Path, int] = {}
_held_guard = threading.Lock()


class StoreLockedError(IngestError):
    """Another process is writing the store (an :class:`IngestError`, hence a ValueError:
    the CLI reports it as a user error, exit code 2)."""


def lock_path(store: str | os.PathLike[str]) -> Path:
    """The lock file of ``store``: ``.NAME.lock`` in the same directory."""
    p = Path(os.path.abspath(store))
    return p.with_name(f".{p.name}.lock")


def _host() -> str:
    return socket.gethostname() or "unknown"


def _command() -> str:
    argv = list(sys.argv) or ["python"]
    # `python -m ccstae_hpc.cli ...` is the `ccstae` command too
    name = os.path.basename(argv[0])
    argv[0] = "ccstae" if Path(argv[0]).parts[-2:] == ("ccstae_hpc", "cli.py") else name or "python"
    return shlex.join(argv)


def read_lock(store: str | os.PathLike[str]) -> dict | None:
    """The holder of ``store``'s lock (its JSON), None when unlocked; ``{}`` when unreadable."""
    return _read(lock_path(store))


def _read(lock: Path) -> dict | None:
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process; anything else: cannot tell
        return True
    return True


def _ancestors() -> set[int]:
    """Pids of this process's ancestors (Linux ``/proc``; just the parent elsewhere)."""
    out, pid = set(), os.getppid()
    for _ in range(_MAX_ANCESTRY):
        if pid <= 1:
            break
        out.add(pid)
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _stale(info: dict, lock: Path) -> str | None:
    """Why the lock ``info`` is stale, or None when its holder may still run."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return "gone"
    if not info and age > _BREAK_STALE_S:  # a holder killed while writing it (O_EXCL)
        return "it is empty or unreadable"
    if info.get("host") == _host():
        pid = info.get("pid")
        if isinstance(pid, int) and not _pid_alive(pid):
            return f"its process {pid} on this host is gone"
        if not isinstance(pid, int) and age > _BREAK_STALE_S:
            return "it names no process"
        return None
    if age > FOREIGN_STALE_AGE_S:
        return f"it was made on {info.get('host')} {age / 3600:.0f} h ago"
    return None


def _create(lock: Path, info: dict) -> bool:
    """Make ``lock`` holding ``info`` if it does not exist; False when it does."""
    text = json.dumps(info)
    tmp = lock.with_name(f"{lock.name}.{info['token']}")
    tmp.write_text(text)
    try:
        try:
            os.link(tmp, lock)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            # NFS may report a retransmitted link that succeeded as failed: the count tells
            if os.stat(tmp).st_nlink == 2:
                return True
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        # no hard links here: exclusive creation (atomic on local file systems and NFSv3+)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _break(lock: Path, seen: dict, why: str, log: Callable[[str], None] | None) -> None:
    """Remove the stale ``lock`` (whose content was ``seen``); only one process at a time."""
    brk = lock.with_name(lock.name + ".break")
    try:
        fd = os.open(brk, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - brk.stat().st_mtime > _BREAK_STALE_S:
                brk.unlink()  # left by a process killed while taking over
        return  # someone else is taking it over: try again
    os.close(fd)
    try:
        # still the stale lock we judged (not one taken meanwhile by another process)?
        if _read(lock) == seen:
            lock.unlink()
            if log is not None:
                log(f"took over the stale lock {lock} ({why}; it was held by "
                    f"{seen.get('command', '?')}, pid {seen.get('pid', '?')} on "
                    f"{seen.get('host', '?')})")
    except OSError:
        pass  # changed under us: judged again on the next attempt
    finally:
        brk.unlink(missing_ok=True)


def _message(store: Path, lock: Path, info: dict) -> str:
    return (f"{store} is in use by {info.get('command', 'another run')} (pid "
            f"{info.get('pid', '?')} on host {info.get('host', '?')} since "
            f"{info.get('started', '?')}). Wait for it to finish, or remove {lock} if that "
            "process is gone")


@contextlib.contextmanager
def store_lock(store: str | os.PathLike[str], what: str | None = None, *,
               log: Callable[[str], None] | None = print) -> Iterator[Path]:
    """Hold ``store``'s lock for the ``with`` block; yields the lock file's path.

    ``what`` names the holder for others (default: this process's command line).  A stale
    lock is taken over (``log`` gets a note); where the directory cannot hold a lock (read
    only), the block runs unlocked with a note.

    Raises
    ------
    StoreLockedError
        Another live process holds the lock.
    """
    store = Path(store)
    lock = lock_path(store)
    with _held_guard:
        if lock in _held:  # this process holds it already: nested
            _held[lock] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield lock
        finally:
            with _held_guard:
                _held[lock] -= 1
        return
    info = {"host": _host(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": what or _command(), "token": uuid.uuid4().hex}
    got = False
    try:
        try:
            got = _acquire(store, lock, info, log)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            if log is not None:
                log(f"cannot make the lock {lock} ({e.strerror}); {store} is not protected "
                    "against a concurrent run")
        with _held_guard:
            _held[lock] = 1
        yield lock
    finally:  # also on Ctrl-C (KeyboardInterrupt) and SystemExit
        with _held_guard:
            _held.pop(lock, None)
        if got:
            _release(lock, info)


def _acquire(store: Path, lock: Path, info: dict, log: Callable[[str], None] | None) -> bool:
    """Take the lock: True when made, False when an ancestor of this process holds it."""
    for _ in range(_ATTEMPTS):
        if _create(lock, info):
            return True
        holder = _read(lock)
        if holder is None:
            continue  # released meanwhile
        if holder.get("host") == info["host"] and holder.get("pid") in _ancestors():
            return False  # e.g. the run that started this Dask worker: its lock covers us
        why = _stale(holder, lock)
        if why is None:
            raise StoreLockedError(_message(store, lock, holder))
        if why != "gone":
            _break(lock, holder, why, log)
        time.sleep(_RETRY_S)
    holder = _read(lock) or {}
    raise StoreLockedError(_message(store, lock, holder))


def _release(lock: Path, info: dict) -> None:
    """Remove ``lock`` if it is still this holder's (never another's, e.g. after a takeover
    of a lock believed stale)."""
    with contextlib.suppress(OSError):
        if (_read(lock) or {}).get("token") == info["token"]:
            lock.unlink()
