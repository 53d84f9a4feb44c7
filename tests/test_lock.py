"""The lock file: a pass holds it while it sends, waits as told, gives it back, and takes it from the dead.

Every lock here is a real ``lockfile`` lock in the test's own directory,
and "another process holds it" is a real second owner: a thread of its own
(see tests/locks.py) or a real process.
"""

import fcntl
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import lockfile
import pytest
from django.conf import settings
from django.core import mail
from django.core.mail.backends.base import BaseEmailBackend
from lockfile.linklockfile import LinkLockFile

import mailer
from mailer import engine, locking
from mailer.exceptions import ConfigurationError
from mailer.models import Message
from tests.alarms import time_limit
from tests.locks import lock_is_free

pytestmark = pytest.mark.django_db


def queue(count=1):
    for n in range(count):
        mailer.send_mail(f"Message {n}", "Body", "from@example.com", [f"to{n}@example.com"])


def levels_and_messages(caplog) -> list[tuple[str, str]]:
    return [(record.levelname, record.getMessage()) for record in caplog.records]


def watch_lock_while_receiving(server, lock_file: Path) -> list[tuple[bool, bool]]:
    """Return a list that gets, for each message the server receives, (the .lock file exists, it is free)."""
    seen: list[tuple[bool, bool]] = []
    path = str(lock_file.with_suffix(""))
    server.on_message(lambda received: seen.append((lock_file.exists(), lock_is_free(path))))
    return seen


def test_the_pass_holds_the_lock_file_while_it_delivers_and_releases_it_after(deliver_to_smtp, lock_path):
    queue(2)
    lock_file = Path(lock_path + ".lock")
    seen = watch_lock_while_receiving(deliver_to_smtp, lock_file)

    engine.send_all()

    assert seen == [(True, False), (True, False)]
    assert not lock_file.exists()
    assert lock_is_free(lock_path)


@pytest.mark.parametrize("setting", [None, ""], ids=["None", "empty"])
def test_without_a_lock_path_the_lock_is_send_mail_lock_in_the_working_directory(
    settings, deliver_to_smtp, tmp_path, monkeypatch, setting
):
    settings.MAILER_LOCK_PATH = setting
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    queue()
    seen = watch_lock_while_receiving(deliver_to_smtp, workdir / "send_mail.lock")

    engine.send_all()

    assert seen == [(True, False)]
    assert os.listdir(workdir) == []


