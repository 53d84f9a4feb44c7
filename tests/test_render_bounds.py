"""Rows and emails that Python's email package would take minutes or hours to render.

The package parses an address in time that grows with the square of its
length (a run of ``"`` 40,000 long takes about ten seconds), and reads every
line of a MIME part once for each multipart that encloses it. A row holding
such a thing, whether crafted, left by django-mailer 2.x (which checked
nothing), or written by hand, must be refused when it is read, before it
is rendered: otherwise the worker that claims it is stuck for hours, and
so is every worker after it once the claim lapses. A site that tries to
queue one gets the error then and there.
"""

import base64
import json
import pickle
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from django.core.mail import EmailMessage
from django.utils.functional import lazy

import mailer
from mailer import engine
from mailer.addresses import MAX_ADDRESS_LENGTH, MAX_ASCII_VALUE_LENGTH
from mailer.codec import decode, email_to_db
from mailer.exceptions import InvalidAddress, InvalidHeader, UndecodableData, UnstorableEmail
from mailer.mime import MAX_MULTIPARTS
from mailer.models import PRIORITY_DEFERRED, PRIORITY_HIGH, RESULT_FAILURE, Message, MessageLog
from tests.alarms import time_limit

pytestmark = pytest.mark.django_db

QUOTES = '"' * 40_000  # rendered as an address: about ten seconds; refused: at once
# Comments nested this deep exhaust Python's stack when the email package parses them, or not, as deep as the
# stack already is: 420 passed when queued and failed when rendered 200 frames deeper (as in the engine).
NESTED = "(" * 420 + ")" * 420 + "a@example.com"


def legacy_row(email: EmailMessage) -> str:
    """``email`` as django-mailer 2.3.2 stored it: a base64 pickle."""
    return base64.encodebytes(pickle.dumps(email)).decode("ascii")


def nested_multiparts(levels: int) -> MIMEMultipart:
    inner: MIMEMultipart | MIMEText = MIMEText("the text at the bottom")
    for _ in range(levels):
        outer = MIMEMultipart()
        outer.attach(inner)
        inner = outer
    assert isinstance(inner, MIMEMultipart)
    return inner


def plain(**fields: object) -> EmailMessage:
    return EmailMessage("Subject", "Body", "from@example.com", ["to@example.com"], **fields)  # type: ignore[arg-type]


def with_mime_attachment(part: MIMEMultipart) -> EmailMessage:
    email = plain()
    email.attachments.append(part)  # as Django 5.2 attaches it; attach() warns of MIMEBase parts on 6.1
    return email


def forwarded_with_header(name: str, value: str) -> EmailMessage:
    forwarded = MIMEText("the forwarded text")
    forwarded[name] = value
    return plain(attachments=[("fwd.eml", forwarded, "message/rfc822")])


def forwarded_with_a_long_header() -> EmailMessage:
    return forwarded_with_header("To", QUOTES)


def json_reply_to(address: str) -> str:
    """A JSON row whose Reply-To holds ``address``, as a row written by hand could."""
    return email_to_db(plain()).replace('"reply_to":[]', '"reply_to":' + json.dumps([address]))


def cases_of(name: str, count: int) -> list[str]:
    """``name`` written in ``count`` ways of upper and lower case."""
    variants = {""}
    for char in name:
        variants = {variant + case for variant in variants for case in {char.lower(), char.upper()}}
    return sorted(variants)[:count]


# Django writes each of them, as Resent-Bcc may be repeated.
CASES_OF_RESENT_BCC = cases_of("Resent-Bcc", 128)

