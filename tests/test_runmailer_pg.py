"""``runmailer_pg`` as a real process: woken by PostgreSQL the moment mail is queued, and hard to kill by accident.

Everything is real: ``manage.py runmailer_pg --debug`` in its own process,
the PostgreSQL server of the run (``process_db``, ``MAILER_TEST_DB=postgresql``),
an aiosmtpd server on loopback. Where a test shows that a notification
brought the mail, ``MAILER_EMPTY_QUEUE_SLEEP`` is a minute and the mail
must arrive well before it: the regular look cannot have sent it.

On SQLite and MariaDB only the refusal to start runs: the rest skips.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests import settings as test_settings
from tests.processes import VENDOR, ProcessDatabase, fresh_database, manage
from tests.test_runmailer_survives import CHANGE_A_COLUMN_TYPE, Runmailer, queue_one_by_one, started_runners

needs_postgresql = pytest.mark.skipif(
    VENDOR != "postgresql", reason=f"runmailer_pg runs on PostgreSQL only (MAILER_TEST_DB={VENDOR})"
)

# MAILER_EMPTY_QUEUE_SLEEP when the mail must be brought by a notification:
# far longer than TIMEOUT, so a regular look cannot be what sent it.
LONG_SLEEP = 120
# MAILER_EMPTY_QUEUE_SLEEP when the regular look is what is tested.
SHORT_SLEEP = 0.5
# How long anything may take on a busy 2-core machine: generous, never a measurement.
TIMEOUT = 40

PRIORITY_DEFERRED = 4
CHANNEL = "django_mailer_new_message"
LISTENING = f"listening for new mail on the channel {CHANNEL}"
WAITING = "waiting for new mail"
NOTIFIED = "notification(s) of new mail"
PASS_FAILED = "the sending pass failed"


class RunmailerPg(Runmailer):
    """``manage.py runmailer_pg --debug`` in the background, its log (stderr) collected line by line."""

    command = "runmailer_pg"

    def wait_until_idle(self, listening: int = 1) -> None:
        """Wait until it listens (for the ``listening``-th time) and has looked at the queue since: mail queued
        from now on is news to it.
        """
        self.wait_for_line(LISTENING, listening)
        since = [n for n, line in enumerate(list(self.lines)) if LISTENING in line][listening - 1]
        self.wait_for_line(WAITING, since=since)


@pytest.fixture
def runmailer_pg():
    """Start ``RunmailerPg``s, killed at the end if still running."""
    yield from started_runners(RunmailerPg)


def queue(db: ProcessDatabase, *subjects: str, priority: int | None = None) -> None:
    """Queue one message per subject the usual way (``mailer.send_mail``), in a process of its own."""
    code = (
        f"import mailer\nfor s in {list(subjects)!r}:\n"
        f"    mailer.send_mail(s, 'Body', 'site@example.com', ['to@example.com'], priority={priority!r})"
    )
    result = manage("shell", "-c", code, db=db)
    assert result.returncode == 0, result.stderr


def insert_message(db: ProcessDatabase, subject: str, priority: int = 2, table: str = "mailer_message") -> None:
    """Write a message straight into ``table``, in a transaction of its own, as another program would."""
    message_id = f"<{uuid.uuid4().hex}@runmailer-pg.test>"
    email = {
        "class": "django.core.mail.message.EmailMessage",
        "subject": subject,
        "body": "Body",
        "from_email": "site@example.com",
        "to": ["to@example.com"],
        "cc": [],
        "bcc": [],
        "reply_to": [],
        "extra_headers": {"Message-ID": message_id},
        "encoding": None,
        "content_subtype": "plain",
        "attachments": [],
    }
    db.execute(
        f"INSERT INTO {table} (message_data, when_added, priority, retry_count, subject, from_email,"  # noqa: S608
        " recipients, message_id) VALUES (%s, now(), %s, 0, %s, 'site@example.com', 'to@example.com', %s)",
        json.dumps({"mailer": 1, "email": email}),
        priority,
        subject,
        message_id,
    )


def queued(db: ProcessDatabase) -> dict[str, tuple[int, bool]]:
    """The queue: subject -> (priority, whether claimed)."""
    rows = db.query("SELECT subject, priority, claimed_until FROM mailer_message")
    return {subject: (priority, claimed is not None) for subject, priority, claimed in rows}


def subjects(server) -> list[str]:
    return sorted(str(received.message["Subject"]) for received in server.received)


def wait_for_delivery(runner: RunmailerPg, server, count: int, timeout: float = TIMEOUT) -> None:
    runner.wait_until(lambda: len(server.received) >= count, f"{count} message(s) at the mail server", timeout)


def assert_stops(runner: RunmailerPg, signum: int = signal.SIGTERM) -> None:
    returncode, out, took = runner.terminate(signum)
    assert returncode == 0, runner.log()
    assert "Starting django-mailer send loop." in out and out.rstrip().endswith("Stopped."), out
    assert took < 10, f"{signal.Signals(signum).name} took {took:.1f} s"


def end_connections(db: ProcessDatabase) -> int:
    """End every client connection to ``db`` but the one asking, as a server restart does; return how many."""
    rows = db.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
        db.name,
    )
    return sum(1 for (done,) in rows if done)


def triggers(db: ProcessDatabase) -> list[str]:
    rows = db.query("SELECT tgname FROM pg_trigger WHERE tgrelid = 'mailer_message'::regclass AND NOT tgisinternal")
    return [name for (name,) in rows]


# Where it cannot run ---------------------------------------------------------------------------------


def test_runmailer_pg_refuses_to_start_on_another_database(tmp_path):
    """On SQLite or MariaDB it says at once what it needs and what to run instead, and exits non-zero.

    On a PostgreSQL run, the site's database is a SQLite file.
    """
    if VENDOR == "mysql":
        with fresh_database(tmp_path) as db:
            result = manage("runmailer_pg", db=db, timeout=60)
    else:
        result = manage("runmailer_pg", db=tmp_path / "site.sqlite3", timeout=60)

    assert result.returncode == 1, result.stderr
    assert "CommandError: runmailer_pg needs PostgreSQL" in result.stderr
    assert "Use runmailer instead." in result.stderr
    assert "Starting" not in result.stdout  # no loop was started


def test_runmailer_pg_refuses_a_number_of_connections_below_1(tmp_path):
    result = manage("runmailer_pg", "--connections", "0", db=tmp_path / "site.sqlite3", timeout=60)

    assert result.returncode == 2
    assert "--connections: must be a whole number, 1 or more, not '0'" in result.stderr


# Prompt: the notification brings the mail ------------------------------------------------------------


@needs_postgresql
@pytest.mark.slow
def test_mail_goes_out_as_soon_as_it_is_queued(process_db, smtp_server, tmp_path, runmailer_pg):
    """With a look at the queue only every two minutes, mail queued while it waits goes out within seconds.

    Mail queued before it started goes out at once too: it looks at the
    queue when it starts, after it has begun to listen.
    """
    queue(process_db, "Before start")
    runner = runmailer_pg(process_db, smtp_server.port, tmp_path / "send_mail", LONG_SLEEP)
    wait_for_delivery(runner, smtp_server, 1)
    runner.wait_until_idle()

    queue(process_db, "Queued 1")
    wait_for_delivery(runner, smtp_server, 2)
    insert_message(process_db, "Queued 2")  # by another program, with SQL
    wait_for_delivery(runner, smtp_server, 3)

    assert subjects(smtp_server) == ["Before start", "Queued 1", "Queued 2"]
    assert runner.count(NOTIFIED) >= 2, runner.log()
    runner.wait_until(lambda: queued(process_db) == {}, "every message recorded")
    assert triggers(process_db) == ["django_mailer_message_notify_trigger"]
    assert_stops(runner)


def one_then_another(process_db, smtp_server, tmp_path, runmailer_pg) -> RunmailerPg:
    """Start runmailer_pg; queue "First", and "Second" once the first has arrived; return the runner."""
    runner = runmailer_pg(process_db, smtp_server.port, tmp_path / "send_mail", LONG_SLEEP)
    runner.wait_until_idle()
    insert_message(process_db, "First")
    wait_for_delivery(runner, smtp_server, 1)
    insert_message(process_db, "Second")
    wait_for_delivery(runner, smtp_server, 2)
    return runner


@needs_postgresql
@pytest.mark.slow
def test_mail_queued_soon_after_goes_out_over_the_same_session(process_db, smtp_server, tmp_path, runmailer_pg):
    """The session of a pass stays open a few seconds: mail queued meanwhile goes out without a new connection,
    greeting and EHLO, which cost more than the rest of its way. It is not held for long: once idle that
    while, it is ended with QUIT.
    """
    runner = one_then_another(process_db, smtp_server, tmp_path, runmailer_pg)

    assert smtp_server.connections == 1, runner.log()
    runner.wait_until(lambda: smtp_server.quits == 1, "the idle session to be ended")
    runner.wait_until(lambda: queued(process_db) == {}, "every message recorded")
    assert_stops(runner)
    assert smtp_server.quits == 1


@needs_postgresql
@pytest.mark.slow
def test_a_session_the_server_ended_meanwhile_is_replaced_and_mail_goes_out(
    process_db, smtp_server, tmp_path, runmailer_pg
):
    """A server that ends a session after each message (or when it has been idle a while): the next message,
    tried on the session kept for it, goes out over a new one, neither deferred nor failed.
    """
    smtp_server.hang_up_after(1)
    runner = one_then_another(process_db, smtp_server, tmp_path, runmailer_pg)

    runner.wait_until(lambda: queued(process_db) == {}, "every message recorded")
    assert subjects(smtp_server) == ["First", "Second"]
    assert smtp_server.connections == 2
    assert process_db.query("SELECT result FROM mailer_messagelog") == [("1",), ("1",)]
    assert_stops(runner)


@needs_postgresql
@pytest.mark.slow
def test_mail_queued_during_a_pass_leads_to_one_more_look(process_db, smtp_server, tmp_path, runmailer_pg):
    """Five messages queued (in five transactions) while a pass is busy at the mail server: one look follows
    that pass, not five. Queued as deferred, they are not for the pass that is running, nor for the look.
    """
    queued_during_the_pass = threading.Event()
    in_the_pass = threading.Event()

    def hold_the_pass(received) -> None:
        in_the_pass.set()
        queued_during_the_pass.wait(TIMEOUT)

    runner = runmailer_pg(process_db, smtp_server.port, tmp_path / "send_mail", LONG_SLEEP)
    runner.wait_until_idle()
    smtp_server.on_message(hold_the_pass)
    insert_message(process_db, "Sent")
    runner.wait_until(in_the_pass.is_set, "the pass to be at the mail server")
    before = len(runner.lines)
    for n in range(5):
        insert_message(process_db, f"Deferred {n}", priority=PRIORITY_DEFERRED)
    queued_during_the_pass.set()
    wait_for_delivery(runner, smtp_server, 1)
    runner.wait_for_line(NOTIFIED, since=before)
    runner.wait_for_line(WAITING, 2, since=before)  # after the pass, then after the look the notifications brought
    time.sleep(1)  # any other look would have come by now

    notified = [line for line in runner.lines[before:] if NOTIFIED in line]
    assert notified == [f"5 {NOTIFIED}"], runner.log(before)
    assert runner.count(WAITING, since=before) == 2, runner.log(before)
    assert subjects(smtp_server) == ["Sent"]
    assert_stops(runner)


@needs_postgresql
@pytest.mark.slow
def test_connections_sends_over_that_many_connections_at_once(process_db, smtp_server, tmp_path, runmailer_pg):
    """``--connections 2``: for a mail server that takes its time, each pass sends over two sessions at once."""
    queue(process_db, *(f"Message {n}" for n in range(10)))
    smtp_server.on_message(lambda received: time.sleep(0.2))
    runner = runmailer_pg(process_db, smtp_server.port, tmp_path / "send_mail", LONG_SLEEP, "--connections", "2")
    wait_for_delivery(runner, smtp_server, 10)

    assert subjects(smtp_server) == sorted(f"Message {n}" for n in range(10))
    assert len({received.session for received in smtp_server.received}) == 2
    runner.wait_until(lambda: queued(process_db) == {}, "every message recorded")
    assert_stops(runner)


# The regular look: what no notification announces ---------------------------------------------------


@needs_postgresql
@pytest.mark.slow
def test_the_regular_look_sends_what_no_notification_announced(process_db, smtp_server, tmp_path, runmailer_pg):
    """``retry_deferred`` changes rows rather than inserting them, so no notification comes: the look every
    MAILER_EMPTY_QUEUE_SLEEP seconds sends them.
    """
    runner = runmailer_pg(process_db, smtp_server.port, tmp_path / "send_mail", SHORT_SLEEP)
    runner.wait_until_idle()
    queue(process_db, "Deferred 1", "Deferred 2", priority=PRIORITY_DEFERRED)
    runner.wait_for_line(NOTIFIED)
    runner.wait_for_line(WAITING, since=[n for n, line in enumerate(list(runner.lines)) if NOTIFIED in line][0])
    assert smtp_server.received == []  # deferred: for retry_deferred, not for the pass

    notifications = runner.count(NOTIFIED)
    result = manage("retry_deferred", db=process_db)
    assert result.returncode == 0, result.stderr
    wait_for_delivery(runner, smtp_server, 2)

    assert subjects(smtp_server) == ["Deferred 1", "Deferred 2"]
    assert runner.count(NOTIFIED) == notifications  # the look found them, no notification
    runner.wait_until(lambda: queued(process_db) == {}, "every message recorded")
    assert_stops(runner)


# Stopping, pausing, the lock ------------------------------------------------------------------------


@needs_postgresql
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_stops_a_waiting_runmailer_pg_with_status_0(process_db, smtp_server, tmp_path, runmailer_pg, signum):
    """Waiting for mail (for two minutes), it stops within seconds and prints "Stopped."."""
    runner = runmailer_pg(process_db, smtp_server.port, tmp_path / "send_mail", LONG_SLEEP)
    runner.wait_until_idle()
    assert_stops(runner, signum)


@needs_postgresql
@pytest.mark.slow
def test_sigterm_during_a_pass_finishes_the_message_in_flight(process_db, smtp_server, tmp_path, runmailer_pg):
    """SIGTERM while the mail server takes the second of five messages: that one goes out and is recorded,
    no other is begun, nothing stays claimed, the lock is given back, and the exit status is 0.
    """
    lock_path = tmp_path / "send_mail"
    runner = runmailer_pg(process_db, smtp_server.port, lock_path, LONG_SLEEP)
    runner.wait_until_idle()

    def signal_during_the_second(received) -> None:
        if len(smtp_server.received) == 1:
            runner.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # still in flight when the signal lands

    smtp_server.on_message(signal_during_the_second)
    queue(process_db, "1", "2", "3", "4", "5")
    returncode = runner.process.wait(timeout=TIMEOUT)

    assert returncode == 0, runner.log()
    assert len(smtp_server.received) == 2, runner.log()
    left = queued(process_db)
    assert len(left) == 3 and not any(claimed for _, claimed in left.values()), left
    assert not Path(f"{lock_path}.lock").exists()


@needs_postgresql
@pytest.mark.slow
def test_a_paused_runmailer_pg_sends_nothing(process_db, smtp_server, tmp_path, runmailer_pg):
    """MAILER_PAUSE_SEND: notified of new mail, it says sending is paused and sends nothing."""
    (tmp_path / "paused_settings.py").write_text(
        "from tests.process_settings import *  # noqa\nMAILER_PAUSE_SEND = True\n"
    )
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    runner = runmailer_pg(
        process_db,
        smtp_server.port,
        tmp_path / "send_mail",
        LONG_SLEEP,
        DJANGO_SETTINGS_MODULE="paused_settings",
        PYTHONPATH=path,
    )
    runner.wait_until_idle()
    queue(process_db, "Paused")
    runner.wait_for_line(NOTIFIED)
    runner.wait_for_line("sending is paused, quitting.")
    time.sleep(1)

    assert smtp_server.received == []
    assert queued(process_db) == {"Paused": (2, False)}
    assert_stops(runner)


@needs_postgresql
@pytest.mark.slow
def test_a_lock_held_elsewhere_holds_it_back_until_the_next_look(
    process_db, smtp_server, tmp_path, runmailer_pg, hold_lock
):
    """Another process (a send_mail from cron) holds the lock when mail is queued: nothing is sent twice at
    once; the mail goes out at a look after the lock is given back.
    """
    lock_path = str(tmp_path / "send_mail")
    holder = hold_lock(lock_path)
    runner = runmailer_pg(process_db, smtp_server.port, Path(lock_path), SHORT_SLEEP)
    runner.wait_until_idle()
    queue(process_db, "Waiting")
    runner.wait_for_line("lock already in place. quitting.", 2)
    assert smtp_server.received == []

    holder.release()
    wait_for_delivery(runner, smtp_server, 1)
    assert subjects(smtp_server) == ["Waiting"]
    assert_stops(runner)


# Errors and lost connections ------------------------------------------------------------------------


@needs_postgresql
@pytest.mark.slow
def test_a_pass_that_fails_is_logged_and_the_loop_goes_on(process_db, smtp_server, tmp_path, runmailer_pg):
    """The queue's table is out of reach (renamed away, as a restore leaves it) when a message comes in: the
    look fails, with an ERROR naming why, and once the table is back the message and later mail go out from
    the same process.
    """
    runner = runmailer_pg(process_db, smtp_server.port, tmp_path / "send_mail", SHORT_SLEEP)
    runner.wait_until_idle()

    process_db.execute("ALTER TABLE mailer_message RENAME TO mailer_message_away")
    try:
        insert_message(process_db, "While away", table="mailer_message_away")  # the trigger went with the table
        runner.wait_for_line(PASS_FAILED, 2)
    finally:
        process_db.execute("ALTER TABLE mailer_message_away RENAME TO mailer_message")
    assert runner.count('relation "mailer_message" does not exist') >= 1, runner.log()
    wait_for_delivery(runner, smtp_server, 1)
    queue(process_db, "After")
    wait_for_delivery(runner, smtp_server, 2)

    assert subjects(smtp_server) == ["After", "While away"]
    runner.wait_until(lambda: queued(process_db) == {}, "every message recorded")
    assert_stops(runner)


@needs_postgresql
@pytest.mark.slow
@pytest.mark.skipif(
    test_settings.DATABASES["default"].get("OPTIONS", {}).get("prepare_threshold") is None,
    reason="psycopg's prepared statements (MAILER_TEST_PG_PREPARED=1)",
)
def test_with_prepared_statements_a_migration_changing_a_column_costs_one_failed_pass(
    process_db, smtp_server, tmp_path, runmailer_pg
):
    """A deploy changes the type of a column of the queue while the worker runs: its prepared claim no longer
    fits the table. That pass fails; the next starts on new connections, and every later pass goes through.
    """
    runner = runmailer_pg(process_db, smtp_server.port, tmp_path / "send_mail", SHORT_SLEEP)
    runner.wait_until_idle()
    queue_one_by_one(runner, process_db, smtp_server, "Before", 3)  # passes enough for psycopg to prepare the claim

    process_db.execute(CHANGE_A_COLUMN_TYPE)
    queue_one_by_one(runner, process_db, smtp_server, "After", 4)

    assert subjects(smtp_server) == [*(f"After {n}" for n in range(1, 5)), *(f"Before {n}" for n in range(1, 4))]
    assert runner.count(PASS_FAILED) <= 1, runner.log()
    assert_stops(runner)


@needs_postgresql
@pytest.mark.slow
def test_it_listens_again_after_losing_its_connections(process_db, smtp_server, tmp_path, runmailer_pg):
    """The server ends every connection (as a restart does) while the trigger is gone (as a restored dump
    leaves it): it connects again, installs the trigger again, and mail queued afterwards goes out within
    seconds, not at the next look two minutes later.
    """
    runner = runmailer_pg(process_db, smtp_server.port, tmp_path / "send_mail", LONG_SLEEP)
    runner.wait_until_idle()
    process_db.execute("DROP TRIGGER django_mailer_message_notify_trigger ON mailer_message")

    assert end_connections(process_db) >= 1
    runner.wait_until_idle(listening=2)
    queue(process_db, "After")
    wait_for_delivery(runner, smtp_server, 1)

    assert subjects(smtp_server) == ["After"]
    assert runner.count("lost the connection listening for new mail") == 1, runner.log()
    # The server was there all along: the first try to listen again worked, no error to alarm anyone.
    assert runner.count("cannot listen for new mail") == 0, runner.log()
    assert triggers(process_db) == ["django_mailer_message_notify_trigger"]
    assert_stops(runner)


# Restarting the server breaks every other test using it at the time, so this
# test runs only when asked; .ci/run asks.
PG_RESTART = os.environ.get("MAILER_TEST_PG_RESTART")


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


@needs_postgresql
@pytest.mark.slow
@pytest.mark.skipif(
    not PG_RESTART, reason="set MAILER_TEST_PG_RESTART to a shell command that restarts the PostgreSQL server"
)
def test_it_survives_a_postgresql_restart(process_db, smtp_server, tmp_path, runmailer_pg):
    """The real thing: the server restarts under it. It listens again on its own, and mail queued
    afterwards goes out within seconds, from the same process.
    """
    queue(process_db, "Before")
    runner = runmailer_pg(process_db, smtp_server.port, tmp_path / "send_mail", LONG_SLEEP)
    wait_for_delivery(runner, smtp_server, 1)
    runner.wait_until_idle()

    try:
        restart = subprocess.run(["sh", "-c", PG_RESTART or "false"], capture_output=True, text=True, timeout=120)
        assert restart.returncode == 0, f"{PG_RESTART!r} failed: {restart.stdout}{restart.stderr}"
        wait_for_server(process_db)
    finally:
        # This suite's own connections died with the server: the next test must open new ones.
        from django.db import connections

        connections.close_all()

    runner.wait_until_idle(listening=2)
    queue(process_db, "After")
    wait_for_delivery(runner, smtp_server, 2)

    assert subjects(smtp_server) == ["After", "Before"]
    assert runner.count("lost the connection listening for new mail") == 1, runner.log()  # it met the restart
    runner.wait_until(lambda: queued(process_db) == {}, "every message recorded")
    assert_stops(runner)


@needs_postgresql
@pytest.mark.slow
def test_sigterm_with_a_session_kept_to_a_server_that_stopped_answering_exits_at_once(
    process_db, tmp_path, runmailer_pg
):
    """Ending the kept session says QUIT, but waits a moment for the reply, not the whole timeout (10 s here):
    a service manager would kill a process that took that long.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        runner = runmailer_pg(process_db, port, tmp_path / "send_mail", LONG_SLEEP)
        runner.wait_until_idle()
        insert_message(process_db, "First")
        runner.wait_until(lambda: queued(process_db) == {}, "the message sent and recorded")
        server.send_signal(signal.SIGSTOP)  # the server hangs, or the network to it is gone

        returncode, _out, took = runner.terminate(signal.SIGTERM)

        assert returncode == 0, runner.log()
        assert took < 5, f"SIGTERM took {took:.1f} s"
    finally:
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.wait()