def test_a_relative_lock_path_is_taken_from_the_working_directory(settings, deliver_to_smtp, tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    settings.MAILER_LOCK_PATH = "run/mailer"
    queue()
    seen = watch_lock_while_receiving(deliver_to_smtp, tmp_path / "run" / "mailer.lock")

    engine.send_all()

    assert seen == [(True, False)]


class BrokenBackend(BaseEmailBackend):
    """A delivering backend that cannot start; it notes first whether the lock file was free then."""

    saw_lock_free: list[bool] = []

    def __init__(self, **kwargs):
        self.saw_lock_free.append(lock_is_free(settings.MAILER_LOCK_PATH))
        raise RuntimeError("the backend is broken")


def test_a_process_killed_while_it_releases_the_lock_does_not_stop_the_queue(deliver_to_smtp, lock_path):
    """Killed between the two removals of a release: what is left must not be a lock that no pass can break."""
    lock = lockfile.FileLock(lock_path)
    lock.acquire(timeout=0)
    real_unlink = os.unlink
    removed: list[str] = []

    def killed_after_the_first(path, *args, **kwargs):
        if removed:
            raise SystemExit("killed")
        removed.append(path)
        return real_unlink(path, *args, **kwargs)

    with mock.patch("os.unlink", killed_after_the_first), pytest.raises(SystemExit):
        engine.release_lock(lock)
    mailer.send_mail("After", "Body", "from@example.com", ["to@example.com"])

    assert engine.send_all() == {"sent": 1}, "the lock left behind stops every pass"


def test_releasing_a_lock_removed_meanwhile_leaves_the_lock_another_process_took_since(lock_path, caplog):
    """An operator removed the lock while this process held it, and another process took it: it stays its."""
    mine = lockfile.FileLock(lock_path)
    mine.acquire(timeout=0)
    os.unlink(mine.lock_file)
    theirs = LinkLockFile(lock_path, threaded=False)  # a holder's file of another name, as another process
    theirs.acquire(timeout=0)

    with caplog.at_level(logging.WARNING, logger="mailer.locking"):
        engine.release_lock(mine)

    assert theirs.i_am_locking()
    assert not os.path.exists(mine.unique_name)
    assert "another process may hold it now" in caplog.text
    theirs.release()


def test_a_lock_whose_holder_file_was_removed_is_still_released_by_its_holder(deliver_to_smtp, lock_path):
    """A cleaner of temporary files removed this process's own file while it held the lock."""
    lock = lockfile.FileLock(lock_path)
    locking.acquire(lock, timeout=0)  # as a pass takes it: with this process's pid written into it
    os.unlink(lock.unique_name)

    engine.release_lock(lock)

    assert not os.path.exists(lock.lock_file)
    mailer.send_mail("After", "Body", "from@example.com", ["to@example.com"])
    assert engine.send_all() == {"sent": 1}


def test_the_lock_is_released_when_the_pass_ends_with_an_error(settings, lock_path):
    """A pass that raises must not leave the lock behind: every later pass would quit."""
    BrokenBackend.saw_lock_free.clear()
    settings.MAILER_EMAIL_BACKEND = "tests.test_lock.BrokenBackend"
    queue()

    with pytest.raises(RuntimeError, match="the backend is broken"):
        engine.send_all()

    assert BrokenBackend.saw_lock_free == [False]
    assert lock_is_free(lock_path)


@pytest.mark.parametrize("wait", ["unset", 0, -1])
def test_a_held_lock_makes_the_pass_quit_at_once_without_a_wait(settings, hold_lock, caplog, wait):
    """The default, as in django-mailer: cron starts send_mail again next minute anyway."""
    if wait != "unset":
        settings.MAILER_LOCK_WAIT_TIMEOUT = wait
    queue()
    holder = hold_lock()

    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="mailer.engine"), time_limit(5):
        assert engine.send_all() is None
    elapsed = time.monotonic() - started

    assert elapsed < 0.5
    # Logged as news, not as an error: it is how cron runs that overlap end.
    assert ("INFO", "lock already in place. quitting.") in levels_and_messages(caplog)
    assert mail.outbox == [] and Message.objects.count() == 1
    assert holder.still_holds_it()


def test_a_held_lock_makes_the_pass_wait_lock_wait_timeout_then_give_up(settings, hold_lock, caplog):
    settings.MAILER_LOCK_WAIT_TIMEOUT = 1
    queue()
    holder = hold_lock()

    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="mailer.engine"), time_limit(5):
        assert engine.send_all() is None
    elapsed = time.monotonic() - started

    assert 1 <= elapsed < 1.8
    assert ("INFO", "waiting for the lock timed out. quitting.") in levels_and_messages(caplog)
    assert mail.outbox == [] and Message.objects.count() == 1
    assert holder.still_holds_it()


@pytest.mark.parametrize("wait", [5, None], ids=["5 seconds", "None"])
def test_a_lock_given_back_while_the_pass_waits_lets_it_send(settings, hold_lock, deliver_to_smtp, wait):
    """A positive wait, or None (as long as it takes): the pass goes ahead as soon as the other holder is done."""
    settings.MAILER_LOCK_WAIT_TIMEOUT = wait
    queue()
    holder = hold_lock(hold_for=0.3)

    counts = engine.send_all()

    assert counts is not None

    assert counts["sent"] == 1
    [received] = deliver_to_smtp.received
    assert holder.released_at is not None and received.received_at > holder.released_at