ROWS = {
    "django-mailer pickle, long Reply-To": (lambda: legacy_row(plain(reply_to=[QUOTES])), "reply_to has an address"),
    "django-mailer pickle, long To": (
        lambda: legacy_row(EmailMessage("S", "B", "from@example.com", [QUOTES])),
        "to has an address longer",
    ),
    "django-mailer pickle, many long Cc": (
        lambda: legacy_row(plain(cc=['"' * 990] * 120)),
        "not plain .* longer than 16384 characters in all",
    ),
    "django-mailer pickle, long address header": (
        lambda: legacy_row(plain(headers={"Reply-To": QUOTES})),
        "header Reply-To has an address longer than 998",
    ),
    "django-mailer pickle, long subject": (
        lambda: legacy_row(EmailMessage("é " * 200_000, "B", "from@example.com", ["to@example.com"])),
        "the subject is longer than 16384",
    ),
    "django-mailer pickle, an address header in many cases": (
        lambda: legacy_row(plain(headers={case: '"' * 990 for case in CASES_OF_RESENT_BCC})),
        "in all",
    ),
    "django-mailer pickle, MIME content with a long header": (
        lambda: legacy_row(forwarded_with_a_long_header()),
        r"a MIME header \(To\) longer than 4096",
    ),
    "JSON row, long Reply-To": (lambda: json_reply_to(QUOTES), "reply_to has an address longer"),
    "JSON row, Reply-To with deeply nested comments": (
        lambda: json_reply_to(NESTED),
        "reply_to has an address with comments nested deeper than 32",
    ),
    "django-mailer pickle, MIME content with deeply nested comments": (
        lambda: legacy_row(forwarded_with_header("Cc", NESTED)),
        r"a MIME header \(Cc\) with comments nested deeper than 32",
    ),
}


@pytest.mark.parametrize("name", ROWS)
def test_a_row_too_costly_to_render_is_refused_when_read(name):
    make_row, reason = ROWS[name]
    row = make_row()
    with time_limit(5), pytest.raises(UndecodableData, match=reason):
        decode(row)


@pytest.mark.parametrize("name", ["django-mailer pickle, long Reply-To", "JSON row, long Reply-To"])
def test_such_a_row_is_set_aside_at_once_and_the_rest_is_sent(name, deliver_to_smtp):
    Message.objects.create(message_data=ROWS[name][0](), priority=PRIORITY_HIGH)
    mailer.send_mail("After it", "Body", "from@example.com", ["next@example.com"])

    with time_limit(20):
        assert engine.send_all() == {"sent": 1, "deferred": 1}

    assert [r.message["Subject"] for r in deliver_to_smtp.received] == ["After it"]
    assert Message.objects.get().priority == PRIORITY_DEFERRED
    assert "has an address longer than 998 characters" in MessageLog.objects.get(result=RESULT_FAILURE).log_message


def test_a_stored_mime_part_nested_too_deep_is_refused_before_it_is_parsed():
    """Stored as it renders (``$mime``); a hand-made row may nest it deeper than mailer would store."""
    fine = email_to_db(with_mime_attachment(nested_multiparts(MAX_MULTIPARTS - 1)))
    assert decode(fine).attachments[0].is_multipart()

    too_deep = nested_multiparts(3 * MAX_MULTIPARTS)
    stored = email_to_db(with_mime_attachment(nested_multiparts(1)))
    source = base64.b64encode(too_deep.as_bytes()).decode("ascii")
    row = stored.replace(stored.split('"bytes":"', 1)[1].split('"', 1)[0], source)
    with time_limit(5), pytest.raises(UndecodableData, match=f"more than {MAX_MULTIPARTS} multipart parts"):
        decode(row)


