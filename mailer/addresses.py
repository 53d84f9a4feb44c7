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
from email._header_value_parser import get_mailbox
from email.headerregistry import AddressHeader
from email.message import Message as MIMEMessage
from typing import Any

import django
from django.conf import settings
from django.core.mail import EmailAlternative, EmailMessage, EmailMultiAlternatives
from django.utils.functional import Promise

from mailer.exceptions import InvalidAddress, InvalidHeader
from mailer.legacy import is_header_value
from mailer.mime import (
    ADDRESS_HEADERS,
    COMMENTED_HEADERS,
    MAX_COMMENT_DEPTH,
    MAX_HEADER_LENGTH,
    PARSED_HEADERS,
    comment_depth,
)
from mailer.redaction import address_of

ENVELOPE_FIELDS = ("to", "cc", "bcc")

# Django accepts a local mailbox such as "webmaster" as a sender (#15042).
ALLOWED_DEFECTS = {"addr-spec local part with no domain"}

# RFC 5322, section 2.2: a field name is printable US-ASCII (33 to 126) but the colon.
FIELD_NAME = re.compile(r"[!-9;-~]+")

# The plainest addresses, which are nearly all of them: ``local@domain`` of
# ASCII atoms and host name labels, alone or in angle brackets after a display
# name of words (or one quoted string). Python's parser takes each without a
# defect and Django writes each out unchanged, so neither need be asked: that
# costs a tenth of a millisecond an address, more than the rest of queueing.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ADDR_SPEC = rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*"
_WORD = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])+"
_DISPLAY_NAME = rf'(?:{_WORD}(?: {_WORD})*|"[^"\\\x00-\x1f\x7f]+")'
PLAIN_ADDRESS = re.compile(rf"({_ADDR_SPEC})|{_DISPLAY_NAME} <({_ADDR_SPEC})>")

# The characters str.splitlines() breaks at. Python's email package ends a
# header line at each of them: Django 6.1 refuses them in a header value,
# Django 5.2 refuses some with an error that is not a ValueError and folds
# the rest away. In a header value, each is a line break.
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")

# RFC 5322 allows no NUL in a message; software written in C ends a header at it.
NUL = "\x00"

# What begins an encoded word (RFC 2047): Python's email package may fail to fold a header holding a
# broken one, so such a header is rendered when queued.
ENCODED = "=?"


# Rendering bounds ----------------------------------------------------------

# Python's email package parses addresses, and folds every header value, in
# time that grows with the square of their length when they are crafted so
# (a Reply-To of 40,000 '"': ten seconds; a subject of 400,000 characters:
# seconds, with accents minutes). A message within these bounds renders in
# a few seconds at worst; queueing refuses one beyond them, and a row beyond
# them is set aside when read, before anything renders it.
#
# An address may be one line of a message long (RFC 5322). The addresses
# of To, Cc, Reply-To and From, with the address headers among the extra
# headers, may hold some 10,000 ordinary ones, but only 16,384 characters of
# what is not a plain address (``is_plain_address``: parsed in linear time).
# Bcc is not written out as a header: its addresses are bounded one by one.
MAX_ADDRESS_LENGTH = 998
MAX_ADDRESSES_LENGTH = 262_144
MAX_UNPLAIN_ADDRESSES_LENGTH = 16_384
# A header value (the subject too) may be 131,072 characters of ASCII, or
# 16,384 with any other character (folded far slower); all of them 262,144
# together, counting four times those with other characters. Those the
# package parses for MIME parameters, a Message-ID, and file names: 4,096.
MAX_ASCII_VALUE_LENGTH = 131_072
MAX_VALUE_LENGTH = 16_384
MAX_VALUES_LENGTH = 262_144


