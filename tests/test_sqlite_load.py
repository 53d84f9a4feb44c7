"""SQLite under load: web processes queue mail while a drain runs, and none of them gets "database is locked".

SQLite lets one connection write at a time; the others wait for it, up to
the busy timeout. But a transaction that has read and then wants to write
cannot wait (another writer may have changed what it read): SQLite fails it
at once with "database is locked", whatever the timeout. A web request
under ``ATOMIC_REQUESTS`` that reads, then queues a message, is such a
transaction, and so is queueing inside any ``transaction.atomic()`` block,
since queueing reads the don't-send list first.

docs/performance.rst recommends the settings below: transactions that take
the write lock when they begin (``"transaction_mode": "IMMEDIATE"``, so they
wait their turn instead of failing), a busy timeout of 20 seconds, and the
WAL journal with ``synchronous=NORMAL`` (readers and the writer no longer
block each other, and a commit costs far less). With Django's defaults the
same processes fail within moments.
"""

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.processes import MANAGE_PY, VENDOR, ProcessDatabase, manage, process_environment

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(VENDOR != "sqlite", reason="SQLite only: the settings docs/performance.rst recommends for it"),
]

# What docs/performance.rst recommends, in DATABASES["default"]["OPTIONS"].
RECOMMENDED_OPTIONS = {
    "transaction_mode": "IMMEDIATE",
    "timeout": 20,
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
}

WEB_PROCESSES = 3
ROUNDS = 20
BULK = 3

# One web process: each round, a request under ATOMIC_REQUESTS that reads
# (the user, say) and queues one message; then a bulk send through the
# queueing backend, in autocommit (what Django's send_mass_mail does when
# EMAIL_BACKEND is mailer's DbBackend). Rounds come a tenth of a second
# apart, as requests do, so that queueing lasts while the drain runs (on a
# busy machine, unpaced rounds may all end before the drain looks again).
WEB_PROCESS = """
import time

from django.contrib.auth.models import User
from django.core.mail import EmailMessage
from django.db import transaction

import mailer
from mailer.backend import DbBackend

queued = 0
for turn in range({rounds}):
    with transaction.atomic():
        User.objects.filter(username="someone").exists()
        queued += mailer.send_mail(f"Web {web} request {{turn}}", "Body", "f@example.com", ["a@example.com"])
    subjects = [f"Web {web} bulk {{turn}}.{{n}}" for n in range({bulk})]
    emails = [EmailMessage(subject, "Body", "f@example.com", ["b@example.com"]) for subject in subjects]
    queued += DbBackend().send_messages(emails)
    time.sleep(0.1)
print("queued", queued)
"""


def environment(db: ProcessDatabase, smtp_port: int | None, options: dict, **extra: str) -> dict[str, str]:
    """The environment of a child ``manage.py`` whose database has ``options`` as its ``OPTIONS``."""
    env = process_environment(db, smtp_port, **extra)
    env["MAILER_PROCESS_DATABASE"] = json.dumps({**db.settings, "OPTIONS": options})
    return env