# Queueing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error", "reason"),
    [
        ({"reply_to": [QUOTES]}, InvalidAddress, "reply_to has an address longer than 998"),
        ({"cc": ["a" * 990 + "@example.com"]}, InvalidAddress, "cc has an address longer than 998"),
        ({"bcc": [QUOTES]}, InvalidAddress, "bcc has an address longer than 998"),
        ({"to": [f"user{n:06}@example.com" for n in range(12_000)]}, InvalidAddress, "262144 characters in all"),
        ({"reply_to": [".," * 499] * 100}, InvalidAddress, "not plain .* longer than 16384 characters in all"),
        ({"headers": {"Reply-To": QUOTES}}, InvalidAddress, "header Reply-To has an address longer than 998"),
        ({"headers": dict.fromkeys(CASES_OF_RESENT_BCC, '"' * 990)}, InvalidAddress, "16384 characters in all"),
        ({"headers": {"Message-ID": f"<{'x' * 5_000}@example.com>"}}, InvalidHeader, "Message-ID is longer than 4096"),
        ({"subject": "é " * 10_000}, InvalidHeader, "the subject is longer than 16384"),
        ({"headers": {"X-Note": "é " * 10_000}}, InvalidHeader, "header X-Note is longer than 16384"),
        ({"headers": {"X-Note": "n " * 70_000}}, InvalidHeader, "header X-Note is longer than 131072"),
        (
            {"headers": {f"X-Note-{n}": "é " * 8_000 for n in range(5)}},
            InvalidHeader,
            "the subject, the headers and the file names are longer than 262144 characters in all",
        ),
        (
            {"attachments": [("a " * 1_000_000, b"data", "application/octet-stream")]},
            InvalidHeader,
            "an attachment's file name is longer than 4096",
        ),
        ({"reply_to": [NESTED]}, InvalidAddress, "reply_to has an address with comments nested deeper than 32"),
        ({"bcc": [NESTED]}, InvalidAddress, "bcc has an address with comments nested deeper than 32"),
        ({"headers": {"Cc": NESTED}}, InvalidAddress, "header Cc has comments nested deeper than 32"),
        ({"headers": {"Message-ID": "(" * 40 + ")" * 40 + "<a@example.com>"}}, InvalidHeader, "nested deeper"),
        ({"headers": {"MIME-Version": "1.0 " + "(" * 40 + ")" * 40}}, InvalidHeader, "nested deeper than 32"),
    ],
    ids=[
        "reply_to",
        "cc",
        "bcc",
        "to in all",
        "reply_to in short pieces",
        "address header",
        "an address header in many cases",
        "parsed header",
        "subject",
        "header",
        "ASCII header",
        "headers in all",
        "file name",
        "reply_to nested",
        "bcc nested",
        "address header nested",
        "Message-ID nested",
        "MIME-Version nested",
    ],
)
def test_queueing_refuses_addresses_and_headers_too_costly_to_render(fields, error, reason):
    subject = fields.pop("subject", "S")
    email = EmailMessage(subject, "B", "from@example.com", fields.pop("to", ["to@example.com"]), **fields)
    with time_limit(5), pytest.raises(error, match=reason):
        Message.queue(email)
    assert not Message.objects.exists()


def test_queueing_takes_long_headers_and_many_addresses_within_the_bounds():
    """What sites send: a To list of thousands, a To header listing a team delivered by Bcc, SendGrid's
    X-SMTPAPI, a long References chain, a long subject, a long display name."""
    many = [f"Reader Number {n} <reader{n:05}@example.com>" for n in range(5_000)]
    team = ", ".join(f"Team Member {n} <member{n}@example.com>" for n in range(150))
    email = EmailMessage("Sujet é" * 2_000, "B", "from@example.com", many, bcc=many)
    email.extra_headers.update(
        {
            "To": team,
            "X-SMTPAPI": '{"to": [' + ", ".join(f'"r{n}@example.com"' for n in range(2_000)) + "]}",
            "References": " ".join(f"<CAK{n:040}@mail.gmail.com>" for n in range(400)),
            "Reply-To": "Longest Name Allowed <" + "r" * (MAX_ADDRESS_LENGTH - 40) + "@example.com>",
        }
    )

    with time_limit(20):
        assert Message.queue(email) is not None
        stored = decode(Message.objects.get().message_data)
    assert stored.to == many and stored.extra_headers["To"] == team


