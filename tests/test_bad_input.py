"""Bad input is refused when mail is queued, in the caller, naming the field; nothing is written.

Each address below is one Django accepts when the message is built but its
SMTP backend refuses when it sends: queued, it would fail in the cron job,
far from the code that made the mistake.
"""

from datetime import datetime, timezone
from email.mime.text import MIMEText
from typing import Any

import django
import pytest
from django.core import mail
from django.core.mail import EmailMessage
from django.core.mail.backends.smtp import EmailBackend as SMTPBackend
from django.core.mail.message import BadHeaderError
from django.utils.translation import gettext_lazy

import mailer
from mailer import engine
from mailer.backend import DbBackend
from mailer.exceptions import InvalidAddress, InvalidHeader, MailerError
from mailer.models import Message, make_message

pytestmark = pytest.mark.django_db

BAD_ADDRESSES = {
    "non-ASCII local part": ("jöhn@example.com", r"non-ASCII part before the @"),
    "two addresses in one": ("a@example.com, b@example.com", r"must be one address"),
    "not an address": ("not an address", r"is not a valid address|must be one address"),
    "line break": ("a@example.com\nBcc: victim@example.com", r"contains a line break"),
    "None": (None, r"is None, not an email address"),
    "a number": (5, r"is 5, not an email address"),
}


def queue_with_recipient(way: str, recipient) -> int:
    if way == "send_mail":
        return mailer.send_mail("Subject", "Body", "from@example.com", ["ok@example.com", recipient])
    if way == "send_html_mail":
        return mailer.send_html_mail(
            "Subject", "Body", "<p>Body</p>", "from@example.com", ["ok@example.com", recipient]
        )
    if way == "send_mass_mail":
        return mailer.send_mass_mail([("Subject", "Body", "from@example.com", ["ok@example.com", recipient])])
    if way == "DbBackend":
        email = EmailMessage("Subject", "Body", "from@example.com", ["ok@example.com"], cc=[recipient])
        return DbBackend().send_messages([EmailMessage("Good", "Body", "from@example.com", ["ok@example.com"]), email])
    raise AssertionError(way)


WAYS = ["send_mail", "send_html_mail", "send_mass_mail", "DbBackend"]


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("address, message", BAD_ADDRESSES.values(), ids=BAD_ADDRESSES.keys())
def test_a_bad_recipient_is_refused_when_queued_and_nothing_is_written(way, address, message):
    with pytest.raises(InvalidAddress, match=message) as refused:
        queue_with_recipient(way, address)
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, MailerError)
    assert "to[1]" in str(refused.value) or "cc[0]" in str(refused.value)
    assert Message.objects.count() == 0
    assert mail.outbox == []


STRINGS_DJANGO_REFUSES = [address for address, _message in BAD_ADDRESSES.values() if isinstance(address, str)]


@pytest.mark.skipif(not hasattr(SMTPBackend, "prep_address"), reason="Django 6.0 added prep_address")
@pytest.mark.parametrize("address", STRINGS_DJANGO_REFUSES)
def test_each_refused_address_is_one_djangos_smtp_backend_refuses_too(address):
    """The check is no stricter than delivery: Django's SMTP backend refuses each one when it sends.

    (Django 5.2's backend writes a non-ASCII local part as an encoded word
    instead of refusing it; no mail server delivers to that, so mailer
    refuses it on every version. ``None`` and numbers are refused by mailer
    only: Django drops a ``None`` recipient silently, and sends to "5".)
    """
    backend = SMTPBackend.__new__(SMTPBackend)  # only its address handling is used: no settings, no connection
    with pytest.raises(ValueError, match=r"Invalid address"):
        backend.prep_address(address)


@pytest.mark.parametrize(
    "sender, message",
    [
        ("jöhn@example.com", r"from_email has a non-ASCII part"),
        ("a@example.com, b@example.com", r"from_email must be one address"),
    ],
)
def test_a_bad_sender_is_refused(sender, message):
    with pytest.raises(InvalidAddress, match=message):
        mailer.send_mail("Subject", "Body", sender, ["ok@example.com"])
    assert Message.objects.count() == 0


