"""``runmailer`` as a real process survives what a long-running sender meets, and still stops cleanly.

Issue 8: a row that cannot be read, an address the SMTP backend refuses, the
mail server going away and coming back, the database dropping its
connections or restarting. Each trouble is recorded where an operator looks
(the message deferred with a failure log row, an ERROR line naming what is
wrong) and the loop goes on: mail queued afterwards is delivered by the same
process, with no restart. SIGTERM ends it with exit status 0 after any of
them.

Everything is real: ``manage.py runmailer`` in its own process, an aiosmtpd
server on loopback, the database of the run's vendor (``process_db``).
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend

from tests.processes import MANAGE_PY, VENDOR, ProcessDatabase, manage, process_environment

pytestmark = pytest.mark.slow

# runmailer's MAILER_EMPTY_QUEUE_SLEEP: short, so that a test sees many passes.
SLEEP = 0.5
# How long anything may take on a busy 2-core machine: generous, never a measurement.
TIMEOUT = 30

PRIORITY_HIGH = 1
PRIORITY_DEFERRED = 4
RESULT_FAILURE = "3"

# Addresses Django's SMTP backend refuses when it sends (ValueError "Invalid
# address"), written straight into the table as a buggy import script or an
# older version would, past the checks made when mail is queued. Django 5.2
# writes a non-ASCII local part as an encoded word instead of refusing it,
# so that one is used only where the backend refuses it (6.0's prep_address).
BAD_ADDRESSES = ["a@example.com\nBcc: victim@example.com"]
if hasattr(DjangoSMTPBackend, "prep_address"):
    BAD_ADDRESSES.append("jöhn@example.com")

SERVER_VENDORS = ("postgresql", "mysql")
needs_database_server = pytest.mark.skipif(
    VENDOR not in SERVER_VENDORS,
    reason=f"a database server dropping its connections: PostgreSQL and MariaDB only (MAILER_TEST_DB={VENDOR})",
)


class Runmailer:
    """``manage.py runmailer --debug`` in the background, its log (stderr) collected line by line as it comes."""

    command = "runmailer"

    def __init__(
        self, db: ProcessDatabase, smtp_port: int, lock_path: Path, sleep: float = SLEEP, *args: str, **env: str
    ):
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-W", "error::DeprecationWarning", str(MANAGE_PY), self.command, "--debug", *args],
            env=process_environment(
                db,
                smtp_port,
                MAILER_PROCESS_EMPTY_QUEUE_SLEEP=str(sleep),
                MAILER_PROCESS_LOCK_PATH=str(lock_path),
                **env,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, name=f"{self.command} stderr", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def log(self, since: int = 0) -> str:
        return "\n".join(self.lines[since:])

    def count(self, text: str, since: int = 0) -> int:
        return sum(text in line for line in list(self.lines)[since:])

    def assert_running(self) -> None:
        assert self.process.poll() is None, f"{self.command} exited with {self.process.returncode}:\n{self.log()}"

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        """Wait until ``condition()`` holds; fail at once, with the log, if the process exits meanwhile."""
        deadline = time.monotonic() + timeout
        while not condition():
            self.assert_running()
            assert time.monotonic() < deadline, f"timed out waiting for {what}; {self.command}'s log:\n{self.log()}"
            time.sleep(0.05)

    def wait_for_line(self, text: str, count: int = 1, since: int = 0) -> None:
        self.wait_until(lambda: self.count(text, since) >= count, f"{count} log line(s) with {text!r}")

    def wait_for_passes(self, count: int) -> None:
        """Wait until runmailer has gone to sleep ``count`` more times: it went round its loop."""
        seen = self.count("sleeping for")
        self.wait_for_line("sleeping for", seen + count)

    def terminate(self, signum: int = signal.SIGTERM) -> tuple[int, str, float]:
        """Send ``signum`` (SIGTERM: as systemd does); return the exit status, what it printed, and how long it took."""
        sent_at = time.monotonic()
        self.process.send_signal(signum)
        returncode = self.process.wait(timeout=TIMEOUT)
        took = time.monotonic() - sent_at
        self.reader.join(10)
        assert self.process.stdout is not None
        return returncode, self.process.stdout.read(), took

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def started_runners(runner_class: type[Runmailer]):
    """For a fixture: start ``runner_class`` processes; any still running at the end (a failed test) is killed
    before its database is dropped.
    """
    started: list[Runmailer] = []

    def start(*args, **kwargs) -> Runmailer:
        runner = runner_class(*args, **kwargs)
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.kill()
        for stream in (runner.process.stdout, runner.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def runmailers():
    """Start ``Runmailer``s, killed at the end if still running."""
    yield from started_runners(Runmailer)


def queue(db: ProcessDatabase, *subjects: str) -> None:
    """Queue one message per subject the usual way (``mailer.send_mail``), in a process of its own."""
    code = (
        f"import mailer\nfor s in {list(subjects)!r}:\n"
        "    mailer.send_mail(s, 'Body', 'site@example.com', ['to@example.com'])"
    )
    result = manage("shell", "-c", code, db=db)
    assert result.returncode == 0, result.stderr


def stored_email(subject: str, to: list[str], message_id: str, **fields: object) -> str:
    """``message_data`` as mailer stores an EmailMessage (``mailer.codec``), written by hand; ``fields`` override."""
    email: dict[str, object] = {
        "class": "django.core.mail.message.EmailMessage",
        "subject": subject,
        "body": "Body",
        "from_email": "site@example.com",
        "to": to,
        "cc": [],
        "bcc": [],
        "reply_to": [],
        "extra_headers": {"Message-ID": message_id},
        "encoding": None,
        "content_subtype": "plain",
        "attachments": [],
    }
    email.update(fields)
    return json.dumps({"mailer": 1, "email": email})


def insert_row(db: ProcessDatabase, message_id: str, data: str) -> None:
    """Write a row straight into the queue, first in sending order (high priority, added long ago)."""
    db.execute(
        "INSERT INTO mailer_message (message_data, when_added, priority, retry_count, subject, from_email,"
        " recipients, message_id) VALUES (%s, %s, %s, 0, '', '', '', %s)",
        data,
        "2024-01-01 00:00:00",
        PRIORITY_HIGH,
        message_id,
    )


def queued(db: ProcessDatabase) -> dict[str, tuple[int, bool]]:
    """The queue: Message-ID (or subject) -> (priority, whether claimed)."""
    rows = db.query("SELECT message_id, subject, priority, claimed_until FROM mailer_message")
    return {message_id or subject: (priority, claimed is not None) for message_id, subject, priority, claimed in rows}


def failure_log(db: ProcessDatabase) -> list[tuple[str, str]]:
    """The failure log rows: (Message-ID, why), oldest first."""
    rows = db.query(
        "SELECT message_id, log_message FROM mailer_messagelog WHERE result = %s ORDER BY id", RESULT_FAILURE
    )
    return [(message_id, log_message) for message_id, log_message in rows]


def subjects(server) -> list[str]:
    return sorted(str(received.message["Subject"]) for received in server.received)


def wait_for_delivery(runner: Runmailer, server, count: int) -> None:
    runner.wait_until(lambda: len(server.received) >= count, f"{count} message(s) at the mail server")


def queue_one_by_one(runner: Runmailer, db: ProcessDatabase, server, prefix: str, count: int) -> None:
    """Queue ``count`` messages, each once the one before it arrived: each goes out in a pass of its own."""
    arrived = len(server.received)
    for number in range(1, count + 1):
        queue(db, f"{prefix} {number}")
        wait_for_delivery(runner, server, arrived + number)


# What a migration changing the type of a column of the queue runs: a claim prepared before it no longer fits.
CHANGE_A_COLUMN_TYPE = "ALTER TABLE mailer_message ALTER COLUMN priority TYPE integer"


def assert_stops_with_sigterm(runner: Runmailer) -> None:
    returncode, out, took = runner.terminate()
    assert returncode == 0, runner.log()
    assert out.rstrip().endswith("Stopped."), out
    assert took < 10, f"SIGTERM took {took:.1f} s"


# A poison row, an invalid address ----------------------------------------------------------------


def test_runmailer_sets_poison_rows_aside_and_delivers_everything_else(process_db, smtp_server, tmp_path, runmailers):
    """Rows that cannot be read or sent, first in the queue, are deferred with a failure log row each.

    The pass goes on past them to the good mail behind, in the same pass; a
    poison row arriving later does not stop the loop either, and neither is
    tried again until someone runs ``retry_deferred``. (``mailer.send_mail``
    refuses these addresses; a row written past it, by an import script or
    another program, must not take the sender down.)
    """
    poison = {
        "<broken-json@survive.test>": (
            '{"mailer": 1, "email": {"class": "django.core.mail.message.EmailMessage", "subject": "Broken',
            "not valid JSON",
        ),
        "<headers-list@survive.test>": (
            stored_email("Headers", ["to@example.com"], "", extra_headers=[["X-Tag", "1"]]),
            "extra_headers is not a dict",
        ),
    }
    for n, address in enumerate(BAD_ADDRESSES):
        message_id = f"<bad-address-{n}@survive.test>"
        poison[message_id] = (stored_email("Bad address", [address], message_id), "Invalid address")
    for message_id, (data, _why) in poison.items():
        insert_row(process_db, message_id, data)
    queue(process_db, "Good 1", "Good 2", "Good 3")

    runner = runmailers(process_db, smtp_server.port, tmp_path / "send_mail")
    wait_for_delivery(runner, smtp_server, 3)
    # All in one pass: no poison row ended it.
    runner.wait_for_line(f"3 sent; {len(poison)} deferred; 0 failed permanently")

    # More while it runs: a poison row and good mail.
    poison["<broken-json-2@survive.test>"] = ('{"mailer": 1, "email": [', "not valid JSON")
    insert_row(process_db, "<broken-json-2@survive.test>", poison["<broken-json-2@survive.test>"][0])
    queue(process_db, "Later 1", "Later 2")
    wait_for_delivery(runner, smtp_server, 5)
    runner.wait_for_passes(2)  # it goes on looking at the queue
    runner.assert_running()

    assert subjects(smtp_server) == ["Good 1", "Good 2", "Good 3", "Later 1", "Later 2"]
    assert all(rcpt == "to@example.com" for r in smtp_server.received for rcpt in r.rcpt_tos)
    # Each poison row is still there, deferred and released, with one failure row saying why: tried once.
    assert queued(process_db) == dict.fromkeys(poison, (PRIORITY_DEFERRED, False))
    failures = failure_log(process_db)
    assert sorted(message_id for message_id, _ in failures) == sorted(poison)
    for message_id, why in failures:
        assert poison[message_id][1] in why, (message_id, why)

    assert_stops_with_sigterm(runner)


# The mail server going away and coming back ------------------------------------------------------


def start_smtp_on(recorder, port: int) -> Controller:
    """Start an aiosmtpd server on ``port`` again (the mail server back where it was), keeping ``recorder``.

    Listening sockets reuse the address, so the port is free at once; a short
    retry covers a slow release on a busy machine.
    """
    deadline = time.monotonic() + 10
    while True:
        controller = Controller(recorder, hostname="127.0.0.1", port=port)
        try:
            controller.start()
            return controller
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_runmailer_waits_out_a_mail_server_outage_without_a_restart(process_db, smtp_server, tmp_path, runmailers):
    """The server stops: each pass defers one message, logs one ERROR naming host:port, and ends; the
    loop goes on. Back on the same port, ``retry_deferred`` and new mail get through the same process.
    """
    port = smtp_server.port
    queue(process_db, "Before")
    runner = runmailers(process_db, port, tmp_path / "send_mail")
    wait_for_delivery(runner, smtp_server, 1)

    smtp_server.stop()
    queue(process_db, "During 1", "During 2", "During 3")
    # One message per pass: the pass ends at the first refused connection.
    runner.wait_until(
        lambda: [priority for priority, _ in queued(process_db).values()] == [PRIORITY_DEFERRED] * 3,
        "the three messages queued during the outage to be deferred",
    )
    runner.wait_for_passes(2)
    runner.assert_running()
    outage_lines = [line for line in runner.lines if "cannot be reached" in line]
    assert len(outage_lines) == 3, runner.log()  # one per pass, not one per message
    assert all(f"the mail server 127.0.0.1:{port}" in line for line in outage_lines), outage_lines
    assert runner.count("the sending pass failed") == 0  # an outage is not a crash of the pass
    failures = failure_log(process_db)
    assert len(failures) == 3 and all("ConnectionRefusedError" in why for _, why in failures), failures
    assert len(smtp_server.received) == 1

    back = start_smtp_on(smtp_server.recorder, port)
    try:
        result = manage("retry_deferred", db=process_db)
        assert result.returncode == 0, result.stderr
        queue(process_db, "After 1", "After 2")
        wait_for_delivery(runner, smtp_server, 6)
        runner.wait_for_passes(1)
    finally:
        back.stop()

    assert subjects(smtp_server) == ["After 1", "After 2", "Before", "During 1", "During 2", "During 3"]
    assert len({r.message["Message-ID"] for r in smtp_server.received}) == 6
    runner.wait_until(lambda: queued(process_db) == {}, "every message recorded")
    assert_stops_with_sigterm(runner)


def test_sigterm_after_a_failed_pass_exits_0_with_every_message_recorded(process_db, smtp_server, tmp_path, runmailers):
    """SIGTERM while runmailer sleeps after passes that met an outage: exit status 0, at once.

    Every message is either deferred with its failure row or untouched in the
    queue; no claim is left behind and the lock file is given back.
    """
    smtp_server.stop()
    queue(process_db, "First", "Second", "Third")
    lock_path = tmp_path / "send_mail"
    runner = runmailers(process_db, smtp_server.port, lock_path, sleep=60)
    runner.wait_for_line("cannot be reached")
    runner.wait_for_line("sleeping for 60")

    assert_stops_with_sigterm(runner)

    state = queued(process_db)
    assert len(state) == 3 and not any(claimed for _, claimed in state.values()), state
    deferred = [message_id for message_id, (priority, _) in state.items() if priority == PRIORITY_DEFERRED]
    assert deferred and sorted(message_id for message_id, _ in failure_log(process_db)) == sorted(deferred)
    assert not Path(f"{lock_path}.lock").exists()


def test_an_outage_ends_the_pass_and_the_rest_of_the_queue_waits_for_the_next_look(
    process_db, smtp_server, tmp_path, runmailers
):
    """The log says "the pass ends, the other messages wait for the next one": they wait
    MAILER_EMPTY_QUEUE_SLEEP, not a few milliseconds. Otherwise a minute's outage defers the whole queue
    (one refused connection and one ERROR line each), all of it waiting for ``retry_deferred``.
    """
    smtp_server.stop()
    queue(process_db, "First", "Second", "Third")
    runner = runmailers(process_db, smtp_server.port, tmp_path / "send_mail", sleep=60)
    runner.wait_for_line("sleeping for 60")

    assert runner.count("cannot be reached") == 1, runner.log()
    assert sorted(priority for priority, _ in queued(process_db).values()) == [2, 2, PRIORITY_DEFERRED]
    assert_stops_with_sigterm(runner)


# The database dropping its connections, restarting -------------------------------------------------


def test_runmailer_goes_on_after_errors_from_the_database(process_db, smtp_server, tmp_path, runmailers):
    """The queue's table is out of reach for a while (renamed away, as a restore or a botched migration
    leaves it): every look at the queue fails, each is logged at ERROR and followed by the usual sleep,
    and once the table is back the same process delivers what was queued. On every vendor, SQLite too.
    """
    queue(process_db, "Before")
    runner = runmailers(process_db, smtp_server.port, tmp_path / "send_mail")
    wait_for_delivery(runner, smtp_server, 1)
    # Recorded a moment after the server took it; renaming the table before that would leave it
    # sent but unrecorded, claimed until its claim runs out (tested elsewhere).
    runner.wait_until(lambda: queued(process_db) == {}, "'Before' recorded")

    process_db.execute("ALTER TABLE mailer_message RENAME TO mailer_message_away")
    try:
        runner.wait_for_line("the sending pass failed", 3)
    finally:
        process_db.execute("ALTER TABLE mailer_message_away RENAME TO mailer_message")
    runner.assert_running()
    # Not a busy loop: it slept after each failure (but perhaps the last, logged a moment ago).
    assert runner.count("sleeping for") >= runner.count("the sending pass failed") - 1, runner.log()

    queue(process_db, "After")
    wait_for_delivery(runner, smtp_server, 2)
    assert subjects(smtp_server) == ["After", "Before"]
    runner.wait_until(lambda: queued(process_db) == {}, "every message recorded")
    assert_stops_with_sigterm(runner)


@pytest.mark.slow
@pytest.mark.skipif(VENDOR != "postgresql", reason="psycopg's prepared statements and Django's pool are PostgreSQL's")
def test_a_migration_under_prepared_statements_and_a_pool_costs_runmailer_a_few_passes(
    process_db, smtp_server, tmp_path, runmailers
):
    """Prepared statements in Django's connection pool, then a migration changes the type of a column of the
    queue: each pooled connection that prepared the claim fails one pass, and is thrown away rather than handed
    back to the pool; every message still goes out, from the same process.
    """
    pytest.importorskip("psycopg", reason="Django's connection pool needs psycopg 3")
    pytest.importorskip("psycopg_pool", reason="Django's connection pool needs psycopg_pool (tox installs it)")
    pool_size = 4
    options = {"server_side_binding": True, "prepare_threshold": 1, "pool": {"min_size": 2, "max_size": pool_size}}
    pooled = dataclasses.replace(process_db, options=options)
    runner = runmailers(pooled, smtp_server.port, tmp_path / "send_mail")
    queue_one_by_one(runner, pooled, smtp_server, "Before", 10)  # passes enough for each pooled connection to prepare

    process_db.execute(CHANGE_A_COLUMN_TYPE)
    queue_one_by_one(runner, pooled, smtp_server, "After", 6)

    assert len(subjects(smtp_server)) == 16
    assert runner.count("the sending pass failed") <= pool_size, runner.log()
    assert_stops_with_sigterm(runner)


def end_connections(db: ProcessDatabase) -> int:
    """End every connection to ``db`` but the one asking, as a server restart does; return how many ended.

    PostgreSQL: pg_terminate_backend; MariaDB: KILL CONNECTION. The client
    sees what it sees after a restart: its next query fails.
    """
    with closing(db._connect()) as connection:
        cursor = connection.cursor()
        if db.vendor == "postgresql":
            cursor.execute(
                # Client backends only: an autovacuum worker visiting the database is the server's own.
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                [db.name],
            )
            ended = sum(1 for (done,) in cursor.fetchall() if done)
        else:
            cursor.execute(
                "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()", [db.name]
            )
            ended = 0
            for (thread_id,) in cursor.fetchall():
                try:
                    cursor.execute(f"KILL CONNECTION {int(thread_id)}")
                    ended += 1
                except Exception as exc:  # gone meanwhile: "Unknown thread id"
                    if "Unknown thread" not in str(exc):
                        raise
        connection.commit()
    return ended


def database_settings(db: ProcessDatabase, conn_max_age: int | None) -> str:
    """MAILER_PROCESS_DATABASE for the child, with its own CONN_MAX_AGE (None: one connection kept for ever)."""
    return json.dumps({**db.settings, "CONN_MAX_AGE": conn_max_age})


@needs_database_server
@pytest.mark.parametrize("conn_max_age", [None, 0], ids=["persistent connection", "CONN_MAX_AGE 0"])
def test_runmailer_survives_the_database_ending_its_connections(
    process_db, smtp_server, tmp_path, runmailers, conn_max_age
):
    """The server ends runmailer's connection while it sleeps, as a restart does.

    Its next query fails: logged at ERROR, the loop goes on, Django replaces
    the broken connection, and mail queued afterwards goes out from the same
    process, after which no more errors come.
    """
    queue(process_db, "Before")
    runner = runmailers(
        process_db,
        smtp_server.port,
        tmp_path / "send_mail",
        MAILER_PROCESS_DATABASE=database_settings(process_db, conn_max_age),
    )
    wait_for_delivery(runner, smtp_server, 1)
    runner.wait_for_passes(2)

    assert end_connections(process_db) >= 1  # runmailer's: it keeps one while it sleeps
    runner.wait_for_passes(2)
    if conn_max_age is None:
        # The connection was kept: the next look at the queue meets the dead one.
        assert runner.count("the sending pass failed") >= 1, runner.log()
    queue(process_db, "After 1", "After 2")
    wait_for_delivery(runner, smtp_server, 3)
    errors = runner.count("the sending pass failed")
    runner.wait_for_passes(3)
    assert runner.count("the sending pass failed") == errors, runner.log()  # it recovered for good

    assert subjects(smtp_server) == ["After 1", "After 2", "Before"]
    runner.wait_until(lambda: queued(process_db) == {}, "every message recorded")
    assert_stops_with_sigterm(runner)


def drop_connections_during_first_message(db: ProcessDatabase, smtp_server, tmp_path, runmailers) -> Runmailer:
    """Queue three messages; end runmailer's database connection while the mail server takes the first.

    The first message goes out; then recording it meets the dead connection.
    Return runmailer once all three are at the mail server and it has looked
    at the queue again.
    """
    queue(db, "One", "Two", "Three")
    ended: list[int] = []

    def on_message(received) -> None:
        if not ended:
            ended.append(end_connections(db))

    smtp_server.on_message(on_message)
    runner = runmailers(
        db, smtp_server.port, tmp_path / "send_mail", MAILER_PROCESS_DATABASE=database_settings(db, None)
    )
    wait_for_delivery(runner, smtp_server, 3)
    runner.wait_for_passes(2)
    assert ended and ended[0] >= 1, ended
    return runner


@needs_database_server
def test_a_database_restart_during_a_message_neither_loses_it_nor_sends_it_twice(
    process_db, smtp_server, tmp_path, runmailers
):
    """The connection dies while a message is at the mail server: the message went out once, and it is
    either recorded as sent or kept claimed (so no pass sends it again before MAILER_CLAIM_TIMEOUT); the
    rest of the queue goes out from the same process, which stops with SIGTERM as usual.
    """
    runner = drop_connections_during_first_message(process_db, smtp_server, tmp_path, runmailers)
    runner.assert_running()

    assert subjects(smtp_server) == ["One", "Three", "Two"]
    [first] = [r.message["Message-ID"] for r in smtp_server.received if r.message["Subject"] == "One"]
    logged_sent = [mid for (mid,) in process_db.query("SELECT message_id FROM mailer_messagelog WHERE result = '1'")]
    left = queued(process_db)
    assert sorted(logged_sent + list(left)) == sorted(r.message["Message-ID"] for r in smtp_server.received)
    assert set(left) <= {first} and all(claimed for _, claimed in left.values()), left
    assert_stops_with_sigterm(runner)


@needs_database_server
def test_a_database_restart_during_a_message_still_records_it_as_sent(process_db, smtp_server, tmp_path, runmailers):
    """The database is back within moments: recording the delivered message, which is tried again for that
    very reason, must succeed on a new connection rather than leave the message to be sent twice.
    """
    runner = drop_connections_during_first_message(process_db, smtp_server, tmp_path, runmailers)

    assert runner.count("was sent but could not be recorded") == 0, runner.log()
    runner.wait_until(lambda: queued(process_db) == {}, "every message recorded")
    assert_stops_with_sigterm(runner)


# Restarting the server breaks every other test using it at the time, so this
# test runs only when asked; .ci/run asks (tox.ini runs the environments on
# one server one after another).
PG_RESTART = os.environ.get("MAILER_TEST_PG_RESTART")
if VENDOR != "postgresql":
    PG_RESTART_SKIPPED: str | None = f"a PostgreSQL restart: PostgreSQL only (MAILER_TEST_DB={VENDOR})"
elif not PG_RESTART:
    PG_RESTART_SKIPPED = "set MAILER_TEST_PG_RESTART to a shell command that restarts the PostgreSQL server"
else:
    PG_RESTART_SKIPPED = None


def wait_for_server(db: ProcessDatabase, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.query("SELECT 1")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.skipif(PG_RESTART_SKIPPED is not None, reason=PG_RESTART_SKIPPED or "")
def test_runmailer_survives_a_postgresql_restart(process_db, smtp_server, tmp_path, runmailers):
    """The real thing, where CI can do it: MAILER_TEST_PG_RESTART is the shell command that restarts the
    server (``pg_ctlcluster 15 main restart``). runmailer, holding a connection, goes on and delivers
    mail queued after the restart.
    """

    queue(process_db, "Before")
    runner = runmailers(
        process_db,
        smtp_server.port,
        tmp_path / "send_mail",
        MAILER_PROCESS_DATABASE=database_settings(process_db, None),
    )
    wait_for_delivery(runner, smtp_server, 1)
    runner.wait_for_passes(1)

    try:
        restart = subprocess.run(["sh", "-c", PG_RESTART or "false"], capture_output=True, text=True, timeout=120)
        assert restart.returncode == 0, f"{PG_RESTART!r} failed: {restart.stdout}{restart.stderr}"
        wait_for_server(process_db)
    finally:
        # This suite's own connections died with the server: the next test must open new ones.
        from django.db import connections

        connections.close_all()

    runner.wait_for_passes(2)
    queue(process_db, "After")
    wait_for_delivery(runner, smtp_server, 2)
    runner.wait_for_passes(2)

    assert runner.count("the sending pass failed") >= 1, runner.log()  # it did meet the restart
    assert subjects(smtp_server) == ["After", "Before"]
    runner.wait_until(lambda: queued(process_db) == {}, "every message recorded")
    assert_stops_with_sigterm(runner)
