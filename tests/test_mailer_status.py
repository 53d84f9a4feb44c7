"""``manage.py mailer_status``: what monitoring and an operator read about the queue, the log and the lock file.

The counts are checked against a queue and a log prepared row by row
(``prepare``), in-process and through real ``manage.py`` processes; the
exit status both ways for each threshold; the lock file as held by a real
``send_mail`` pass in the middle of a message, then as left by that pass
killed with SIGKILL.
"""

import datetime
import json
import os
import re
import socket
import subprocess
import sys
import threading
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from mailer import locking
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_MEDIUM,
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    SENT_MARK,
    SENT_MARK_HOLDS,
    Message,
    MessageLog,
    make_message,
)
from mailer.status import queue_status
from tests import settings as test_settings
from tests.processes import MANAGE_PY, VENDOR, ProcessDatabase, fresh_database, manage, process_environment

MINUTE = datetime.timedelta(minutes=1)

# What ``prepare`` puts in the queue and the log, as ``--json`` must report it.
EXPECTED_COUNTS = {
    "queue": {"high": 2, "medium": 3, "low": 3, "deferred": 3, "other": 0, "total": 11},
    "failed_permanently": 1,
    "claimed": 1,
    "sent_not_recorded": 1,
    "paused": False,
    "log": {
        "last_hour": {"sent": 2, "failed": 1, "dont_send": 0},
        "last_day": {"sent": 3, "failed": 2, "dont_send": 1},
    },
}
# The oldest message a pass would send: older ones wait for a retry, were sent already, or are deferred.
OLDEST_DUE_AGE = 90 * 60


def prepare(now: datetime.datetime | None = None) -> None:
    """Fill the queue and the log as ``EXPECTED_COUNTS`` says, ``now`` being now.

    Also run in the ``manage.py`` process of a test (``manage shell``), so
    the same rows are counted there.
    """
    if now is None:
        now = timezone.now()

    def add(priority: int, minutes_ago: float, **columns: Any) -> None:
        message = make_message("Subject", "Body", "from@example.com", ["to@example.com"], priority=priority)
        message.save()
        Message.objects.filter(pk=message.pk).update(when_added=now - minutes_ago * MINUTE, **columns)

    add(PRIORITY_HIGH, 10)
    add(PRIORITY_HIGH, 5)
    add(PRIORITY_MEDIUM, 30)
    add(PRIORITY_MEDIUM, 120, retry_after=now + 10 * MINUTE, retry_count=1)  # waits for its automatic retry
    add(PRIORITY_MEDIUM, 200, claimed_by=SENT_MARK + "pass", claimed_until=now + SENT_MARK_HOLDS)  # sent
    add(PRIORITY_LOW, OLDEST_DUE_AGE / 60)
    add(PRIORITY_LOW, 1, claimed_by="pass", claimed_until=now + 10 * MINUTE)  # being sent
    add(PRIORITY_LOW, 2, claimed_by="dead pass", claimed_until=now - MINUTE)  # a claim that has lapsed
    add(PRIORITY_DEFERRED, 1000)
    add(PRIORITY_DEFERRED, 500)
    add(PRIORITY_DEFERRED, 400, failed_permanently=True)

    for result, minutes_ago in [
        (RESULT_SUCCESS, 30),
        (RESULT_SUCCESS, 59),
        (RESULT_SUCCESS, 61),
        (RESULT_SUCCESS, 2 * 24 * 60),
        (RESULT_FAILURE, 10),
        (RESULT_FAILURE, 20 * 60),
        (RESULT_DONT_SEND, 3 * 60),
    ]:
        MessageLog.objects.create(
            message_id="<id@example.com>",
            when_added=now - 3 * 24 * 60 * MINUTE,
            when_attempted=now - minutes_ago * MINUTE,
            priority=PRIORITY_MEDIUM,
            result=result,
            log_message="",
        )


def counts_of(document: dict[str, Any]) -> dict[str, Any]:
    return {key: document[key] for key in EXPECTED_COUNTS}


def status_json(*args: str) -> dict[str, Any]:
    out = StringIO()
    call_command("mailer_status", "--json", *args, stdout=out)
    return json.loads(out.getvalue())