def test_with_use_file_lock_off_a_held_lock_does_not_stop_the_pass(settings, hold_lock):
    """Passes may then overlap (claims keep them apart); the lock file is not touched."""
    settings.MAILER_USE_FILE_LOCK = False
    queue()
    holder = hold_lock()

    counts = engine.send_all()

    assert counts is not None

    assert counts["sent"] == 1 and len(mail.outbox) == 1
    assert holder.still_holds_it()


# A lock left by a dead process ---------------------------------------------
#
# The holders below are real processes, killed with SIGKILL as the
# out-of-memory killer would kill them, and waited for, as cron or a process
# manager would. Fake holders (a file named as lockfile names a holder's,
# linked to the lock) are used only for what cannot be arranged for real:
# another host, a reused pid.

HOLDER_SCRIPT = """
import sys, time
import lockfile
from lockfile.linklockfile import LinkLockFile
from mailer import locking

path, how, cue = sys.argv[1:]
lock = lockfile.FileLock(path)
if cue == "on-cue":
    print("ready", flush=True)
    sys.stdin.readline()
try:
    if how == "mailer":
        locking.acquire(lock, 0)
    else:
        lock.acquire(0)
except lockfile.AlreadyLocked:
    print("refused", flush=True)
    sys.exit()
print("holds", lock.unique_name, flush=True)
time.sleep(600)
"""

# How a holder took the lock: with mailer.locking (which notes its pid in
# the lock), or with lockfile alone as django-mailer 2.x does. lockfile
# writes the hash of the path right after the pid, so the pid can only be
# told from the hash when the hash is negative.
HOLDER_KINDS = ["mailer", "lockfile, hash > 0", "lockfile, hash < 0"]


