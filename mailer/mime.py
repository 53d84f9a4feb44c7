"""MIME objects that mailer reads back from storage."""

import email.message
import email.policy
import re
from email.mime.base import MIMEBase
from typing import Any


class StoredMIMEBase(MIMEBase):
    """A legacy ``email.mime`` attachment read back from storage.

    Django treats ``MIMEBase`` instances as ready-made parts; the parser
    needs a class it can create without arguments, which ``MIMEBase`` is not.
    """

    def __init__(self, policy: Any = email.policy.compat32) -> None:
        email.message.Message.__init__(self, policy=policy)


# Python's email package folds and parses some headers in quadratic time, and
# walks nested parts line by line at every level: a stored MIME object must
# stay within these before it is rendered.
MAX_PARTS = 200
MAX_HEADER_LENGTH = 4096
MAX_HEADERS_LENGTH = 32768


def check_bounds(part: email.message.Message) -> None:
    """Raise ValueError if ``part`` has more parts, or longer headers, than a stored attachment may have."""
    total = 0
    multiparts = 0
    for count, each in enumerate(part.walk(), start=1):
        if count > MAX_PARTS:
            raise ValueError(f"a MIME attachment of more than {MAX_PARTS} parts")
        multiparts += each.is_multipart()
        if multiparts > MAX_MULTIPARTS:
            raise ValueError(f"a MIME attachment of more than {MAX_MULTIPARTS} multipart parts")
        for name, value in each.raw_items():
            length = len(str(value))
            total += length
            if length > MAX_HEADER_LENGTH:
                raise ValueError(f"a MIME header ({name!s:.40}) longer than {MAX_HEADER_LENGTH} characters")
            if total > MAX_HEADERS_LENGTH:
                raise ValueError(f"MIME headers longer than {MAX_HEADERS_LENGTH} characters in all")


# The same holds for an email's own headers. The package parses addresses
# one by one (a run of '"' twenty thousand long takes seconds), and folds
# every header value in time that grows with the square of its length (a
# subject of 400,000 characters: seconds; with accents, minutes). So an
# address may be as long as a line of a message (RFC 5322), and the
# addresses of the To, Cc, Reply-To and From fields and of the address
# headers together some four thousand ordinary ones; Bcc is not written out
# as a header, so its addresses are bounded one by one only. The subject and
# each header value may be 16,384 characters long, 65,536 together; a
# header the package parses for MIME parameters or a Message-ID, 4,096.
MAX_ADDRESS_LENGTH = 998
MAX_ADDRESSES_LENGTH = 100_000
MAX_HEADER_VALUE_LENGTH = 16_384
MAX_HEADER_VALUES_LENGTH = 65_536

# The headers the email package parses as addresses, and those it parses otherwise.
ADDRESS_HEADERS = frozenset(
    {
        "bcc", "cc", "from", "reply-to", "resent-bcc", "resent-cc", "resent-from", "resent-sender", "resent-to",
        "sender", "to",
    }
)  # fmt: skip
PARSED_HEADERS = frozenset({"content-disposition", "content-type", "message-id"})

# A part nested in others is read once for each multipart above it: a stored
# MIME object may have this many multipart containers.
MAX_MULTIPARTS = 20


def addresses_problem(message: Any) -> str | None:
    """Why the addresses of the email ``message`` (its fields, and its extra address headers) are too long to
    render in bounded time, or None. Values that are not text are left to the checks of their types.
    """
    total = 0
    for field in ("from_email", "to", "cc", "reply_to", "bcc"):
        value = getattr(message, field, None)
        for address in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
            if not isinstance(address, str):
                continue
            if len(address) > MAX_ADDRESS_LENGTH:
                return f"{field} has an address longer than {MAX_ADDRESS_LENGTH} characters"
            if field != "bcc":
                total += len(address)
    for name, value in _extra_headers(message):
        if name.lower() in ADDRESS_HEADERS and isinstance(value, str):
            # Split where a list of addresses is: a quoted comma only makes the pieces shorter.
            if any(len(piece) > MAX_ADDRESS_LENGTH for piece in value.split(",")):
                return f"header {name:.40} has an address longer than {MAX_ADDRESS_LENGTH} characters"
            total += len(value)
    if total > MAX_ADDRESSES_LENGTH:
        return f"the addresses of To, Cc, Reply-To and From are longer than {MAX_ADDRESSES_LENGTH} characters in all"
    return None


def headers_problem(message: Any) -> str | None:
    """Why the subject or the extra headers of the email ``message`` are too long to render in bounded time,
    or None. Values that are not text are left to the checks of their types.
    """
    subject = getattr(message, "subject", None)
    total = len(subject) if isinstance(subject, str) else 0
    if total > MAX_HEADER_VALUE_LENGTH:
        return f"the subject is longer than {MAX_HEADER_VALUE_LENGTH} characters"
    for name, value in _extra_headers(message):
        length = len(value) if isinstance(value, str) else 0
        limit = MAX_HEADER_LENGTH if name.lower() in PARSED_HEADERS else MAX_HEADER_VALUE_LENGTH
        if length > limit:
            return f"header {name:.40} is longer than {limit} characters"
        total += length
    if total > MAX_HEADER_VALUES_LENGTH:
        return f"the subject and the headers are longer than {MAX_HEADER_VALUES_LENGTH} characters in all"
    return None


def _extra_headers(message: Any) -> list[tuple[str, Any]]:
    headers = getattr(message, "extra_headers", None)
    if not isinstance(headers, dict):
        return []
    return [(name, value) for name, value in headers.items() if isinstance(name, str)]


def check_source_bounds(source: bytes) -> None:
    """Raise ValueError if the MIME ``source`` declares more multipart containers than it may have.

    Checked before parsing: the parser reads every line once for each
    multipart that encloses it.
    """
    if len(_MULTIPART_DECLARATION.findall(source)) > MAX_MULTIPARTS:
        raise ValueError(f"a MIME attachment of more than {MAX_MULTIPARTS} multipart parts")


_MULTIPART_DECLARATION = re.compile(rb"^content-type:[ \t]*multipart/", re.IGNORECASE | re.MULTILINE)