def report(*args: str) -> dict[str, str]:
    """The human-readable output, as {label: value}; checks first that the values are aligned."""
    out = StringIO()
    call_command("mailer_status", *args, stdout=out)
    lines = out.getvalue().splitlines()
    rows = [re.fullmatch(r"(\S.*?)  +(\S.*)", line) for line in lines]
    assert all(rows), lines
    assert len({len(line) - len(row[2]) for line, row in zip(lines, rows, strict=True) if row}) == 1, lines
    return {row[1]: row[2] for row in rows if row}


# In-process: the counts ------------------------------------------------------


@pytest.mark.django_db
def test_json_counts_the_queue_the_claims_and_the_log_of_the_last_hour_and_day():
    prepare()

    document = status_json()

    assert counts_of(document) == EXPECTED_COUNTS
    assert document["format"] == 1 and document["exceeded"] == []
    age = document["oldest_due"]["age_seconds"]
    assert OLDEST_DUE_AGE <= age < OLDEST_DUE_AGE + 60
    queued_at = datetime.datetime.fromisoformat(document["oldest_due"]["due_since"])
    now = datetime.datetime.fromisoformat(document["time"])
    assert queued_at.utcoffset() == now.utcoffset() == datetime.timedelta(0)
    assert abs((now - queued_at).total_seconds() - age) <= 1  # the time is given to the second


@pytest.mark.django_db
def test_the_oldest_due_message_is_the_oldest_of_any_priority_that_a_pass_would_send():
    """Not the deferred, nor one waiting for its automatic retry, nor one already sent; at any priority."""
    now = timezone.now()
    prepare(now)

    status = queue_status(now)

    assert status.oldest_due == now - OLDEST_DUE_AGE / 60 * MINUTE
    assert status.oldest_due_age == OLDEST_DUE_AGE


@pytest.mark.django_db
def test_an_empty_queue_has_no_oldest_due_message_and_passes_every_threshold():
    document = status_json("--max-age", "0", "--max-deferred", "0")

    assert document["oldest_due"] is None
    assert document["queue"]["total"] == 0 and document["exceeded"] == []


@pytest.mark.django_db
def test_messages_with_an_unknown_priority_are_counted_apart_and_in_the_total():
    prepare()
    Message.objects.filter(priority=PRIORITY_HIGH).update(priority=0)

    document = status_json()

    assert document["queue"]["other"] == 2 and document["queue"]["high"] == 0
    assert document["queue"]["total"] == EXPECTED_COUNTS["queue"]["total"]  # type: ignore[index]


@pytest.mark.django_db
def test_the_snapshot_costs_a_few_queries_whatever_the_queue_and_reads_no_message_data():
    """It runs every minute against queues of millions: aggregates only, never a row's content."""
    prepare()
    with CaptureQueriesContext(connection) as small:
        queue_status()
    for _ in range(30):
        make_message("Subject", "Body", "from@example.com", ["to@example.com"]).save()
    with CaptureQueriesContext(connection) as larger:
        queue_status()

    assert len(small) == len(larger) <= 7
    assert not [query["sql"] for query in larger.captured_queries if "message_data" in query["sql"]]


@pytest.mark.django_db
def test_without_time_zone_support_times_are_still_given_in_utc(settings, hold_lock):
    """With USE_TZ = False the database gives naive times in TIME_ZONE; mixing them with the lock's would fail."""
    settings.USE_TZ = False
    settings.TIME_ZONE = "America/New_York"
    now = timezone.now()
    prepare(now)
    hold_lock()

    status = queue_status(now)
    document = status_json()
    rows = report()

    assert status.oldest_due_age == OLDEST_DUE_AGE
    assert counts_of(document) == EXPECTED_COUNTS
    assert document["time"].endswith("+00:00") and document["lock"]["since"].endswith("+00:00")
    assert OLDEST_DUE_AGE <= document["oldest_due"]["age_seconds"] < OLDEST_DUE_AGE + 60
    assert 0 <= document["lock"]["held_for_seconds"] < 60
    assert rows["Lock"].startswith("held since ")