class Holder:
    """A process started to take the lock file."""

    def __init__(self, path: str, kind: str, cwd: Path, on_cue: bool = False) -> None:
        env = dict(os.environ)
        # Where this test run imports mailer from: the checkout, or the installed wheel under tox.
        env["PYTHONPATH"] = str(Path(mailer.__file__).resolve().parent.parent)
        if kind != "mailer":
            env["PYTHONHASHSEED"] = hash_seed(path, negative=kind.endswith("< 0"))
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                HOLDER_SCRIPT,
                path,
                "mailer" if kind == "mailer" else "lockfile",
                "on-cue" if on_cue else "now",
            ],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.process.pid
        self.file: Path | None = None
        if on_cue:
            assert self._read() == "ready"
        else:
            self.outcome()

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def outcome(self) -> str:
        """Return "holds" or "refused", once the process knows."""
        line = self._read()
        if line.startswith("holds "):
            self.file = Path(line.removeprefix("holds "))
            return "holds"
        return line

    def _read(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line:
            self.process.wait(10)
            assert self.process.stderr is not None
            raise AssertionError(f"the holder ended: {self.process.stderr.read()}")
        return line

    def kill(self) -> None:
        """SIGKILL it, and wait for it: it leaves its lock behind."""
        self.process.kill()
        self.process.wait(10)

    def holds(self, lock_path: str) -> bool:
        """Whether it runs and the lock file is its file."""
        return self.process.poll() is None and self.file is not None and same_file(self.file, Path(lock_path + ".lock"))

    def end(self) -> None:
        if self.process.poll() is None:
            self.kill()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def hash_seed(path: str, negative: bool) -> str:
    """Return a PYTHONHASHSEED under which hash(path) is negative, or positive."""
    for seed in range(100):
        printed = subprocess.run(
            [sys.executable, "-c", "import sys; print(hash(sys.argv[1]))", path],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if (int(printed) < 0) == negative:
            return str(seed)
    raise AssertionError("no seed found")


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except FileNotFoundError:
        return False


@pytest.fixture
def start_holder(lock_path, tmp_path):
    """Return a function that starts a process taking the lock file (this test's by default); all end with the test."""
    started: list[Holder] = []

    def start(kind: str = "mailer", path: str = lock_path, on_cue: bool = False) -> Holder:
        holder = Holder(path, kind, tmp_path, on_cue)
        started.append(holder)
        return holder

    yield start
    for holder in started:
        holder.end()


@pytest.fixture
def killed_holder(start_holder, lock_path):
    """A process that took the lock and was killed: the lock file is still there."""
    holder = start_holder()
    assert holder.holds(lock_path)
    holder.kill()
    assert Path(lock_path + ".lock").exists()
    return holder


def dead_pid() -> int:
    """The pid of a process that has ended (and been waited for)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(10)
    return process.pid


def fake_holder(lock_path: str, name: str, taken_at: float | None = None) -> Path:
    """Make the lock file held by a file ``name`` in its directory, as lockfile does; return that file."""
    holder = Path(lock_path).parent / name
    holder.touch()
    os.link(holder, lock_path + ".lock")
    if taken_at is not None:
        os.utime(holder, (taken_at, taken_at))
    return holder


def holder_name(host: str, pid: int) -> str:
    """The name lockfile gives a holder's file: host, thread, pid and (here negative) hash of the path."""
    return f"{host}-7f3a21c0.{pid}-4611686018427387904"


def other_readings_alive(holder) -> bool:
    """Whether the holder's file name, which lockfile writes without a separator, also reads as the pid of a
    process that may have taken the lock (alive, and started before it)."""
    assert holder.file is not None
    host = socket.gethostname()
    readings = locking._pids_in_name(holder.file.name[len(host) :])
    taken_at = holder.file.stat().st_mtime
    return any(pid != holder.pid and locking._may_hold(pid, taken_at) for pid in readings)


def take(lock_path: str, timeout: float | None = 0) -> lockfile.FileLock:
    lock = lockfile.FileLock(lock_path)
    locking.acquire(lock, timeout)
    return lock


def broken_lock_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mailer.locking" and r.levelname == "WARNING"]


@pytest.mark.parametrize("kind", HOLDER_KINDS)
@pytest.mark.parametrize("timeout", [0, 5, None], ids=["no wait", "5 seconds", "None"])
def test_a_lock_left_by_a_killed_process_is_taken_at_once(start_holder, lock_path, caplog, kind, timeout):
    """With any wait: lockfile alone would wait for a dead holder until the timeout, and with None forever."""
    holder = start_holder(kind)
    assert holder.holds(lock_path)
    holder.kill()
    if kind != "mailer" and other_readings_alive(holder):
        # Its file name also reads as the pid of a live process (a busy machine): not certainly
        # dead, so the lock must stay.
        with pytest.raises(lockfile.AlreadyLocked):
            take(lock_path, 0)
        return

    started = time.monotonic()
    with time_limit(10):
        lock = take(lock_path, timeout)

    assert time.monotonic() - started < 1
    assert lock.i_am_locking()
    assert holder.file is not None and not holder.file.exists()  # no file of the dead holder stays
    [warning] = broken_lock_warnings(caplog)
    assert warning.startswith(f"broke the lock {lock_path}.lock: it was held by process ")
    if kind == "mailer":  # it noted its pid
        assert f" process {holder.pid} of this host" in warning
    else:  # the file name may read as other pids too, all gone
        assert re.search(rf" process (\d+ or )*{holder.pid}( or \d+)* of this host", warning)
    lock.release()
    # Only the guard of the breaking is left.
    assert sorted(os.listdir(Path(lock_path).parent)) == ["send_mail.lock.guard"]


def test_a_holder_that_dies_while_the_pass_waits_leaves_the_lock_to_it(start_holder, lock_path):
    """lockfile waits out the timeout for the dead holder; then the lock is broken, not given up on."""
    holder = start_holder()
    killer = threading.Timer(0.3, holder.kill)
    killer.start()
    try:
        with time_limit(10):
            lock = take(lock_path, 1)
    finally:
        killer.join()

    assert lock.i_am_locking()
    lock.release()


@pytest.mark.parametrize("kind", HOLDER_KINDS)
@pytest.mark.parametrize("timeout", [0, 0.5])
def test_a_lock_held_by_a_live_process_is_not_broken(start_holder, lock_path, caplog, kind, timeout):
    holder = start_holder(kind)

    with pytest.raises(lockfile.LockTimeout if timeout else lockfile.AlreadyLocked):
        take(lock_path, timeout)

    assert holder.holds(lock_path)
    assert broken_lock_warnings(caplog) == []


def test_a_lock_held_by_another_thread_of_this_process_is_not_broken(hold_lock, lock_path):
    holder = hold_lock()

    with pytest.raises(lockfile.AlreadyLocked):
        take(lock_path)

    assert holder.still_holds_it()


@pytest.mark.parametrize(
    ("host", "broken"),
    [
        ("{this host}", True),
        ("other.example.com", False),
        ("{this host}-1a", False),  # other hosts whose names begin with this one's
        ("{this host}.example.com", False),
    ],
)
def test_a_dead_holder_is_broken_only_on_its_own_host(lock_path, host, broken):
    """The pid of another host's holder says nothing here, even if no process of this host has it."""
    host = host.replace("{this host}", socket.gethostname())
    holder = fake_holder(lock_path, holder_name(host, dead_pid()))

    if broken:
        take(lock_path).release()
        assert not holder.exists()
    else:
        with pytest.raises(lockfile.AlreadyLocked):
            take(lock_path)
        assert same_file(holder, Path(lock_path + ".lock"))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times are read from Linux's /proc")
@pytest.mark.parametrize(("taken", "broken"), [("an hour before", True), ("just now", False)])
def test_a_pid_now_used_by_a_process_started_after_the_lock_was_taken_is_not_its_holder(lock_path, taken, broken):
    """The holder died and its pid went to a process that started after the lock was taken (or after a reboot)."""
    newcomer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        taken_at = time.time() - 3600 if taken == "an hour before" else None
        holder = fake_holder(lock_path, holder_name(socket.gethostname(), newcomer.pid), taken_at)

        if broken:
            take(lock_path).release()
            assert not holder.exists()
        else:
            with pytest.raises(lockfile.AlreadyLocked):
                take(lock_path)
            assert same_file(holder, Path(lock_path + ".lock"))
    finally:
        newcomer.kill()
        newcomer.wait(10)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process states are read from Linux's /proc")
def test_a_killed_holder_that_its_parent_has_not_waited_for_yet_is_dead(start_holder, lock_path):
    """Until then its pid still answers os.kill(pid, 0): the process is a zombie."""
    holder = start_holder()
    holder.process.kill()  # and not waited for
    stat = Path(f"/proc/{holder.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline, "the holder did not die"
        time.sleep(0.01)

    take(lock_path).release()

    assert holder.file is not None and not holder.file.exists()


def test_the_process_that_takes_the_lock_notes_its_pid_in_it(lock_path):
    """Later passes read it there: lockfile's file name runs the pid and the hash of the path together."""
    lock = take(lock_path)

    assert Path(lock_path + ".lock").read_text() == f"{os.getpid()}\n"
    lock.release()


@pytest.mark.skipif(not Path("/proc/1").exists(), reason="the free pid is found in Linux's /proc")
@pytest.mark.parametrize(("noted", "broken"), [(True, True), (False, False)], ids=["pid noted", "pid not noted"])
def test_a_noted_pid_settles_which_process_the_file_name_means(lock_path, noted, broken):
    """A name that reads as pid 19999 (gone) or as pid 1 (running, and older than the lock): only a note tells.

    Without one, the lock is left alone, since it may be pid 1's.
    """
    gone = next(pid for pid in range(19999, 10000, -1) if not Path(f"/proc/{pid}").exists())
    holder = fake_holder(lock_path, f"{socket.gethostname()}-7f3a21c0.{gone}4242")
    if noted:
        holder.write_text(f"{gone}\n")

    if broken:
        take(lock_path).release()
        assert not holder.exists()
    else:
        with pytest.raises(lockfile.AlreadyLocked):
            take(lock_path)
        assert same_file(holder, Path(lock_path + ".lock"))


def test_only_one_of_the_processes_that_find_the_same_dead_holder_takes_the_lock(
    killed_holder, start_holder, lock_path
):
    racers = [start_holder(on_cue=True) for _ in range(6)]
    for racer in racers:
        racer.go()

    outcomes = [racer.outcome() for racer in racers]

    assert sorted(outcomes) == ["holds"] + ["refused"] * 5
    [winner] = [racer for racer, outcome in zip(racers, outcomes, strict=True) if outcome == "holds"]
    assert winner.holds(lock_path)


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="waiting flocks are seen in Linux's /proc/locks")
def test_the_dead_holder_is_looked_at_again_under_the_guard_before_the_lock_is_broken(
    killed_holder, start_holder, lock_path
):
    """The guard: while one process breaks the lock and takes it, another that found the same dead holder waits.

    Then it finds the lock held by the live process, and leaves it alone.
    """
    lock_file = Path(lock_path + ".lock")
    stale = lock_file.stat().st_ino
    guard = os.open(lock_path + ".lock.guard", os.O_RDONLY | os.O_CREAT)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)  # this test is breaking the lock
        racer = start_holder(on_cue=True)
        racer.go()
        wait_until_waiting_for_a_flock(racer.pid)
        assert lock_file.stat().st_ino == stale  # the racer has not broken it

        lock_file.unlink()
        assert killed_holder.file is not None
        killed_holder.file.unlink()
        taker = start_holder("lockfile, hash < 0")
    finally:
        os.close(guard)

    assert racer.outcome() == "refused"
    assert taker.holds(lock_path)


def wait_until_waiting_for_a_flock(pid: int) -> None:
    deadline = time.monotonic() + 10
    # A waiting flock is shown as "N: -> FLOCK  ADVISORY  WRITE <pid> ...".
    while not re.search(rf"^\d+: -> FLOCK +ADVISORY +WRITE +{pid} ", Path("/proc/locks").read_text(), re.MULTILINE):
        assert time.monotonic() < deadline, f"process {pid} did not come to wait for the guard"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("make_lock", "error", "timeout"),
    [
        (mock.Mock, lockfile.AlreadyLocked("held"), 0),
        (lambda: mock.create_autospec(lockfile.FileLock, instance=True), lockfile.LockTimeout("timed out"), 5),
        (mock.Mock, None, None),
    ],
    ids=["Mock, AlreadyLocked", "autospec, LockTimeout", "Mock, taken"],
)
def test_a_lock_that_is_not_lockfiles_is_only_asked_to_acquire(killed_holder, lock_path, make_lock, error, timeout):
    """As django-mailer 2.x tests patch lockfile.FileLock: the error comes out as it went in, no file is touched."""
    lock = make_lock()
    lock.acquire.side_effect = error
    before = sorted(os.listdir(Path(lock_path).parent))

    if error is None:
        locking.acquire(lock, timeout)
    else:
        with pytest.raises(type(error)) as raised:
            locking.acquire(lock, timeout)
        assert raised.value is error

    assert lock.mock_calls == [mock.call.acquire(timeout)]
    assert sorted(os.listdir(Path(lock_path).parent)) == before  # the dead holder's lock is left as it is


