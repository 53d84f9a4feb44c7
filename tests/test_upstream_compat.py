"""What django-mailer 2.3.2's own test suite relies on, which tox's ``upstream`` environment runs unchanged.

Each test here pins one of those behaviours on real parts (the aiosmtpd
server of ``tests/smtp.py``, the database), so that a change that would
break the original's suite fails here first, saying which promise it broke.
"""

import logging
import pickle
from unittest import mock

import pytest
from django.core.mail import EmailMessage
from django.core.mail.backends.smtp import EmailBackend as SMTPBackend
from django.db import connection

import mailer
from mailer import engine
from mailer.models import RESULT_FAILURE, RESULT_SUCCESS, Message, MessageLog, db_to_email, email_to_db
from tests.alarms import time_limit
from tests.conftest import deliver_through

pytestmark = pytest.mark.django_db

DISCARDED = "message discarded due to failure in converting from DB"


class StampingBackend(SMTPBackend):
    """A delivering backend that notes something on the email in place, as email services' backends do."""

    def send_messages(self, email_messages):
        for email in email_messages:
            email.extra_headers["X-Relay-Ticket"] = "T-1"
        return super().send_messages(email_messages)


def test_a_header_the_delivering_backend_adds_in_place_is_kept_in_the_log(settings, deliver_to_smtp):
    """The log shows the message as it went out, even when the backend changed it without replacing anything."""
    deliver_through(settings, f"{__name__}.StampingBackend")
    mailer.send_mail("Stamped", "Body", "from@example.com", ["to@example.com"])

    assert engine.send_all() == {"sent": 1}

    [received] = deliver_to_smtp.received
    assert received.message["X-Relay-Ticket"] == "T-1"
    log = MessageLog.objects.get()
    assert log.email.extra_headers["X-Relay-Ticket"] == "T-1"
    assert log.message_id == received.message["Message-ID"]


def test_a_row_without_message_data_is_discarded_with_a_warning_and_no_log_row(deliver_to_smtp, caplog):
    """Nothing in it can be sent or kept for a human; a row that holds damaged data is kept instead."""
    empty = Message.objects.create(message_data="")
    # Data, but no email: a pickled empty dict (base64, then junk the base64 decoder skips).
    damaged = Message.objects.create(message_data="gAR9lC4=not a pickle")
    mailer.send_mail("Good", "Body", "from@example.com", ["to@example.com"])

    with caplog.at_level(logging.WARNING, logger="mailer.engine"):
        engine.send_all()

    assert [r.message["Subject"] for r in deliver_to_smtp.received] == ["Good"]
    assert not Message.objects.filter(pk=empty.pk).exists()
    discarded = [r for r in caplog.records if DISCARDED in r.getMessage()]
    assert len(discarded) == 1
    # No log row for the discarded one: the success of "Good", the failure of the damaged row.
    assert sorted(MessageLog.objects.values_list("result", flat=True)) == [RESULT_SUCCESS, RESULT_FAILURE]
    assert Message.objects.get().pk == damaged.pk


def test_subject_and_to_addresses_read_message_data_and_the_search_column_keeps_its_name():
    mailer.send_mail("First", "Body", "from@example.com", ["first@example.com"])
    message = Message.objects.get()
    assert (message.subject, message.to_addresses) == ("First", ["first@example.com"])

    message.message_data = email_to_db(EmailMessage("Second", "Body", "f@example.com", ["second@example.com"]))
    assert (message.subject, message.to_addresses) == ("Second", ["second@example.com"])
    message.message_data = ""
    assert (message.subject, message.to_addresses) == ("", [])

    # The searchable copy is still there, in the column "subject", for the admin and plain SQL.
    assert Message.objects.filter(subject_copy="First").exists()
    with connection.cursor() as cursor:
        cursor.execute("SELECT subject FROM mailer_message")
        assert list(cursor.fetchall()) == [("First",)]


def test_a_log_rows_subject_and_to_addresses_read_its_message_data(deliver_to_smtp):
    mailer.send_mail("Logged", "Body", "from@example.com", ["to@example.com"])
    engine.send_all()
    log = MessageLog.objects.get()
    assert (log.subject, log.to_addresses, log.subject_copy) == ("Logged", ["to@example.com"], "Logged")

    log.message_data = None
    assert (log.subject, log.to_addresses) == (None, None)
    assert str(log) == f'On {log.when_attempted}, "{log.message_id}"'


