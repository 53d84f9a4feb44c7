"""What the commands print and their exit status, as real ``manage.py`` processes on a site with no ``LOGGING``.

Most sites never configure the ``mailer`` loggers: what the commands print
themselves is then all an operator (or cron, or systemd) sees, and the exit
status is what a monitoring script goes by.
"""

import io
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.locks import LockHolder
from tests.processes import MANAGE_PY, ProcessDatabase, fresh_database, process_environment

SUMMARY = re.compile(
    r"^(?P<sent>\d+) sent, (?P<deferred>\d+) deferred, (?P<failed>\d+) failed permanently, "
    r"(?P<dont_send>\d+) not sent \(don't-send list\), in (?P<seconds>[\d.]+) seconds\.$"
)
PROGRESS = re.compile(
    r"^Progress: (?P<handled>\d+) handled, (?P<rate>[\d.]+) per second, (?P<left>\d+) left, "
    r"about (?P<eta>\d+) (?P<unit>seconds?) to go\.$"
)


class Site:
    """A site whose settings are ``tests/process_settings.py`` without ``LOGGING``, plus ``extra`` lines."""

    def __init__(self, tmp_path: Path, db: ProcessDatabase, smtp_port: int | None = None) -> None:
        self.tmp_path = tmp_path
        self.db = db
        self.smtp_port = smtp_port
        self.lock_path = str(tmp_path / "send_mail")
        self.settings("")

    def settings(self, extra: str) -> None:
        (self.tmp_path / "quiet_settings.py").write_text(
            f"from tests.process_settings import *  # noqa: F403\nLOGGING = {{}}\n{extra}\n"
        )

    def environment(self) -> dict[str, str]:
        return process_environment(
            self.db,
            self.smtp_port,
            DJANGO_SETTINGS_MODULE="quiet_settings",
            PYTHONPATH=str(self.tmp_path),
            MAILER_PROCESS_LOCK_PATH=self.lock_path,
            MAILER_PROCESS_EMPTY_QUEUE_SLEEP="0.2",
            PYTHONDONTWRITEBYTECODE="1",  # the settings file may be rewritten within the second: no stale .pyc
        )

    def run(self, *args: str, warnings_are_errors: bool = True) -> subprocess.CompletedProcess:
        options = ["-W", "error::DeprecationWarning"] if warnings_are_errors else []
        return subprocess.run(
            [sys.executable, *options, str(MANAGE_PY), *args],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def queue(self, *recipients: str) -> None:
        """Queue one message to each of ``recipients``."""
        code = "import mailer\n" + "".join(
            f"mailer.send_mail('Subject {n}', 'Body', 'from@example.com', [{recipient!r}])\n"
            for n, recipient in enumerate(recipients)
        )
        result = self.run("shell", "-c", code)
        assert result.returncode == 0, result.stderr


@pytest.fixture
def site(tmp_path, process_db, smtp_server):
    return Site(tmp_path, process_db, smtp_server.port)


def summaries(output: str) -> list[dict[str, float]]:
    return [
        {name: float(value) for name, value in match.groupdict().items()}
        for line in output.splitlines()
        if (match := SUMMARY.match(line))
    ]


# send_mail at each verbosity ------------------------------------------------


def test_send_mail_prints_one_summary_line_by_default(site, smtp_server):
    """Without LOGGING, the operator still learns how the pass went: two sent, one refused for good."""
    smtp_server.reject_recipient("gone@example.com")
    site.queue("one@example.com", "gone@example.com", "two@example.com")

    result = site.run("send_mail")

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1, result.stdout
    [summary] = summaries(result.stdout)
    assert (summary["sent"], summary["deferred"], summary["failed"], summary["dont_send"]) == (2, 0, 1, 0)
    assert len(smtp_server.received) == 2


def test_send_mail_prints_nothing_at_verbosity_0_unless_something_is_wrong(site, smtp_server):
    site.queue("one@example.com")

    result = site.run("send_mail", "-v", "0")

    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert len(smtp_server.received) == 1


def test_send_mail_with_an_empty_queue_is_silent_by_default(site):
    """Run by cron every minute: a pass with nothing to send must not mail the operator each time."""
    result = site.run("send_mail")

    assert (result.returncode, result.stdout) == (0, "")
    assert summaries(site.run("send_mail", "-v", "2").stdout)[0]["sent"] == 0


def test_send_mail_tells_when_the_server_is_down(tmp_path, process_db):
    """The case that motivated it all: every message deferred, and before, not a word."""
    site = Site(tmp_path, process_db, smtp_port=1)  # nothing listens there
    site.queue("one@example.com", "two@example.com")

    for verbosity in ("0", "1"):
        result = site.run("send_mail", "-v", verbosity)

        assert result.returncode == 0  # the pass ran; the messages wait for the mail server
        assert re.search(r"^Mail server unreachable: 127\.0\.0\.1:1\b", result.stderr, re.MULTILINE)
        if verbosity == "0":  # for cron: the one line, not the log's own words for it as well
            assert result.stderr.count("\n") == 1, result.stderr
    [summary] = summaries(result.stdout)
    assert (summary["sent"], summary["deferred"]) == (0, 1)  # the pass ends after one


def test_send_mail_at_verbosity_2_names_each_message_and_why_it_failed(site, smtp_server):
    smtp_server.reject_recipient("gone@example.com", "550 5.1.1 No such user here")
    site.queue("one@example.com", "gone@example.com")

    result = site.run("send_mail", "-v", "2")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    sent = [line for line in lines if line.startswith("sent: <")]
    failed = [line for line in lines if line.startswith("failed permanently: <")]
    assert len(sent) == 1 and "'Subject 0' to one@example.com" in sent[0]
    assert len(failed) == 1 and "550" in failed[0] and "No such user here" in failed[0]
    assert summaries(result.stdout)[0]["failed"] == 1


def test_send_mail_at_verbosity_2_says_why_a_row_that_cannot_be_read_was_deferred(site, smtp_server):
    """Such a row has no Message-ID to find its log row by."""
    code = "from mailer.models import Message\nMessage.objects.create(message_data='not a message at all')\n"
    assert site.run("shell", "-c", code).returncode == 0

    result = site.run("send_mail", "-v", "2")

    assert result.returncode == 0, result.stderr
    [deferred] = [line for line in result.stdout.splitlines() if line.startswith("deferred: #")]
    assert deferred.endswith("(message data is neither JSON nor a django-mailer pickle)"), deferred


def test_send_mail_at_verbosity_2_keeps_addresses_and_subjects_out_when_the_site_says_so(site, smtp_server):
    """MAILER_EMAIL_LOG_MESSAGE_DATA = False: the per-message lines name messages by Message-ID only."""
    site.settings("MAILER_EMAIL_LOG_MESSAGE_DATA = False")
    smtp_server.reject_recipient("gone@example.com", "550 5.1.1 <gone@example.com> No such user here")
    site.queue("one@example.com", "gone@example.com")

    result = site.run("send_mail", "-v", "2")

    assert result.returncode == 0, result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("failed permanently: <")]
    assert len(failed) == 1 and "No such user here" in failed[0]  # the reason, without the address
    assert "@example.com>" not in result.stdout.replace(failed[0].split()[2], "")
    assert "gone@example.com" not in result.stdout
    assert "one@example.com" not in result.stdout
    assert "Subject" not in result.stdout
    assert len(re.findall(r"^sent: <[^>]+>$", result.stdout, re.MULTILINE)) == 1