def test_a_pass_after_a_killed_pass_sends(killed_holder, deliver_to_smtp, lock_path, caplog):
    queue()

    counts = engine.send_all()

    assert counts is not None and counts["sent"] == 1
    assert [r.message["Subject"] for r in deliver_to_smtp.received] == ["Message 0"]
    assert len(broken_lock_warnings(caplog)) == 1
    assert lock_is_free(lock_path)


@pytest.mark.slow
def test_cron_send_mail_sends_after_a_killed_send_mail(process_db, smtp_server, tmp_path):
    """The whole story, in real processes: a pass killed mid-queue by SIGKILL, and cron's next run."""
    from tests.processes import MANAGE_PY, manage, process_environment

    result = manage(
        "shell",
        "-c",
        "import mailer\nfor subject in ('First', 'Second'): mailer.send_mail(subject, 'B', 'f@e.com', ['a@e.com'])",
        db=process_db,
    )
    assert result.returncode == 0, result.stderr
    lock_path = str(tmp_path / "lock")
    # It sleeps after each message, holding the lock.
    env = process_environment(
        process_db, smtp_server.port, MAILER_PROCESS_LOCK_PATH=lock_path, MAILER_PROCESS_THROTTLE="60"
    )
    killed = subprocess.Popen([sys.executable, str(MANAGE_PY), "send_mail"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not smtp_server.received:
            assert time.monotonic() < deadline, "the first pass sent nothing"
            time.sleep(0.05)
    finally:
        killed.kill()
        killed.wait(10)
    assert Path(lock_path + ".lock").exists()

    result = manage("send_mail", db=process_db, smtp_port=smtp_server.port, MAILER_PROCESS_LOCK_PATH=lock_path)

    assert result.returncode == 0, result.stderr
    assert f"broke the lock {lock_path}.lock: it was held by process {killed.pid} " in result.stderr
    # The claims the killed pass held are given back at once, not after MAILER_CLAIM_TIMEOUT: the next run
    # sends everything. 'First' went out but may not have been recorded when the kill came: it may go twice.
    assert f"gave back the claims of process {killed.pid} on " in result.stderr
    subjects = [r.message["Subject"] for r in smtp_server.received]
    assert subjects in (["First", "Second"], ["First", "First", "Second"]), subjects


# A lock file that cannot be made ----------------------------------------------


def test_a_lock_path_in_a_missing_directory_is_a_configuration_error(settings, tmp_path):
    settings.MAILER_LOCK_PATH = str(tmp_path / "missing" / "send_mail")
    queue()

    with pytest.raises(ConfigurationError) as raised:
        engine.send_all()

    assert str(tmp_path / "missing") in str(raised.value)
    assert "MAILER_LOCK_PATH" in str(raised.value)
    assert Message.objects.count() == 1


def test_describe_failure_names_the_lock_file_and_what_is_wrong(tmp_path):
    missing = locking.describe_failure(str(tmp_path / "missing" / "send_mail"), lockfile.LockFailed("failed"))
    there = locking.describe_failure(str(tmp_path / "send_mail"), lockfile.LockFailed("failed to create x"))

    assert missing == (
        f"cannot create the lock file {tmp_path}/missing/send_mail.lock: the directory {tmp_path}/missing "
        "does not exist. MAILER_LOCK_PATH must name a file in a directory this process can write to."
    )
    assert there == (
        f"cannot create the lock file {tmp_path}/send_mail.lock (LockFailed: failed to create x). "
        "MAILER_LOCK_PATH must name a file in a directory this process can write to."
    )


def test_a_lock_held_for_hours_is_a_warning_naming_the_file_to_delete(lock_path, caplog):
    """Held by another host, it cannot be told whether its holder lives: an operator must be told, not INFO."""
    lock_file = Path(f"{lock_path}.lock")
    holder = lock_file.parent / "elsewhere.example-1a2b.4242-123"
    holder.touch()
    os.link(holder, lock_file)
    two_hours_ago = time.time() - 7200
    os.utime(lock_file, (two_hours_ago, two_hours_ago))
    queue()

    with caplog.at_level(logging.INFO, logger="mailer"):
        assert engine.send_all() is None

    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (
        f"lock already in place for 120 minutes. quitting. If no mailer process runs (on any host), delete {lock_file}"
    )
    assert lock_file.exists()  # never broken: its holder may live

    os.utime(lock_file)  # taken a moment ago: the normal overlap of two runs
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mailer"):
        engine.send_all()
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO] == [
        ("INFO", "lock already in place. quitting.")
    ]