def wait_for(condition, timeout: float, process: subprocess.Popen) -> None:
    """Wait until ``condition()`` holds, at most ``timeout`` seconds, or until ``process`` has ended."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)


def test_web_processes_queue_while_runmailer_drains_without_database_is_locked(process_db, smtp_server, tmp_path):
    """With the recommended settings, requests that queue mail in their transaction wait their turn, never fail.

    Three web processes queue (one by one in ATOMIC_REQUESTS-like
    transactions, and in bulk) while runmailer sends and records; every
    message then arrives once and is logged once.
    """
    result = manage(
        "shell",
        "-c",
        "import mailer; mailer.send_mail('First', 'B', 'f@example.com', ['a@example.com'])",
        db=process_db,
    )
    assert result.returncode == 0, result.stderr
    drain_log = tmp_path / "runmailer.log"
    with drain_log.open("w") as output:
        drain = subprocess.Popen(
            [sys.executable, str(MANAGE_PY), "runmailer"],
            env=environment(
                process_db,
                smtp_server.port,
                RECOMMENDED_OPTIONS,
                MAILER_PROCESS_LOCK_PATH=str(tmp_path / "lock"),
                MAILER_PROCESS_EMPTY_QUEUE_SLEEP="0.1",
            ),
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
    web: list[subprocess.Popen] = []
    try:
        # The drain is running once the first message has arrived; then the web processes start.
        wait_for(lambda: smtp_server.received, 30, drain)
        assert smtp_server.received, drain_log.read_text()
        web = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(MANAGE_PY),
                    "shell",
                    "-c",
                    WEB_PROCESS.format(web=n, rounds=ROUNDS, bulk=BULK),
                ],
                env=environment(process_db, smtp_server.port, RECOMMENDED_OPTIONS),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in range(WEB_PROCESSES)
        ]
        outputs = [process.communicate(timeout=120) for process in web]
        queueing_ended = time.monotonic()
        if all(process.returncode == 0 for process in web):
            expected = 1 + WEB_PROCESSES * ROUNDS * (1 + BULK)
            wait_for(lambda: len(smtp_server.received) >= expected and not queued(process_db), 60, drain)
        drain.send_signal(signal.SIGTERM)
        drain.wait(timeout=30)
    finally:
        for process in [drain, *web]:
            if process.poll() is None:
                process.kill()
                process.wait()
    drain_output = drain_log.read_text()

    # No process saw "database is locked", or any other error.
    for process, (out, err) in zip(web, outputs, strict=True):
        assert "database is locked" not in err, err
        assert process.returncode == 0, err
        assert f"queued {ROUNDS * (1 + BULK)}" in out.splitlines(), out
    assert "database is locked" not in drain_output, drain_output
    assert "Traceback" not in drain_output, drain_output
    assert drain.returncode == 0, drain_output
    assert process_db.query("PRAGMA journal_mode") == [("wal",)]  # the recommended settings took effect

    # The drain really ran while the web processes queued.
    assert any(
        r.received_at < queueing_ended for r in smtp_server.received if r.message["Subject"].startswith("Web")
    ), "nothing queued by the web processes went out before they had all finished"

    # Every message arrived exactly once, and is recorded once.
    subjects = sorted(r.message["Subject"] for r in smtp_server.received)
    assert subjects == sorted(
        ["First"]
        + [f"Web {n} request {r}" for n in range(WEB_PROCESSES) for r in range(ROUNDS)]
        + [f"Web {n} bulk {r}.{k}" for n in range(WEB_PROCESSES) for r in range(ROUNDS) for k in range(BULK)]
    )
    arrived = Counter(r.message["Message-ID"] for r in smtp_server.received)
    assert max(arrived.values()) == 1
    logged = Counter(process_db.query("SELECT message_id, result FROM mailer_messagelog"))
    assert logged == Counter({(message_id, "1"): 1 for message_id in arrived})
    assert not queued(process_db)


def queued(db: ProcessDatabase) -> int:
    [(count,)] = db.query("SELECT COUNT(*) FROM mailer_message")
    return count


def test_the_recommended_options_are_what_django_reads(tmp_path: Path):
    """A misspelt option is ignored or refused by Django: the settings must be in force, on every Django we support.

    (The first test would then still pass on a quiet machine, but only by luck.)
    """
    code = (
        "from django.db import connection, transaction\n"
        "from django.test.utils import CaptureQueriesContext\n"
        "cursor = connection.cursor()\n"
        "for pragma in ('journal_mode', 'synchronous', 'busy_timeout'):\n"
        "    print(cursor.execute(f'PRAGMA {pragma}').fetchone()[0], end=' ')\n"
        "with CaptureQueriesContext(connection) as queries, transaction.atomic():\n"
        "    connection.cursor().execute('SELECT 1')\n"
        "print()\n"
        "print(queries.captured_queries[0]['sql'])\n"
    )
    database = ProcessDatabase.sqlite(tmp_path / "site.sqlite3")
    result = subprocess.run(
        [sys.executable, str(MANAGE_PY), "shell", "-c", code],
        env=environment(database, None, RECOMMENDED_OPTIONS),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    # WAL; synchronous 1 is NORMAL; the timeout in milliseconds; transactions take the write lock at once.
    assert result.stdout.splitlines()[-2:] == ["wal 1 20000 ", "BEGIN IMMEDIATE"]