def test_send_mail_at_verbosity_2_shows_progress_on_a_long_drain(site, smtp_server):
    """A slow mail server: the operator sees how far it is and how long is left, about once a second."""
    smtp_server.delay_each_message(0.4)
    site.queue(*[f"r{n}@example.com" for n in range(8)])

    result = site.run("send_mail", "-v", "2")

    assert result.returncode == 0, result.stderr
    progress = [match.groupdict() for line in result.stdout.splitlines() if (match := PROGRESS.match(line))]
    [summary] = summaries(result.stdout)
    assert summary["sent"] == 8
    assert progress, result.stdout
    handled = [int(p["handled"]) for p in progress]
    assert handled == sorted(handled) and all(0 < count < 8 for count in handled)
    assert all(int(p["handled"]) + int(p["left"]) <= 8 for p in progress)
    assert all(p["unit"] == ("second" if p["eta"] == "1" else "seconds") for p in progress), progress
    # At most one a second (PROGRESS_INTERVAL), however the pass goes.
    assert len(progress) <= summary["seconds"]
    # Not at -v 1.
    site.queue("late@example.com")
    assert "Progress" not in site.run("send_mail").stdout


def test_send_mail_at_verbosity_3_shows_the_debug_log(site):
    site.queue("one@example.com")

    result = site.run("send_mail", "-v", "3")

    assert result.returncode == 0
    assert "acquiring lock..." in result.stderr
    assert "acquiring lock..." not in site.run("send_mail", "-v", "2").stderr