def addresses_problem(message: Any) -> str | None:
    """Why the addresses of the email ``message`` (its fields, and the address headers among its extra headers)
    could not be rendered in bounded time, or None. Values that are not text are left to the checks of their types.
    """
    total = 0
    shown: list[str] = []  # the addresses written out in headers
    for field in ("from_email", "to", "cc", "reply_to", "bcc"):
        value = getattr(message, field, None)
        for address in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
            if not isinstance(address, str):
                continue
            if len(address) > MAX_ADDRESS_LENGTH:
                return f"{field} has an address longer than {MAX_ADDRESS_LENGTH} characters"
            if comment_depth(address) > MAX_COMMENT_DEPTH:
                return f"{field} has an address with comments nested deeper than {MAX_COMMENT_DEPTH}"
            if field != "bcc":
                total += len(address)
                shown.append(address)
    headers = [
        (name, value)
        for name, value in _extra_headers(message)
        if name.lower() in ADDRESS_HEADERS and isinstance(value, str)
    ]
    for name, value in headers:
        # Split where a list of addresses is: a quoted comma only makes the pieces shorter.
        if any(len(piece) > MAX_ADDRESS_LENGTH for piece in value.split(",")):
            return f"header {name:.40} has an address longer than {MAX_ADDRESS_LENGTH} characters"
        if comment_depth(value) > MAX_COMMENT_DEPTH:
            return f"header {name:.40} has comments nested deeper than {MAX_COMMENT_DEPTH}"
        total += len(value)
    if total > MAX_ADDRESSES_LENGTH:
        return f"the addresses are longer than {MAX_ADDRESSES_LENGTH} characters in all"
    # Looked at only when they could matter: all the addresses of most messages are shorter together.
    if total > MAX_UNPLAIN_ADDRESSES_LENGTH:
        unplain = sum(len(address) for address in shown if not is_plain_address(address))
        unplain += sum(len(value) for _name, value in headers)
        if unplain > MAX_UNPLAIN_ADDRESSES_LENGTH:
            return (
                f"the addresses that are not plain (display names with quotes or other specials, groups, address "
                f"headers) are longer than {MAX_UNPLAIN_ADDRESSES_LENGTH} characters in all"
            )
    return None


def headers_problem(message: Any) -> str | None:
    """Why the subject, the extra headers or the attachments' file names of the email ``message`` could not be
    rendered in bounded time, or None. Values that are not text are left to the checks of their types.
    """
    values = [("the subject", _resolved(getattr(message, "subject", None)), MAX_VALUE_LENGTH)]
    for name, value in _extra_headers(message):
        value = _resolved(value)
        # Address headers are addresses_problem's.
        commented = name.lower() in COMMENTED_HEADERS and name.lower() not in ADDRESS_HEADERS
        if commented and isinstance(value, str) and comment_depth(value) > MAX_COMMENT_DEPTH:
            return f"header {name:.40} has comments nested deeper than {MAX_COMMENT_DEPTH}"
        if name.lower() == "message-id":
            # Mailer gives every message one: not counted with the others, so adding it cannot pass a bound.
            if isinstance(value, str) and len(value) > MAX_HEADER_LENGTH:
                return f"header {name:.40} is longer than {MAX_HEADER_LENGTH} characters"
            continue
        limit = MAX_HEADER_LENGTH if name.lower() in PARSED_HEADERS else MAX_VALUE_LENGTH
        values.append((f"header {name:.40}", value, limit))
    attachments = getattr(message, "attachments", None)
    for attachment in attachments if isinstance(attachments, list) else []:
        if isinstance(attachment, tuple) and attachment:
            values.append(("an attachment's file name", attachment[0], MAX_HEADER_LENGTH))
    total = 0
    for what, value, limit in values:
        if not isinstance(value, str):
            continue
        # Encoded words ("=?utf-8?b?...?=") are decoded when parsed, at a cost in memory that grows with the square
        # of how many there are: counted as what they stand for.
        ascii_only = value.isascii() and ENCODED not in value
        if ascii_only and limit == MAX_VALUE_LENGTH:
            limit = MAX_ASCII_VALUE_LENGTH
        if len(value) > limit:
            return f"{what} is longer than {limit} characters"
        total += len(value) if ascii_only else 4 * len(value)
    if total > MAX_VALUES_LENGTH:
        return f"the subject, the headers and the file names are longer than {MAX_VALUES_LENGTH} characters in all"
    return None


def render_problem(message: Any) -> str | None:
    """Why the email ``message`` could not be rendered in bounded time (its addresses, its headers), or None."""
    return addresses_problem(message) or headers_problem(message)