def test_a_reply_to_with_a_line_break_is_refused():
    email = EmailMessage("Subject", "Body", "from@example.com", ["ok@example.com"], reply_to=["a@x.com\nBcc: b@y.com"])
    with pytest.raises(InvalidAddress, match=r"reply_to\[0\] contains a line break"):
        DbBackend().send_messages([email])


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"reply_to": ["a@x.com\x00Bcc: b@y.com"]}, InvalidAddress, r"reply_to\[0\] contains a NUL character"),
        ({"subject": "Hello\x00Bcc: b@y.com"}, InvalidHeader, r"the subject contains a NUL character"),
        ({"attachments": [("a\x00.txt", "text", "text/plain")]}, InvalidHeader, r"file name contains a NUL"),
    ],
    ids=["reply_to", "subject", "attachment name"],
)
def test_a_nul_in_a_header_is_refused(fields, error, message):
    """No line break, and Django writes it out; but mail software written in C reads a header only up to it."""
    email = EmailMessage(fields.pop("subject", "Subject"), "Body", "from@example.com", ["ok@example.com"], **fields)
    with pytest.raises(error, match=message):
        DbBackend().send_messages([email])
    assert Message.objects.count() == 0


def test_a_nul_in_the_file_name_of_a_mime_attachment_is_refused():
    part = MIMEText("text")
    part.add_header("Content-Disposition", "attachment", filename="a\x00.exe")
    email = EmailMessage("Subject", "Body", "from@example.com", ["ok@example.com"])
    email.attachments.append(part)  # as Django 5.2 attaches it; attach() warns of MIMEBase parts on 6.1
    with pytest.raises(InvalidHeader, match="file name contains a NUL"):
        DbBackend().send_messages([email])
    assert Message.objects.count() == 0


def test_a_bad_admins_entry_is_refused(settings):
    settings.ADMINS = [("Ada", "ada@example.com"), ("Bob", "bob@example.com, eve@example.com")]
    with pytest.raises(InvalidAddress, match=r"to\[1\] must be one address"):
        mailer.mail_admins("Subject", "Body")
    assert Message.objects.count() == 0


@pytest.mark.parametrize(
    "good",
    [
        "plain@example.com",
        "Ada Lovelace <ada@example.com>",
        '"Lovelace, Ada" <ada@example.com>',
        "Zoë Ünicode <zoe@example.com>",
        "user@exämple.com",
        "webmaster",
    ],
)
def test_good_addresses_are_queued(good):
    assert mailer.send_mail("Subject", "Body", "from@example.com", [good]) == 1
    assert Message.objects.get().to_addresses == [good]


@pytest.mark.parametrize("recipients", [[], [""], ["", ""]], ids=["none", "empty", "two empty"])
@pytest.mark.parametrize("way", ["send_mail", "send_html_mail", "send_mass_mail"])
def test_a_message_without_recipients_is_not_queued_and_counts_0(way, recipients):
    """As Django's own functions do: there is nobody to send it to."""
    if way == "send_mail":
        count = mailer.send_mail("Subject", "Body", "from@example.com", recipients)
    elif way == "send_html_mail":
        count = mailer.send_html_mail("Subject", "Body", "<p>Body</p>", "from@example.com", recipients)
    else:
        count = mailer.send_mass_mail([("Subject", "Body", "from@example.com", recipients)])
    assert count == 0
    assert Message.objects.count() == 0


def test_db_backend_skips_messages_without_recipients_and_counts_the_rest():
    emails = [
        EmailMessage("One", "Body", "from@example.com", ["a@example.com"]),
        EmailMessage("None", "Body", "from@example.com", []),
    ]
    assert DbBackend().send_messages(emails) == 1
    assert list(Message.objects.values_list("subject_copy", flat=True)) == ["One"]


def test_a_header_with_a_line_break_is_refused_when_queued():
    """As Django's ``BadHeaderError``, which code written for Django catches (on 6.1 it is ``ValueError``)."""
    with pytest.raises(BadHeaderError, match=r"header 'X-Tag' contains a line break"):
        mailer.send_html_mail(
            "Subject", "Body", "<p>Body</p>", "from@example.com", ["a@example.com"], headers={"X-Tag": "a\nBcc: b"}
        )
    assert Message.objects.count() == 0


# A header name with a line break: Django 5.2 sends it as it is, so the mail
# carries a Reply-To of the attacker's choosing; Django 6.1 garbles it.
INJECTED_NAME = "X-Ref\r\nReply-To: phish@attacker.example\r\nX-B"

# Django 5.2 writes str() of a number or a date in any header; Django 6.1
# raises TypeError for a number, and for a date outside a date header.
NUMBERS_ARE_SENT = django.VERSION < (6, 0)
WHEN = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

NOT_A_FIELD_NAME = r"header name .* is not a valid field name"
NOT_QUEUEABLE = r"header 'X-Ref' has the value .*, which cannot be queued: give it as text"

