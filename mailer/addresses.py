"""Checking addresses and headers when mail is queued, as the delivering backend will.

Django builds an ``EmailMessage`` from almost any strings and only its SMTP
backend, at send time, refuses an address it cannot deliver to. In a queue
that is too late: the error would land in the cron job, far from the code
that made the mistake. So every address is checked when the message is
queued, and a bad one is refused there, naming the field.

Extra headers are checked at the same time, for the same reason and for one
more: Django writes a header name out as it is given, so a line break in it
would add a header of the sender's choosing (a Reply-To to an attacker).
"""

import re
import reprlib
from collections.abc import Iterable
from email.headerregistry import AddressHeader
from typing import Any

from django.core.mail import EmailMessage
from django.utils.functional import Promise

from mailer.exceptions import InvalidAddress, InvalidHeader
from mailer.legacy import is_header_value

ENVELOPE_FIELDS = ("to", "cc", "bcc")

# Django accepts a local mailbox such as "webmaster" as a sender (#15042).
ALLOWED_DEFECTS = {"addr-spec local part with no domain"}

# RFC 5322, section 2.2: a field name is printable US-ASCII (33 to 126) but the colon.
FIELD_NAME = re.compile(r"[!-9;-~]+")

# The characters str.splitlines() breaks at. Python's email package ends a
# header line at each of them: Django 6.1 refuses them in a header value,
# Django 5.2 refuses some with an error that is not a ValueError and folds
# the rest away. In a header value, each is a line break.
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def check_addresses(email: EmailMessage) -> None:
    """Raise InvalidAddress, naming the field, unless every address of ``email`` can be delivered.

    The sender and the recipients go into the SMTP envelope, one address
    each; Reply-To is only a header, so it need only be text without a line
    break (a group, or several addresses in one entry, are fine there).
    The extra headers are checked too (``check_headers``: InvalidHeader).
    """
    check_address(email.from_email, "from_email")
    for field in ENVELOPE_FIELDS:
        for index, address in enumerate(_as_list(getattr(email, field), field)):
            if address != "":  # Django skips empty strings, and so does delivery
                check_address(address, f"{field}[{index}]")
    for index, address in enumerate(_as_list(email.reply_to, "reply_to")):
        if not isinstance(address, str):
            raise InvalidAddress(f"reply_to[{index}] is {address!r}, not an email address")
        if "\r" in address or "\n" in address:
            raise InvalidAddress(f"reply_to[{index}] contains a line break: {address!r}")
    check_headers(email)


def check_address(address: Any, where: str) -> None:
    """Raise InvalidAddress unless ``address`` is one address that SMTP can carry."""
    if not isinstance(address, str):
        raise InvalidAddress(f"{where} is {address!r}, not an email address")
    if "\r" in address or "\n" in address:
        raise InvalidAddress(f"{where} contains a line break: {address!r}")
    parsed = AddressHeader.value_parser(address)
    for mailbox in parsed.all_mailboxes:
        # The parser leaves them None (typeshed says str) for "<>", "a@b@c", "a@x..y".
        local_part: str | None = mailbox.local_part
        domain: str | None = mailbox.domain
        if local_part is None or (domain is None and "@" in address):
            raise InvalidAddress(f"{where} is not a valid address: {address!r}")
        if not local_part.isascii():
            raise InvalidAddress(f"{where} has a non-ASCII part before the @, which SMTP cannot carry: {address!r}")
    defects = sorted({str(defect) for defect in parsed.all_defects} - ALLOWED_DEFECTS)
    if defects:
        raise InvalidAddress(f"{where} is not a valid address: {address!r} ({'; '.join(defects)})")
    mailboxes = parsed.all_mailboxes
    if len(mailboxes) != 1:
        raise InvalidAddress(f"{where} must be one address, not {address!r}")
    mailbox = mailboxes[0]
    if mailbox.domain and not mailbox.domain.isascii():
        try:
            mailbox.domain.encode("idna")
        except UnicodeError as exc:
            raise InvalidAddress(f"{where} has a domain that cannot be written in ASCII: {address!r}") from exc


def _as_list(value: Any, field: str) -> Iterable[Any]:
    if isinstance(value, (list, tuple)):
        return value
    raise InvalidAddress(f"{field} must be a list or tuple of addresses, not {type(value).__name__}")


def check_headers(email: EmailMessage) -> None:
    """Raise InvalidHeader, naming the header, unless every extra header of ``email`` can be sent as given.

    Without this, a bad name would be queued and sent (a header injection on
    Django 5.2, a garbled header on 6.1), and a bad value would fail here
    with a TypeError or AttributeError, or be queued and then fail in the
    cron job.
    """
    for name, value in _header_items(email):
        check_header_name(name)
        check_header_value(name, value)


def check_header_name(name: Any) -> None:
    """Raise InvalidHeader unless ``name`` is a field name RFC 5322 allows: Django writes names out unchecked."""
    if not isinstance(name, str):
        raise InvalidHeader(f"header name {name!r} is a {type(name).__name__}, not a str")
    if not FIELD_NAME.fullmatch(name):
        raise InvalidHeader(
            f"header name {name!r} is not a valid field name: "
            "it must be printable ASCII other than ':', without spaces or line breaks"
        )


def check_header_value(name: str, value: Any) -> None:
    """Raise InvalidHeader unless the queue can store ``value`` and the installed Django can send it.

    Text can, if it is one line. A number or a date only where the installed
    Django writes it out (a number on 5.2; a date in any header on 5.2, in a
    date header on 6.1). Anything else the queue could not read back, and
    the cron job would have to set the message aside.
    """
    if isinstance(value, Promise):
        value = str(value)  # the queue stores a lazy string resolved, so check what it stores
    if not is_header_value(value):
        raise InvalidHeader(
            f"header {name!r} has the value {reprlib.repr(value)} ({type(value).__name__}), which cannot be queued: "
            "give it as text"
        )
    if isinstance(value, str):
        _check_header_text(name, value)
    else:
        _check_header_renders(name, value)


def _check_header_text(name: str, value: str) -> None:
    if not LINE_BREAKS.isdisjoint(value):
        raise InvalidHeader(f"header {name!r} contains a line break: {reprlib.repr(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        reason = f"{reprlib.repr(value)} ({exc.reason})"
        raise InvalidHeader(f"header {name!r} is not text that can be sent: {reason}") from exc


def _check_header_renders(name: str, value: Any) -> None:
    """Raise InvalidHeader unless the installed Django writes the non-text ``value`` out as header ``name``.

    That depends on the version and the header (5.2 writes a number as
    text; 6.1 refuses a number, and takes a date only in a date header), so
    the installed Django is asked, with a message holding just this header.
    """
    try:
        EmailMessage(headers={name: value}).message()
    except Exception as exc:  # whatever Django raises, the caller must learn which header it was
        raise InvalidHeader(
            f"header {name!r} has the value {reprlib.repr(value)} ({type(value).__name__}), "
            f"which this version of Django cannot send: {exc}"
        ) from exc


def _header_items(email: EmailMessage) -> list[tuple[Any, Any]]:
    """Return the extra headers of ``email`` as the queue will take them (a list of pairs becomes a dict)."""
    headers = email.extra_headers or {}
    try:
        return list(dict(headers).items())
    except (TypeError, ValueError) as exc:
        raise InvalidHeader(
            f"extra_headers must be a dict of header names and values, not {type(headers).__name__}"
        ) from exc
