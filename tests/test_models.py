"""The models' public behaviour, as django-mailer 2.x code relies on it."""

import base64
import pickle

import pytest
from django.core.mail import EmailMessage

import mailer
from mailer.models import (
    RESULT_SUCCESS,
    Message,
    MessageLog,
    db_to_email,
    email_to_db,
    get_message_id,
)

pytestmark = pytest.mark.django_db


def test_str_of_a_queued_message_names_when_subject_and_recipients():
    mailer.send_mail("Hello", "Body", "f@example.com", ["a@example.com", "b@example.com"])
    message = Message.objects.get()

    assert str(message) == f'On {message.when_added}, "Hello" to a@example.com, b@example.com'


@pytest.mark.parametrize(
    "data",
    [
        pytest.param("garbage", id="neither-json-nor-pickle"),
        pytest.param('{"mailer": 1, "email": {"class": "os.system"}}', id="json-naming-a-class-not-allowed"),
        pytest.param(email_to_db({"plain": [1, 2]}), id="a-plain-value-not-an-email"),
    ],
)
def test_str_of_a_row_that_is_not_an_email_says_so(data):
    """The admin lists every row, so ``str()`` of one whose data is not an email must still give a text."""
    message = Message(message_data=data)

    assert str(message) == "<Message repr unavailable>"


def test_undecodable_message_properties():
    message = Message(message_data="garbage")
    assert message.email is None
    assert message.to_addresses == []
    assert message.subject == ""


def test_str_of_a_log_row_names_when_attempted_subject_and_recipients():
    mailer.send_mail("Logged", "Body", "f@example.com", ["a@example.com"])
    log = MessageLog.objects.log(Message.objects.get(), RESULT_SUCCESS)

    assert str(log) == f'On {log.when_attempted}, "Logged" to a@example.com'
    assert log.to_addresses == ["a@example.com"] and log.subject == "Logged"


def test_str_of_a_log_row_kept_without_data_names_its_message_id(settings):
    """With ``MAILER_EMAIL_LOG_MESSAGE_DATA`` off the row keeps no content; the Message-ID still identifies it."""
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    mailer.send_mail("Private", "Body", "f@example.com", ["a@example.com"])
    message = Message.objects.get()

    bare = MessageLog.objects.log(message, RESULT_SUCCESS)

    assert bare.message_data is None
    assert bare.message_id == message.message_id and bare.message_id.startswith("<")
    assert str(bare) == f'On {bare.when_attempted}, "{message.message_id}"'
    assert bare.to_addresses is None and bare.subject is None


def test_codec_round_trip_and_empty_values():
    email = EmailMessage("S", "B", "f@example.com", ["t@example.com"])
    decoded = db_to_email(email_to_db(email))
    assert (decoded.subject, decoded.body, decoded.to) == ("S", "B", ["t@example.com"])
    assert db_to_email("") is None
    assert db_to_email(None) is None
    assert db_to_email(email_to_db({"plain": [1, 2]})) == {"plain": [1, 2]}


def test_rows_from_before_django_mailer_2_still_decode():
    """Releases before 2.0 stored the raw (protocol 0, ASCII) pickle, not base64."""
    email = EmailMessage("Old", "B", "f@example.com", ["t@example.com"])
    raw = pickle.dumps(email, protocol=0).decode("ascii")
    assert db_to_email(raw).subject == "Old"
    assert db_to_email(base64.b64encode(b"not a pickle").decode()) is None


def test_get_message_id_is_case_insensitive():
    email = EmailMessage(headers={"MESSAGE-id": "<x@y>"})
    assert get_message_id(email) == "<x@y>"
    assert get_message_id(EmailMessage()) is None
    assert get_message_id(None) is None


def test_defer_releases_the_claim():
    mailer.send_mail("S", "B", "f@example.com", ["t@example.com"])
    message = Message.objects.get()
    from django.utils import timezone

    Message.objects.claim(message.pk, "pass", until=timezone.now())
    message.refresh_from_db()
    message.defer()
    message.refresh_from_db()
    assert message.claimed_until is None
    assert message.priority == 4


def test_messages_pickled_before_django_5_2_render_today():
    """Django 5.2 made alternatives and attachments named tuples; older pickles hold plain ones."""
    from django.core.mail import EmailMultiAlternatives

    email = EmailMultiAlternatives("Old", "Text", "f@example.com", ["t@example.com"])
    email.alternatives = [("<p>Html</p>", "text/html")]
    email.attachments = [("notes.txt", "hello", "text/plain")]

    decoded = db_to_email(email_to_db(email))

    rendered = decoded.message()
    assert decoded.alternatives[0].mimetype == "text/html"
    assert [part.get_filename() for part in rendered.walk() if part.get_filename()] == ["notes.txt"]


def test_subject_sender_and_recipients_are_searchable_columns(settings):
    mailer.send_mail("Columns", "Body", "Sender <s@example.com>", ["a@example.com"])
    message = Message.objects.get()
    assert (message.subject_copy, message.from_email, message.recipients) == (
        "Columns",
        "Sender <s@example.com>",
        "a@example.com",
    )
    assert Message.objects.filter(recipients__contains="a@example.com").exists()

    log = MessageLog.objects.log(message, RESULT_SUCCESS)
    assert (log.subject_copy, log.from_email, log.recipients) == ("Columns", "Sender <s@example.com>", "a@example.com")

    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    bare = MessageLog.objects.log(message, RESULT_SUCCESS)
    assert (bare.message_data, bare.subject_copy, bare.from_email, bare.recipients) == (None, None, None, None)
