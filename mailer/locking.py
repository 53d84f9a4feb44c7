"""Take the lock file, and break it first if the process that holds it is dead.

``lockfile.FileLock`` is lockfile's ``LinkLockFile`` on every system with
hard links. It takes ``<path>.lock`` by hard-linking to it a file of the
holder's own, ``<host>-<thread>.<pid><hash of path>``, in the same
directory, and it never asks whether that holder is still running. A
process killed outright (``SIGKILL``, the out-of-memory killer, a power
cut) leaves the link behind, and every later pass would find the lock taken
and send nothing, forever.

``acquire`` takes the lock as lockfile does, and first breaks it if its
holder is dead. It errs towards leaving a lock alone: it breaks one only
when the holder is identified as a process of this host (by host name) that
certainly no longer runs. A lock held by a live process, by another host,
or by a holder it cannot identify, is left as it is.

lockfile writes the pid and the hash with nothing between them, so a file
name can often be read as more than one pid. A lock is then broken only if
none of them is running. To spare a later pass that guess, the process that
takes the lock writes its pid into it.
"""

import contextlib
import functools
import hashlib
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lockfile
from lockfile.linklockfile import LinkLockFile

__all__ = ["LockState", "acquire", "describe_failure", "held_for", "lock_state", "process_name", "release"]

logger = logging.getLogger(__name__)

# The bounds of the two numbers in a holder's file name: a pid has at most
# 7 digits (Linux allows up to 2**22) and the hash fits in 64 bits. They
# limit how many ways a name can be read.
MAX_PID = 2**22
MAX_HASH = 2**63

# How much later than the lock a process may seem to have started and still
# be taken for its holder. The lock's time and the process's are measured
# by different clocks, and wrongly thinking the holder dead would break a
# live lock; a pid reused within these seconds goes unnoticed.
CLOCK_SLACK = 2.0

# After the host name: "-<thread id in hex>.<pid><hash>", the hash perhaps
# negative. ("<host>.<pid><hash>", without the thread, is a lock that
# FileLock(path) never makes: it is not read, so it is never broken.)
HOLDER_NAME = re.compile(r"-[0-9a-f]{1,8}\.([0-9]+)(-[0-9]+)?")

# What the holder writes into the lock: its pid and a newline, which tells
# a complete write from one still under way.
NOTED_PID = re.compile(rb"([1-9][0-9]{0,6})\n")

# A holder's whole file name, whatever its host: "<host>-<thread>.<pid><hash>".
HOLDER_FILE_NAME = re.compile(r"(.+?)(" + HOLDER_NAME.pattern + ")")


def acquire(lock: Any, timeout: float | None) -> tuple[int, ...]:
    """Call ``lock.acquire(timeout)``, after breaking the lock if its holder is dead.

    Return the pids the dead holder may have had (several when its file name
    does not tell which; none of them runs), or () if no lock was broken.

    ``timeout`` is lockfile's: None waits as long as it takes, a positive
    number that many seconds, anything else not at all. When the lock stays
    held, lockfile's ``AlreadyLocked`` or ``LockTimeout`` is raised.

    The lock is looked at before waiting, since lockfile would wait for a
    dead holder until the timeout (with None, forever), and once more if the
    wait fails, since the holder may have died meanwhile. Only a
    ``LinkLockFile`` on a POSIX system is looked at: any other lock, such as
    the mock of a test, is only asked to ``acquire``.
    """
    if not _can_break(lock):
        lock.acquire(timeout)
        return ()
    dead = _break_if_stale(lock.lock_file)
    try:
        lock.acquire(timeout)
    except (lockfile.AlreadyLocked, lockfile.LockTimeout):
        dead = _break_if_stale(lock.lock_file)
        if dead is None:
            raise
        lock.acquire(timeout)
    _note_pid(lock)
    return dead or ()


def process_name() -> str:
    """Name this process so that another process of the same host can later tell whether it is still running.

    ``<pid>@<namespace>``: the namespace stands for the pid namespace of this
    boot of this host (containers that share a host name have their own),
    so that a pid is only ever looked up where it means the same process.
    """
    return f"{os.getpid()}@{_pid_namespace()}"