@pytest.mark.django_db
def test_the_report_for_people_gives_each_count_on_an_aligned_line():
    prepare()

    rows = report()

    assert rows["Queue"] == "2 high, 3 medium, 3 low priority"
    assert rows["Deferred"] == "3, of which 1 failed permanently"
    assert rows["Being sent"] == "1"
    assert rows["Sent, not recorded"] == "1"
    assert re.fullmatch(r"1 hour, 30 minutes ago \(due since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)", rows["Oldest due"])
    assert rows["Last hour"] == "2 sent, 1 failed, 0 not sent (don't-send list)"
    assert rows["Last day"] == "3 sent, 2 failed, 1 not sent (don't-send list)"
    assert rows["Lock"] == "free"
    assert "Sending" not in rows


@pytest.mark.django_db
def test_the_report_leaves_out_sent_marks_when_there_are_none_and_says_when_sending_is_paused(settings):
    settings.MAILER_PAUSE_SEND = True

    rows = report()

    assert "Sent, not recorded" not in rows
    assert rows["Oldest due"] == "none"
    assert rows["Sending"] == "paused (MAILER_PAUSE_SEND)"
    assert status_json()["paused"] is True


# In-process: the thresholds --------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args, exceeded",
    [
        (["--max-deferred", "3"], []),
        (["--max-deferred", "2"], ["3 messages are deferred, more than --max-deferred 2"]),
        (["--max-age", str(OLDEST_DUE_AGE + 600)], []),
        (["--max-age", str(OLDEST_DUE_AGE - 600)], ["the oldest message due has waited 5400 seconds, more than"]),
    ],
)
def test_a_threshold_exceeded_exits_1_and_says_which_on_stderr(args, exceeded):
    prepare()
    out, err = StringIO(), StringIO()

    if exceeded:
        with pytest.raises(SystemExit) as exit_:
            call_command("mailer_status", *args, stdout=out, stderr=err)
        assert exit_.value.code == 1
    else:
        call_command("mailer_status", *args, stdout=out, stderr=err)

    problems = err.getvalue().splitlines()
    assert len(problems) == len(exceeded)
    for problem, expected in zip(problems, exceeded, strict=True):
        assert problem.startswith(expected)
    assert out.getvalue().startswith("Queue")  # the report is printed either way


# In-process: errors and the lock ---------------------------------------------


@pytest.mark.django_db
def test_a_lock_path_that_is_not_a_path_is_a_configuration_error_with_status_1(settings):
    settings.MAILER_LOCK_PATH = 5

    with pytest.raises(CommandError, match=r"^configuration error: MAILER_LOCK_PATH must be a path, not 5") as error:
        call_command("mailer_status")

    assert error.value.returncode == 1


@pytest.mark.django_db
def test_a_lock_held_while_the_file_lock_is_off_is_shown_as_not_used(settings, hold_lock, lock_path):
    """Passes then ignore it, but a process with other settings (an old cron job) may still hold it."""
    settings.MAILER_USE_FILE_LOCK = False
    hold_lock()

    lock = status_json()["lock"]
    rows = report()

    assert lock["enabled"] is False and lock["held"] is True and lock["stale"] is False
    assert lock["host"] == socket.gethostname() and os.getpid() in lock["pids"]
    assert lock["path"] == lock_path + ".lock"
    assert rows["Lock file"] == lock_path + ".lock"
    assert rows["Lock"].endswith("; not used here (MAILER_USE_FILE_LOCK is off)")


def fake_holder(lock_path: str, name: str, content: str = "") -> None:
    """Hold the lock as lockfile does, with a file ``name`` linked to it (for what a test cannot arrange for real)."""
    holder = Path(lock_path).parent / name
    holder.write_text(content)
    os.link(holder, lock_path + ".lock")


@pytest.mark.parametrize("hash_", ["-4611686018427387904", "123456789"], ids=["hash < 0", "hash > 0"])
def test_a_lock_held_from_another_host_names_that_host_and_is_never_stale(lock_path, hash_):
    """A shared directory: that host's process cannot be looked up from here, so it is never called dead.

    lockfile writes the hash of the path right after the pid; the pid that
    mailer writes into the lock tells which it is.
    """
    fake_holder(lock_path, f"mail-2.example.com-7f3a21c0.4321{hash_}", content="4321\n")

    state = locking.lock_state(lock_path)

    assert state.held and not state.stale
    assert (state.host, state.pids) == ("mail-2.example.com", (4321,))
    assert state.taken_at == Path(lock_path + ".lock").stat().st_mtime