BAD_HEADERS: dict[str, tuple[dict[Any, Any], str]] = {
    "CR LF in the name (injects Reply-To)": ({INJECTED_NAME: "1"}, NOT_A_FIELD_NAME),
    "LF in the name": ({"X-Ref\nBcc: victim@example.com": "1"}, NOT_A_FIELD_NAME),
    "CR in the name": ({"X-Ref\rBcc": "1"}, NOT_A_FIELD_NAME),
    "space in the name": ({"X Ref": "1"}, NOT_A_FIELD_NAME),
    "colon in the name": ({"X-Ref:": "1"}, NOT_A_FIELD_NAME),
    "tab in the name": ({"X\tRef": "1"}, NOT_A_FIELD_NAME),
    "NUL in the name": ({"X\x00Ref": "1"}, NOT_A_FIELD_NAME),
    "DEL in the name": ({"X\x7fRef": "1"}, NOT_A_FIELD_NAME),
    "non-ASCII name": ({"X-Réf": "1"}, NOT_A_FIELD_NAME),
    "empty name": ({"": "1"}, NOT_A_FIELD_NAME),
    "int name": ({5: "1"}, r"header name 5 is a int, not a str"),
    "None name": ({None: "1"}, r"header name None is a NoneType, not a str"),
    "bytes name": ({b"X-Ref": "1"}, r"header name b'X-Ref' is a bytes, not a str"),
    "None value": ({"X-Ref": None}, NOT_QUEUEABLE),
    "bytes value": ({"X-Ref": b"1"}, NOT_QUEUEABLE),
    "list value": ({"X-Ref": ["1"]}, NOT_QUEUEABLE),
    "float value": ({"X-Ref": 1.5}, NOT_QUEUEABLE),
    "bool value": ({"X-Ref": True}, NOT_QUEUEABLE),
    "int value too large to store": ({"X-Ref": 2**70}, NOT_QUEUEABLE),
    "LF in the value": ({"X-Ref": "a\nBcc: victim@example.com"}, r"header 'X-Ref' contains a line break"),
    "vertical tab in the value": ({"X-Ref": "a\x0bBcc: victim@example.com"}, r"header 'X-Ref' contains a line break"),
    "U+2028 in the value": ({"X-Ref": "a\u2028Bcc: victim@example.com"}, r"header 'X-Ref' contains a line break"),
    "lone surrogate in the value": ({"X-Ref": "a\ud800"}, r"header 'X-Ref' is not text that can be sent"),
    "NUL in the value": ({"X-Ref": "a\x00Bcc: victim@example.com"}, r"header 'X-Ref' contains a NUL character"),
}
if not NUMBERS_ARE_SENT:
    BAD_HEADERS["int value (Django 6 cannot send it)"] = ({"X-Ref": 5}, NOT_QUEUEABLE)
    BAD_HEADERS["date outside a date header (Django 6 cannot send it)"] = (
        {"X-Ref": WHEN},
        r"header 'X-Ref' has the value .* \(datetime\), which this version of Django cannot send",
    )

GOOD_HEADERS: dict[str, dict[str, Any]] = {
    "text": {"X-Ref": "plain"},
    "non-ASCII text": {"X-Ref": "välue ✓"},
    "lazy text": {"X-Ref": gettext_lazy("Yes")},
    "every character a field name may hold": {"".join(chr(c) for c in range(33, 127) if c != ord(":")): "1"},
    "a date in Date": {"Date": WHEN},
    "address headers that override fields": {"From": "Owner <owner@example.com>", "Reply-To": "help@example.com"},
}
if NUMBERS_ARE_SENT:
    GOOD_HEADERS["a number (Django 5.2 sends it)"] = {"X-Priority": 1}
    GOOD_HEADERS["a date in another header (Django 5.2 sends it)"] = {"X-When": WHEN}

# The ways into the queue that take extra headers (send_mail, send_mass_mail
# and mail_admins take none); all of them end in Message.for_email.
HEADER_WAYS = ["send_html_mail", "DbBackend", "make_message"]


def queue_with_headers(way: str, headers: dict[Any, Any]) -> int:
    if way == "send_html_mail":
        return mailer.send_html_mail(
            "Subject", "Body", "<p>Body</p>", "from@example.com", ["ok@example.com"], headers=headers
        )
    if way == "DbBackend":
        email = EmailMessage("Subject", "Body", "from@example.com", ["ok@example.com"], headers=headers)
        return DbBackend().send_messages([EmailMessage("Good", "Body", "from@example.com", ["ok@example.com"]), email])
    if way == "make_message":
        make_message("Subject", "Body", "from@example.com", ["ok@example.com"], headers=headers).save()
        return 1
    raise AssertionError(way)


