"""Stored messages come back exactly: the acceptance tests of the "no pickle in the database" storage format.

The requirement: ``message_data`` is versioned, readable (JSON) and exact.
Exact means that for every message, ``message()`` of the decoded message and
of the original have the same headers and the same tree of parts with the
same decoded payloads, leaving aside the Date header and the MIME
boundaries (see ``tests/mime_compare.py`` for the comparison, and for the
stricter field-by-field one). Lazy translation strings are resolved when
queued. ``email_to_db`` / ``db_to_email`` keep their contract: any plain
value round-trips; empty or None data decodes to None.

These tests use only the public codec functions, so they hold for any
storage format that meets the requirement, the old pickle one included
(except where pickle cannot: readability, and resolving lazy strings).
The codec is pure, so no database is needed.
"""

import email.message
import email.utils
import functools
import json
import re
from datetime import datetime, timezone
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.image import MIMEImage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

import django
import pytest
from django.core.mail import EmailAttachment, EmailMessage, EmailMultiAlternatives
from django.utils import translation
from django.utils.translation import gettext_lazy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.codec import db_to_email, email_to_db
from tests.mime_compare import (
    assert_same_field_lines,
    assert_same_fields,
    assert_same_message,
    assert_same_snapshot,
    email_fields,
    message_snapshot,
)

# Django 6.0 accepts email.message.MIMEPart attachments (and deprecates the
# legacy email.mime MIMEBase ones); Django 5.2 only knows MIMEBase, and still
# has the mixed_subtype / alternative_subtype attributes that 6.0 removed.
MIMEPART_SUPPORTED = django.VERSION >= (6, 0)
SUBTYPE_ATTRIBUTES = django.VERSION < (6, 0)
# Django 5.2 encodes non-ASCII header values (subject, display names, extra
# headers) in the message's encoding, and raises UnicodeEncodeError when
# they do not fit it; Django 6 always uses UTF-8 for headers. Django 5.2 also
# cannot render bytes under a text/* type that were not passed via attach().
HEADERS_USE_MESSAGE_ENCODING = django.VERSION < (6, 0)
needs_django_6 = pytest.mark.skipif(
    django.VERSION < (6, 0), reason="Django 5.2's message() fails on this message before any storage is involved"
)
needs_mimepart = pytest.mark.skipif(not MIMEPART_SUPPORTED, reason="MIMEPart attachments need Django 6.0")

# A tiny valid PNG (1x1, transparent), so image parts hold a real image.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63600001000005000177f29c1f0000000049454e44ae426082"
)


def round_trip(value):
    """Store ``value`` the way the queue does and read it back."""
    return db_to_email(email_to_db(value))


def check_round_trip(original: EmailMessage) -> EmailMessage:
    """Assert the storage criterion for ``original``, field equality too, and return the decoded message.

    The expected snapshots are taken before encoding, so a codec that
    changed the original while encoding could not hide it.
    """
    expected_message = message_snapshot(original)
    expected_fields = email_fields(original)
    decoded = round_trip(original)
    assert isinstance(decoded, EmailMessage), f"decoded to {decoded!r}"
    assert_same_snapshot(expected_message, decoded)
    assert_same_field_lines(expected_fields, decoded)
    return decoded


def legacy_inline_image(cid: str = "<logo@example.com>", filename: str = "logo.png") -> MIMEImage:
    """An inline image the pre-Django-6 way: an email.mime object with a Content-ID."""
    image = MIMEImage(PNG, _subtype="png")
    image.add_header("Content-ID", cid)
    image.add_header("Content-Disposition", "inline", filename=filename)
    return image


def add_legacy_part(message: EmailMessage, part) -> None:
    """Attach a legacy MIMEBase object without Django 6's deprecation warning (warnings are errors here).

    ``attach()`` warns (RemovedInDjango2028Warning) on Django 6; appending
    to ``attachments`` is what code written for Django 5 and stored before
    the upgrade ends up with, and message() still renders it.
    """
    message.attachments.append(part)


def modern_inline_image(cid: str = "<logo@example.com>", filename: str = "logo.png") -> email.message.MIMEPart:
    """An inline image the Django 6 way: an email.message.MIMEPart with a Content-ID."""
    part = email.message.MIMEPart()
    part.set_content(PNG, maintype="image", subtype="png", disposition="inline", filename=filename, cid=cid)
    return part