def test_a_lock_taken_by_lockfile_alone_names_every_pid_its_file_name_can_be_read_as(lock_path):
    """django-mailer 2.x writes no pid into the lock: with a positive hash, the name reads several ways."""
    fake_holder(lock_path, "mail-2.example.com-7f3a21c0.4321123456789")

    state = locking.lock_state(lock_path)

    assert state.host == "mail-2.example.com"
    assert 4321 in state.pids and len(state.pids) > 1


def test_a_lock_whose_holder_cannot_be_identified_is_held_by_nobody_known(lock_path):
    Path(lock_path + ".lock").write_text("")  # not linked to any holder's file

    state = locking.lock_state(lock_path)

    assert state.held and not state.stale
    assert (state.host, state.pids) == (None, ())


def test_a_free_lock_is_not_held(lock_path):
    state = locking.lock_state(lock_path)

    assert (state.lock_file, state.held, state.taken_at, state.host, state.pids, state.stale) == (
        lock_path + ".lock",
        False,
        None,
        None,
        (),
        False,
    )


# Real processes ------------------------------------------------------------


def run_status(db: ProcessDatabase, *args: str, lock_path: Path) -> subprocess.CompletedProcess[str]:
    return manage("mailer_status", *args, db=db, MAILER_PROCESS_LOCK_PATH=str(lock_path))


def prepare_in(db: ProcessDatabase) -> None:
    result = manage("shell", "-c", "from tests.test_mailer_status import prepare; prepare()", db=db)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_process_reports_the_prepared_queue_and_exits_by_its_thresholds(process_db, tmp_path):
    prepare_in(process_db)
    lock_path = tmp_path / "send_mail"

    within = run_status(process_db, "--json", "--max-age", "86400", "--max-deferred", "3", lock_path=lock_path)
    too_old = run_status(process_db, "--max-age", "3600", lock_path=lock_path)
    too_many = run_status(process_db, "--json", "--max-deferred", "2", lock_path=lock_path)
    both = run_status(process_db, "--max-age", "3600", "--max-deferred", "0", lock_path=lock_path)

    assert within.returncode == 0, within.stderr
    assert within.stderr == ""
    document = json.loads(within.stdout)
    assert counts_of(document) == EXPECTED_COUNTS
    assert document["exceeded"] == []
    assert OLDEST_DUE_AGE <= document["oldest_due"]["age_seconds"] < OLDEST_DUE_AGE + 600

    assert too_old.returncode == 1
    assert too_old.stderr.startswith("the oldest message due has waited ")
    assert too_old.stderr.strip().endswith("more than --max-age 3600")
    assert too_old.stdout.startswith("Queue")

    assert too_many.returncode == 1
    assert too_many.stderr.strip() == "3 messages are deferred, more than --max-deferred 2"
    assert json.loads(too_many.stdout)["exceeded"] == ["max_deferred"]

    assert both.returncode == 1
    age_line, deferred_line = both.stderr.splitlines()
    assert age_line.startswith("the oldest message due has waited ")
    assert age_line.endswith(" seconds, more than --max-age 3600")
    assert deferred_line == "3 messages are deferred, more than --max-deferred 0"


def unreachable_database(tmp_path: Path) -> ProcessDatabase:
    if VENDOR == "sqlite":
        return ProcessDatabase.sqlite(tmp_path / "no such directory" / "site.sqlite3")
    base = test_settings.DATABASES["default"]
    server = {"HOST": base["HOST"], "PORT": "1", "USER": base["USER"], "PASSWORD": base["PASSWORD"]}
    return ProcessDatabase(VENDOR, "unreachable", server)


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["no tables", "unreachable"])
def test_a_database_that_cannot_be_read_exits_1_with_one_line_and_no_traceback(tmp_path, problem):
    if problem == "no tables":
        with fresh_database(tmp_path, "bare") as db:
            result = run_status(db, "--json", lock_path=tmp_path / "send_mail")
    else:
        result = run_status(unreachable_database(tmp_path), "--json", lock_path=tmp_path / "send_mail")

    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("CommandError: cannot read the mail queue: ")
    assert re.search(r"\((OperationalError|ProgrammingError)\)$", line), line


