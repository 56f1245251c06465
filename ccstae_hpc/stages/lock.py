"""One writer per store: a lock file beside it, safe on shared (NFS-like) file systems.

``STORE.zarr`` is locked by ``.STORE.zarr.lock`` in the same directory, a small JSON file
``{host, pid, started, command, token}``.  It is made complete under a unique name and then
hard-linked to the lock's name: ``link`` fails atomically when the lock exists, on local and
NFS file systems alike (``flock``/``fcntl`` locks are not reliable there), and a reader never
sees a half-written lock.  Where hard links are not supported, ``O_CREAT | O_EXCL`` is used.

The lock also records, where Linux ``/proc`` is readable, the holder's process start time
(``pid_start``: field 22 of ``/proc/PID/stat``, clock ticks since boot) and the host's boot
id (``boot_id``): together with the pid they name one process, whereas a pid alone is
reused by the system once its process is gone.

A second process gets :class:`StoreLockedError` naming the holder.  A lock is **stale**,
and taken over with a note, when

* its holder ran on this host and is gone: no process has its pid, that process is a zombie
  (dead, not yet reaped), the host was restarted since (another boot id), or the pid now
  belongs to another process (another start time).  Without ``/proc`` (macOS), and for
  locks written before these fields existed, only the pid is checked; or
* it was made on another host more than :data:`FOREIGN_STALE_AGE_S` (7 days) ago: a pid of
  another host cannot be checked from here, so such a lock is otherwise left alone (remove
  it by hand once that run is known to be gone).

The holding process may take the lock again (nested :func:`store_lock`, e.g. a stage's
commit inside ``ccstae run``), and so may its descendants on the same host (the worker
processes of a local Dask cluster it started; an ancestor is matched by pid and start
time), and processes it hands its token to (``store_lock(..., join=held_lock_token(...))``:
the workers of an external Dask scheduler, which are no descendants).  It is released when
the outermost holder exits.
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

__all__ = ["FOREIGN_STALE_AGE_S", "StoreLockedError", "boot_id", "held_lock_token", "lock_path",
           "parse_stat", "process_start_time", "read_lock", "store_lock"]

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

# /proc/PID/stat after the ")" closing the command name: field 3 (state) is index 0, so
# field N is index N - 3
_STAT_FIRST_FIELD = 3
_STAT_PPID = 4
_STAT_STARTTIME = 22
# process states of a process that has ended (zombie: not yet reaped by its parent; dead)
_ENDED_STATES = frozenset("ZX")
_BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")

# locks this process holds: lock path -> nesting depth
_held: dict[Path, int] = {}
# ... and the token of the lock each runs under (its own, an ancestor's or a joined one)
_held_tokens: dict[Path, str] = {}
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


def parse_stat(text: str) -> tuple[str, int, int]:
    """State, parent pid and start time (clock ticks since boot) from the text of a Linux
    ``/proc/PID/stat``.

    The command name (field 2, in parentheses) may hold spaces and parentheses: the fields
    are counted after the last ``)``.  ValueError when ``text`` is not such a line.
    """
    head, sep, tail = text.rpartition(")")
    fields = tail.split()
    if not sep or "(" not in head or len(fields) <= _STAT_STARTTIME - _STAT_FIRST_FIELD:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    return (fields[0], int(fields[_STAT_PPID - _STAT_FIRST_FIELD]),
            int(fields[_STAT_STARTTIME - _STAT_FIRST_FIELD]))


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """:func:`parse_stat` of process ``pid``; None where it cannot be read (no such process,
    no ``/proc``: macOS)."""
    try:
        return parse_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError):
        return None


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux); None where unknown
    (no such process, no ``/proc``)."""
    st = _proc_stat(pid)
    return None if st is None else st[2]


def boot_id() -> str | None:
    """This host's boot id (Linux; a new one at every boot), None where unknown."""
    try:
        return _BOOT_ID_FILE.read_text().strip() or None
    except OSError:
        return None


def _ancestors() -> dict[int, int | None]:
    """This process's ancestors: pid -> start time (Linux ``/proc``; just the parent, start
    time None, elsewhere)."""
    out: dict[int, int | None] = {}
    pid = os.getppid()
    for _ in range(_MAX_ANCESTRY):
        if pid <= 1:
            break
        st = _proc_stat(pid)
        out[pid] = None if st is None else st[2]
        if st is None:
            break
        pid = st[1]
    return out


def _same_process(info: dict, pid: int, start: int | None) -> bool:
    """Whether process ``pid`` of this host, started at ``start`` (None: unknown), is the
    holder that wrote ``info``.  A field missing on either side (an old lock, no ``/proc``)
    is not held against it: the pid decides, as before these fields existed."""
    if info.get("pid") != pid:
        return False
    boot, now = info.get("boot_id"), boot_id()
    if isinstance(boot, str) and now is not None and boot != now:
        return False
    recorded = info.get("pid_start")
    return not (isinstance(recorded, int) and start is not None and recorded != start)