def basic_message(cls: type[EmailMessage] = EmailMessage, **kwargs) -> Any:
    """A message of class ``cls`` with every address field and a Message-ID, as the queue stores them."""
    defaults: dict[str, Any] = dict(
        subject="Grüße – état 😀",
        body="Hallo\nsecond line ✓\n",
        from_email="Zoë Sender <from@example.com>",
        to=["to@example.com", "Jürgen <j@example.org>"],
        cc=["cc@example.com"],
        bcc=["hidden@example.com"],
        reply_to=["Reply Désk <reply@example.com>"],
        headers={"Message-ID": "<1234.abcd@example.com>", "X-Umlaut": "välue ✓", "X-Plain": "x"},
    )
    defaults.update(kwargs)
    return cls(**defaults)


# Explicit cases -------------------------------------------------------------


def test_every_address_field_and_header_survives():
    decoded = check_round_trip(basic_message())
    assert decoded.bcc == ["hidden@example.com"]
    assert decoded.extra_headers["Message-ID"] == "<1234.abcd@example.com>"


def test_alternatives_survive():
    message = basic_message(EmailMultiAlternatives)
    message.attach_alternative("<p>Grüße <b>😀</b></p>", "text/html")
    message.attach_alternative("<!doctype html><html ⚡4email><body>amp</body></html>", "text/x-amp-html")
    decoded = check_round_trip(message)
    assert type(decoded) is EmailMultiAlternatives
    # Django's EmailAlternative named tuples (the stubs say plain tuples).
    assert [alt.mimetype for alt in decoded.alternatives] == ["text/html", "text/x-amp-html"]  # type: ignore[attr-defined]


def test_non_text_alternatives_survive():
    """Alternatives need not be text/*: a calendar invitation or a binary rendering are sent as they are."""
    message = basic_message(EmailMultiAlternatives)
    message.attach_alternative("BEGIN:VCALENDAR\nVERSION:2.0\nEND:VCALENDAR\n", "text/calendar")
    message.attach_alternative(b"%PDF-1.4\x00\xff", "application/pdf")
    check_round_trip(message)


def test_alternatives_without_a_body_survive():
    """With an empty body Django sends only the alternatives: a different tree, which must come back too."""
    message = basic_message(EmailMultiAlternatives, body="")
    message.attach_alternative("<p>only html</p>", "text/html")
    check_round_trip(message)


@pytest.mark.parametrize("encoding", [None, "utf-8", "iso-8859-1"])
@pytest.mark.parametrize("subtype", ["plain", "html"])
def test_encoding_and_content_subtype_survive(encoding, subtype):
    if encoding == "iso-8859-1":
        # Body, alternatives and text attachments must fit the encoding
        # (and on Django 5.2 the headers too).
        message = basic_message(
            EmailMultiAlternatives,
            subject="Grüße, état",
            body="Ça coûte 5 £.",
            headers={"Message-ID": "<latin@example.com>", "X-Umlaut": "välue"},
        )
    else:
        message = basic_message(EmailMultiAlternatives, body="Ça coûte 5 €? Non: 5 £.")
    message.encoding = encoding
    message.content_subtype = subtype
    message.attach("note.txt", "prix: 5 £", "text/plain")
    message.attach_alternative("<p>façade</p>", "text/html")
    decoded = check_round_trip(message)
    assert (decoded.encoding, decoded.content_subtype) == (encoding, subtype)


def _attach_text(message):
    message.attach("notes ✓.txt", "Zeile 1\nZeile 2 – ü\n", "text/plain")


def _attach_csv(message):
    message.attach("data.csv", "a,b\n1,ü\n", "text/csv")


def _attach_bytes(message):
    message.attach("blob.bin", bytes(range(256)), "application/octet-stream")


def _attach_png_bytes(message):
    message.attach("pixel.png", PNG, "image/png")


def _attach_undecodable_text(message):
    # attach() turns text/* bytes that are not UTF-8 into application/octet-stream.
    message.attach("latin.txt", "é".encode("latin-1"), "text/plain")


def _attach_text_bytes_directly(message):
    # A triple appended by hand keeps bytes under a text/* type; Django 6
    # decodes them (or falls back to octet-stream) when rendering.
    message.attachments.append(EmailAttachment("raw.txt", "ü".encode(), "text/plain"))


def _attach_without_filename(message):
    message.attach(None, b"\x00\x01\x02", "application/octet-stream")