def test_the_message_id_mailer_adds_passes_no_bound():
    """Queued at the very bound of the headers together: the Message-ID given when queued is not counted."""
    at_the_bound = MAX_ASCII_VALUE_LENGTH - len("Subject")  # with the subject, 262,144 characters
    email = plain(headers={"X-A": "a" * MAX_ASCII_VALUE_LENGTH, "X-B": "b" * at_the_bound})
    assert Message.queue(email) is not None
    assert decode(Message.objects.get().message_data).extra_headers["Message-ID"]


def test_queueing_refuses_an_attached_email_that_could_not_be_read_back():
    forwarded = plain(reply_to=[QUOTES])
    with time_limit(5), pytest.raises(UnstorableEmail, match="reply_to has an address longer than 998"):
        Message.queue(plain(attachments=[("fwd.eml", forwarded, "message/rfc822")]))
    assert not Message.objects.exists()


def test_queueing_refuses_a_mime_attachment_that_could_not_be_read_back():
    email = with_mime_attachment(nested_multiparts(MAX_MULTIPARTS + 1))
    with pytest.raises(UnstorableEmail, match=f"more than {MAX_MULTIPARTS} multipart parts"):
        Message.queue(email)


def test_queueing_refuses_a_mime_attachment_whose_header_nests_comments_too_deep():
    with pytest.raises(UnstorableEmail, match=r"a MIME header \(Cc\) with comments nested deeper than 32"):
        Message.queue(forwarded_with_header("Cc", NESTED))


def test_comments_nested_as_deep_as_the_bound_are_queued_and_render_deep_in_the_stack():
    """The bound is far below what exhausts the stack: such a message renders however deep the caller is."""
    nested = "(" * 32 + "note" + ")" * 32
    email = plain(cc=[f"a@example.com {nested}"], reply_to=[f"Team {nested} <team@example.com>"])
    email.extra_headers["Message-ID"] = f"{nested} <id@example.com>"
    assert Message.queue(email) is not None

    def rendered_at(depth: int) -> bytes:
        return rendered_at(depth - 1) if depth else Message.objects.get().email.message().as_bytes()

    assert b"team@example.com" in rendered_at(700)


# A backslash outside a comment escapes nothing to the parser: the "(" after it opens a comment, in which the
# quote is only a character, and every "(" after that nests one level deeper.
ESCAPED_THEN_QUOTED = 'a@example.com \\(" ' + "(" * 490 + ' "'


@pytest.mark.parametrize(
    "fields",
    [{"reply_to": [ESCAPED_THEN_QUOTED]}, {"headers": {"Reply-To": ESCAPED_THEN_QUOTED}}],
    ids=["reply_to", "Reply-To header"],
)
def test_comments_are_counted_whatever_quotes_and_backslashes_surround_them(fields):
    with pytest.raises(InvalidAddress, match="nested deeper than 32"):
        Message.queue(plain(**fields))
    assert not Message.objects.exists()


def uploaded_eml(multiparts: int) -> bytes:
    """An .eml file a user could upload, its parts nested ``multiparts`` deep: Django parses it when rendering."""
    return nested_multiparts(multiparts).as_bytes()


def test_a_message_attachment_given_as_bytes_is_bounded_as_a_mime_part_is():
    deep = plain(attachments=[("upload.eml", uploaded_eml(MAX_MULTIPARTS + 5), "message/rfc822")])
    with time_limit(5), pytest.raises(UnstorableEmail, match=f"more than {MAX_MULTIPARTS} multipart parts"):
        Message.queue(deep)

    shallow = plain(attachments=[("upload.eml", uploaded_eml(3), "message/rfc822")])
    assert Message.queue(shallow) is not None
    assert b"the text at the bottom" in Message.objects.get().email.message().as_bytes()


def test_a_stored_message_attachment_beyond_the_bound_is_refused_when_read():
    row = json.loads(email_to_db(plain(attachments=[("upload.eml", uploaded_eml(MAX_MULTIPARTS + 5), "text/x")])))
    row["email"]["attachments"][0]["mimetype"] = "message/rfc822"  # as a forged row would have it

    with time_limit(5), pytest.raises(UndecodableData, match=f"more than {MAX_MULTIPARTS} multipart parts"):
        decode(json.dumps(row))


