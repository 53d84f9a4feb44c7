"""Mail that sites queue as they send it with Django's own backend: what Django delivers, mailer delivers.

And what mailer cannot deliver is refused when it is queued, in the caller,
never queued and then set aside by the sending job for good.
"""

import email
import email.policy
import json
import logging

import django
import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.db import DatabaseError, InterfaceError, connection, transaction

from mailer import engine
from mailer.backend import DbBackend
from mailer.codec import decode, email_to_db
from mailer.exceptions import InvalidAddress, UnstorableEmail
from mailer.models import DontSendEntry, Message

pytestmark = pytest.mark.django_db

DJANGO_6 = django.VERSION >= (6, 0)


def queued(**fields: object) -> Message:
    """Queue an email made of ``fields`` over a plain one, and return its row."""
    values: dict[str, object] = {
        "subject": "Subject",
        "body": "Body",
        "from_email": "from@example.com",
        "to": ["to@example.com"],
    }
    values.update(fields)
    assert Message.queue(EmailMessage(**values)) is not None  # type: ignore[arg-type]
    return Message.objects.get()


@pytest.mark.parametrize(("subject", "written"), [(None, "None"), (1042, "1042")])
def test_a_subject_that_is_not_text_is_written_out_as_django_writes_it(subject, written, deliver_to_smtp):
    queued(subject=subject)

    assert engine.send_all() == {"sent": 1}
    assert deliver_to_smtp.received[0].message["Subject"] == written


def test_a_subject_ending_with_a_line_break_is_sent_as_the_installed_django_sends_it(deliver_to_smtp):
    """What ``render_to_string("subject.txt")`` gives: Django 6 writes it out; 5.2 refuses it, then and there."""
    subject = "Your order\n"
    if not DJANGO_6:
        with pytest.raises(ValueError, match="newlines"):
            queued(subject=subject)
        return
    # What Django's SMTP backend hands the server: the message's bytes, as this Python writes them out.
    written = EmailMessage(subject, "Body", "from@example.com", ["to@example.com"]).message().as_bytes()
    queued(subject=subject)

    assert engine.send_all() == {"sent": 1}
    expected = email.message_from_bytes(written, policy=email.policy.default)["Subject"]
    assert deliver_to_smtp.received[0].message["Subject"] == expected


def test_what_the_sending_job_would_refuse_is_refused_when_queued():
    """Django 6 renders a body given as bytes; the sending job reads back text only: refused now, not later."""
    email = EmailMessage("Subject", "Grüße".encode(), "from@example.com", ["to@example.com"])  # type: ignore[arg-type]
    with pytest.raises((UnstorableEmail, TypeError, AttributeError)):
        Message.queue(email)
    assert not Message.objects.exists()


def test_a_row_queued_on_django_5_2_is_sent_on_django_6(deliver_to_smtp):
    """Django 5.2 gave every email mixed_subtype and alternative_subtype, which Django 6 refuses on an email."""
    email = EmailMultiAlternatives("Welcome", "Text", "from@example.com", ["to@example.com"])
    email.attach_alternative("<p>HTML</p>", "text/html")
    email.attach("invoice.txt", "total: 1", "text/plain")
    row = json.loads(email_to_db(email))
    row["email"].update(mixed_subtype="mixed", alternative_subtype="alternative")  # as Django 5.2 stored it
    Message.objects.create(message_data=json.dumps(row))

    assert engine.send_all() == {"sent": 1}
    received = deliver_to_smtp.received[0].message
    assert received.get_content_type() == "multipart/mixed"
    assert [part.get_content_type() for part in received.walk()] == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "text/plain",
    ]


def test_only_the_subtypes_an_email_sets_itself_are_stored():
    email = EmailMultiAlternatives("Welcome", "Text", "from@example.com", ["to@example.com"])
    assert "mixed_subtype" not in json.loads(email_to_db(email))["email"]
    if not DJANGO_6:
        email.mixed_subtype = "related"  # type: ignore[attr-defined]  # Django 5.2's way to attach inline images
        assert json.loads(email_to_db(email))["email"]["mixed_subtype"] == "related"
        assert decode(email_to_db(email)).mixed_subtype == "related"