def _attach_legacy_image(message):
    add_legacy_part(message, legacy_inline_image())


def _attach_legacy_application(message):
    part = MIMEApplication(b"%PDF-1.4 \x00\xff", _subtype="pdf")
    part.add_header("Content-Disposition", "attachment", filename="réçu.pdf")
    add_legacy_part(message, part)


def _attach_legacy_text(message):
    part = MIMEText("legacy text ✓\n", "plain", "utf-8")
    part.add_header("Content-Disposition", "attachment", filename="legacy.txt")
    add_legacy_part(message, part)


def _legacy_related(cid: str = "<chart@example.com>") -> MIMEMultipart:
    """A multipart/related block (HTML plus the image it shows) built with email.mime and attached whole."""
    related = MIMEMultipart("related")
    related.attach(MIMEText(f'<p>chart: <img src="cid:{cid[1:-1]}"></p>', "html", "utf-8"))
    related.attach(legacy_inline_image(cid, "chart.png"))
    return related


def _attach_legacy_related(message):
    add_legacy_part(message, _legacy_related())


def _attach_modern_related(message):
    related = email.message.MIMEPart()
    related.set_content('<p>chart: <img src="cid:chart@example.com"></p>', subtype="html")
    related.add_related(PNG, "image", "png", cid="<chart@example.com>", filename="chart.png")
    message.attach(related)


def _attach_modern_image(message):
    message.attach(modern_inline_image())


def _attach_modern_text(message):
    part = email.message.MIMEPart()
    part.set_content("modern text – ✓\n", subtype="plain", disposition="attachment", filename="modern.txt")
    message.attach(part)


def _attach_modern_email_message(message):
    # email.message.EmailMessage is a MIMEPart too (it adds MIME-Version).
    part = email.message.EmailMessage()
    part.set_content(b"\x89binary", maintype="application", subtype="octet-stream", filename="blob.dat")
    message.attach(part)


# How each kind of attachment is made; the MIMEPart ones only where Django renders them.
ATTACHMENT_KINDS = {
    "text-plain": _attach_text,
    "text-csv": _attach_csv,
    "bytes-octet-stream": _attach_bytes,
    "bytes-image-png": _attach_png_bytes,
    "text-mimetype-undecodable-bytes": _attach_undecodable_text,
    "text-mimetype-bytes-appended": _attach_text_bytes_directly,
    "no-filename": _attach_without_filename,
    "legacy-mimeimage-inline-cid": _attach_legacy_image,
    "legacy-mimeapplication": _attach_legacy_application,
    "legacy-mimetext": _attach_legacy_text,
    "legacy-multipart-related": _attach_legacy_related,
    "mimepart-image-inline-cid": _attach_modern_image,
    "mimepart-text": _attach_modern_text,
    "mimepart-email-message": _attach_modern_email_message,
    "mimepart-multipart-related": _attach_modern_related,
}
MODERN_KINDS = {_attach_modern_image, _attach_modern_text, _attach_modern_email_message, _attach_modern_related}
DJANGO_6_KINDS = MODERN_KINDS | {_attach_text_bytes_directly}
ATTACHMENT_PARAMS = [
    pytest.param(
        attach,
        id=name,
        marks=[needs_mimepart] if attach in MODERN_KINDS else [needs_django_6] if attach in DJANGO_6_KINDS else [],
    )
    for name, attach in ATTACHMENT_KINDS.items()
]


@pytest.mark.parametrize("attach", ATTACHMENT_PARAMS)
@pytest.mark.parametrize("cls", [EmailMessage, EmailMultiAlternatives])
def test_each_attachment_kind_survives(cls, attach):
    message = basic_message(cls)
    if cls is EmailMultiAlternatives:
        message.attach_alternative("<p>html</p>", "text/html")
    attach(message)
    check_round_trip(message)


def test_all_attachment_kinds_together_survive():
    message = basic_message(EmailMultiAlternatives)
    message.attach_alternative("<p>html</p>", "text/html")
    for attach in ATTACHMENT_KINDS.values():
        if MIMEPART_SUPPORTED or attach not in DJANGO_6_KINDS:
            attach(message)
    check_round_trip(message)