def _extra_headers(message: Any) -> list[tuple[str, Any]]:
    headers = getattr(message, "extra_headers", None)
    if not isinstance(headers, dict):
        return []
    return [(name, value) for name, value in headers.items() if isinstance(name, str)]


def check_addresses(email: EmailMessage) -> None:
    """Raise InvalidAddress, naming the field, unless every address of ``email`` can be delivered.

    The sender and the recipients go into the SMTP envelope, one address
    each; Reply-To is only a header, so it need only be text without a line
    break (a group, or several addresses in one entry, are fine there).
    The extra headers are checked too (``check_headers``: InvalidHeader).
    """
    problem = addresses_problem(email)  # first: parsing an address takes time that grows with its square
    if problem is not None:
        raise InvalidAddress(problem)
    check_address(email.from_email, "from_email")
    for field in ENVELOPE_FIELDS:
        for index, address in enumerate(map(_resolved, _as_list(getattr(email, field), field))):
            # Django skips empty strings, and so does delivery; a plain address needs no more
            # (and no name for an error).
            if address != "" and not (isinstance(address, str) and is_plain_address(address)):
                check_address(address, f"{field}[{index}]")
    for index, address in enumerate(map(_resolved, _as_list(email.reply_to, "reply_to"))):
        if not isinstance(address, str):
            raise InvalidAddress(f"reply_to[{index}] is {address!r}, not an email address")
        if "\r" in address or "\n" in address:
            raise InvalidAddress(f"reply_to[{index}] contains a line break: {address!r}")
        if NUL in address:
            raise InvalidAddress(f"reply_to[{index}] contains a NUL character: {address!r}")
    check_headers(email)


def _resolved(value: Any) -> Any:
    """Return a lazy string (``gettext_lazy``) as the text the queue stores for it, anything else as it is."""
    return str(value) if isinstance(value, Promise) else value


def check_address(address: Any, where: str) -> None:
    """Raise InvalidAddress unless ``address`` is one address that SMTP can carry (a lazy string is resolved)."""
    address = _resolved(address)
    if isinstance(address, str) and is_plain_address(address):
        return
    if not isinstance(address, str):
        raise InvalidAddress(f"{where} is {address!r}, not an email address")
    if "\r" in address or "\n" in address:
        raise InvalidAddress(f"{where} contains a line break: {address!r}")
    if len(address) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress(f"{where} is longer than {MAX_ADDRESS_LENGTH} characters: {reprlib.repr(address)}")
    try:
        mailboxes, defects = _read_as_django_52(address) if django.VERSION < (6, 0) else _read_as_django_6(address)
    except Exception as exc:  # Python's parser stumbles on some input ('"', '0@[', ':;a@b') with IndexError...
        raise InvalidAddress(f"{where} is not a valid address: {address!r}") from exc
    for local_part, domain in mailboxes:
        if local_part is None or (domain is None and "@" in address):
            raise InvalidAddress(f"{where} is not a valid address: {address!r}")
        if not local_part.isascii():
            raise InvalidAddress(f"{where} has a non-ASCII part before the @, which SMTP cannot carry: {address!r}")
    if defects:
        raise InvalidAddress(f"{where} is not a valid address: {address!r} ({'; '.join(defects)})")
    if len(mailboxes) != 1:
        raise InvalidAddress(f"{where} must be one address, not {address!r}")
    [(_local_part, domain)] = mailboxes
    if domain and not domain.isascii():
        try:
            domain.encode("idna")
        except UnicodeError as exc:
            raise InvalidAddress(f"{where} has a domain that cannot be written in ASCII: {address!r}") from exc


# An address as a (local part, domain) pair; the parser leaves them None (typeshed says str) for "<>", "a@b@c",
# "a@x..y".
Mailbox = tuple[str | None, str | None]


def _read_as_django_6(address: str) -> tuple[list[Mailbox], list[str]]:
    """The mailboxes in ``address`` and the defects that make Django 6 refuse it, as its SMTP backend reads it."""
    parsed = AddressHeader.value_parser(address)
    mailboxes: list[Mailbox] = [(each.local_part, each.domain) for each in parsed.all_mailboxes]
    return mailboxes, sorted({str(defect) for defect in parsed.all_defects} - ALLOWED_DEFECTS)