@functools.cache
def _pid_namespace() -> str:
    """A short name for the pid namespace of this boot of this host."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
        parts.append(file.read().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def describe_failure(path: str, exc: BaseException) -> str:
    """Say why the lock file for ``path`` could not be made, and what to change."""
    lock_file = os.path.abspath(path) + ".lock"
    directory = os.path.dirname(lock_file)
    hint = "MAILER_LOCK_PATH must name a file in a directory this process can write to."
    if not os.path.isdir(directory):
        return f"cannot create the lock file {lock_file}: the directory {directory} does not exist. {hint}"
    return f"cannot create the lock file {lock_file} ({type(exc).__name__}: {exc}). {hint}"


def held_for(lock: Any) -> float | None:
    """Return how many seconds ago the lock file of ``lock`` was taken, or None if that cannot be told."""
    if not _can_break(lock):
        return None
    try:
        return time.time() - os.lstat(lock.lock_file).st_mtime
    except OSError:
        return None


def release(lock: Any) -> None:
    """Release ``lock``: for lockfile's ``LinkLockFile``, the lock first and the holder's own file after it.

    lockfile removes them the other way round: a process killed between the
    two (the out-of-memory killer, a power cut) leaves a lock without its
    holder's file, which no later pass can tell is dead, and the queue stops
    until someone deletes it. In this order it leaves at worst a holder's
    file without a lock, which holds nothing.
    """
    if not _can_break(lock):
        lock.release()
        return
    # Its own: linked to this process's file, or, that file gone (a cleaner of temporary files), still
    # holding the pid this process wrote into it.
    if lock.i_am_locking() or _noted_pid(lock.lock_file) == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock.lock_file)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock.unique_name)
        return
    # Broken while this process held it (by hand, say), and perhaps taken since by another process: that
    # lock is not this process's to remove (lockfile would remove it), only its own file is.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock.unique_name)
    logger.warning(
        "the lock %s was removed while this process held it; another process may hold it now", lock.lock_file
    )


def _can_break(lock: Any) -> bool:
    # The exact class: a subclass may name its files otherwise, and a mock
    # made with spec=LinkLockFile passes isinstance().
    return os.name == "posix" and type(lock) is LinkLockFile


def _note_pid(lock: Any) -> None:
    """Write this process's pid into the lock it has just taken, so that nobody has to read it from the file name."""
    with contextlib.suppress(OSError), open(lock.unique_name, "w", encoding="ascii") as file:
        file.write(f"{os.getpid()}\n")


@dataclass(frozen=True)
class Holder:
    """The holder of a lock, as its file tells: the file, and the pids it may be."""

    file: str
    pids: tuple[int, ...]


def _break_if_stale(lock_file: str) -> tuple[int, ...] | None:
    """Remove the lock at ``lock_file`` if its holder is dead; return None if the lock is held.

    Otherwise return the pids of the holder whose lock it broke, or () if
    the lock was broken by another process meanwhile.

    The holder is looked at a second time under a guard before the lock is
    removed: two processes that find the same dead holder must not both
    break the lock, or the second would break the one that the first has
    just taken, and both would hold it.
    """
    if _dead_holder(lock_file) is None:
        return None
    try:
        with _guard(lock_file):
            if not os.path.lexists(lock_file):
                return ()  # broken by another process meanwhile
            holder = _dead_holder(lock_file)
            if holder is None:
                return None  # taken meanwhile, by a live process
            os.unlink(lock_file)
            # Only then the holder's file: were this process killed between
            # the two, a lock left without it could never be broken.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(holder.file)
    except OSError as exc:
        logger.warning("could not break the lock %s left by a dead process: %s", lock_file, exc)
        return None
    logger.warning(
        "broke the lock %s: it was held by process %s of this host, which is no longer running",
        lock_file,
        # Several when lockfile's file name does not tell which.
        " or ".join(str(pid) for pid in holder.pids),
    )
    return holder.pids