def test_legacy_inline_image_keeps_content_id_and_stays_a_mimebase():
    """The HTML refers to the image by Content-ID; a lost or changed cid breaks the email silently."""
    message = basic_message(EmailMultiAlternatives)
    message.attach_alternative('<p><img src="cid:logo@example.com"></p>', "text/html")
    add_legacy_part(message, legacy_inline_image())
    decoded = check_round_trip(message)

    (image,) = decoded.attachments
    assert isinstance(image, MIMEBase)
    assert image["Content-ID"] == "<logo@example.com>"
    assert image.get_content_disposition() == "inline"
    assert image.get_payload(decode=True) == PNG
    sent = [part for part in decoded.message().walk() if part.get("Content-ID")]
    assert [(p["Content-ID"], p.get_content_type(), p.get_payload(decode=True)) for p in sent] == [
        ("<logo@example.com>", "image/png", PNG)
    ]


@needs_mimepart
def test_mimepart_inline_image_keeps_content_id_and_stays_a_mimepart():
    message = basic_message(EmailMultiAlternatives)
    message.attach_alternative('<p><img src="cid:logo@example.com"></p>', "text/html")
    message.attach(modern_inline_image())
    decoded = check_round_trip(message)

    (image,) = decoded.attachments
    assert isinstance(image, email.message.MIMEPart)
    assert image["Content-ID"] == "<logo@example.com>"
    assert image.get_content() == PNG


@pytest.mark.skipif(not SUBTYPE_ATTRIBUTES, reason="mixed_subtype was removed in Django 6.0")
def test_mixed_subtype_related_survives():
    """Before Django 6, inline images were sent as multipart/related by setting mixed_subtype."""
    message = basic_message(EmailMultiAlternatives)
    message.mixed_subtype = "related"
    message.attach_alternative('<img src="cid:logo@example.com">', "text/html")
    add_legacy_part(message, legacy_inline_image())
    decoded = check_round_trip(message)
    assert decoded.message().get_content_type() == "multipart/related"


def test_attached_django_message_survives():
    inner = basic_message(
        subject="Inner ✓",
        headers={"Message-ID": "<inner@example.com>", "Date": "Tue, 01 Jan 2030 00:00:00 -0000"},
    )
    inner.attach("inner.txt", "inside", "text/plain")
    message = basic_message()
    message.attach("forwarded.eml", inner, "message/rfc822")
    decoded = check_round_trip(message)
    (attachment,) = decoded.attachments
    assert isinstance(attachment.content, EmailMessage)
    assert attachment.content.subject == "Inner ✓"


def test_attached_django_message_without_its_own_date_or_message_id_survives():
    """The inner message's Date and Message-ID are then generated afresh, like the outer ones, and left aside."""
    inner = EmailMessage("Inner", "body", "a@example.com", ["b@example.com"])
    message = basic_message()
    message.attach(None, inner, "message/rfc822")
    check_round_trip(message)


def test_attached_raw_and_stdlib_messages_survive():
    raw = "From: a@example.com\nTo: b@example.com\nSubject: raw\nMessage-ID: <raw@example.com>\n\nraw body\n"
    parsed = email.message_from_string(raw)
    modern = email.message.EmailMessage()
    modern["Subject"] = "modern ✓"
    modern["Message-ID"] = "<modern@example.com>"
    modern.set_content("modern body ü\n")
    message = basic_message()
    message.attach("raw.eml", raw, "message/rfc822")
    message.attach("parsed.eml", parsed, "message/rfc822")
    message.attach("modern.eml", modern, "message/rfc822")
    check_round_trip(message)


def test_message_id_is_generated_when_the_original_had_none():
    """Without a Message-ID in extra_headers, Django makes one per call; the comparison then leaves it aside."""
    message = basic_message(headers={"X-Only": "1"})
    decoded = check_round_trip(message)
    assert not any(name.lower() == "message-id" for name in decoded.extra_headers)


def test_extra_headers_that_override_address_fields_survive():
    message = basic_message(
        headers={
            "Message-ID": "<override@example.com>",
            "From": "List Owner <owner@example.com>",
            "To": "Mailing list <list@example.com>",
            "Reply-To": "noreply@example.com",
            "Date": "Wed, 02 Jan 2030 10:00:00 +0100",
        }
    )
    decoded = check_round_trip(message)
    assert list(decoded.extra_headers) == ["Message-ID", "From", "To", "Reply-To", "Date"]


def test_a_datetime_date_header_survives():
    """Django 6 sends a datetime in extra_headers["Date"] as a proper Date header; the value must stay a datetime."""
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    decoded = check_round_trip(basic_message(headers={"Message-ID": "<d@example.com>", "Date": when}))
    assert decoded.extra_headers["Date"] == when


