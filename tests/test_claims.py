"""MAILER_CLAIM_TIMEOUT: how long a message a worker took stays out of the others' reach."""

import datetime
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest
from django.core.mail.backends.locmem import EmailBackend as LocmemBackend
from django.db.models import QuerySet
from django.utils import timezone

import mailer
from mailer import engine, workers
from mailer.models import Message
from tests.processes import MANAGE_PY, VENDOR, manage, process_environment


class ClaimRecordingBackend(LocmemBackend):
    """Delivers like locmem, noting first the claims on the queue as they stand while the message is handed over."""

    claims: list[tuple[str | None, datetime.datetime | None]] = []

    def send_messages(self, messages):
        self.claims.extend(Message.objects.values_list("claimed_by", "claimed_until"))
        return super().send_messages(messages)


@pytest.mark.django_db
def test_a_pass_claims_each_message_for_claim_timeout_seconds_before_sending_it(settings):
    settings.MAILER_EMAIL_BACKEND = "tests.test_claims.ClaimRecordingBackend"
    settings.MAILER_CLAIM_TIMEOUT = 120
    ClaimRecordingBackend.claims.clear()
    mailer.send_mail("Claimed", "Body", "from@example.com", ["to@example.com"])

    before = timezone.now()
    engine.send_all()
    after = timezone.now()

    [(claimed_by, claimed_until)] = ClaimRecordingBackend.claims
    assert claimed_by
    claim = datetime.timedelta(seconds=120)
    assert claimed_until is not None and before + claim <= claimed_until <= after + claim


def a_pass_holding_claims_on(count: int) -> engine.SendingPass:
    """A pass that has claimed ``count`` queued messages and sent none yet, as a pass stands between two messages."""
    for n in range(count):
        mailer.send_mail(f"Held {n}", "Body", "from@example.com", [f"to{n}@example.com"])
    sending_pass = engine.SendingPass(None, engine.handle_delivery_exception, workers.Progress())
    assert sending_pass._claim_next() and len(sending_pass.held) == count
    return sending_pass


def wait_until(moment: datetime.datetime) -> None:
    while timezone.now() <= moment:
        time.sleep(0.01)


@pytest.mark.django_db(transaction=True)
def test_claims_are_extended_in_time_even_when_extending_them_is_slow(settings):
    """The next extension is reckoned from the claims' new end, not from when the slow queries that made them
    returned: otherwise a database slow to answer eats into the time left, and a claim lapses unextended while
    the pass still means to send the message (and another worker has taken it)."""
    settings.MAILER_CLAIM_TIMEOUT = 1
    sending_pass = a_pass_holding_claims_on(3)
    time.sleep(0.55)  # past half the claims' time: the next message extends them
    slow_update = QuerySet.update

    def update(queryset, **changes):
        time.sleep(0.8)  # a database slow to answer
        return slow_update(queryset, **changes)

    with mock.patch.object(QuerySet, "update", update):
        sending_pass._keep_claims()
    wait_until(sending_pass.held_until)  # the extended claims lapse
    [taken, *rest] = sending_pass.held
    assert Message.objects.claim(taken, "another worker", until=timezone.now() + datetime.timedelta(minutes=10))

    sending_pass._keep_claims()  # before the next message: extends what it still holds

    assert not sending_pass._begin(taken), "the pass would send a message another worker holds"
    assert sending_pass.held == rest and all(sending_pass._begin(pk) for pk in rest)


@pytest.mark.django_db(transaction=True)
def test_claims_are_extended_after_the_machine_was_paused(settings):
    """Claims lapse by the wall clock, which goes on while a virtual machine is paused and the monotonic clock
    does not: after such a pause the next message extends the claims at once, and leaves the lapsed ones."""
    settings.MAILER_CLAIM_TIMEOUT = 1
    with mock.patch("time.monotonic", return_value=1000.0):  # a clock that stands still, as during a pause
        sending_pass = a_pass_holding_claims_on(2)
        wait_until(sending_pass.held_until)
        [taken, kept] = sending_pass.held
        assert Message.objects.claim(taken, "another worker", until=timezone.now() + datetime.timedelta(minutes=10))

        sending_pass._keep_claims()

    assert not sending_pass._begin(taken)
    assert sending_pass._begin(kept)


def read_claims(db):
    """The claims on the queue, read as an operator would, with aware datetimes."""
    claims = []
    for claimed_by, claimed_until in db.query("SELECT claimed_by, claimed_until FROM mailer_message"):
        if isinstance(claimed_until, str):  # SQLite
            claimed_until = datetime.datetime.fromisoformat(claimed_until)
        if claimed_until.tzinfo is None:  # SQLite, MySQL: UTC
            claimed_until = claimed_until.replace(tzinfo=datetime.timezone.utc)
        claims.append((claimed_by, claimed_until))
    return claims


BACKDATE = {
    "sqlite": "datetime(claimed_until, '-{seconds} seconds')",
    "postgresql": "claimed_until - interval '{seconds} seconds'",
    "mysql": "claimed_until - INTERVAL {seconds} SECOND",
}


def backdate_claims(db, seconds: int) -> None:
    """Move every claim ``seconds`` into the past, as if that much time had gone by."""
    db.execute(f"UPDATE mailer_message SET claimed_until = {BACKDATE[VENDOR].format(seconds=int(seconds))}")


@pytest.mark.slow
def test_a_worker_killed_while_sending_leaves_the_message_to_others_once_its_claim_lapses(process_db, smtp_server):
    """SIGKILL while the server has the message: the next cron run leaves it; once the claim (600 s by default)
    has passed, a run sends it again. Delivery is at least once."""
    result = manage(
        "shell", "-c", "import mailer; mailer.send_mail('Once', 'B', 'f@example.com', ['a@example.com'])", db=process_db
    )
    assert result.returncode == 0, result.stderr
    arrived, carry_on = threading.Event(), threading.Event()

    def hold_the_message(received):
        arrived.set()
        carry_on.wait(20)

    smtp_server.on_message(hold_the_message)
    # Without the lock file: a killed worker leaves it behind, and every later run would quit.
    env = process_environment(process_db, smtp_server.port, MAILER_PROCESS_USE_FILE_LOCK="0")

    started = datetime.datetime.now(datetime.timezone.utc)
    worker = subprocess.Popen([sys.executable, str(MANAGE_PY), "send_mail"], env=env, stderr=subprocess.DEVNULL)
    try:
        assert arrived.wait(30), "the worker never delivered"
        arrived_at = datetime.datetime.now(datetime.timezone.utc)
    finally:
        worker.kill()
        worker.wait(10)
        carry_on.set()
        smtp_server.on_message(None)

    [(token, claimed_until)] = read_claims(process_db)
    assert token
    default_claim = datetime.timedelta(seconds=600)
    assert started + default_claim <= claimed_until <= arrived_at + default_claim

    again = manage("send_mail", db=process_db, smtp_port=smtp_server.port, MAILER_PROCESS_USE_FILE_LOCK="0")
    assert "0 sent; 0 deferred" in again.stderr, again.stderr
    deadline = time.monotonic() + 5
    while len(smtp_server.received) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(smtp_server.received) == 1  # only the killed worker's attempt

    backdate_claims(process_db, 601)
    last = manage("send_mail", db=process_db, smtp_port=smtp_server.port, MAILER_PROCESS_USE_FILE_LOCK="0")
    assert "1 sent; 0 deferred" in last.stderr, last.stderr
    first, second = smtp_server.received
    assert first.message["Message-ID"] == second.message["Message-ID"]
    assert read_claims(process_db) == []