# Exit status ----------------------------------------------------------------


def test_a_configuration_error_exits_1_with_one_line(site):
    site.settings("MAILER_RETRY_BACKOFF = -5")
    site.queue("one@example.com")

    result = site.run("send_mail")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("CommandError: configuration error: MAILER_RETRY_BACKOFF")
    assert "Traceback" in site.run("send_mail", "--traceback").stderr


@pytest.mark.parametrize("command", [["send_mail"], ["retry_deferred"], ["purge_mail_log", "7"]])
def test_a_database_error_exits_1_with_one_line(tmp_path, command):
    """An empty database (migrations not run): each command says so in one line, and exits 1."""
    with fresh_database(tmp_path, "unmigrated") as db:
        result = Site(tmp_path, db, smtp_port=1).run(*command)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("CommandError: database error: ")


def test_a_lock_held_by_another_run_is_not_a_failure(site, smtp_server):
    site.queue("one@example.com")
    holder = LockHolder(site.lock_path).start()
    try:
        result = site.run("send_mail")
    finally:
        holder.release()

    assert result.returncode == 0
    assert result.stdout.strip() == "The lock is held by another run: nothing sent."
    assert smtp_server.received == []
    assert site.run("send_mail", "-v", "0").stdout == ""


def test_paused_sending_is_said_and_is_not_a_failure(site, smtp_server):
    site.settings("MAILER_PAUSE_SEND = True")
    site.queue("one@example.com")

    result = site.run("send_mail")

    assert result.returncode == 0
    assert result.stdout.strip() == "Sending is paused (MAILER_PAUSE_SEND): nothing sent."
    assert smtp_server.received == []


# The other commands ---------------------------------------------------------


def test_purge_mail_log_refuses_a_negative_number_of_days(site):
    """purge_mail_log -1 would be "older than tomorrow": the whole log. It is refused; nothing is deleted."""
    site.queue("one@example.com")
    assert site.run("send_mail").returncode == 0

    result = site.run("purge_mail_log", "-1", "-r", "all")

    assert result.returncode == 1
    assert "DAYS must be 0 or more, not -1" in result.stderr
    assert site.db.query("SELECT COUNT(*) FROM mailer_messagelog") == [(1,)]
    result = site.run("purge_mail_log", "0", "--result", "all")
    assert (result.returncode, result.stdout.strip()) == (0, "1 log entry deleted.")
    assert site.db.query("SELECT COUNT(*) FROM mailer_messagelog") == [(0,)]
    assert "DAYS" in site.run("purge_mail_log", "--help").stdout


def test_retry_deferred_says_how_many_it_put_back(site):
    site.queue("one@example.com", "two@example.com")
    site.db.execute("UPDATE mailer_message SET priority = '4'")

    result = site.run("retry_deferred")

    assert (result.returncode, result.stdout.strip()) == (0, "2 messages put back in the queue.")
    assert site.run("retry_deferred", "-v", "0").stdout == ""


@pytest.mark.parametrize("command", ["send_mail", "retry_deferred"])
def test_the_deprecated_cron_option_is_said_on_stderr(site, command):
    """Python hides a DeprecationWarning from a command: the crontab's owner would never hear of it."""
    result = site.run(command, "--cron", "1", warnings_are_errors=False)

    assert result.returncode == 0
    assert f"{command}'s -c/--cron option is deprecated" in result.stderr
    assert "-c/--cron" not in site.run(command, "-c", "0", warnings_are_errors=False).stderr


# runmailer ------------------------------------------------------------------