@pytest.mark.skipif(django.VERSION >= (6, 0), reason="Django 6's message() raises TypeError for an int header value")
def test_a_number_header_value_survives():
    """Django 5.2 sends str(value) for any header value, so {"X-Priority": 1} works there and must keep working."""
    decoded = check_round_trip(basic_message(headers={"Message-ID": "<n@example.com>", "X-Priority": 1}))
    assert decoded.extra_headers["X-Priority"] == 1


def test_unicode_domains_and_display_names_survive():
    message = basic_message(
        from_email='"Doe, Jöhn" <john@bücher.example>',
        to=["Ωmega <o@παράδειγμα.example>", "plain@example.com"],
    )
    check_round_trip(message)


def test_lazy_strings_are_resolved_when_queued():
    """A lazy string is resolved in the language active when the message is queued, and is stored as plain text.

    Were it stored lazily (as pickle does), it would be translated again, in
    whatever language the sending process happens to have active.
    """
    message = basic_message(
        subject=gettext_lazy("Yes"),
        body=gettext_lazy("Enter a valid value."),
        headers={"Message-ID": "<lazy@example.com>", "X-Answer": gettext_lazy("Yes")},
    )
    with translation.override("fr"):
        expected = message_snapshot(message)
        stored = email_to_db(message)
    with translation.override("en"):
        decoded = db_to_email(stored)
        assert (decoded.subject, decoded.body, decoded.extra_headers["X-Answer"]) == (
            "Oui",
            "Saisissez une valeur valide.",
            "Oui",
        )
        assert type(decoded.subject) is str
        assert type(decoded.body) is str
        assert type(decoded.extra_headers["X-Answer"]) is str
        assert_same_snapshot(expected, decoded)


# The plain-value contract ---------------------------------------------------

PLAIN_VALUES = [
    None,
    "",
    "text ✓",
    0,
    -7,
    2**70,
    1.5,
    True,
    False,
    [],
    {},
    [1, "two", None, [3.25]],
    {"plain": [1, 2], "nested": {"ü": None, "": True}},
    {"$bytes": "not a tag", "$tuple": [1]},
    # Not JSON types, but plain Python values that pickle kept exactly.
    (1, "two"),
    b"\x00\xffbytes",
    {"pair": (1, [b"x"])},
]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=repr)
def test_plain_values_round_trip(value):
    decoded = round_trip(value)
    assert decoded == value
    assert type(decoded) is type(value)


@pytest.mark.parametrize("empty", ["", None, b""], ids=repr)
def test_empty_data_decodes_to_none(empty):
    assert db_to_email(empty) is None


def test_stored_text_is_readable_json():
    """The stored text is JSON a person can read: json.loads works and the subject is in it as text.

    The exact layout (keys, version marker) is the codec's own business.
    """
    message = basic_message(subject="Quarterly report ready", headers={"Message-ID": "<r@example.com>"})
    message.attach("r.txt", "report", "text/plain")
    stored = email_to_db(message)
    assert isinstance(stored, str)
    json.loads(stored)
    assert "Quarterly report ready" in stored
    # Non-ASCII may be written as \u escapes; it must still be the subject, as text, once parsed.
    unicode_stored = email_to_db(basic_message(subject="Grüße 😀 ünïcode"))
    assert "Grüße 😀 ünïcode" in _strings_in(json.loads(unicode_stored))


def _strings_in(document) -> set[str]:
    """Every string anywhere in a JSON document, keys included, so text is found however it was escaped."""
    found: set[str] = set()
    if isinstance(document, str):
        found.add(document)
    elif isinstance(document, dict):
        for key, value in document.items():
            found.add(key)
            found |= _strings_in(value)
    elif isinstance(document, list):
        for item in document:
            found |= _strings_in(item)
    return found


# Checking the checker --------------------------------------------------------


def _changed(change) -> EmailMessage:
    message = basic_message(EmailMultiAlternatives)
    message.attach_alternative("<p>html</p>", "text/html")
    message.attach("a.txt", "text", "text/plain")
    add_legacy_part(message, legacy_inline_image())
    change(message)
    return message