@pytest.mark.parametrize("value", ["Hello Email", ["Subject", "Body", "from@example.com", ["to@example.com"]]])
def test_plain_values_round_trip_through_the_storage_codec(value):
    assert db_to_email(email_to_db(value)) == value


@pytest.mark.parametrize("protocol", [0, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_db_to_email_reads_a_raw_pickle_given_as_bytes(protocol):
    email = EmailMessage("Old", "Old body", "old@example.com", ["old-to@example.com"], cc=["cc@example.com"])

    read = db_to_email(pickle.dumps(email, protocol=protocol))

    assert type(read) is EmailMessage
    assert (read.subject, read.body, read.from_email, read.to, read.cc) == (
        "Old",
        "Old body",
        "old@example.com",
        ["old-to@example.com"],
        ["cc@example.com"],
    )


CALLS: list[str] = []


def record_call(marker: str) -> str:
    CALLS.append(marker)
    return marker


class Trap:
    """Unpickled for real, this would call ``record_call``: the reader must only read it."""

    def __reduce__(self):
        return (record_call, ("called",))


def test_a_raw_pickle_given_as_bytes_runs_nothing():
    email = EmailMessage("Trap", "Body", "f@example.com", ["t@example.com"])
    email.extra_headers["X-Trap"] = Trap()
    CALLS.clear()

    assert db_to_email(pickle.dumps(email)) is None
    assert db_to_email(pickle.dumps(Trap())) is None
    assert CALLS == []


class EndLoop(Exception):
    """What django-mailer 2.x's tests patch ``send_all`` and ``time.sleep`` to raise, to end ``send_loop``."""


def test_send_loop_called_directly_sleeps_once_and_lets_a_patched_send_all_end_it(settings):
    """django-mailer 2.x sites' tests patch these; runmailer itself still answers SIGTERM at once (test_signals)."""
    settings.MAILER_EMPTY_QUEUE_SLEEP = 17
    with mock.patch("time.sleep", side_effect=EndLoop) as sleep, pytest.raises(EndLoop):
        engine.send_loop()
    sleep.assert_called_once_with(17)

    mailer.send_mail("Due", "Body", "from@example.com", ["to@example.com"])
    # time_limit: a loop that went on would never return.
    with mock.patch("mailer.engine.send_all", side_effect=EndLoop) as send_all, pytest.raises(EndLoop), time_limit(5):
        engine.send_loop()
    send_all.assert_called_once_with()


def test_a_django_mailer_process_still_running_during_the_upgrade_can_queue_and_its_mail_is_sent(deliver_to_smtp):
    """A rolling upgrade: a django-mailer 2.3.2 process inserts only the four columns its model has, with a
    base64 pickle; the columns added since have database defaults, so the insert works and the mail leaves.
    """
    import base64

    from django.utils import timezone

    data = base64.b64encode(pickle.dumps(EmailMessage("Old code", "Body", "f@example.com", ["t@example.com"])))
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO mailer_message (message_data, when_added, priority, retry_count) VALUES (%s, %s, %s, %s)",
            [data.decode(), timezone.now(), 2, 0],
        )

    assert engine.send_all() == {"sent": 1}
    assert [received.message["Subject"] for received in deliver_to_smtp.received] == ["Old code"]


@pytest.mark.django_db(transaction=True)
def test_a_patched_prioritize_is_obeyed_in_each_pass_and_only_while_patched(deliver_to_smtp):
    """django-mailer's tests patch ``mailer.engine.prioritize``: looked up at each pass, even where the engine
    compiles its claim once (PostgreSQL), and not kept once the patch is gone.
    """
    original = engine.prioritize
    engine.send_all()  # a first pass, which compiles the claim where it can
    for number in range(3):
        mailer.send_mail(f"Message {number}", "Body", "from@example.com", ["to@example.com"])

    def newest_first(queryset=None):
        return original(queryset).order_by("-when_added", "-pk")

    def high_only(queryset=None):
        return original(queryset).filter(priority=1)

    with mock.patch("mailer.engine.prioritize", newest_first):
        engine.send_all()
    with mock.patch("mailer.engine.prioritize", high_only):
        engine.send_all()
    mailer.send_mail("After", "Body", "from@example.com", ["to@example.com"])  # medium priority
    counts = engine.send_all()

    assert counts is not None
    assert [str(received.message["Subject"]) for received in deliver_to_smtp.received] == [
        "Message 2",
        "Message 1",
        "Message 0",
        "After",
    ]
    assert counts["sent"] == 1