def test_encoded_words_count_as_the_characters_they_stand_for():
    """Decoded when parsed, at a cost in memory that grows with the square of how many there are."""
    with pytest.raises(InvalidHeader, match="the subject is longer than 16384"):
        Message.queue(EmailMessage("=?utf-8?b?w6k=?= " * 1_100, "B", "from@example.com", ["to@example.com"]))
    assert Message.queue(EmailMessage("=?utf-8?b?w6k=?= " * 900, "B", "from@example.com", ["to@example.com"]))


def nested_dict(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels):
        value = {"inner": value}
    return value


def test_data_nested_deeper_than_it_could_be_read_back_is_refused_when_queued():
    email = plain()
    email.metadata = nested_dict(120)  # type: ignore[attr-defined]  # as a subclass's own attribute
    with pytest.raises(UnstorableEmail, match="nested more than 100 deep"):
        Message.queue(email)

    email.metadata = nested_dict(90)  # type: ignore[attr-defined]
    assert Message.queue(email) is not None
    assert decode(Message.objects.get().message_data).metadata == nested_dict(90)


def test_emails_attached_in_emails_hundreds_deep_are_refused_when_queued():
    email = plain()
    for level in range(400):
        email = plain(attachments=[(f"level{level}.eml", email, "message/rfc822")])
    with pytest.raises(UnstorableEmail, match="nested more than 100 deep"):
        Message.queue(email)
    assert not Message.objects.exists()


def test_a_message_may_have_a_thousand_attachments_and_alternatives_in_all():
    """Django renders each in about half a millisecond: a row of tiny ones must not take a worker for minutes."""
    many = [(f"f{n}.txt", "x", "text/plain") for n in range(1_000)]
    with pytest.raises(UnstorableEmail, match="more than 1000 attachments and alternatives"):
        Message.queue(plain(attachments=[*many, ("one.txt", "x", "text/plain")]))
    attached = plain(attachments=many[:600])
    with pytest.raises(UnstorableEmail, match="more than 1000 attachments and alternatives"):
        Message.queue(plain(attachments=[*many[:500], ("fwd.eml", attached, "message/rfc822")]))

    assert Message.queue(plain(attachments=many)) is not None
    row = json.loads(Message.objects.get().message_data)
    row["email"]["attachments"].append(row["email"]["attachments"][0])
    with pytest.raises(UndecodableData, match="more than 1000 attachments and alternatives"):
        decode(json.dumps(row))


def test_a_message_attachment_given_as_text_is_bounded_in_its_headers_comments_too():
    forwarded = "To: " + "(" * 480 + "x" + ")" * 480 + " <a@example.com>\nSubject: hi\n\nbody\n"
    with pytest.raises(UnstorableEmail, match=r"a MIME header \(To\) with comments nested deeper than 32"):
        Message.queue(plain(attachments=[("fwd.eml", forwarded, "message/rfc822")]))
    assert not Message.objects.exists()


def test_a_lazy_subject_or_header_is_bounded_as_the_text_it_stands_for():
    lazy_text = lazy(str, str)
    with pytest.raises(InvalidHeader, match="the subject is longer than 16384"):
        Message.queue(EmailMessage(lazy_text("é" * 20_000), "B", "from@example.com", ["to@example.com"]))
    with pytest.raises(InvalidHeader, match="the subject contains a NUL"):
        Message.queue(EmailMessage(lazy_text("a\x00b"), "B", "from@example.com", ["to@example.com"]))
    with time_limit(5), pytest.raises(InvalidHeader, match="header X-Note is longer than 16384"):
        Message.queue(plain(headers={"X-Note": lazy_text("=?utf-8?b?w6k=?= " * 20_000)}))
    assert not Message.objects.exists()
