"""``runmailer`` as a real process: how often it looks at the queue (MAILER_EMPTY_QUEUE_SLEEP)."""

import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.processes import MANAGE_PY, manage, process_environment

pytestmark = pytest.mark.slow

SLEEP = 0.5
# What a poll may take on top of the sleep: a query, on a busy machine.
SLACK = 1.0


class Runmailer:
    """``manage.py runmailer --debug``, its log lines stamped with time.monotonic() as they come."""

    def __init__(self, db, smtp_port, **env):
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(
            [sys.executable, "-W", "error::DeprecationWarning", str(MANAGE_PY), "runmailer", "--debug"],
            env=process_environment(db, smtp_port, MAILER_PROCESS_EMPTY_QUEUE_SLEEP=str(SLEEP), **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, name="runmailer stderr")
        self.reader.start()

    def _read(self):
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def times_of(self, text: str) -> list[float]:
        return [at for at, line in list(self.lines) if text in line]

    def wait_for(self, text: str, count: int = 1, timeout: float = 20) -> list[float]:
        """Wait until ``text`` has appeared in ``count`` lines; return when each appeared."""
        deadline = time.monotonic() + timeout
        while len(self.times_of(text)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        times = self.times_of(text)
        assert len(times) >= count, f"{text!r} seen {len(times)} times, not {count}:\n{self.log()}"
        return times[:count]

    def log(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def stop(self) -> str:
        """Stop it as Ctrl-C does; return what it printed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            out, _ = self.process.communicate(timeout=20)
        finally:
            self.reader.join(10)
        assert not self.reader.is_alive()
        return out


def queue_in_process(db, code: str) -> None:
    result = manage("shell", "-c", f"import mailer; from mailer.models import PRIORITY_DEFERRED; {code}", db=db)
    assert result.returncode == 0, result.stderr


def spaced_by_the_sleep(times: list[float]) -> bool:
    """Whether ``times`` (when lines came in) are SLEEP apart, give or take the delay of the pipe."""
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    mean = (times[-1] - times[0]) / len(gaps)
    return SLEEP - 0.05 <= mean < SLEEP + SLACK and all(gap >= SLEEP / 2 for gap in gaps)


def wait_for_delivery(server, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(server.received) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(server.received) >= count


def test_runmailer_looks_at_the_queue_every_empty_queue_sleep_seconds(process_db, smtp_server, tmp_path):
    """Deferred mail does not count as something to send; mail queued later goes out at the next look."""
    queue_in_process(
        process_db, "mailer.send_mail('Deferred', 'B', 'f@example.com', ['d@example.com'], priority=PRIORITY_DEFERRED)"
    )
    runner = Runmailer(process_db, smtp_server.port, MAILER_PROCESS_LOCK_PATH=str(tmp_path / "lock"))
    try:
        looks = runner.wait_for(f"sleeping for {SLEEP} seconds", count=4)
        assert spaced_by_the_sleep(looks), looks
        assert runner.times_of(" sent;") == []  # no pass while only deferred mail waits

        queue_in_process(process_db, "mailer.send_mail('Later', 'B', 'f@example.com', ['a@example.com'])")
        queued_at = time.monotonic()
        wait_for_delivery(smtp_server, 1)
    finally:
        out = runner.stop()

    [received] = smtp_server.received
    assert received.message["Subject"] == "Later"
    assert received.received_at - queued_at < SLEEP + SLACK
    assert "Starting django-mailer send loop." in out and "Stopped." in out


def test_runmailer_sleeps_after_a_pass_that_did_nothing(process_db, smtp_server, tmp_path, hold_lock):
    """While another process holds the lock, runmailer tries again every MAILER_EMPTY_QUEUE_SLEEP, not at once."""
    queue_in_process(process_db, "mailer.send_mail('Waiting', 'B', 'f@example.com', ['a@example.com'])")
    lock_path = str(tmp_path / "lock")
    holder = hold_lock(lock_path)
    runner = Runmailer(process_db, smtp_server.port, MAILER_PROCESS_LOCK_PATH=lock_path)
    try:
        tries = runner.wait_for("lock already in place. quitting.", count=3)
        assert spaced_by_the_sleep(tries), tries
        assert smtp_server.received == []

        holder.release()
        wait_for_delivery(smtp_server, 1)
    finally:
        out = runner.stop()

    [received] = smtp_server.received
    assert received.received_at - holder.released_at < SLEEP + SLACK
    assert "Stopped." in out