@pytest.mark.parametrize("way", HEADER_WAYS)
@pytest.mark.parametrize("headers, message", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_a_bad_header_is_refused_when_queued_naming_it_and_nothing_is_written(way, headers, message):
    [name] = headers
    with pytest.raises(InvalidHeader, match=message) as refused:
        queue_with_headers(way, headers)
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, MailerError)
    assert isinstance(refused.value, BadHeaderError)
    assert repr(name) in str(refused.value)
    assert "\n" not in str(refused.value) and "\r" not in str(refused.value)  # safe to log as one line
    assert Message.objects.count() == 0
    assert mail.outbox == []


@pytest.mark.parametrize("way", HEADER_WAYS)
@pytest.mark.parametrize("headers", GOOD_HEADERS.values(), ids=GOOD_HEADERS.keys())
def test_headers_the_installed_django_sends_are_queued_and_read_back(way, headers):
    assert queue_with_headers(way, headers) >= 1
    last = Message.objects.order_by("pk").last()
    assert last is not None
    stored = last.email
    assert list(stored.extra_headers)[: len(headers)] == list(headers)  # then the Message-ID mailer gives it
    stored.message()  # as the sending job will


def test_extra_headers_as_a_list_of_pairs_are_queued_as_before():
    """``Message.for_email`` makes a dict of them; the check takes them the same way."""
    email = EmailMessage("Subject", "Body", "from@example.com", ["ok@example.com"])
    email.extra_headers = [("X-Ref", "1")]  # type: ignore[assignment]  # wrong on purpose
    assert DbBackend().send_messages([email]) == 1


def test_extra_headers_that_are_not_a_mapping_are_refused():
    email = EmailMessage("Subject", "Body", "from@example.com", ["ok@example.com"])
    email.extra_headers = "X-Ref: 1"  # type: ignore[assignment]  # wrong on purpose
    with pytest.raises(InvalidHeader, match=r"extra_headers must be a dict of header names and values, not str"):
        DbBackend().send_messages([email])
    assert Message.objects.count() == 0


def test_an_injected_reply_to_never_reaches_the_smtp_server(deliver_to_smtp):
    with pytest.raises(InvalidHeader, match=r"is not a valid field name"):
        mailer.send_html_mail(
            "Injected", "Body", "<p>Body</p>", "from@example.com", ["to@example.com"], headers={INJECTED_NAME: "1"}
        )
    with pytest.raises(InvalidHeader, match=r"is not a valid field name"):
        email = EmailMessage("Injected", "Body", "from@example.com", ["to@example.com"], headers={INJECTED_NAME: "1"})
        DbBackend().send_messages([email])
    mailer.send_html_mail("Good", "Body", "<p>Body</p>", "from@example.com", ["to@example.com"], headers={"X-Ref": "1"})

    engine.send_all()

    [received] = deliver_to_smtp.received
    assert received.message["Subject"] == "Good"
    assert received.message["X-Ref"] == "1"
    assert received.message["Reply-To"] is None
    assert b"attacker" not in received.data


@pytest.mark.skipif(not NUMBERS_ARE_SENT, reason="Django 6 garbles the name into an encoded word instead")
def test_without_the_check_django_5_2_would_deliver_the_injected_reply_to(deliver_to_smtp, monkeypatch):
    """What the check prevents, shown by turning it off: the attacker's Reply-To reaches the server."""
    monkeypatch.setattr("mailer.addresses.check_headers", lambda email: None)
    mailer.send_html_mail(
        "Injected", "Body", "<p>Body</p>", "from@example.com", ["to@example.com"], headers={INJECTED_NAME: "1"}
    )

    engine.send_all()

    [received] = deliver_to_smtp.received
    assert b"\r\nReply-To: phish@attacker.example\r\n" in received.data  # a header line of its own


def test_a_message_for_suppressed_recipients_only_is_still_queued(settings):
    """It is logged as "don't send" when its turn comes, as before: the list is applied at send time too."""
    from django.utils import timezone

    from mailer.models import DontSendEntry

    DontSendEntry.objects.create(to_address="blocked@example.com", when_added=timezone.now())
    assert mailer.send_mail("Subject", "Body", "from@example.com", ["blocked@example.com"]) == 1
    assert Message.objects.count() == 1


@pytest.mark.parametrize(
    "address", ["a@example.com.", "a@example..com", "a@.example.com", "a@b@c.com", "Name <>", "<>"]
)
def test_malformed_domains_and_empty_brackets_are_refused_as_invalid_addresses(address):
    """A view that catches ValueError on a user's typo must get one, not an AttributeError."""
    with pytest.raises(InvalidAddress, match=r"to\[0\] is not a valid address"):
        mailer.send_mail("Subject", "Body", "from@example.com", [address])