def _holder_gone(info: dict, pid: int) -> str | None:
    """Why the holder ``pid`` of this host named by ``info`` is gone, or None if it may run."""
    if not _pid_alive(pid):
        return f"its process {pid} on this host is gone"
    st = _proc_stat(pid)
    if st is not None and st[0] in _ENDED_STATES:
        return f"its process {pid} on this host has ended (a zombie not yet reaped)"
    boot, now = info.get("boot_id"), boot_id()
    if isinstance(boot, str) and now is not None and boot != now:
        return f"this host was restarted since it was taken by process {pid}"
    if st is not None and not _same_process(info, pid, st[2]):
        return (f"its process {pid} on this host is gone: that pid now belongs to another "
                f"process (started at tick {st[2]}, not {info.get('pid_start')})")
    return None


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
        if isinstance(pid, int):
            return _holder_gone(info, pid)
        if age > _BREAK_STALE_S:
            return "it names no process"
        return None
    if age > FOREIGN_STALE_AGE_S:
        return f"it was made on {info.get('host')} {age / 3600:.0f} h ago"
    return None


def _create(lock: Path, info: dict) -> bool:
    """Make ``lock`` holding ``info`` if it does not exist; False when it does."""
    text = json.dumps(info)
    tmp = lock.with_name(f"{lock.name}.{info['token']}")
    try:
        tmp.write_text(text)  # inside the try: a failed write (ENOSPC) leaves no empty file
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
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
        except BaseException:
            lock.unlink(missing_ok=True)  # ours and empty: not a holder being born
            raise
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


def held_lock_token(store: str | os.PathLike[str]) -> str | None:
    """The token of the lock on ``store`` under which this process runs inside
    :func:`store_lock` (its own, an ancestor's or a joined one); None outside, or when the
    store could not be locked.  Hand it to a process that is no descendant of this one and
    works for it (``store_lock(store, join=token)``)."""
    with _held_guard:
        return _held_tokens.get(lock_path(store))


@contextlib.contextmanager
def store_lock(store: str | os.PathLike[str], what: str | None = None, *,
               log: Callable[[str], None] | None = print,
               join: str | None = None) -> Iterator[Path]:
    """Hold ``store``'s lock for the ``with`` block; yields the lock file's path.

    ``what`` names the holder for others (default: this process's command line).  A stale
    lock is taken over (``log`` gets a note); where the directory cannot hold a lock (read
    only), the block runs unlocked with a note.  ``join``: the token of a lock held by the
    process this one works for (:func:`held_lock_token`); while the lock holds that token,
    the block runs under it, else the lock is taken as usual.

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
    # the process, not just its pid (which is reused once it is gone): see _same_process
    extra = {"pid_start": process_start_time(os.getpid()), "boot_id": boot_id()}
    info.update({k: v for k, v in extra.items() if v is not None})
    got = False
    try:
        token: str | None = None
        try:
            got, token = _acquire(store, lock, info, log, join)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            if log is not None:
                log(f"cannot make the lock {lock} ({e.strerror}); {store} is not protected "
                    "against a concurrent run")
        with _held_guard:
            _held[lock] = 1
            if token is not None:
                _held_tokens[lock] = token
        yield lock
    finally:  # also on Ctrl-C (KeyboardInterrupt) and SystemExit
        with _held_guard:
            _held.pop(lock, None)
            _held_tokens.pop(lock, None)
        if got:
            _release(lock, info)


def _covers_us(holder: dict, host: str, join: str | None) -> bool:
    """Whether ``holder``'s lock covers this process: it was handed its token (``join``), or
    the holder is an ancestor on this host (e.g. the run that started this Dask worker),
    the same process by pid and start time (not a reused pid)."""
    if join is not None and holder.get("token") == join:
        return True
    if holder.get("host") != host:
        return False
    return any(_same_process(holder, pid, start) for pid, start in _ancestors().items())


def _acquire(store: Path, lock: Path, info: dict, log: Callable[[str], None] | None,
             join: str | None) -> tuple[bool, str | None]:
    """Take the lock: ``(True, our token)`` when made, ``(False, its token)`` when a lock
    that covers this process (:func:`_covers_us`) holds it."""
    for _ in range(_ATTEMPTS):
        if _create(lock, info):
            return True, info["token"]
        holder = _read(lock)
        if holder is None:
            continue  # released meanwhile
        if _covers_us(holder, info["host"], join):
            token = holder.get("token")
            return False, token if isinstance(token, str) else None
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