class Running:
    """``manage.py runmailer`` (or runmailer_pg) of ``site``, its output read as it comes."""

    def __init__(self, site: Site, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-W", "error::DeprecationWarning", str(MANAGE_PY), *args],
            env=site.environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.out)),
            threading.Thread(target=self._read, args=(self.process.stderr, self.err)),
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, lines: list[str], pattern: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while sum(bool(re.search(pattern, line)) for line in list(lines)) < count:
            assert time.monotonic() < deadline, f"no {pattern!r}:\n" + "\n".join(self.out + self.err)
            assert self.process.poll() is None, "runmailer ended:\n" + "\n".join(self.out + self.err)
            time.sleep(0.05)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        returncode = self.process.wait(30)
        for reader in self.readers:
            reader.join(10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return returncode


@pytest.mark.parametrize("command", ["runmailer", "runmailer_pg"])
def test_runmailer_prints_each_pass(site, smtp_server, command):
    if command == "runmailer_pg" and site.db.vendor != "postgresql":
        pytest.skip("runmailer_pg needs PostgreSQL")
    site.queue("one@example.com")
    running = Running(site, command)
    try:
        running.wait_for(running.out, SUMMARY.pattern)
    finally:
        returncode = running.stop()

    assert returncode == 0
    assert [summary["sent"] for summary in summaries("\n".join(running.out))] == [1]
    assert running.out[-1] == "Stopped."


@pytest.mark.parametrize("command", ["runmailer", "runmailer_pg"])
def test_runmailer_says_a_pass_failed_and_goes_on(site, command):
    """A pass that fails does not end the loop, as before; now the operator hears of it, in one line each time."""
    if command == "runmailer_pg" and site.db.vendor != "postgresql":
        pytest.skip("runmailer_pg needs PostgreSQL")
    site.settings("MAILER_RETRY_BACKOFF = -5")  # every pass fails
    site.queue("one@example.com")
    running = Running(site, command, "-v", "0")
    try:
        running.wait_for(running.err, r"^The sending pass failed: MAILER_RETRY_BACKOFF must be", count=2)
    finally:
        returncode = running.stop()

    assert returncode == 0
    assert running.out == []  # -v 0: no banner, no "Stopped.", only the errors
    assert all(line.startswith("The sending pass failed: ") for line in running.err), running.err


def test_runmailer_debug_shows_the_engine_log_without_logging_settings(site):
    site.queue("one@example.com")
    running = Running(site, "runmailer", "--debug", "-v", "0")
    try:
        running.wait_for(running.err, r"acquiring lock\.\.\.")
    finally:
        running.stop()

    assert not any(SUMMARY.match(line) for line in running.out)  # -v 0


def test_runmailer_says_once_that_the_lock_is_held_not_at_every_look(site, smtp_server):
    """A loop that looks every fraction of a second must not fill its journal with the same line."""
    site.queue("one@example.com")
    holder = LockHolder(site.lock_path).start()
    running = Running(site, "runmailer", "--debug")
    try:
        running.wait_for(running.err, r"lock already in place", count=3)
        holder.release()
        running.wait_for(running.out, SUMMARY.pattern)
    finally:
        holder.release()
        running.stop()

    assert running.out.count("The lock is held by another run: nothing sent.") == 1
    assert len(smtp_server.received) == 1


def test_several_delivery_connections_print_whole_lines(site, smtp_server):
    """The senders of a pass run on threads of their own: each message still gets one whole line."""
    smtp_server.delay_each_message(0.05)
    site.queue(*[f"r{n}@example.com" for n in range(9)])

    result = site.run("send_mail", "-v", "2", "--connections", "3")

    assert result.returncode == 0, result.stderr
    sent = re.findall(r"^sent: <[^>]+> 'Subject (\d)' to r\1@example\.com$", result.stdout, re.MULTILINE)
    assert sorted(sent) == [str(n) for n in range(9)]
    assert summaries(result.stdout)[0]["sent"] == 9


@pytest.mark.django_db
def test_verbosity_3_in_a_process_that_goes_on_leaves_the_log_levels_as_they_were(settings, tmp_path):
    """``call_command("send_mail", verbosity=3)`` in a worker: the mailer log is not left at DEBUG after it."""
    import logging

    from django.core.management import call_command

    settings.MAILER_LOCK_PATH = str(tmp_path / "lock")
    before = logging.getLogger("mailer").level
    call_command("send_mail", verbosity=3, stdout=io.StringIO(), stderr=io.StringIO())
    assert logging.getLogger("mailer").level == before


@pytest.mark.parametrize(
    ("language", "handled", "due", "seconds", "expected"),
    [
        ("en", 10, 20, 1.0, "about 1 second to go."),
        ("en", 10, 30, 1.0, "about 2 seconds to go."),
        ("de", 10, 20, 1.0, "noch etwa 1 Sekunde."),
        ("de", 10, 30, 1.0, "noch etwa 2 Sekunden."),
        ("fr", 10, 20, 1.0, "encore environ 1 seconde."),
        ("fr", 10, 30, 1.0, "encore environ 2 secondes."),
    ],
)
def test_the_time_left_of_a_progress_line_agrees_with_its_number(language, handled, due, seconds, expected):
    from django.core.management.base import OutputWrapper
    from django.utils import translation

    from mailer.management.commands._output import PassReport

    report = PassReport(OutputWrapper(io.StringIO()), OutputWrapper(io.StringIO()), 2)
    report._due = due
    with translation.override(language):
        assert report._progress_line(handled, seconds).endswith(expected)