def _read_as_django_52(address: str) -> tuple[list[Mailbox], list[str]]:
    """The mailbox in ``address`` as Django 5.2's SMTP backend reads it (``sanitize_address``): one mailbox, all
    of the text, whatever defects the parser notes ("Acme Inc. <a@example.com>", with its period, is sent).
    """
    token, rest = get_mailbox(address)
    if rest:
        mailboxes, _defects = _read_as_django_6(address)
        if len(mailboxes) > 1:
            return mailboxes, []  # several: refused as such
        raise ValueError(f"only {token} could be read")
    if any("missing '.' between words" in str(defect) for defect in token.all_defects):
        raise ValueError("words, not an address")  # Django would send it quoted, to no one
    return [(token.local_part, token.domain)], []


def is_plain_address(address: str) -> bool:
    """Return whether ``address`` is in its plainest form (``PLAIN_ADDRESS``), which needs no parsing to be trusted.

    A display name may hold any printable character beyond ASCII; control
    characters, line separators and lone surrogates make it not plain.
    """
    return PLAIN_ADDRESS.fullmatch(address) is not None and (address.isascii() or address.isprintable())


def bare_address(recipient: str) -> str:
    """Return the bare, lower-cased address in ``recipient``, as ``mailer.redaction.address_of`` does, but
    without parsing a plain one (``is_plain_address``): the don't-send lookup needs it for every recipient.
    """
    recipient = _resolved(recipient)
    if recipient.isascii() or recipient.isprintable():
        match = PLAIN_ADDRESS.fullmatch(recipient)
        if match is not None:
            return (match[1] or match[2]).lower()
    return address_of(recipient)


def _as_list(value: Any, field: str) -> Iterable[Any]:
    if isinstance(value, (list, tuple)):
        return value
    raise InvalidAddress(f"{field} must be a list or tuple of addresses, not {type(value).__name__}")


def check_headers(email: EmailMessage) -> None:
    """Raise InvalidHeader, naming the header, unless every extra header of ``email`` (and its subject and
    attachment names, for a NUL) can be sent as given.

    Without this, a bad name would be queued and sent (a header injection on
    Django 5.2, a garbled header on 6.1), and a bad value would fail here
    with a TypeError or AttributeError, or be queued and then fail in the
    cron job.
    """
    problem = headers_problem(email)  # first: the email package folds a header in time that grows with its square
    if problem is not None:
        raise InvalidHeader(problem)
    for name, value in _header_items(email):
        check_header_name(name)
        check_header_value(name, value)
    # NUL is no line break, and Django writes it out; mail software written in C reads a header only up to it.
    subject = _resolved(email.subject)
    if isinstance(subject, str) and NUL in subject:
        raise InvalidHeader(f"the subject contains a NUL character: {reprlib.repr(subject)}")
    for attachment in email.attachments:
        if isinstance(attachment, MIMEMessage):  # a MIME part: its name is a parameter of its headers
            filename = attachment.get_filename()
        else:
            filename = attachment[0] if isinstance(attachment, tuple) and attachment else None
        if isinstance(filename, str) and NUL in filename:
            raise InvalidHeader(f"an attachment's file name contains a NUL character: {reprlib.repr(filename)}")


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
    if NUL in value:
        raise InvalidHeader(f"header {name!r} contains a NUL character: {reprlib.repr(value)}")
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


# Plain emails --------------------------------------------------------------

# The headers Python's email package parses (addresses, dates, MIME
# parameters), and those Django sets or refuses itself: an email that names
# one among its extra headers is rendered when queued.
STRUCTURED_HEADERS = frozenset(
    {
        "bcc", "cc", "content-disposition", "content-transfer-encoding", "content-type", "date", "from",
        "message-id", "mime-version", "orig-date", "reply-to", "resent-bcc", "resent-cc", "resent-date",
        "resent-from", "resent-sender", "resent-to", "return-path", "sender", "subject", "to",
    }
)  # fmt: skip

# A MIME type of an attachment that Django writes out the same way on every
# version: lower case, no parameters, not a message or a multipart.
PLAIN_ATTACHMENT_TYPE = re.compile(r"(?!message/|multipart/)[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")
PLAIN_ALTERNATIVE_TYPE = re.compile(r"text/[a-z0-9][a-z0-9!#$&^_.+-]*")