# Each change, and the line the comparison's diff must show for it (the decoded side, "+").
MUTATIONS = {
    # (Django 5.2 writes the non-ASCII subject encoded, so the "!" is not shown as such.)
    "subject": (lambda m: setattr(m, "subject", m.subject + "!"), r"\+message header Subject: "),
    "bcc": (lambda m: m.bcc.append("more@example.com"), r"\+recipients: \[.*'more@example\.com'\]"),
    "header-order": (
        lambda m: setattr(m, "extra_headers", dict(reversed(list(m.extra_headers.items())))),
        r"\+message header X-Plain: x\n",
    ),
    "message-id": (
        lambda m: m.extra_headers.update({"Message-ID": "<other@example.com>"}),
        r"\+message header Message-ID: <other@example\.com>",
    ),
    "alternative-payload": (
        lambda m: setattr(m, "alternatives", [m.alternatives[0]._replace(content="<p>HTML</p>")]),
        r"\+message\.0\.1 decoded payload: b'<p>HTML</p>",
    ),
    "attachment-filename": (
        lambda m: m.attachments.__setitem__(0, m.attachments[0]._replace(filename="b.txt")),
        r'\+message\.1 header Content-Disposition: attachment; filename="b\.txt"',
    ),
    "content-id": (
        lambda m: m.attachments[1].replace_header("Content-ID", "<other@example.com>"),
        r"\+message\.2 header Content-ID: <other@example\.com>",
    ),
    "image-bytes": (lambda m: m.attachments[1].set_payload(PNG[:-1]), r"\+message\.2 decoded payload: "),
    "content-subtype": (
        lambda m: setattr(m, "content_subtype", "html"),
        r"\+message\.0\.0 header Content-Type: text/html",
    ),
    "class": (
        lambda m: setattr(m, "__class__", type("Sub", (EmailMultiAlternatives,), {})),
        r"\+class: tests\.test_storage_roundtrip\.Sub\n",
    ),
}


@pytest.mark.parametrize("change, shown", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_the_comparison_sees_every_kind_of_change(change, shown):
    """The helpers must not be vacuous: a changed field, header, payload or class fails them, showing the change."""
    with pytest.raises(AssertionError, match=r"message\(\) differs after the storage round trip:\n") as failed:
        assert_same_message(_changed(lambda m: None), _changed(change))
    assert re.search(shown, str(failed.value)), str(failed.value)


FIELD_ONLY_MUTATIONS = {
    # encoding None means DEFAULT_CHARSET (utf-8): message() cannot tell them apart.
    "encoding-none-to-utf-8": (lambda m: setattr(m, "encoding", "utf-8"), r"\+encoding: str 'utf-8'\n"),
    # A triple turned into the MIME part Django would render from it.
    "triple-to-mime": (
        lambda m: m.attachments.__setitem__(0, MIMEText("text", "plain", "utf-8")),
        r"\+attachments\[0\]: MIMEBase\n",
    ),
    "namedtuple-to-tuple": (
        lambda m: m.attachments.__setitem__(0, tuple(m.attachments[0])),
        r"\+attachments\[0\]: tuple of 3\n",
    ),
    "list-to-tuple": (lambda m: setattr(m, "cc", tuple(m.cc)), r"\+cc: tuple of 1\n"),
}


@pytest.mark.parametrize("change, shown", FIELD_ONLY_MUTATIONS.values(), ids=FIELD_ONLY_MUTATIONS.keys())
def test_the_field_comparison_sees_what_message_does_not_show(change, shown):
    with pytest.raises(
        AssertionError, match=r"The Django message's fields differs after the storage round trip:\n"
    ) as failed:
        assert_same_fields(_changed(lambda m: None), _changed(change))
    assert re.search(shown, str(failed.value)), str(failed.value)


def test_the_comparison_ignores_only_what_varies_per_call():
    """The same message compared with itself passes, though Date, Message-ID and boundaries are new each call."""
    message = _changed(lambda m: m.extra_headers.pop("Message-ID"))
    assert_same_message(message, message)
    assert_same_fields(message, message)


# Property-based --------------------------------------------------------------

# Characters str.splitlines() breaks on: Python's modern email policy refuses
# header values containing any of them (ValueError), as Django 6 does for \r \n.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


# The strategy factories below are cached: building a strategy is far
# slower than drawing from it, and they are called for every example.
@functools.cache
def header_text(max_size=20, latin1=False):
    """Unicode text fit for a header value: no line breaks, controls, surrogates or NUL."""
    return st.text(
        st.characters(
            exclude_categories=("Cs", "Cc"), exclude_characters=LINE_BREAKS, max_codepoint=0xFF if latin1 else None
        ),
        max_size=max_size,
    )


@functools.cache
def body_text(max_size=40, latin1=False):
    """Unicode text for bodies and text attachments: any character but surrogates and NUL, newlines included."""
    return st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="\x00", max_codepoint=0xFF if latin1 else None),
        max_size=max_size,
    )