@contextlib.contextmanager
def _guard(lock_file: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<lock file>.guard`` during the block.

    The guard file is made when first needed and never removed: a process
    that removed it could let two others in, each holding the flock of a
    different file under the same name.
    """
    import fcntl  # POSIX only, as is breaking locks

    descriptor = os.open(lock_file + ".guard", os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # and with it the flock


def _dead_holder(lock_file: str) -> Holder | None:
    """Return the holder of the lock at ``lock_file`` if it is certainly dead; else None.

    None also when there is no lock, or its holder is on another host or
    cannot be identified.
    """
    try:
        lock_stat = os.lstat(lock_file)
        # Held: the lock and its holder's file are two names of one file.
        if not stat.S_ISREG(lock_stat.st_mode) or lock_stat.st_nlink != 2:
            return None
        holder = _find_holder(lock_file, lock_stat)
    except OSError:
        return None
    if holder is None or any(_may_hold(pid, lock_stat.st_mtime) for pid in holder.pids):
        return None
    return holder


def _find_holder(lock_file: str, lock_stat: os.stat_result) -> Holder | None:
    """Find the file of this host's process linked to the lock, and the pids its name and content tell."""
    host = socket.gethostname()
    directory = os.path.dirname(lock_file)
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.path == lock_file or not entry.name.startswith(host):
                continue
            entry_stat = entry.stat(follow_symlinks=False)
            if (entry_stat.st_dev, entry_stat.st_ino) == (lock_stat.st_dev, lock_stat.st_ino):
                found.append(entry)
    if len(found) != 1:
        return None  # the holder is on another host, or cannot be told
    pids = _pids_in_name(found[0].name[len(host) :])
    if not pids:
        return None
    noted = _noted_pid(found[0].path)
    if noted in pids:
        pids = (noted,)
    return Holder(found[0].path, pids)


def _pids_in_name(rest: str) -> tuple[int, ...]:
    """Return every pid that a holder's file name, after the host name, can be read as."""
    match = HOLDER_NAME.fullmatch(rest)
    if match is None:
        return ()
    digits, negative_hash = match.groups()
    if negative_hash is not None:
        splits = [(digits, negative_hash[1:])]
    else:
        splits = [(digits[:end], digits[end:]) for end in range(1, len(digits))]
    return tuple(int(pid) for pid, hash_ in splits if _is_pid(pid) and _is_hash(hash_))


def _is_pid(digits: str) -> bool:
    return not digits.startswith("0") and int(digits) <= _max_pid()


def _is_hash(digits: str) -> bool:
    """Whether ``digits`` is how Python writes the size of a hash: no leading zero, and within 64 bits."""
    return (digits == "0" or not digits.startswith("0")) and int(digits) <= MAX_HASH


def _max_pid() -> int:
    """The highest pid this system gives: Linux tells; elsewhere, the highest there could be."""
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as file:
            return int(file.read())
    except (OSError, ValueError):
        return MAX_PID


def _noted_pid(path: str) -> int | None:
    """Return the pid the holder wrote into its file, or None if there is none (a lock made by lockfile alone)."""
    try:
        with open(path, "rb") as file:
            match = NOTED_PID.fullmatch(file.read(16))
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _may_hold(pid: int, locked_at: float) -> bool:
    """Return False only if process ``pid`` is certainly not the one that took a lock at ``locked_at``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # PermissionError: it runs, as another user
    process = _linux_process(pid)
    if process is None:
        return True
    state, started_at = process
    if state in ("Z", "X"):
        return False  # killed, and not yet waited for by its parent
    # Started after the lock was taken: the pid has been given to another process.
    return started_at <= locked_at + CLOCK_SLACK


def _linux_process(pid: int) -> tuple[str, float] | None:
    """Return the state of process ``pid`` and when it started (as time.time() tells), or None if unknown.

    Read from Linux's /proc; elsewhere there is none.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            line = file.read()
        with open("/proc/uptime", "rb") as file:
            uptime = float(file.read().split()[0])
        # After "<pid> (<command>)", and the command may hold spaces and parentheses.
        fields = line[line.rindex(b")") + 1 :].split()
        state, started_ticks = fields[0].decode("ascii"), int(fields[19])
        ticks_per_second = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return state, time.time() - uptime + started_ticks / ticks_per_second


@dataclass(frozen=True)
class LockState:
    """What the lock file says about its holder, read without taking or breaking it.

    For monitoring (``manage.py mailer_status``): a lock that stays held
    stops every pass, and an operator must be able to tell a busy pass from
    a dead one without reading lockfile's file names.
    """

    lock_file: str  # the absolute path of "<path>.lock"
    held: bool  # the lock file is there: a pass that starts now finds the lock taken
    taken_at: float | None  # when it was taken (as time.time() tells), if held
    host: str | None  # the host name in its holder's file name; None if there is no such file
    pids: tuple[int, ...]  # the pids its holder may have: one when known, several when lockfile's name can't tell
    stale: bool  # its holder is a process of this host that certainly no longer runs: the next pass breaks it


def lock_state(path: str) -> LockState:
    """Describe the lock file that ``lockfile.FileLock(path)`` takes, changing nothing.

    The holder is found as ``acquire`` finds it (the file linked to the
    lock), but on any host, since the directory may be shared. ``stale`` is
    what ``acquire`` would conclude before breaking the lock, so it errs as
    ``acquire`` does: a lock of another host, or of a holder that cannot be
    identified, is never called stale.
    """
    lock_file = os.path.abspath(path) + ".lock"
    try:
        lock_stat = os.lstat(lock_file)
    except OSError:
        return LockState(lock_file, held=False, taken_at=None, host=None, pids=(), stale=False)
    host, pids = _any_holder(lock_file, lock_stat)
    stale = os.name == "posix" and host == socket.gethostname() and _dead_holder(lock_file) is not None
    return LockState(lock_file, held=True, taken_at=lock_stat.st_mtime, host=host, pids=pids, stale=stale)


def _any_holder(lock_file: str, lock_stat: os.stat_result) -> tuple[str | None, tuple[int, ...]]:
    """Return the host and the possible pids of the holder of the lock, from its file; (None, ()) if unknown."""
    if not stat.S_ISREG(lock_stat.st_mode) or lock_stat.st_nlink != 2:
        return None, ()
    linked = []
    try:
        with os.scandir(os.path.dirname(lock_file)) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):  # a file removed meanwhile is not the holder's
                    entry_stat = entry.stat(follow_symlinks=False)
                    same_file = (entry_stat.st_dev, entry_stat.st_ino) == (lock_stat.st_dev, lock_stat.st_ino)
                    if same_file and entry.path != lock_file:
                        linked.append(entry)
    except OSError:
        return None, ()
    if len(linked) != 1:
        return None, ()
    this_host = socket.gethostname()
    name = linked[0].name
    if name.startswith(this_host) and HOLDER_NAME.fullmatch(name[len(this_host) :]):
        host, rest = this_host, name[len(this_host) :]
    else:
        match = HOLDER_FILE_NAME.fullmatch(name)
        if match is None:
            return None, ()
        host, rest = match.group(1), match.group(2)
    pids = _pids_in_name(rest)
    noted = _noted_pid(linked[0].path)
    if noted in pids:
        pids = (noted,)
    return host, pids