# A Message-ID in its plainest form (RFC 5322, 3.6.4): <dot-atom@dot-atom>.
PLAIN_MESSAGE_ID = re.compile(rf"<{_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*>")


def is_plain(email: EmailMessage) -> bool:
    """Return whether Django renders ``email`` without fail, as it can be told from its fields alone.

    Rendering a message (``email.message()``) costs more than storing it
    (a millisecond on Django 6.1), so it is done when queueing only when
    needed to find out. It is not needed for what nearly all mail is: a
    Django ``EmailMessage`` or ``EmailMultiAlternatives`` in UTF-8, whose
    subject, body and texts are text that UTF-8 can carry, whose addresses
    are plain (``is_plain_address``), whose extra headers are one-line text
    that Python's email package does not parse (or a plain Message-ID), with
    text alternatives, and
    attachments that are bytes of a plain MIME type or text of a ``text/``
    one. Anything else (a subclass, another charset, a ``MIMEBase`` part, a
    ``message/rfc822`` attachment, a display name Python parses with a
    defect...) is rendered, and what Django raises then reaches the caller.
    The addresses and headers must have passed ``check_addresses``.
    """
    if type(email) is not EmailMessage and type(email) is not EmailMultiAlternatives:
        return False
    attributes = vars(email)
    if "mixed_subtype" in attributes or "alternative_subtype" in attributes:
        return False  # Django 6.1 refuses them, 5.2 writes them out
    if (email.encoding or settings.DEFAULT_CHARSET) != "utf-8" or email.content_subtype not in ("plain", "html"):
        return False
    if not (_is_sendable_text(email.subject) and LINE_BREAKS.isdisjoint(email.subject)) or ENCODED in email.subject:
        return False
    if not _is_sendable_text(email.body) or not isinstance(email.from_email, str):
        return False
    if not is_plain_address(email.from_email):
        return False
    for addresses in (email.to, email.cc, email.reply_to):
        if type(addresses) is not list or not all(isinstance(a, str) and is_plain_address(a) for a in addresses):
            return False
    message_ids = 0
    for name, value in email.extra_headers.items():
        if not (isinstance(name, str) and FIELD_NAME.fullmatch(name)):
            return False
        if not (_is_sendable_text(value) and LINE_BREAKS.isdisjoint(value)) or ENCODED in value:
            return False
        if name.lower() == "message-id" and PLAIN_MESSAGE_ID.fullmatch(value):
            message_ids += 1  # a site's own, in its plainest form; Django 6.1 takes one only
        elif name.lower() in STRUCTURED_HEADERS:
            return False
    if message_ids > 1:
        return False
    if not all(_is_plain_attachment(attachment) for attachment in email.attachments):
        return False
    if isinstance(email, EmailMultiAlternatives):
        return all(_is_plain_alternative(alternative) for alternative in email.alternatives)
    return True


def _is_sendable_text(text: Any) -> bool:
    """Return whether ``text`` is a str that UTF-8 can carry."""
    return type(text) is str and is_utf8(text)


def is_utf8(text: str) -> bool:
    """Return whether UTF-8 can carry ``text``: whether it holds no lone surrogate."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_plain_attachment(attachment: Any) -> bool:
    if not isinstance(attachment, tuple) or len(attachment) != 3:
        return False  # a MIME part: rendered
    filename, content, mimetype = attachment
    if filename is not None and not (_is_sendable_text(filename) and filename and filename.isprintable()):
        return False
    if not (isinstance(mimetype, str) and PLAIN_ATTACHMENT_TYPE.fullmatch(mimetype)):
        return False
    if mimetype.startswith("text/"):
        return _is_sendable_text(content)
    return type(content) is bytes


def _is_plain_alternative(alternative: Any) -> bool:
    if not isinstance(alternative, EmailAlternative):
        return False  # Django 6.1 reads .mimetype: a bare tuple fails there
    content, mimetype = alternative
    return _is_sendable_text(content) and isinstance(mimetype, str) and bool(PLAIN_ALTERNATIVE_TYPE.fullmatch(mimetype))