@pytest.mark.parametrize(
    "reply_to", ["a@example.com, b@example.com", "undisclosed-recipients:;", "Zoë <zoë@example.com>"]
)
def test_reply_to_is_a_header_only_and_takes_what_django_delivers(reply_to):
    email = EmailMessage("Subject", "Body", "from@example.com", ["ok@example.com"], reply_to=[reply_to])
    assert DbBackend().send_messages([email]) == 1


def stored_row_with(**fields) -> str:
    """The JSON row of a good email, with ``fields`` changed in the stored document (as a forged row would)."""
    import json

    from mailer.codec import email_to_db

    document = json.loads(email_to_db(EmailMessage("Subject", "Body", "from@example.com", ["to@example.com"])))
    document["email"].update(fields)
    return json.dumps(document)


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"encoding": "rot13"}, "encoding is not a text encoding"),
        ({"encoding": "no-such-codec"}, "encoding is not a text encoding"),
        ({"subject": "Two\nlines"}, "subject contains a line break"),
        ({"body": "lone \ud800 surrogate"}, "body is not text"),
        ({"attachments": [{"filename": "a.txt", "content": "x", "mimetype": "nonsense"}]}, "type is not a type"),
        ({"attachments": [{"filename": "a\n.txt", "content": "x", "mimetype": "text/plain"}]}, "not one line"),
    ],
    ids=["rot13", "unknown codec", "subject line break", "lone surrogate", "mimetype", "filename line break"],
)
def test_a_stored_row_django_could_not_send_is_refused_when_read(fields, problem):
    """Refused as undecodable (and so deferred with the reason), rather than failing inside the send pass."""
    from mailer.codec import decode
    from mailer.exceptions import UndecodableData

    with pytest.raises(UndecodableData, match=problem):
        decode(stored_row_with(**fields))


@pytest.mark.parametrize(
    "headers, problem",
    [
        (b"To: " + b"\\" * 64000 + b"\n", r"longer than 4096 characters"),
        (b"".join(b"X-H%d: " % n + b"\\" * 4000 + b"\n" for n in range(10)), r"longer than 32768 characters in all"),
    ],
    ids=["one long header", "many long headers"],
)
def test_a_stored_mime_attachment_with_headers_python_folds_slowly_is_refused_at_once(headers, problem):
    """Python's email package folds such headers in quadratic time: a row could take minutes to render."""
    import base64
    import json
    import time

    from mailer.codec import decode
    from mailer.exceptions import UndecodableData

    raw = b"Content-Type: text/plain\n" + headers + b"\nbody\n"
    row = json.loads(stored_row_with())
    row["email"]["attachments"] = [{"mime": {"kind": "part", "bytes": base64.b64encode(raw).decode("ascii")}}]
    started = time.perf_counter()
    with pytest.raises(UndecodableData, match=problem):
        decode(json.dumps(row))
    assert time.perf_counter() - started < 1


def test_lazy_addresses_are_queued_resolved_and_delivered(deliver_to_smtp):
    """Django's own backend sends an address given as a lazy string (``gettext_lazy``, a translatable sender
    name), and django-mailer 2.3.2 queued one: refusing it as invalid would break code that worked.
    """
    sender = gettext_lazy("Support <support@example.com>")
    # mailer.send_mail's hints say str, as Django's own send_mail's do; lazy text is what Django sends anyway.
    mailer.send_mail("Subject", "Body", sender, [gettext_lazy("to@example.com")])  # type: ignore[arg-type,list-item]
    email = EmailMessage("Subject", "Body", "from@example.com", ["to@example.com"])
    email.cc, email.reply_to = [gettext_lazy("Ann <cc@example.com>")], [gettext_lazy("reply@example.com")]
    DbBackend().send_messages([email])

    stored = [message.email for message in Message.objects.order_by("pk")]
    assert [(e.from_email, e.to, e.cc, e.reply_to) for e in stored] == [
        ("Support <support@example.com>", ["to@example.com"], [], []),
        ("from@example.com", ["to@example.com"], ["Ann <cc@example.com>"], ["reply@example.com"]),
    ]
    assert all(type(e.from_email) is str and all(type(a) is str for a in e.to + e.cc) for e in stored)
    assert engine.send_all() == {"sent": 2}
    assert sorted(tuple(received.rcpt_tos) for received in deliver_to_smtp.received) == [
        ("to@example.com",),
        ("to@example.com", "cc@example.com"),
    ]