def start_send_mail(db: ProcessDatabase, smtp_port: int, lock_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(MANAGE_PY), "send_mail"],
        env=process_environment(db, smtp_port, MAILER_PROCESS_LOCK_PATH=str(lock_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_the_lock_of_a_pass_in_progress_then_of_the_same_pass_killed(process_db, smtp_server, tmp_path):
    """What an operator sees while a pass sends, and after the out-of-memory killer took it mid-message."""
    lock_path = tmp_path / "send_mail"
    result = manage(
        "shell", "-c", "import mailer; mailer.send_mail('S', 'B', 'f@example.com', ['t@example.com'])", db=process_db
    )
    assert result.returncode == 0, result.stderr
    arrived, release = threading.Event(), threading.Event()

    def hold_the_message(received):
        arrived.set()
        release.wait(60)

    smtp_server.on_message(hold_the_message)
    before = datetime.datetime.now(tz=datetime.timezone.utc).replace(microsecond=0)
    process = start_send_mail(process_db, smtp_server.port, lock_path)
    try:
        assert arrived.wait(60), process.communicate(timeout=10)
        sending = run_status(process_db, "--json", lock_path=lock_path)
        process.kill()
        process.wait(10)
        killed = run_status(process_db, "--json", lock_path=lock_path)
        killed_report = run_status(process_db, lock_path=lock_path)
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)

    assert sending.returncode == 0, sending.stderr
    document = json.loads(sending.stdout)
    lock = document["lock"]
    since = datetime.datetime.fromisoformat(lock["since"])
    assert before - datetime.timedelta(seconds=2) <= since <= datetime.datetime.fromisoformat(document["time"])
    assert {key: lock[key] for key in ("enabled", "path", "held", "host", "pids", "stale")} == {
        "enabled": True,
        "path": f"{lock_path}.lock",
        "held": True,
        "host": socket.gethostname(),
        "pids": [process.pid],
        "stale": False,
    }
    assert lock["held_for_seconds"] >= 0
    assert document["claimed"] == 1 and document["queue"]["medium"] == 1

    assert killed.returncode == 0, killed.stderr
    document = json.loads(killed.stdout)
    assert document["lock"]["held"] is True and document["lock"]["stale"] is True
    assert document["lock"]["pids"] == [process.pid]
    assert document["claimed"] == 1  # its claim lapses after MAILER_CLAIM_TIMEOUT
    assert (tmp_path / "send_mail.lock").exists()  # looked at, not broken: the next pass does that

    assert killed_report.returncode == 0, killed_report.stderr
    [lock_line] = [line for line in killed_report.stdout.splitlines() if re.match(r"Lock  ", line)]
    assert re.fullmatch(
        rf"Lock +stale: held since .* by process {process.pid} of this host, which is no longer running; "
        "the next pass breaks it",
        lock_line,
    )


@pytest.mark.django_db
def test_a_message_put_back_by_retry_deferred_counts_its_wait_from_then_not_from_when_it_was_queued():
    """``retry_deferred`` every 20 minutes and ``mailer_status --max-age 900`` every 5 must not raise a false alarm
    for a message that was deferred for hours and has just been put back.
    """
    message = make_message("Deferred for hours", "Body", "f@example.com", ["t@example.com"])
    message.when_added = timezone.now() - 180 * MINUTE
    message.priority = PRIORITY_DEFERRED
    message.save()

    Message.objects.retry_deferred()
    status = queue_status()

    assert status.oldest_due is not None and status.oldest_due_age is not None
    assert status.oldest_due_age < 60
    assert status_json("--max-age", "900")["oldest_due"]["age_seconds"] < 60


@pytest.mark.django_db
def test_a_message_put_back_does_not_hide_those_waiting_behind_it():
    """retry_deferred puts back a message queued long ago: the one never tried since it was queued has waited
    longest, and a stalled queue must show it (the docs run retry_deferred and --max-age side by side).
    """
    now = timezone.now()
    for subject, hours_ago, put_back in [("put back", 3, now - MINUTE), ("waiting", 2, None)]:
        message = make_message(subject, "Body", "from@example.com", ["to@example.com"])
        message.save()
        Message.objects.filter(pk=message.pk).update(when_added=now - hours_ago * 60 * MINUTE, retry_after=put_back)

    status = queue_status(now)

    assert status.oldest_due_age == 2 * 3600