local_parts = st.from_regex(r"[a-z0-9]{1,8}(\.[a-z0-9]{1,4})?", fullmatch=True)
domains = st.sampled_from(["example.com", "example.org", "mail.example.net", "bücher.example"])


@functools.cache
def display_names(latin1=False):
    """Unicode display names (letters, digits, inner spaces): no quoting needed."""
    return st.text(
        st.characters(categories=("L", "N"), max_codepoint=0xFF if latin1 else None) | st.just(" "),
        min_size=1,
        max_size=12,
    ).map(str.strip)


@functools.cache
def addresses(latin1=False):
    """A valid address, sometimes with a (unicode) display name: "Name <a@example.com>"."""
    return st.builds(
        lambda local, domain, name: f"{name} <{local}@{domain}>" if name else f"{local}@{domain}",
        local_parts,
        domains,
        st.none() | display_names(latin1),
    )


@functools.cache
def address_lists(latin1=False):
    return st.lists(addresses(latin1), max_size=3)


filenames = st.none() | st.builds(
    "{}.{}".format,
    st.text(st.characters(categories=("L", "N")) | st.sampled_from(" -_()'"), min_size=1, max_size=10),
    st.sampled_from(["txt", "csv", "png", "bin", "pdf"]),
)
binary = st.binary(max_size=64)
content_ids = st.builds("<{}.{}@example.com>".format, st.integers(0, 10**6), local_parts)


@st.composite
def extra_headers(draw, latin1=False):
    """Extra headers as the queue stores them: always a Message-ID, some X- headers, sometimes Date or To."""
    headers = {"Message-ID": f"<{draw(st.integers(0, 10**9))}.{draw(local_parts)}@example.com>"}
    name_strategy = st.from_regex(r"X-[A-Za-z][A-Za-z0-9-]{0,10}", fullmatch=True)
    names = draw(st.lists(name_strategy, max_size=3, unique_by=str.lower))
    for name in names:
        headers[name] = draw(header_text(latin1=latin1))
    if draw(st.booleans()):
        headers["Date"] = email.utils.formatdate(draw(st.integers(0, 2**31)))
    if draw(st.integers(0, 4)) == 0:
        headers["To"] = ", ".join(draw(st.lists(addresses(latin1), min_size=1, max_size=2)))
    return headers


@st.composite
def attachments(draw, latin1: bool):
    """One attachment of a random kind; see ATTACHMENT_KINDS for the same kinds written out."""
    kinds = ["text", "bytes", "legacy-image", "legacy-application", "legacy-text", "legacy-related", "rfc822"]
    if MIMEPART_SUPPORTED:
        kinds += ["mimepart-image", "mimepart-text", "mimepart-related"]
    kind = draw(st.sampled_from(kinds))
    if kind == "text":
        mimetype = draw(st.sampled_from(["text/plain", "text/csv"]))
        return ("triple", (draw(filenames), draw(body_text(latin1=latin1)), mimetype))
    if kind == "bytes":
        mimetype = draw(st.sampled_from(["application/octet-stream", "image/png", "application/pdf"]))
        return ("triple", (draw(filenames), draw(binary), mimetype))
    if kind == "rfc822":
        inner = EmailMessage(
            draw(header_text()),
            draw(body_text()),
            draw(addresses()),
            draw(address_lists()),
            headers={"Message-ID": draw(content_ids)},
        )
        return ("triple", (draw(filenames), inner, "message/rfc822"))
    if kind == "legacy-image":
        image = MIMEImage(draw(binary), _subtype="png")
        image.add_header("Content-ID", draw(content_ids))
        image.add_header("Content-Disposition", "inline", filename=draw(filenames) or "image.png")
        return ("part", image)
    if kind == "legacy-application":
        application = MIMEApplication(draw(binary))
        application.add_header("Content-Disposition", "attachment", filename=draw(filenames) or "file.bin")
        return ("part", application)
    if kind == "legacy-text":
        return ("part", MIMEText(draw(body_text()), "plain", "utf-8"))
    if kind == "legacy-related":
        return ("part", _legacy_related(draw(content_ids)))
    part = email.message.MIMEPart()
    if kind == "mimepart-related":
        cid = draw(content_ids)
        part.set_content(f'<img src="cid:{cid[1:-1]}">{draw(body_text())}', subtype="html")
        part.add_related(draw(binary), "image", "png", cid=cid, filename=draw(filenames))
    elif kind == "mimepart-image":
        part.set_content(
            draw(binary),
            maintype="image",
            subtype="png",
            cid=draw(content_ids),
            disposition="inline",
            filename=draw(filenames),
        )
    else:
        part.set_content(draw(body_text()), subtype="plain", filename=draw(filenames))
    return ("part", part)