@pytest.mark.parametrize("sender", ["Acme Inc. <noreply@example.com>", "J.R.R. Tolkien <jrr@example.com>"])
def test_a_display_name_with_a_period_is_queued_where_django_sends_it(sender, deliver_to_smtp):
    """Django 5.2 sends these (DEFAULT_FROM_EMAIL, SERVER_EMAIL of many sites); Django 6 refuses them itself."""
    if DJANGO_6:
        with pytest.raises(InvalidAddress, match="from_email is not a valid address"):
            queued(from_email=sender)
        return
    queued(from_email=sender)

    assert engine.send_all() == {"sent": 1}
    assert deliver_to_smtp.received[0].mail_from == sender.split("<")[1].rstrip(">")


@pytest.mark.parametrize("recipient", ['"john doe"@example.com', 'John Doe <"john doe"@example.com>'])
def test_a_quoted_local_part_is_queued_on_every_django(recipient):
    assert queued(to=[recipient]).email.to == [recipient]


def test_an_address_with_text_after_it_is_refused_on_django_5_2_as_django_refuses_it():
    if DJANGO_6:
        pytest.skip("Django 6 reads the whole header, and sends it")
    with pytest.raises(InvalidAddress, match="from_email is not a valid address"):
        queued(from_email="Name <a@example.com>,")


def broken_transaction() -> None:
    """Fail a query as the ORM does (a duplicate user, say): Django refuses every later query of the transaction."""
    try:
        with transaction.mark_for_rollback_on_error(), connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table")
    except DatabaseError:
        pass


def test_fail_silently_hides_a_database_error_as_django_hides_a_mail_server_error(caplog):
    """Django's AdminEmailHandler asks for it: logging an error inside a failed transaction must not raise."""
    email = EmailMessage("Error", "Traceback", "server@example.com", ["admin@example.com"])
    with transaction.atomic():
        broken_transaction()
        with pytest.raises(transaction.TransactionManagementError):
            DbBackend().send_messages([email])
        with caplog.at_level(logging.ERROR, logger="mailer.backend"):
            assert DbBackend(fail_silently=True).send_messages([email]) == 0

    assert [r.getMessage() for r in caplog.records] == ["1 message(s) could not be queued (fail_silently)"]
    assert not Message.objects.exists()


def test_fail_silently_hides_a_connection_the_server_dropped_too(monkeypatch):
    """mysqlclient and psycopg2 say so with InterfaceError, which is not a DatabaseError (simulated: the drop)."""

    def dropped(*args: object, **kwargs: object) -> None:
        raise InterfaceError("connection already closed")

    monkeypatch.setattr(DontSendEntry.objects, "suppressed_addresses", dropped)
    email = EmailMessage("Error", "Traceback", "server@example.com", ["admin@example.com"])
    assert DbBackend(fail_silently=True).send_messages([email]) == 0
    with pytest.raises(InterfaceError):
        DbBackend().send_messages([email])


class MailsItsRecords(logging.Handler):
    """A handler that mails what it is given, as AdminEmailHandler does, through the queue."""

    def __init__(self) -> None:
        super().__init__()
        self.handled = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.handled += 1
        DbBackend(fail_silently=True).send_messages([EmailMessage("Log", "x", "s@example.com", ["a@example.com"])])


def test_a_handler_that_mails_the_log_does_not_loop_when_queueing_fails():
    handler = MailsItsRecords()
    logger = logging.getLogger("mailer.backend")
    logger.addHandler(handler)
    try:
        with transaction.atomic():
            broken_transaction()
            email = EmailMessage("Error", "Traceback", "server@example.com", ["admin@example.com"])
            assert DbBackend(fail_silently=True).send_messages([email]) == 0
    finally:
        logger.removeHandler(handler)

    assert handler.handled == 1