@st.composite
def django_messages(draw):
    """A random EmailMessage or EmailMultiAlternatives with unicode everywhere, alternatives and attachments.

    Every message has a Message-ID in extra_headers, as queued messages do;
    some have a fixed Date, some an extra_headers["To"] overriding the To list.

    The encoding is drawn first: with iso-8859-1 the texts Django encodes in
    it (body, alternatives, text attachments; on Django 5.2 headers and
    display names too) keep to Latin-1, or message() would fail on the
    original already.
    """
    cls = draw(st.sampled_from([EmailMessage, EmailMultiAlternatives]))
    encoding = draw(st.sampled_from([None, "utf-8", "iso-8859-1"]))
    latin1 = encoding == "iso-8859-1"
    latin1_headers = latin1 and HEADERS_USE_MESSAGE_ENCODING
    message = cls(
        subject=draw(header_text(max_size=30, latin1=latin1_headers)),
        body=draw(body_text(latin1=latin1)),
        from_email=draw(addresses(latin1_headers)),
        to=draw(address_lists(latin1_headers)),
        cc=draw(address_lists(latin1_headers)),
        bcc=draw(address_lists(latin1_headers)),
        reply_to=draw(address_lists(latin1_headers)),
        headers=draw(extra_headers(latin1_headers)),
    )
    if encoding is not None or draw(st.booleans()):
        message.encoding = encoding
    subtype = draw(st.sampled_from([None, "plain", "html"]))
    if subtype is not None:
        message.content_subtype = subtype
    if SUBTYPE_ATTRIBUTES and draw(st.integers(0, 4)) == 0:
        message.mixed_subtype = "related"
    if cls is EmailMultiAlternatives:
        for _ in range(draw(st.integers(0, 2))):
            mimetype = draw(st.sampled_from(["text/html", "text/x-amp-html"]))
            message.attach_alternative(f"<p>{draw(body_text(latin1=latin1))}</p>", mimetype)
    for how, attachment in draw(st.lists(attachments(latin1), max_size=3)):
        if how == "triple":
            message.attach(*attachment)
        elif isinstance(attachment, email.message.MIMEPart):
            message.attach(attachment)
        else:
            add_legacy_part(message, attachment)
    return message


# How many examples: the Hypothesis profile decides (HYPOTHESIS_PROFILE, tests/conftest.py).
PROPERTY_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(django_messages())
def test_generated_messages_send_the_same_after_storage(message):
    """The requirement's criterion, on random messages: decode(encode(m)).message() is m.message()."""
    expected = message_snapshot(message)
    decoded = round_trip(message)
    assert_same_snapshot(expected, decoded)


@PROPERTY_SETTINGS
@given(django_messages())
def test_generated_messages_keep_every_field(message):
    """Stricter than the criterion: the Django object itself comes back field for field, attachment kinds included."""
    expected = email_fields(message)
    stored = email_to_db(message)
    assert email_fields(message) == expected, "encoding changed the original message"
    assert_same_field_lines(expected, db_to_email(stored))


plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.binary(max_size=16),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(deadline=None)
@given(plain_values)
def test_generated_plain_values_round_trip(value):
    """Any plain value comes back equal: JSON shapes plus tuples and bytes, NUL and "$"-prefixed keys included.

    ``==`` already tells a tuple from a list and bytes from str.
    """
    assert round_trip(value) == value


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(django_messages(), plain_values))
def test_stored_text_fits_any_text_column(value):
    """message_data is a text column: PostgreSQL refuses NUL in text, and every database needs valid Unicode."""
    stored = email_to_db(value)
    assert isinstance(stored, str)
    assert "\x00" not in stored
    stored.encode("utf-8")  # no lone surrogates
